//! A small federation for end-to-end tests: the aggregator's config, edge-client processes
//! on the real backbone, and an independent decoding of what travelled over the broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use fedpeft_protocol::{Envelope, Message, Reassembler, ReassemblyLimits, Topic, TopicKind};

use crate::{Proc, binary, workspace_root};

/// What a `fedpeft-fleet run` left: its report, and the fleet's pid (its network namespaces and
/// relays are named after it).
#[derive(Debug)]
pub struct FleetRun {
    pub report: serde_json::Value,
    pub pid: u32,
}

/// Runs `trial` with `fedpeft-fleet run` into `out` and prints the fleet's output; the test
/// fails, with that output, unless it finishes successfully within `limit`.
pub fn run_fleet(trial: &Path, out: &Path, limit: Duration) -> FleetRun {
    let mut cmd = Command::new(binary("fedpeft-fleet"));
    cmd.arg("run").arg(trial).arg("--out").arg(out);
    let mut fleet = Proc::spawn("fedpeft-fleet", cmd);
    let pid = fleet.pid();
    let status = fleet.wait_exit(limit);
    let output = fleet.output().join("\n");
    eprintln!("{output}");
    let status = status.unwrap_or_else(|| panic!("the trial did not finish within {limit:?}"));
    assert!(status.success(), "fedpeft-fleet exited with {status}");
    let path = out.join("report.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let report = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    FleetRun { report, pid }
}

/// A small trial file for `fedpeft-fleet run` in `dir`: `clients` edge clients, all sampled,
/// quorum 2, LoRA r 8 on EfficientNet-Lite0 at 96 px, 64 examples each, one local epoch of
/// AdamW, f32 updates, the e2e activation cache. `top` goes among the top-level keys, `tail`
/// after `[local]`.
pub fn small_trial(
    dir: &Path,
    name: &str,
    clients: usize,
    rounds: u32,
    top: &str,
    tail: &str,
) -> PathBuf {
    let text = format!(
        r#"name = "{name}"
rounds = {rounds}
clients = {clients}
fraction = 1.0
min_clients = {clients}
quorum = 2
cache_dir = "{cache}"
{top}

[model]
backbone = "{backbone}"
peft = "lora"
lora_rank = 8
runtime = "auto"
image_size = 96
eval_examples = 200

[data]
max_examples = 64

[local]
epochs = 1
batch_size = 32
learning_rate = 0.001
optimizer = "adamw"
update_dtype = "f32"
{tail}
"#,
        cache = shared_cache().display(),
        backbone = backbone().display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write trial");
    path
}

/// The built EfficientNet-Lite0 (`make models`).
pub fn backbone() -> PathBuf {
    let dir = workspace_root().join("models/build/efficientnet-lite0");
    assert!(
        dir.join("manifest.json").is_file(),
        "{} is missing: run `make models` first (make test does)",
        dir.display()
    );
    dir
}

/// Activations shared by every end-to-end test of this build (keyed by trunk, samples and
/// preprocessing, written atomically), so each shard's trunk pass runs once per build.
pub fn shared_cache() -> PathBuf {
    crate::target_dir().join("fedpeft-e2e-activations")
}

/// One federation under test: fleet name, run id, packet limit and its working folder.
#[derive(Debug, Clone)]
pub struct Federation {
    pub fleet: String,
    pub run_id: u64,
    pub max_packet: usize,
    pub dir: PathBuf,
    pub clients: usize,
    /// Examples per client (a seeded random subset of its Dirichlet shard).
    pub max_examples: usize,
}

impl Federation {
    /// Writes the aggregator's config for a LoRA run on EfficientNet-Lite0 (plus `extra` TOML
    /// at the top level) and returns its path. `broker` is "embedded" or an mqtt:// URL.
    pub fn aggregator_config(
        &self,
        broker: &str,
        port: u16,
        rounds: u32,
        top: &str,
        local: &str,
    ) -> PathBuf {
        let broker_table = if broker == "embedded" {
            format!("url = \"embedded\"\nport = {port}")
        } else {
            format!("url = \"{broker}\"")
        };
        let text = format!(
            r#"fleet = "{fleet}"
run_id = {run_id}
rounds = {rounds}
seed = 3
{top}

[local]
batch_size = 32
learning_rate = 0.001
optimizer = "adamw"
update_dtype = "f32"
{local}

[broker]
{broker_table}
max_packet_bytes = {max_packet}

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
            fleet = self.fleet,
            run_id = self.run_id,
            max_packet = self.max_packet,
            backbone = backbone().display(),
            cache = shared_cache().display(),
            out = self.out().display(),
        );
        let path = self.dir.join("aggregator.toml");
        std::fs::write(&path, text).expect("write aggregator.toml");
        path
    }

    /// The aggregator's output folder (report, checkpoint).
    pub fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// Starts the aggregator binary on `config` and returns once it prints `aggregator ready`:
    /// it has subscribed, so no client's join can go unheard (a broker drops a publish that
    /// nobody is subscribed to).
    pub fn start_aggregator(&self, config: &Path, name: &str) -> Proc {
        let mut cmd = Command::new(binary("aggregator"));
        cmd.arg("--config").arg(config);
        Self::ready(Proc::spawn(name, cmd), name)
    }

    /// [`Federation::start_aggregator`] with `cmd` (the aggregator binary with its arguments
    /// and environment).
    pub fn start_aggregator_cmd(&self, cmd: Command, name: &str) -> Proc {
        Self::ready(Proc::spawn(name, cmd), name)
    }

    fn ready(aggregator: Proc, name: &str) -> Proc {
        aggregator
            .wait_for_line("aggregator ready", std::time::Duration::from_secs(120))
            .unwrap_or_else(|| panic!("{name} did not get ready within 120 s"));
        aggregator
    }

    /// Starts edge client `index` of the fleet.
    pub fn spawn_client(&self, broker_url: &str, index: usize) -> Proc {
        self.spawn_client_with(broker_url, index, &[])
    }

    /// Starts edge client `index` of the fleet with `extra` flags.
    pub fn spawn_client_with(&self, broker_url: &str, index: usize, extra: &[&str]) -> Proc {
        let cmd = self.client_command(broker_url, index, extra);
        Proc::spawn(&format!("client-{index:02}"), cmd)
    }

    /// The command [`Federation::spawn_client_with`] runs.
    pub fn client_command(&self, broker_url: &str, index: usize, extra: &[&str]) -> Command {
        let id = format!("client-{index:02}");
        let mut cmd = Command::new(binary("edge-client"));
        cmd.args([
            "--broker",
            broker_url,
            "--fleet",
            &self.fleet,
            "--client-id",
            &id,
        ])
        .args(["--run-id", &self.run_id.to_string()])
        .arg("--model-dir")
        .arg(backbone())
        .args(["--runtime", "auto", "--peft", "lora", "--image-size", "96"])
        .args([
            "--dataset",
            "fashion-mnist",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.5",
        ])
        .args(["--num-clients", &self.clients.to_string()])
        .args(["--client-index", &index.to_string(), "--seed", "3"])
        .args(["--max-examples", &self.max_examples.to_string()])
        .args(["--max-packet-bytes", &self.max_packet.to_string()])
        .arg("--cache-dir")
        .arg(shared_cache())
        .args(extra)
        .env("RAYON_NUM_THREADS", "1");
        cmd
    }

    /// The aggregator's report.json.
    pub fn report(&self) -> serde_json::Value {
        let path = self.out().join("report.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("report.json is JSON")
    }
}

/// The record of round `r` in a report.
pub fn round_record(report: &serde_json::Value, r: u32) -> serde_json::Value {
    report["rounds"]
        .as_array()
        .expect("rounds array")
        .iter()
        .find(|x| x["round"] == r)
        .unwrap_or_else(|| panic!("no round {r} in the report: {report}"))
        .clone()
}

/// Named tensors as f32 values.
pub type Tensors = Vec<(String, Vec<f32>)>;

/// Global adapters by the round that produced them, and client updates by round.
#[derive(Debug, Default)]
pub struct Observed {
    pub globals: BTreeMap<u32, Tensors>,
    /// round -> client -> (num_examples, delta tensors)
    pub updates: BTreeMap<u32, BTreeMap<String, (u64, Tensors)>>,
}

pub fn tensors(ts: &[fedpeft_protocol::Tensor]) -> Tensors {
    ts.iter()
        .map(|t| (t.name().to_string(), t.to_f32()))
        .collect()
}

/// Decodes everything the observer saw, reassembling chunked payloads.
pub fn observe(messages: &[(String, Vec<u8>)]) -> Observed {
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
                match reassembler.push(source, chunk, 0) {
                    Ok(Some(whole)) => envelopes
                        .push(Envelope::decode(&whole).expect("reassembled payload decodes")),
                    Ok(None) => {}
                    // A payload cut short by a broker restart: its sender sends it again.
                    Err(e) => eprintln!("observer: chunk on {topic} dropped: {e:?}"),
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
                // The first update a client sent for a round is the one an aggregator can
                // accept; a later one for the same round is a duplicate it must drop.
                seen.updates
                    .entry(u.round)
                    .or_default()
                    .entry(u.client.to_string())
                    .or_insert_with(|| (u.num_examples, tensors(&u.tensors)));
            }
            _ => {}
        }
    }
    seen
}

/// `a + b` and its rounding error (Knuth's TwoSum).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bp = s - a;
    (s, (a - (s - bp)) + (b - bp))
}

/// FedAvg recomputed from the observed updates, as `docs/protocol.md` defines it:
/// global(r) = f32(global(r-1) + f64(Σ nᵢΔᵢ) / Σ nᵢ), with the sum exact (here: TwoSum over the
/// clients in id order, not the order the aggregator received them). Returns how many values
/// were compared and how many differ from the published global adapter in any bit.
pub fn check_fedavg(seen: &Observed, round: u32) -> (usize, usize) {
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
