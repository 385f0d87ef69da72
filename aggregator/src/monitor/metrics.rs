//! `/metrics`: a snapshot in the Prometheus text exposition format (version 0.0.4). Names and
//! units follow Prometheus' conventions: counters end in `_total`, sizes in `_bytes`, times in
//! `_seconds`; ratios are 0..1. The book's "Watching a fleet" lists them; a test runs
//! `promtool check metrics` on the output.

use std::fmt::Write;

use super::Live;

/// Upper bounds (seconds) of the round-duration histogram's buckets.
pub const ROUND_SECONDS_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A label value, escaped as the format wants (`\\`, `\"`, `\n`).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.0, " {}", fmt(value));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.head(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn b(v: bool) -> f64 {
    if v { 1.0 } else { 0.0 }
}

/// The metrics of `live`.
pub fn render(live: &Live) -> String {
    let mut o = Out(String::new());
    o.head(
        "fedpeft_run_info",
        "gauge",
        "The run: fleet, run id, strategy and PEFT method (always 1).",
    );
    let run_id = live.run_id.clone();
    o.sample(
        "fedpeft_run_info",
        &[
            ("fleet", &live.fleet),
            ("run_id", &run_id),
            ("strategy", &live.strategy),
            ("peft", &live.peft),
        ],
        1.0,
    );
    o.one(
        "fedpeft_run_finished",
        "gauge",
        "1 once every planned round is done.",
        b(live.finished),
    );
    o.one(
        "fedpeft_rounds_planned",
        "gauge",
        "Rounds the run is configured for.",
        f64::from(live.rounds_planned),
    );
    o.one(
        "fedpeft_round",
        "gauge",
        "The open round, or the next one while waiting for clients.",
        f64::from(live.round),
    );
    o.head(
        "fedpeft_round_phase",
        "gauge",
        "1 for the phase the run is in: waiting (for clients), collecting (a round is open), done.",
    );
    for p in ["waiting", "collecting", "done"] {
        o.sample("fedpeft_round_phase", &[("phase", p)], b(live.phase == p));
    }
    if let (Some(start), Some(deadline)) = (live.round_started_ms, live.deadline_ms) {
        o.one(
            "fedpeft_round_started_timestamp_seconds",
            "gauge",
            "When the open round was announced (Unix time).",
            start as f64 / 1e3,
        );
        o.one(
            "fedpeft_round_deadline_timestamp_seconds",
            "gauge",
            "The open round's deadline (Unix time).",
            deadline as f64 / 1e3,
        );
    }
    let t = &live.totals;
    o.one(
        "fedpeft_clients_joined",
        "gauge",
        "Clients that have joined the run.",
        t.clients_joined as f64,
    );
    o.one(
        "fedpeft_clients_online",
        "gauge",
        "Joined clients that are online (no last will or offline status since).",
        t.clients_online as f64,
    );
    o.one(
        "fedpeft_clients_sampled",
        "gauge",
        "Clients sampled in the open round.",
        live.sampled.len() as f64,
    );
    o.one(
        "fedpeft_round_updates_accepted",
        "gauge",
        "Updates accepted so far in the open round.",
        live.accepted.len() as f64,
    );
    o.head(
        "fedpeft_rounds_total",
        "counter",
        "Closed rounds after the initial adapter, by outcome.",
    );
    for status in ["ok", "failed"] {
        let n = live.rounds.iter().filter(|r| r.status == status).count();
        o.sample("fedpeft_rounds_total", &[("status", status)], n as f64);
    }
    o.one(
        "fedpeft_updates_accepted_total",
        "counter",
        "Client updates accepted over the run.",
        t.updates_accepted as f64,
    );
    o.head(
        "fedpeft_messages_refused_total",
        "counter",
        "Messages refused over the run, by reason (the report's refusal reasons).",
    );
    for (reason, n) in &t.refused {
        o.sample(
            "fedpeft_messages_refused_total",
            &[("reason", reason)],
            *n as f64,
        );
    }
    o.head(
        "fedpeft_bytes_total",
        "counter",
        "MQTT bytes (framing included) by direction and message kind: up from clients, down to \
         each receiving client.",
    );
    for (kind, (up, down)) in &t.bytes_by_kind {
        if *up > 0 {
            o.sample(
                "fedpeft_bytes_total",
                &[("direction", "up"), ("kind", kind)],
                *up as f64,
            );
        }
        if *down > 0 {
            o.sample(
                "fedpeft_bytes_total",
                &[("direction", "down"), ("kind", kind)],
                *down as f64,
            );
        }
    }
    o.head(
        "fedpeft_messages_total",
        "counter",
        "MQTT packets by direction.",
    );
    o.sample(
        "fedpeft_messages_total",
        &[("direction", "up")],
        t.up_messages as f64,
    );
    o.sample(
        "fedpeft_messages_total",
        &[("direction", "down")],
        t.down_messages as f64,
    );
    o.one(
        "fedpeft_full_model_fedavg_bytes_total",
        "counter",
        "Bytes full-model FedAvg would have moved for the same rounds (the comparison).",
        t.full_model_fedavg_bytes as f64,
    );
    // Closed rounds' durations (round 0, the initial adapter, has none).
    let durations: Vec<f64> = live
        .rounds
        .iter()
        .filter(|r| r.round > 0)
        .map(|r| r.duration_ms as f64 / 1e3)
        .collect();
    o.head(
        "fedpeft_round_duration_seconds",
        "histogram",
        "Closed rounds' time from announcement to close.",
    );
    for le in ROUND_SECONDS_BUCKETS {
        let n = durations.iter().filter(|&&d| d <= le).count();
        o.sample(
            "fedpeft_round_duration_seconds_bucket",
            &[("le", &fmt(le))],
            n as f64,
        );
    }
    o.sample(
        "fedpeft_round_duration_seconds_bucket",
        &[("le", "+Inf")],
        durations.len() as f64,
    );
    o.sample(
        "fedpeft_round_duration_seconds_sum",
        &[],
        durations.iter().sum(),
    );
    o.sample(
        "fedpeft_round_duration_seconds_count",
        &[],
        durations.len() as f64,
    );
    if let Some(r) = live.rounds.iter().rev().find(|r| r.eval_accuracy.is_some()) {
        o.one(
            "fedpeft_eval_round",
            "gauge",
            "The round whose global adapter was evaluated last.",
            f64::from(r.round),
        );
        o.one(
            "fedpeft_eval_accuracy_ratio",
            "gauge",
            "Held-out accuracy of the last evaluated global adapter (0..1).",
            r.eval_accuracy.unwrap_or(f64::NAN),
        );
        if let Some(loss) = r.eval_loss {
            o.one(
                "fedpeft_eval_loss",
                "gauge",
                "Held-out mean cross-entropy of the last evaluated global adapter.",
                loss,
            );
        }
    }
    if let Some((round, ms)) = live
        .rounds
        .iter()
        .rev()
        .find_map(|r| r.secure_stage_ms.map(|ms| (r.round, ms)))
    {
        o.one(
            "fedpeft_secagg_round",
            "gauge",
            "The last secure-aggregation round.",
            f64::from(round),
        );
        o.head(
            "fedpeft_secagg_stage_seconds",
            "gauge",
            "Wall time of each stage of the last secure-aggregation round (keys includes local \
             training).",
        );
        for (stage, v) in ["keys", "shares", "masked", "unmask"].iter().zip(ms) {
            o.sample(
                "fedpeft_secagg_stage_seconds",
                &[("stage", stage)],
                v as f64 / 1e3,
            );
        }
    }
    let eps: Vec<(&str, &str, f64)> = [
        ("client", "aggregator", t.dp_epsilon),
        ("sample", "max", t.local_dp_epsilon_max),
        ("sample", "median", t.local_dp_epsilon_median),
    ]
    .into_iter()
    .filter_map(|(l, s, v)| v.map(|v| (l, s, v)))
    .collect();
    if !eps.is_empty() {
        o.head(
            "fedpeft_dp_epsilon",
            "gauge",
            "Privacy spent: client-level DP at the aggregator, and sample-level DP-SGD as the \
             clients state it (the largest and the median).",
        );
        for (level, stat, v) in eps {
            o.sample("fedpeft_dp_epsilon", &[("level", level), ("stat", stat)], v);
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::super::{RoundRow, Totals};
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_are_escaped() {
        let live = Live {
            fleet: "a\"b\\c".into(),
            rounds: [(0, 0), (1, 1500), (2, 40_000)]
                .map(|(round, duration_ms)| RoundRow {
                    round,
                    status: if round == 0 { "initial" } else { "ok" }.into(),
                    duration_ms,
                    eval_accuracy: Some(0.5),
                    secure_stage_ms: (round == 2).then_some([30_000, 1500, 250, 8000]),
                    ..RoundRow::default()
                })
                .to_vec(),
            totals: Totals::default(),
            ..Live::default()
        };
        let m = render(&live);
        assert!(m.contains(r#"fleet="a\"b\\c""#), "{m}");
        assert!(m.contains("fedpeft_secagg_round 2\n"), "{m}");
        assert!(
            m.contains("fedpeft_secagg_stage_seconds{stage=\"unmask\"} 8\n"),
            "{m}"
        );
        assert!(m.contains("fedpeft_round_duration_seconds_bucket{le=\"1\"} 0\n"));
        assert!(m.contains("fedpeft_round_duration_seconds_bucket{le=\"2\"} 1\n"));
        assert!(m.contains("fedpeft_round_duration_seconds_bucket{le=\"60\"} 2\n"));
        assert!(m.contains("fedpeft_round_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(m.contains("fedpeft_round_duration_seconds_sum 41.5\n"));
        assert!(m.contains("fedpeft_rounds_total{status=\"ok\"} 2\n"));
        assert!(m.contains("fedpeft_eval_accuracy_ratio 0.5\n"));
    }

    /// Every metric the Grafana dashboard in `deploy/` queries is one `/metrics` serves.
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_that_exist() {
        let live = Live {
            phase: "collecting",
            round_started_ms: Some(1),
            deadline_ms: Some(2),
            rounds: vec![RoundRow {
                round: 1,
                status: "ok".into(),
                eval_accuracy: Some(0.5),
                eval_loss: Some(1.0),
                ..RoundRow::default()
            }],
            totals: Totals {
                refused: [("malformed".to_string(), 1)].into(),
                bytes_by_kind: [("update".to_string(), (1, 1))].into(),
                dp_epsilon: Some(1.0),
                local_dp_epsilon_max: Some(1.0),
                local_dp_epsilon_median: Some(1.0),
                ..Totals::default()
            },
            ..Live::default()
        };
        let served: std::collections::BTreeSet<String> = render(&live)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
            .collect();
        let dash: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/grafana/fedpeft-fleet.json"))
                .expect("the dashboard is JSON");
        let mut queried = 0;
        for panel in dash["panels"].as_array().expect("panels") {
            for t in panel["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                for (i, _) in expr.match_indices("fedpeft_") {
                    let name: String = expr[i..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(served.contains(&name), "`{name}` in `{expr}` is not served");
                    queried += 1;
                }
            }
        }
        assert!(queried >= 15, "{queried}");
    }
}
