//! A text federation end to end: `fedpeft-fleet` runs the real aggregator (embedded broker)
//! and three edge-client processes on all-MiniLM-L6-v2 (frozen 4-layer trunk, 2 transformer
//! blocks in the tail) with bottleneck adapters, each client holding its natural SpamAssassin
//! shard (whole mailing lists, plus a Dirichlet share of the mails from no list). The
//! aggregator evaluates every global adapter on SpamAssassin's seeded held-out split, which no
//! client trains on.

mod common;
use common::exported::{Inputs, argmax, max_diff, onnxruntime_logits, tract_logits};

use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpeft_tests::e2e::{round_record, run_fleet, shared_cache};
use fedpeft_tests::workspace_root;

const CLIENTS: usize = 3;
const ROUNDS: u32 = 2;

/// The built all-MiniLM-L6-v2 (`make models`).
fn minilm() -> PathBuf {
    let dir = workspace_root().join("models/build/all-minilm-l6-v2");
    assert!(
        dir.join("manifest.json").is_file(),
        "{} is missing: run `make models` first (make test does)",
        dir.display()
    );
    dir
}

fn trial(dir: &Path) -> PathBuf {
    let text = format!(
        r#"name = "text-e2e"
rounds = {ROUNDS}
clients = {CLIENTS}
round_timeout_secs = 600
seed = 5
cache_dir = "{cache}"

[model]
backbone = "{backbone}"
peft = "adapter"
bottleneck = 16
runtime = "auto"
max_seq_len = 32
eval_examples = 300

[data]
dataset = "spam-assassin"
partition = "natural"
alpha = 1.0
max_examples = 96

[local]
epochs = 2
batch_size = 16
learning_rate = 0.003
optimizer = "adamw"
update_dtype = "f32"

[broker]
max_packet_bytes = 65536
"#,
        cache = shared_cache().display(),
        backbone = minilm().display(),
    );
    let path = dir.join("trial.toml");
    std::fs::write(&path, text).expect("write trial");
    path
}

#[test]
fn adapters_on_minilm_federate_over_natural_spam_assassin_shards_and_beat_round_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = trial(dir.path());
    let out = dir.path().join("out");
    let report = run_fleet(&path, &out, Duration::from_secs(900)).report;

    for r in 1..=ROUNDS {
        let rec = round_record(&report, r);
        assert_eq!(rec["status"], "ok", "round {r}: {rec}");
        assert_eq!(rec["clients_ok"], CLIENTS, "round {r}: {rec}");
    }
    let eval = |r: u32, key: &str| {
        round_record(&report, r)["eval_accuracy"]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key} for round {r} in the report"))
    };
    let (first, last) = (eval(0, "eval_accuracy"), eval(ROUNDS, "eval_accuracy"));
    eprintln!("held-out accuracy: round 0 {first:.3}, round {ROUNDS} {last:.3}");
    // The baseline: a constant answer scores the majority class's share of the held-out
    // e-mails (the aggregator logs it; ham is about two thirds of SpamAssassin).
    let log = std::fs::read_to_string(out.join("logs/aggregator.log")).expect("aggregator log");
    let majority: f64 = log
        .split("majority_share=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("the aggregator logged no majority_share:\n{log}"));
    eprintln!("majority-class share of the held-out e-mails: {majority:.3}");
    assert!((0.5..0.8).contains(&majority), "majority share {majority}");
    assert!(
        last > first && last > majority + 0.10,
        "accuracy did not improve enough: round 0 {first}, round {ROUNDS} {last}, \
         majority-class baseline {majority}"
    );

    // Each client's shard is natural: the logs name the mailing lists it holds, and they differ.
    let mut shards = Vec::new();
    for i in 0..CLIENTS {
        let log = std::fs::read_to_string(out.join("logs").join(format!("client-{i:02}.log")))
            .unwrap_or_else(|e| panic!("client {i}'s log: {e}"));
        let line = log
            .lines()
            .find(|l| l.contains("partition") && l.contains("shard="))
            .unwrap_or_else(|| panic!("client {i} logged no partition line:\n{log}"));
        assert!(
            log.contains("max_seq_len=32"),
            "client {i} did not tokenize at 32 tokens:\n{log}"
        );
        shards.push(line.split("shard=").nth(1).unwrap_or_default().to_string());
    }
    shards.sort();
    shards.dedup();
    assert_eq!(shards.len(), CLIENTS, "shards: {shards:?}");
    assert!(
        shards.iter().any(|s| s.contains("fork.xent.com")),
        "the largest list is on some client: {shards:?}"
    );

    the_exported_text_model_matches_the_rust_path(&out, dir.path());
}

/// The exported MiniLM model (trunk + the merged adapter tail, masked mean pooling, in one
/// ONNX file taking `input_ids` and `attention_mask`) gives the Rust path's logits on held-out
/// e-mails in tract and in onnxruntime's Python API.
fn the_exported_text_model_matches_the_rust_path(out: &Path, dir: &Path) {
    use fedpeft_edge::model::{Model, ModelOptions, RoundChoice, locate, read_adapter};
    let export = dir.join("model");
    common::exported::export(out, &export);
    let (file, index) = locate(out, RoundChoice::Best).unwrap();
    let adapter = read_adapter(&file, index, None).unwrap();
    let model = Model::open(
        &adapter,
        &ModelOptions {
            model_dir: None,
            runtime: Some(fedpeft_backbone::Runtime::Tract),
            threads: 1,
        },
    )
    .unwrap();
    let ds =
        fedpeft_backbone::data::load_spam_assassin(&fedpeft_backbone::data::spam_assassin_dir())
            .unwrap();
    let (_, test) = fedpeft_backbone::data::spam_assassin_split(&ds).unwrap();
    let idx = &test[..64];
    let rust = model.text_logits(&ds, idx).unwrap();
    let pre = fedpeft_backbone::TextPreprocess::from_backbone(
        &model.backbone,
        adapter.index.model.max_seq_len,
    )
    .unwrap();
    let (ids, mask) = pre.batch(&ds, idx).unwrap();
    let inputs = Inputs::Tokens(ids, mask);
    let onnx = export.join("model.onnx");
    let (tract, ort) = (
        tract_logits(&onnx, &inputs),
        onnxruntime_logits(&onnx, &inputs, dir),
    );
    let (dt, dort) = (max_diff(&rust, &tract), max_diff(&rust, &ort));
    eprintln!("exported text model against the Rust path: tract {dt:e}, onnxruntime {dort:e}");
    assert!(dt < 1e-4 && dort < 1e-4, "tract {dt}, onnxruntime {dort}");
    assert_eq!(argmax(&rust), argmax(&ort));
    assert_eq!(argmax(&rust), argmax(&tract));
}
