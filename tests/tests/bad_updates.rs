//! Bad updates end to end: the real `aggregator` binary behind a real Mosquitto, and scripted
//! MQTT clients that send, among good updates, every kind of bad one: malformed, truncated,
//! wrong protocol version, wrong shape, NaN, infinity, oversized, a stale round and a
//! duplicate. Each must be refused with a log line naming the client, the round and the
//! reason, counted in the report, and the rounds must complete with the good updates. The bad
//! updates are unsigned, so they may come from anybody: the clients they name are still waited
//! for, and round 1 closes at its deadline with them counted as silent.

use std::path::Path;
use std::thread;
use std::time::Duration;

use fedpeft_protocol::envelope::crc32;
use fedpeft_protocol::{Capabilities, ClientId, DType, Envelope, Join, PeftMethod, Tensor, Values};
use fedpeft_tests::{Mosquitto, Proc, binary};

const FLEET: &str = "bad";
const RUN: u64 = 5;
const W: usize = 64;
/// Updates above this many bytes on the wire are refused as oversized.
const MAX_UPDATE: usize = 4096;
/// The round deadline: round 1 waits for it (its refused clients never answer).
const TIMEOUT: u64 = 8;

fn topic(kind: &str) -> String {
    format!("fedpeft/v1/{FLEET}/{kind}")
}

/// A scripted client: its own MQTT connection, publishing what the test tells it to.
struct Scripted {
    id: String,
    mqtt: rumqttc::Client,
}

