//! End-to-end federation: the real `aggregator` and `edge-client` binaries as separate
//! processes, a real broker on loopback (the aggregator's embedded rumqttd, or Mosquitto), the
//! real EfficientNet-Lite0 trunk and Fashion-MNIST. An observer subscribed to the fleet's topics
//! records what really travelled, and the test recomputes FedAvg from the clients' updates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fedpeft_protocol::{Envelope, Message, Reassembler, ReassemblyLimits, Topic, TopicKind};
use fedpeft_tests::{Mosquitto, Proc, Sniffer, binary, free_port, wait_for_port, workspace_root};

const FLEET: &str = "e2e";
const RUN_ID: u64 = 7;
/// Below the LoRA adapter's f32 size (25,610 values ≈ 102 KB): globals and updates are chunked.
const MAX_PACKET: usize = 65536;

fn backbone() -> PathBuf {
    let dir = workspace_root().join("models/build/efficientnet-lite0");
    assert!(
        dir.join("manifest.json").is_file(),
        "{} is missing: run `make models` first (make test does)",
        dir.display()
    );
    dir
}

/// Writes the aggregator's config for a small LoRA run and returns its path.
fn aggregator_config(dir: &Path, broker: &str, port: u16, rounds: u32, clients: usize) -> PathBuf {
    let broker_table = if broker == "embedded" {
        format!("url = \"embedded\"\nport = {port}")
    } else {
        format!("url = \"{broker}\"")
    };
    let text = format!(
        r#"fleet = "{FLEET}"
run_id = {RUN_ID}
rounds = {rounds}
seed = 3
min_clients = {clients}
quorum = {clients}
round_timeout_secs = 240.0

[local]
epochs = 1
batch_size = 32
learning_rate = 0.001
optimizer = "adamw"
update_dtype = "f32"

[broker]
{broker_table}
max_packet_bytes = {MAX_PACKET}

[model]
backbone = "{backbone}"
peft = "lora"
lora_rank = 8
lora_alpha = 16.0
eval_examples = 600
cache_dir = "{cache}"

[output]
dir = "{out}"
"#,
        backbone = backbone().display(),
        out = dir.join("out").display(),
        cache = dir.join("cache").display(),
    );
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, text).expect("write aggregator.toml");
    path
}

fn spawn_client(dir: &Path, broker_url: &str, index: usize, clients: usize) -> Proc {
    let id = format!("client-{index:02}");
    let mut cmd = Command::new(binary("edge-client"));
    cmd.args(["--broker", broker_url, "--fleet", FLEET, "--client-id", &id])
        .args(["--run-id", &RUN_ID.to_string()])
        .arg("--model-dir")
        .arg(backbone())
        .args(["--runtime", "tract", "--peft", "lora", "--image-size", "96"])
        .args([
            "--dataset",
            "fashion-mnist",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.5",
        ])
        .args(["--num-clients", &clients.to_string()])
        .args(["--client-index", &index.to_string(), "--seed", "3"])
        .args(["--max-examples", "160"])
        .args(["--max-packet-bytes", &MAX_PACKET.to_string()])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("RAYON_NUM_THREADS", "1");
    Proc::spawn(&id, cmd)
}

/// Named tensors as f32 values.
type Tensors = Vec<(String, Vec<f32>)>;

/// Global adapters by the round that produced them, and client updates by round.
#[derive(Debug, Default)]
struct Observed {
    globals: BTreeMap<u32, Tensors>,
    /// round -> client -> (num_examples, delta tensors)
    updates: BTreeMap<u32, BTreeMap<String, (u64, Tensors)>>,
}

fn tensors(ts: &[fedpeft_protocol::Tensor]) -> Tensors {
    ts.iter()
        .map(|t| (t.name().to_string(), t.to_f32()))
        .collect()
}

/// Decodes everything the observer saw, reassembling chunked payloads.
fn observe(messages: &[(String, Vec<u8>)]) -> Observed {
    let mut seen = Observed::default();
    let mut reassembler: Reassembler<String> = Reassembler::new(ReassemblyLimits::default());
    let mut envelopes = Vec::new();
    for (topic, payload) in messages {
        if payload.is_empty() {
            continue; // a cleared retained topic
        }
        let Ok(parsed) = Topic::parse(topic) else {
            continue;
        };
        let envelope = Envelope::decode(payload)
            .unwrap_or_else(|e| panic!("undecodable payload on {topic}: {e:?}"));
        let source = match &parsed.kind {
            TopicKind::GlobalChunk(_) | TopicKind::Global => "global".to_string(),
            TopicKind::Update(client) => format!("update/{client}"),
            _ => topic.clone(),
        };
        match envelope.message {
            Message::Chunk(chunk) => {
                if let Some(whole) = reassembler
                    .push(source, chunk, 0)
                    .unwrap_or_else(|e| panic!("bad chunk on {topic}: {e:?}"))
                {
                    envelopes.push(Envelope::decode(&whole).expect("reassembled payload decodes"));
                }
            }
            _ => envelopes.push(envelope),
        }
    }
    for envelope in envelopes {
        match envelope.message {
            Message::GlobalAdapter(g) => {
                seen.globals.insert(g.round, tensors(&g.tensors));
            }
            Message::ClientUpdate(u) => {
                seen.updates
                    .entry(u.round)
                    .or_default()
                    .insert(u.client.to_string(), (u.num_examples, tensors(&u.tensors)));
            }
            _ => {}
        }
    }
    seen
}

