//! fedpeft's LoRA adapters in the Hugging Face PEFT format, checked against transformers + peft
//! (PyPI, in `.venv-hf`, set up by `make models`) on the very weights the MiniLM backbone is
//! built from:
//! - an adapter fedpeft writes, loaded by `PeftModel.from_pretrained` onto `AutoModel`, gives
//!   the embeddings fedpeft's trunk + tail give, within 1e-4;
//! - an adapter peft makes and saves, read by fedpeft, gives peft's embeddings within 1e-4;
//! - a federation (the aggregator binary) starts from that adapter: its round-0 global is it;
//! - an adapter for another base model, method or rank is refused with the file named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fedpeft_backbone::data::TextDataset;
use fedpeft_backbone::hf_peft;
use fedpeft_backbone::{Backbone, Runtime, TextPreprocess, TrunkConfig, TrunkInput, open_trunk};
use fedpeft_peft::{Batch, FrozenWeights, NamedTensor, PeftConfig, Tail};
use fedpeft_protocol::{Envelope, Message, PeftMethod};
use fedpeft_tests::{Proc, binary, free_port, workspace_root};
use ndarray::Array2;

const TEXTS: [&str; 6] = [
    "Congratulations! You have won a free cruise, call now to claim your prize.",
    "Hi Bob, the meeting moved to Thursday at 10; see you there.",
    "Cheap meds online, no prescription needed!!!",
    "Attached are the minutes of yesterday's call.",
    "short",
    "A longer message that goes on about the quarterly numbers, the weather, and the plans for \
     the holidays, so that it is padded differently from the rest of the batch.",
];

fn minilm() -> Backbone {
    Backbone::open(workspace_root().join("models/build/all-minilm-l6-v2"))
        .expect("the MiniLM backbone (make models)")
}

fn python() -> PathBuf {
    let p = workspace_root().join(".venv-hf/bin/python");
    assert!(p.is_file(), "{} missing: run make models", p.display());
    p
}

/// The texts' token ids and masks, as the clients tokenize them.
fn tokens(backbone: &Backbone) -> (Array2<i64>, Array2<i64>) {
    let pre = TextPreprocess::from_backbone(backbone, Some(48)).unwrap();
    let ds = TextDataset {
        texts: TEXTS.iter().map(|t| t.to_string()).collect(),
        labels: vec![0; TEXTS.len()],
        classes: vec!["x".into()],
        keys: vec![None; TEXTS.len()],
        source: PathBuf::from("texts"),
    };
    pre.batch(&ds, &(0..TEXTS.len()).collect::<Vec<_>>())
        .unwrap()
}

/// A LoRA r 8 / alpha 16 tail whose classifier is the identity on 384 features: its logits
/// are the pooled embeddings.
fn tail(backbone: &Backbone) -> Box<dyn Tail> {
    let weights = FrozenWeights::from_safetensors(&backbone.tail_path()).unwrap();
    let mut tail = fedpeft_peft::build_tail(
        backbone.manifest.tail_family().unwrap(),
        &weights,
        PeftConfig::new(
            fedpeft_backbone::peft_method(PeftMethod::Lora {
                rank: 8,
                alpha: 16.0,
            }),
            384,
            5,
        ),
    )
    .unwrap();
    let mut t = tail.trainable();
    for x in &mut t {
        match x.name.as_str() {
            "head.weight" => {
                x.values.fill(0.0);
                for i in 0..384 {
                    x.values[i * 384 + i] = 1.0;
                }
            }
            "head.bias" => x.values.fill(0.0),
            // B starts at zero (LoRA is a no-op until trained): make it matter.
            n if n.ends_with("lora_b") => {
                for (i, v) in x.values.iter_mut().enumerate() {
                    *v = ((i * 7919 % 101) as f32 / 101.0 - 0.5) * 0.4;
                }
            }
            _ => {}
        }
    }
    tail.set_trainable(&t).unwrap();
    tail
}

fn embeddings(backbone: &Backbone, tail: &dyn Tail) -> Array2<f32> {
    let (ids, mask) = tokens(backbone);
    let trunk = open_trunk(
        backbone,
        &TrunkConfig::default().with_runtime(Runtime::Tract),
    )
    .unwrap();
    let features = trunk
        .run(&TrunkInput::Tokens {
            ids,
            mask: mask.clone(),
        })
        .unwrap();
    tail.forward(&Batch::new(features, Some(mask.mapv(|m| m as f32))))
        .unwrap()
}

