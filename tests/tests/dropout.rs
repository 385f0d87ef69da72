//! Dropout and stragglers end to end: `fedpeft-fleet` runs small LoRA trials (the real
//! aggregator with its embedded broker, real edge-client processes on EfficientNet-Lite0 at
//! 96 px, 64 examples each, the e2e activation cache).
//!
//! - With `dropout = 0.3`, a sampled client whose keyed draw for the round falls below 0.3
//!   trains, then drops its connection without publishing; the broker delivers its last will,
//!   the aggregator counts it `offline` and closes the round as soon as every other sampled
//!   client has answered (the deadline is 600 s, far beyond the test's own limit, so a round
//!   that waited for it would fail the test), and the client comes back for the next round.
//!   The dropouts must be exactly the ones the draws predict, and every client's summary must
//!   list the rounds it vanished in.
//! - With one straggler holding its update for an hour and a 30 s deadline, each round closes
//!   at the deadline with the straggler counted late and the others' updates aggregated.

use std::path::Path;
use std::time::Duration;

use fedpeft_protocol::keyed_unit;
use fedpeft_protocol::rng::DROPOUT_PURPOSE;
use fedpeft_tests::e2e::{round_record, run_fleet, small_trial as trial};

const DROPOUT: f64 = 0.3;

/// Runs a trial file with `fedpeft-fleet`; returns the report and the output folder.
fn run(path: &Path, out: &Path, limit: Duration) -> serde_json::Value {
    let report = run_fleet(path, out, limit).report;
    // The trial's plots were drawn.
    for name in [
        "accuracy_vs_round",
        "accuracy_vs_bytes",
        "round_time_per_preset",
    ] {
        let png = std::fs::read(out.join(format!("{name}.png"))).expect("PNG plot");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}.png");
        let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).expect("SVG plot");
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}.svg"
        );
    }
    report
}

/// Whether client `index` vanishes in `round` for `seed` (the edge client's own rule).
fn drops(seed: u64, index: usize, round: u32) -> bool {
    keyed_unit(seed, DROPOUT_PURPOSE, index as u64, u64::from(round)) < DROPOUT
}

#[test]
fn clients_that_vanish_mid_round_are_counted_dropped_and_the_round_closes_without_them() {
    let (clients, rounds) = (4usize, 3u32);
    // A seed whose draws drop at least one client in round 1 and never more than two in a
    // round (quorum 2 of 4).
    let seed = (1u64..)
        .find(|&s| {
            (0..clients).any(|i| drops(s, i, 1))
                && (1..=rounds)
                    .all(|r| (0..clients).filter(|&i| drops(s, i, r)).count() <= clients - 2)
        })
        .expect("a seed");
    let dir = tempfile::tempdir().expect("temp dir");
    let top = format!(
        "round_timeout_secs = 600\nseed = {seed}\ndropout = {DROPOUT}\ndropout_offline_secs = 1.0"
    );
    let path = trial(dir.path(), "dropout", clients, rounds, &top, "");
    let out = dir.path().join("out");
    let report = run(&path, &out, Duration::from_secs(500));

    let part = &report["participation"];
    assert_eq!(part["dropout"], DROPOUT);
    let mut total = 0;
    for round in 1..=rounds {
        let expected: Vec<String> = (0..clients)
            .filter(|&i| drops(seed, i, round))
            .map(|i| format!("client-{i:02}"))
            .collect();
        total += expected.len();
        let rec = round_record(&report, round);
        assert_eq!(rec["status"], "ok", "round {round}: {rec}");
        let p = &part["rounds"][(round - 1) as usize];
        eprintln!("round {round}: expected dropouts {expected:?}; {p}");
        assert_eq!(p["round"], round);
        assert_eq!(p["sampled"], clients, "round {round}: {p}");
        assert_eq!(p["dropped"], expected.len(), "round {round}: {p}");
        assert_eq!(
            p["dropped_clients"],
            serde_json::json!(expected),
            "round {round}"
        );
        assert_eq!(
            p["accepted"],
            clients - expected.len(),
            "round {round}: {p}"
        );
        assert_eq!(
            p["late"], 0,
            "round {round}: nobody waits for the deadline: {p}"
        );
    }
    assert!(total >= 1);
    // Each client's own account of the rounds it vanished in.
    for i in 0..clients {
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("clients/client-{i:02}.json")))
                .expect("client summary"),
        )
        .expect("JSON");
        let expected: Vec<u32> = (1..=rounds).filter(|&r| drops(seed, i, r)).collect();
        assert_eq!(
            summary["dropped_rounds"],
            serde_json::json!(expected),
            "client {i}: {summary}"
        );
        assert_eq!(
            summary["exit"], "run_done",
            "client {i} came back and finished"
        );
        let connects = summary["connects"].as_u64().expect("connects") as usize;
        assert!(
            connects > expected.len(),
            "client {i}: {connects} connects after {} dropouts",
            expected.len()
        );
    }
}

#[test]
fn a_straggler_past_the_deadline_is_counted_late_and_the_round_aggregates_the_others() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (clients, rounds) = (3usize, 2u32);
    let top = "round_timeout_secs = 30\nseed = 5";
    let tail = "[stragglers]\nfraction = 0.3\ndelay_secs = 3600.0";
    let path = trial(dir.path(), "straggler", clients, rounds, top, tail);
    let out = dir.path().join("out");
    let report = run(&path, &out, Duration::from_secs(400));

    let part = &report["participation"];
    let stragglers = part["stragglers"].as_array().expect("stragglers").clone();
    assert_eq!(stragglers.len(), 1, "round(0.3 x 3) = 1 straggler: {part}");
    assert_eq!(part["straggle_secs"], 3600.0);
    for round in 1..=rounds {
        let rec = round_record(&report, round);
        assert_eq!(rec["status"], "ok", "round {round}: {rec}");
        let p = &part["rounds"][(round - 1) as usize];
        eprintln!("round {round}: {p}");
        assert_eq!(p["sampled"], clients);
        assert_eq!(p["late"], 1, "round {round}: {p}");
        assert_eq!(p["late_clients"], serde_json::json!(stragglers));
        assert_eq!(p["accepted"], clients - 1, "round {round}: {p}");
        assert_eq!(p["dropped"], 0);
    }
}