/// `a + b` and its rounding error (Knuth's TwoSum).
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bp = s - a;
    (s, (a - (s - bp)) + (b - bp))
}

/// FedAvg recomputed from the observed updates, as `docs/protocol.md` defines it:
/// global(r) = f32(global(r-1) + f64(Σ nᵢΔᵢ) / Σ nᵢ), with the sum exact (here: TwoSum over the
/// clients in id order, not the order the aggregator received them). Returns how many values
/// were compared and how many differ from the published global adapter in any bit.
fn check_fedavg(seen: &Observed, round: u32) -> (usize, usize) {
    let previous = &seen.globals[&(round - 1)];
    let published = &seen.globals[&round];
    let updates = &seen.updates[&round];
    let total: u64 = updates.values().map(|(n, _)| n).sum();
    assert!(total > 0, "round {round}: no examples");
    let (mut compared, mut differing) = (0usize, 0usize);
    for (ti, (name, base)) in previous.iter().enumerate() {
        let (pub_name, got) = &published[ti];
        assert_eq!(name, pub_name, "round {round}: tensor order changed");
        for (i, &b) in base.iter().enumerate() {
            let (mut sum, mut err) = (0f64, 0f64);
            for (n, delta) in updates.values() {
                assert_eq!(&delta[ti].0, name, "round {round}: update tensor order");
                let (s, e) = two_sum(sum, *n as f64 * f64::from(delta[ti].1[i]));
                sum = s;
                err += e;
            }
            let expected = (f64::from(b) + (sum + err) / total as f64) as f32;
            compared += 1;
            if expected.to_bits() != got[i].to_bits() {
                differing += 1;
                if differing <= 5 {
                    eprintln!(
                        "round {round} {name}[{i}]: FedAvg {expected:e}, published {:e}",
                        got[i]
                    );
                }
            }
        }
    }
    (compared, differing)
}

fn report(dir: &Path) -> serde_json::Value {
    let path = dir.join("out/report.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("report.json is JSON")
}

/// Runs a 3-round, 3-client LoRA federation and checks it end to end.
fn federate(broker: &str, broker_port: u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let rounds = 3;
    let clients = 3;
    let config = aggregator_config(dir.path(), broker, broker_port, rounds, clients);
    let mut aggregator = {
        let mut cmd = Command::new(binary("aggregator"));
        cmd.arg("--config").arg(&config);
        Proc::spawn("aggregator", cmd)
    };
    assert!(
        wait_for_port(broker_port, Duration::from_secs(120)),
        "no broker on 127.0.0.1:{broker_port}"
    );
    let sniffer = Sniffer::start(broker_port, FLEET, MAX_PACKET);
    let url = format!("mqtt://127.0.0.1:{broker_port}");
    let mut procs: Vec<Proc> = (0..clients)
        .map(|i| spawn_client(dir.path(), &url, i, clients))
        .collect();

    let status = aggregator
        .wait_exit(Duration::from_secs(900))
        .expect("the aggregator did not finish 3 rounds within 15 minutes");
    assert!(status.success(), "aggregator exited with {status}");
    for p in &mut procs {
        let status = p
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{} did not exit after the run was done", p.name));
        assert!(status.success(), "{} exited with {status}", p.name);
    }
    std::thread::sleep(Duration::from_millis(500));

    let seen = observe(&sniffer.messages());
    for round in 0..=rounds {
        assert!(
            seen.globals.contains_key(&round),
            "no global adapter for round {round} was observed (saw {:?})",
            seen.globals.keys().collect::<Vec<_>>()
        );
    }
    for round in 1..=rounds {
        let n = seen.updates.get(&round).map_or(0, BTreeMap::len);
        assert_eq!(n, clients, "round {round}: {n} client updates observed");
        let (compared, differing) = check_fedavg(&seen, round);
        assert_eq!(compared, 25_610, "LoRA r=8 + head on EfficientNet-Lite0");
        assert_eq!(
            differing, 0,
            "round {round}: {differing} of {compared} values differ from FedAvg"
        );
        eprintln!("round {round}: FedAvg recomputed; all {compared} values bit-identical");
    }

    let report = report(dir.path());
    let rounds_json = report["rounds"].as_array().expect("rounds array");
    let accuracy = |r: u32| {
        rounds_json
            .iter()
            .find(|x| x["round"] == r)
            .and_then(|x| x["eval_accuracy"].as_f64())
            .unwrap_or_else(|| panic!("no eval accuracy for round {r} in the report"))
    };
    let (first, last) = (accuracy(0), accuracy(rounds));
    eprintln!("eval accuracy: round 0 {first:.3}, round {rounds} {last:.3}");
    assert!(
        last > first + 0.2,
        "accuracy did not improve: round 0 {first}, round {rounds} {last}"
    );
    for r in 1..=rounds {
        let rec = rounds_json.iter().find(|x| x["round"] == r).unwrap();
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], clients, "round {r}: {rec}");
    }
    let up = report["totals"]["up_bytes"].as_u64().expect("up bytes");
    assert!(up > 3 * 3 * 25_610 * 4, "uploads accounted: {up} bytes");
}

#[test]
fn three_rounds_over_the_embedded_broker_equal_fedavg_of_the_clients_updates() {
    federate("embedded", free_port());
}

#[test]
fn three_rounds_over_mosquitto_equal_fedavg_of_the_clients_updates() {
    let broker = Mosquitto::start((MAX_PACKET + 4096) as u32);
    federate(&broker.url(), broker.port);
}