/// Runs scripts/models/hf_peft.py `mode` on `adapter`; its embeddings.
fn reference(mode: &str, adapter: &Path, backbone: &Backbone, dir: &Path) -> Array2<f32> {
    let (ids, mask) = tokens(backbone);
    let rows =
        |a: &Array2<i64>| -> Vec<Vec<i64>> { a.rows().into_iter().map(|r| r.to_vec()).collect() };
    let input = dir.join("input.json");
    std::fs::write(
        &input,
        serde_json::json!({"input_ids": rows(&ids), "attention_mask": rows(&mask)}).to_string(),
    )
    .unwrap();
    let out = dir.join(format!("{mode}.json"));
    let o = Command::new(python())
        .arg(workspace_root().join("scripts/models/hf_peft.py"))
        .arg(mode)
        .arg(adapter)
        .arg(&input)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hf_peft.py {mode}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let e = v["embeddings"].as_array().unwrap();
    let flat: Vec<f32> = e
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    Array2::from_shape_vec((e.len(), flat.len() / e.len()), flat).unwrap()
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fedpeft_and_peft_read_each_others_lora_adapters_and_a_federation_starts_from_one() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = minilm();

    // fedpeft → peft.
    let ours = tail(&backbone);
    let ours_emb = embeddings(&backbone, ours.as_ref());
    let written = dir.path().join("ours");
    hf_peft::write(
        &written,
        &backbone.manifest,
        8,
        16.0,
        &ours.trainable(),
        &Default::default(),
    )
    .unwrap();
    let theirs_emb = reference("embed", &written, &backbone, dir.path());
    let d = max_diff(&ours_emb, &theirs_emb);
    eprintln!("fedpeft's adapter in peft: max |Δ embedding| = {d:.2e}");
    assert!(d < 1e-4, "fedpeft's adapter in peft: {d}");
    // The adapter changes the embeddings (so the check above is not of the base model alone).
    let base = reference("embed", Path::new("-"), &backbone, dir.path());
    assert!(
        max_diff(&base, &theirs_emb) > 1e-2,
        "the adapter is a no-op"
    );

    // peft → fedpeft.
    let made = dir.path().join("made");
    let peft_emb = reference("make", &made, &backbone, dir.path());
    let read = hf_peft::read(&made, &backbone.manifest, 2).unwrap();
    assert_eq!((read.rank, read.alpha, read.lora.len()), (8, 16.0, 8));
    let mut theirs = tail(&backbone);
    let mut t = theirs.trainable();
    for x in &mut t {
        if let Some(r) = read.lora.iter().find(|r| r.name == x.name) {
            x.values = r.values.clone();
        }
    }
    theirs.set_trainable(&t).unwrap();
    let d = max_diff(&embeddings(&backbone, theirs.as_ref()), &peft_emb);
    eprintln!("peft's adapter in fedpeft: max |Δ embedding| = {d:.2e}");
    assert!(d < 1e-4, "peft's adapter in fedpeft: {d}");

    federation_starts_from(&made, &read.lora, dir.path());
    refusals(&made, &backbone, dir.path());
}

/// The aggregator, told `initial_adapter = made`, publishes it as the round-0 global.
fn federation_starts_from(made: &Path, lora: &[NamedTensor], dir: &Path) {
    let out = dir.join("run");
    let config = dir.join("aggregator.toml");
    std::fs::write(
        &config,
        format!(
            r#"fleet = "hf"
run_id = 5
rounds = 1

[broker]
url = "embedded"
port = {port}

[model]
backbone = "{backbone}"
peft = "lora"
lora_rank = 8
lora_alpha = 16.0
dataset = "spam-assassin"
eval_examples = 50
max_seq_len = 48
initial_adapter = "{made}"
cache_dir = "{cache}"

[output]
dir = "{out}"
"#,
            port = free_port(),
            backbone = workspace_root()
                .join("models/build/all-minilm-l6-v2")
                .display(),
            made = made.display(),
            cache = fedpeft_tests::e2e::shared_cache().display(),
            out = out.display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(binary("aggregator"));
    cmd.arg("--config").arg(&config);
    let mut agg = Proc::spawn("aggregator", cmd);
    agg.wait_for_line("aggregator ready", Duration::from_secs(120))
        .expect("the aggregator starts");
    let round0 = out.join("globals/round-0000.bin");
    let start = std::time::Instant::now();
    while !round0.is_file() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no round-0 global"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agg.terminate(Duration::from_secs(10));
    let env = Envelope::decode(&std::fs::read(&round0).unwrap()).unwrap();
    let Message::GlobalAdapter(g) = env.message else {
        panic!("round-0000.bin holds another message")
    };
    for want in lora {
        let got = g
            .tensors
            .iter()
            .map(fedpeft_backbone::dense)
            .find(|t| t.name == want.name)
            .unwrap_or_else(|| panic!("no {} in the round-0 global", want.name));
        assert_eq!(got.values, want.values, "{}", want.name);
    }
    assert!(
        agg.output()
            .iter()
            .any(|l| l.contains("round-0 adapter from a Hugging Face PEFT folder")),
        "the aggregator did not say where its round-0 adapter came from"
    );
}

/// Adapters that do not fit are refused, naming the file and what disagreed.
fn refusals(made: &Path, backbone: &Backbone, dir: &Path) {
    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(made.join(f), d.join(f)).unwrap();
        }
        let p = d.join("adapter_config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
        d
    };
    let refused = |d: &Path, needle: &str| {
        let e = hf_peft::read(d, &backbone.manifest, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle) && e.contains("adapter_"), "{e}");
    };
    refused(
        &copy("other-base", &|c| {
            c["base_model_name_or_path"] = "bert-base-uncased".into()
        }),
        "bert-base-uncased",
    );
    refused(
        &copy("ia3", &|c| c["peft_type"] = "IA3".into()),
        "only LORA",
    );
    refused(&copy("rank", &|c| c["r"] = 4.into()), "not rank r = 4");
    refused(&copy("dora", &|c| c["use_dora"] = true.into()), "use_dora");
    let truncated = copy("truncated", &|_| {});
    let w = truncated.join("adapter_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    refused(&truncated, "adapter_model.safetensors");
}
