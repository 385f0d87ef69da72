//! The run report: built from the machine state, written as JSON (the schema is
//! [`fedpeft_config::report`], which the fleet runner reads back), CSV (one row per round) and a
//! summary table.
//!
//! Byte counts are MQTT PUBLISH packets including framing (see [`crate::accounting`]).

use std::fmt::Write as _;
use std::path::Path;

pub use fedpeft_config::report::{LocalDp, Report, RobustTotals, SCHEMA, Totals};

use crate::accounting::Ledger;
use crate::round::{MachineState, RoundRecord};

/// Each client's latest stated ε over `rounds` (in round order), or `None` if none stated one.
pub fn local_dp(rounds: &[RoundRecord]) -> Option<LocalDp> {
    let mut clients = std::collections::BTreeMap::new();
    for r in rounds {
        for (id, &eps) in &r.local_dp_epsilon {
            clients.insert(id.clone(), eps);
        }
    }
    let (median, max) = median_and_max(clients.values().copied())?;
    Some(LocalDp {
        clients,
        median,
        max,
    })
}

/// Median and largest of `values`, or `None` for none.
fn median_and_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.collect();
    let median = crate::strategy::median_of(&v)?;
    Some((median, v.iter().copied().fold(f64::MIN, f64::max)))
}

/// Static facts about the run that the machine state does not hold.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub fleet: String,
    pub peft: String,
    pub rounds_planned: u32,
    pub backbone_params: u64,
}

/// The report of a run in `state`, with the traffic `ledger` counted.
pub fn build(state: &MachineState, ledger: &Ledger, info: &RunInfo, finished: bool) -> Report {
    let t = ledger.total;
    let last_dp = state
        .records
        .iter()
        .rev()
        .find(|r| r.robust.dp_epsilon.is_some());
    let full: u64 = state
        .records
        .iter()
        .map(|r| r.full_model_fedavg_bytes)
        .sum();
    Report {
        schema: SCHEMA.into(),
        run_id: state.run_id,
        fleet: info.fleet.clone(),
        strategy: state.strategy.clone(),
        peft: info.peft.clone(),
        rounds_planned: info.rounds_planned,
        trainable_params: state.global.num_params(),
        backbone_params: info.backbone_params,
        finished,
        totals: Totals {
            up_bytes: t.up_bytes,
            down_bytes: t.down_bytes,
            up_messages: t.up_messages,
            down_messages: t.down_messages,
            aggregator_published_bytes: ledger.aggregator_published_bytes,
            full_model_fedavg_bytes: full,
            ratio_to_full_model: (full > 0)
                .then(|| (t.up_bytes + t.down_bytes) as f64 / full as f64),
        },
        rejected: state.rejected_total.clone(),
        clients: ledger.per_client.clone(),
        rounds: state
            .records
            .iter()
            .map(|r| RoundRecord {
                traffic: ledger.round(r.round),
                ..r.clone()
            })
            .collect(),
        robust: RobustTotals {
            clipped_total: state.clipped_total,
            dp_epsilon: last_dp.and_then(|r| r.robust.dp_epsilon),
            dp_delta: last_dp.and_then(|r| r.robust.dp_delta),
        },
        local_dp: local_dp(&state.records),
        globals: None,
        round_timing: Vec::new(),
    }
}

/// One CSV row per round.
pub fn csv(report: &Report) -> String {
    let mut s = String::from(
        "round,status,sampled,clients_ok,clients_failed,rejected,train_loss,train_accuracy,eval_loss,eval_accuracy,up_bytes,down_bytes,full_model_fedavg_bytes,duration_ms,clipped,dp_epsilon,local_dp_epsilon_median,local_dp_epsilon_max\n",
    );
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    for r in &report.rounds {
        let local = median_and_max(r.local_dp_epsilon.values().copied());
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.round,
            r.status,
            r.sampled.len(),
            r.clients_ok,
            r.clients_failed,
            r.rejected.values().sum::<u64>(),
            opt(r.train_loss),
            opt(r.train_accuracy),
            opt(r.eval_loss),
            opt(r.eval_accuracy),
            r.traffic.up_bytes,
            r.traffic.down_bytes,
            r.full_model_fedavg_bytes,
            r.duration_ms,
            r.robust.clipped,
            opt(r.robust.dp_epsilon),
            opt(local.map(|l| l.0)),
            opt(local.map(|l| l.1))
        );
    }
    s
}

/// A table for people.
pub fn summary(report: &Report) -> String {
    let mut s = String::new();
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.2}%", 100.0 * x))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        s,
        "run {} · fleet {} · {} · {} · {} trainable parameters",
        report.run_id, report.fleet, report.strategy, report.peft, report.trainable_params
    );
    let _ = writeln!(
        s,
        "{:>5}  {:<7} {:>4} {:>6} {:>8} {:>9} {:>9} {:>12} {:>12} {:>9}",
        "round",
        "status",
        "ok",
        "failed",
        "rejected",
        "eval acc",
        "eval loss",
        "up bytes",
        "down bytes",
        "secs"
    );
    for r in &report.rounds {
        let _ = writeln!(
            s,
            "{:>5}  {:<7} {:>4} {:>6} {:>8} {:>9} {:>9} {:>12} {:>12} {:>9.1}",
            r.round,
            r.status,
            r.clients_ok,
            r.clients_failed,
            r.rejected.values().sum::<u64>(),
            pct(r.eval_accuracy),
            r.eval_loss
                .map(|x| format!("{x:.4}"))
                .unwrap_or_else(|| "-".into()),
            r.traffic.up_bytes,
            r.traffic.down_bytes,
            r.duration_ms as f64 / 1000.0
        );
    }
    let t = &report.totals;
    let _ = writeln!(
        s,
        "total: {} bytes up, {} bytes down ({} published by the aggregator); full-model FedAvg would move {} bytes{}",
        t.up_bytes,
        t.down_bytes,
        t.aggregator_published_bytes,
        t.full_model_fedavg_bytes,
        t.ratio_to_full_model
            .map(|r| format!(" (this run: {:.4}% of it, {:.0}x less)", 100.0 * r, 1.0 / r))
            .unwrap_or_default()
    );
    if report.robust.clipped_total > 0 {
        let per_round: Vec<String> = report
            .rounds
            .iter()
            .filter(|r| r.round > 0)
            .map(|r| r.robust.clipped.to_string())
            .collect();
        let _ = writeln!(
            s,
            "norm bound: {} updates clipped (per round: {})",
            report.robust.clipped_total,
            per_round.join(" ")
        );
    }
    if let (Some(eps), Some(delta)) = (report.robust.dp_epsilon, report.robust.dp_delta) {
        let _ = writeln!(s, "client-level DP: ε = {eps:.3} at δ = {delta:e}");
    }
    if let Some(l) = &report.local_dp {
        let _ = writeln!(
            s,
            "DP-SGD on the clients (their own accountants): ε median {:.3}, largest {:.3}, over {} clients",
            l.median,
            l.max,
            l.clients.len()
        );
    }
    if !report.rejected.is_empty() {
        let list: Vec<String> = report
            .rejected
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "rejected: {}", list.join(", "));
    }
    s
}

/// Writes `report.json` and `report.csv` into `dir` (each atomically: temp + rename).
pub fn write(report: &Report, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    crate::checkpoint::write_atomic(&dir.join("report.json"), json.as_bytes())?;
    crate::checkpoint::write_atomic(&dir.join("report.csv"), csv(report).as_bytes())
}
