//! The fleet runner's trials end to end (issue 19): `fedpeft-fleet run` with the real
//! aggregator and edge clients (LoRA on EfficientNet-Lite0 at 96 px, 64 examples each, the e2e
//! activation cache).
//!
//! - Two trials back to back from one trial file on one external Mosquitto. Before issue 19 a
//!   trial's run id was its seed, so the second trial's clients took the first trial's retained
//!   "run done" announcement as their own and left at once, and the second trial waited for
//!   clients that were gone until the runner's deadline. Now each trial draws a fresh run id,
//!   and the second must train every round.
//! - A trial whose clients cannot read their data set: every client exits with an error at
//!   start. Before, the runner waited for them until its deadline; now it must stop at once and
//!   say which client failed and why.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedpeft_tests::e2e::{round_record, run_fleet, small_trial};
use fedpeft_tests::{Mosquitto, binary};

const ROUNDS: u32 = 2;
const CLIENTS: usize = 2;

/// A client's summary (`<out>/clients/<id>.json`).
fn summary(out: &Path, client: &str) -> serde_json::Value {
    let path = out.join("clients").join(format!("{client}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("client summary {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_second_trial_on_the_same_mosquitto_draws_a_fresh_run_id_and_trains_every_round() {
    let broker = Mosquitto::start(65_536 + 4096);
    let dir = tempfile::tempdir().expect("temp dir");
    let tail = format!(
        "\n[broker]\nkind = \"external\"\nurl = \"{}\"",
        broker.url()
    );
    let trial = small_trial(
        dir.path(),
        "twice",
        CLIENTS,
        ROUNDS,
        "round_timeout_secs = 60\nseed = 9",
        &tail,
    );
    let mut run_ids = Vec::new();
    for name in ["first", "second"] {
        let out = dir.path().join(name);
        let report = run_fleet(&trial, &out, Duration::from_secs(180)).report;
        run_ids.push(report["run_id"].as_u64().expect("run_id"));
        assert_eq!(report["finished"], true, "{name}: {report}");
        for r in 1..=ROUNDS {
            let rec = round_record(&report, r);
            assert_eq!(rec["status"], "ok", "{name} trial, round {r}: {rec}");
            assert_eq!(rec["clients_ok"], CLIENTS, "{name} trial, round {r}: {rec}");
        }
        for i in 0..CLIENTS {
            let s = summary(&out, &format!("client-{i:02}"));
            assert_eq!(s["exit"], "run_done", "{name} trial: {s}");
            assert_eq!(s["rounds_trained"], ROUNDS, "{name} trial: {s}");
            if name == "second" {
                // It was handed the first trial's retained messages, and refused them.
                assert!(
                    s["rejected_messages"].as_u64().unwrap_or(0) >= 1,
                    "the second trial's client saw nothing of the first trial: {s}"
                );
            }
        }
    }
    assert_ne!(
        run_ids[0], run_ids[1],
        "two trials of one trial file (one seed) ran under the same run id"
    );
}

#[test]
fn a_fleet_whose_clients_cannot_read_their_data_fails_at_once_naming_the_client_and_its_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A round deadline far beyond the test's limit: only the runner noticing the dead clients
    // can end this trial in time.
    let path = small_trial(
        dir.path(),
        "no-data",
        CLIENTS,
        ROUNDS,
        "round_timeout_secs = 600",
        "",
    );
    let missing = "/nonexistent/fashion-mnist";
    // A trial's root is the aggregator's held-out folder too (`eval_root` defaults to it): give
    // the aggregator the real Fashion-MNIST, so only the clients cannot start.
    let real = std::env::var("FEDPEFT_FASHION_MNIST")
        .unwrap_or_else(|_| "/usr/share/datasets/fashion-mnist".into());
    let text = std::fs::read_to_string(&path).expect("trial file");
    std::fs::write(
        &path,
        text.replace(
            "[data]\n",
            &format!("[data]\nroot = \"{missing}\"\neval_root = \"{real}\"\n"),
        ),
    )
    .expect("trial file");
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let started = Instant::now();
    let mut fleet = Command::new(binary("fedpeft-fleet"))
        .arg("run")
        .arg(&path)
        .arg("--out")
        .arg(dir.path().join("out"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("spawn fedpeft-fleet");
    let status = loop {
        if let Some(status) = fleet.try_wait().expect("wait for fedpeft-fleet") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let _ = fleet.kill();
            let _ = fleet.wait();
            panic!("fedpeft-fleet still ran after 180 s with clients that cannot start");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = started.elapsed();
    let err = std::fs::read_to_string(&stderr).expect("stderr");
    eprintln!(
        "fedpeft-fleet exited with {status} after {:.1} s\nstdout:\n{}\nstderr:\n{err}",
        elapsed.as_secs_f64(),
        std::fs::read_to_string(&stdout).unwrap_or_default()
    );
    assert!(!status.success(), "fedpeft-fleet succeeded: {err}");
    assert!(
        elapsed < Duration::from_secs(60),
        "fedpeft-fleet took {elapsed:?} to give up"
    );
    let culprit = err
        .lines()
        .find(|l| l.contains("exited") && l.contains("while the run went on"))
        .unwrap_or_else(|| panic!("stderr names no client that exited: {err}"));
    assert!(
        culprit.contains("client-0"),
        "the failing client is not named: {culprit}"
    );
    assert!(
        err.lines().any(|l| l.contains(missing)),
        "stderr does not show the client's error about {missing}: {err}"
    );
}