impl Scripted {
    fn connect(id: &str, port: u16) -> Scripted {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(256 * 1024, 256 * 1024);
        let (mqtt, mut connection) = rumqttc::Client::new(opts, 64);
        thread::spawn(move || {
            for event in connection.iter() {
                if event.is_err() {
                    thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Scripted {
            id: id.to_string(),
            mqtt,
        }
    }

    fn publish(&self, kind: &str, payload: Vec<u8>) {
        self.mqtt
            .publish(topic(kind), rumqttc::QoS::AtLeastOnce, false, payload)
            .expect("queue a publish");
    }

    fn join(&self) {
        let join = Join {
            client: ClientId::new(&self.id).unwrap(),
            capabilities: Capabilities {
                backbone_id: heapless::String::new(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
                max_packet_size: 256 * 1024,
            },
            num_examples: 100,
        };
        self.publish("join", Envelope::new(RUN, 0, join).encode().unwrap());
    }

    fn send(&self, payload: Vec<u8>) {
        self.publish(&format!("update/{}", self.id), payload);
    }
}

/// An update's bytes: `w` of `w_len` values (all `value`) and `b` of 2.
fn update(client: &str, round: u32, sequence: u32, w_len: usize, value: f32) -> Vec<u8> {
    let w = Tensor::dense("w", &[w_len as u32], Values::F32(vec![value; w_len])).unwrap();
    let b = Tensor::dense("b", &[2], Values::F32(vec![0.5, -0.5])).unwrap();
    let u = fedpeft_tests::client_update(client, round, sequence, 100, vec![w, b]);
    Envelope::new(RUN, round, u).encode().unwrap()
}

fn config(dir: &Path, port: u16) -> std::path::PathBuf {
    let text = format!(
        r#"fleet = "{FLEET}"
run_id = {RUN}
rounds = 2
min_clients = 10
quorum = 2
round_timeout_secs = {TIMEOUT}
max_update_bytes = {MAX_UPDATE}
backbone_params = 1000000

[broker]
url = "mqtt://127.0.0.1:{port}"
max_packet_bytes = 262144

[model]
tensors = [{{ name = "w", shape = [{W}] }}, {{ name = "b", shape = [2] }}]

[output]
dir = "{}"
"#,
        dir.join("out").display()
    );
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn every_kind_of_bad_update_is_refused_named_and_counted_and_the_rounds_complete() {
    let broker = Mosquitto::start(300 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(binary("aggregator"));
    cmd.arg("--config").arg(config(dir.path(), broker.port));
    let mut aggregator = Proc::spawn("aggregator", cmd);
    aggregator
        .wait_for_line("aggregator ready", Duration::from_secs(60))
        .expect("aggregator ready");

    let ids = [
        "good-1",
        "good-2",
        "stale",
        "malformed",
        "truncated",
        "version",
        "shape",
        "nan",
        "inf",
        "oversized",
    ];
    let clients: Vec<Scripted> = ids
        .iter()
        .map(|id| Scripted::connect(id, broker.port))
        .collect();
    for c in &clients {
        c.join();
    }
    let by = |id: &str| clients.iter().find(|c| c.id == id).unwrap();
    aggregator
        .wait_for_line("round started round=1", Duration::from_secs(60))
        .expect("round 1 started");

    // Round 1: three good updates (one of them sent twice), seven bad ones.
    for (id, seq) in [("good-1", 1), ("good-2", 1), ("stale", 1)] {
        by(id).send(update(id, 1, seq, W, 0.01));
    }
    by("good-1").send(update("good-1", 1, 1, W, 0.01)); // a redelivery: duplicate
    let mut malformed = update("malformed", 1, 1, W, 0.01);
    let body_end = malformed.len() - 4;
    for b in &mut malformed[12..body_end] {
        *b = 0xff; // the body is garbage, the checksum is right
    }
    let crc = crc32(&malformed[..body_end]);
    malformed[body_end..].copy_from_slice(&crc.to_le_bytes());
    by("malformed").send(malformed);
    let full = update("truncated", 1, 1, W, 0.01);
    by("truncated").send(full[..full.len() - 9].to_vec());
    let mut version = update("version", 1, 1, W, 0.01);
    version[0] = 0x63; // protocol version 99
    by("version").send(version);
    by("shape").send(update("shape", 1, 1, W + 1, 0.01));
    by("nan").send(update("nan", 1, 1, W, f32::NAN));
    by("inf").send(update("inf", 1, 1, W, f32::INFINITY));
    let big = MAX_UPDATE; // values: four bytes each, so far above the limit
    by("oversized").send(update("oversized", 1, 1, big, 0.01));

    aggregator
        .wait_for_line("round started round=2", Duration::from_secs(60))
        .expect("round 1 closed at its deadline and round 2 started");
    // A refusal counted nobody failed: the round waited for its deadline.
    assert!(
        aggregator
            .output()
            .iter()
            .any(|l| l.contains("round closed round=1") && l.contains("failed=7")),
        "round 1 should close at its deadline with the 7 refused clients silent"
    );
    // Round 2: an update for round 0 (two rounds old), then everybody good.
    by("stale").send(update("stale", 0, 2, W, 0.01));
    for id in ids {
        by(id).send(update(id, 2, 3, W, 0.02));
    }
    let status = aggregator
        .wait_exit(Duration::from_secs(120))
        .expect("the aggregator finished");
    assert!(status.success(), "aggregator exited with {status}");

    let lines = aggregator.output();
    let rejected = |client: &str, round: u32, reason: &str| {
        lines.iter().any(|l| {
            l.contains("update rejected")
                && l.contains(&format!("client={client} "))
                && l.contains(&format!("round={round} "))
                && l.contains(&format!("reason={reason} "))
        })
    };
    for (client, round, reason) in [
        ("good-1", 1, "duplicate"),
        ("malformed", 1, "malformed"),
        ("truncated", 1, "bad_checksum"),
        ("version", 1, "wrong_version"),
        ("shape", 1, "wrong_shape"),
        ("nan", 1, "non_finite"),
        ("inf", 1, "non_finite"),
        ("oversized", 1, "oversized"),
        ("stale", 0, "stale"),
    ] {
        assert!(
            rejected(client, round, reason),
            "no log line refusing {client}'s round-{round} update as {reason}"
        );
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out/report.json")).unwrap())
            .unwrap();
    let round = |r: u32| {
        report["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["round"] == r)
            .unwrap()
            .clone()
    };
    let r1 = round(1);
    assert_eq!(r1["status"], "ok", "{r1}");
    assert_eq!(r1["clients_ok"], 3, "{r1}");
    assert_eq!(r1["clients_failed"], 7, "{r1}");
    assert_eq!(
        r1["failed_clients"]["nan"], "no reply by the deadline",
        "an unsigned refusal is not the client's reply: {r1}"
    );
    // (good-1's duplicate may reach the aggregator after round 1 closed: the run's totals
    // count it, whichever round it fell in.)
    for (reason, n) in [
        ("malformed", 1),
        ("bad_checksum", 1),
        ("wrong_version", 1),
        ("wrong_shape", 1),
        ("non_finite", 2),
        ("oversized", 1),
    ] {
        assert_eq!(r1["rejected"][reason], n, "round 1 {reason}: {r1}");
    }
    let r2 = round(2);
    assert_eq!(r2["status"], "ok", "{r2}");
    assert_eq!(r2["clients_ok"], 10, "{r2}");
    assert_eq!(r2["rejected"]["stale"], 1, "{r2}");
    let totals = &report["rejected"];
    assert_eq!(totals["non_finite"], 2, "{report}");
    assert_eq!(totals["stale"], 1, "{report}");
    assert_eq!(totals["duplicate"], 1, "{report}");
}
