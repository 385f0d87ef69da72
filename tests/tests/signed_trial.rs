//! A signed fleet trial end to end: `fedpeft-fleet` runs the same 2-client, 3-round head trial
//! (real aggregator with its embedded broker, real edge clients on EfficientNet-Lite0 at 96 px,
//! 64 examples each) with `signed = true` and without. The signed run makes its keys, every
//! message is signed and verified (nothing is refused), it learns exactly what the unsigned run
//! learns, and each upstream message of a round costs exactly the 64-byte signature more.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpeft_tests::e2e::{backbone, round_record, run_fleet, shared_cache};

const ROUNDS: u32 = 3;

fn trial(dir: &Path, signed: bool) -> PathBuf {
    let text = format!(
        // One name for both runs: the fleet name is in every topic, so in every message's size.
        r#"name = "signed"
rounds = {ROUNDS}
clients = 2
min_clients = 2
quorum = 2
round_timeout_secs = 240
seed = 5
cache_dir = "{cache}"
signed = {signed}

[model]
backbone = "{backbone}"
peft = "head"
runtime = "auto"
image_size = 96
eval_examples = 200

[data]
max_examples = 64

[local]
epochs = 1
batch_size = 32
learning_rate = 0.01
optimizer = "sgd"
update_dtype = "f32"
"#,
        cache = shared_cache().display(),
        backbone = backbone().display(),
    );
    let path = dir.join(format!("signed-{signed}.toml"));
    std::fs::write(&path, text).expect("write trial");
    path
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
            // round 1): the same messages, each 64 bytes longer.
            let (pu, su) = (&p["traffic"], &s["traffic"]);
            assert_eq!(su["up_messages"], pu["up_messages"], "round {r}");
            assert_eq!(
                u(&su["up_bytes"]) - u(&pu["up_bytes"]),
                64 * u(&su["up_messages"]),
                "round {r}: signed {su}, plain {pu}"
            );
        }
    }
}
