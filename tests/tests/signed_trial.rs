//! A signed fleet trial end to end: `fedpeft-fleet` runs the same 2-client, 3-round LoRA trial
//! (real aggregator with its embedded broker, real edge clients on EfficientNet-Lite0 at 96 px,
//! 64 examples each) with `signed = true` and without. The signed run makes its keys, every
//! message is signed and verified (nothing is refused), it learns exactly what the unsigned run
//! learns, and each upstream message of a round costs the 64-byte signature more (to within
//! the one byte a timing field's varint can vary between runs).

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpeft_tests::e2e::{round_record, run_fleet, small_trial};

const ROUNDS: u32 = 3;

/// The trial, signed or not, written into its own folder: one fleet name for both runs, since
/// the name is in every topic, so in every message's size.
fn trial(dir: &Path, signed: bool) -> PathBuf {
    let dir = dir.join(format!("signed-{signed}"));
    std::fs::create_dir_all(&dir).expect("trial folder");
    let top = format!("round_timeout_secs = 240\nseed = 5\nsigned = {signed}");
    small_trial(&dir, "signed", 2, ROUNDS, &top, "")
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn a_signed_trial_verifies_every_message_and_pays_64_bytes_per_upstream_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut reports = Vec::new();
    for signed in [false, true] {
        let out = dir.path().join(format!("out-{signed}"));
        reports.push(run_fleet(&trial(dir.path(), signed), &out, Duration::from_secs(300)).report);
        if signed {
            for file in [
                "aggregator.key",
                "client-00.key",
                "client-01.key",
                "enrolled.toml",
            ] {
                assert!(out.join("keys").join(file).is_file(), "keys/{file}");
            }
        }
    }
    let (plain, signed) = (&reports[0], &reports[1]);
    assert_eq!(
        signed["rejected"],
        serde_json::json!({}),
        "a signed run refuses nothing"
    );
    for r in 1..=ROUNDS {
        let (p, s) = (round_record(plain, r), round_record(signed, r));
        assert_eq!(s["status"], "ok", "round {r}: {s}");
        assert_eq!(s["clients_ok"], 2, "round {r}: {s}");
        // Signing changes no value: the same updates, the same global, the same accuracy.
        assert_eq!(s["eval_accuracy"], p["eval_accuracy"], "round {r}");
        assert_eq!(s["eval_loss"], p["eval_loss"], "round {r}");
        if r >= 2 {
            // From round 2 a round's upstream traffic is its updates alone (joins come before
            // round 1): the same messages, each 64 bytes longer, give or take two bytes: an
            // update states its training time in milliseconds as a varint, 1 byte below 128 ms,
            // 2 below 16 384 ms, 3 beyond, so a loaded machine can make one run's 2 bytes
            // longer than the other's.
            let (pu, su) = (&p["traffic"], &s["traffic"]);
            assert_eq!(su["up_messages"], pu["up_messages"], "round {r}");
            eprintln!(
                "round {r}: {} B per unsigned upstream message, {} B signed",
                u(&pu["up_bytes"]) / u(&pu["up_messages"]),
                u(&su["up_bytes"]) / u(&su["up_messages"])
            );
            let messages = u(&su["up_messages"]) as i64;
            let extra = u(&su["up_bytes"]) as i64 - u(&pu["up_bytes"]) as i64;
            assert!(
                (extra - 64 * messages).abs() <= 2 * messages,
                "round {r}: {extra} bytes more for {messages} signed messages; \
                 signed {su}, plain {pu}"
            );
        }
    }
}
