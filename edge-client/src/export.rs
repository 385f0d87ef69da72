//! `edge-client export`: the federation's model as files another runtime can load.
//!
//! - `tail-merged.safetensors`: every tail tensor as trained ([`fedpeft_peft::Tail::merged`]:
//!   LoRA folded into its weight as `W + (α/r)·B·A`, trained biases and LayerNorm shifts,
//!   adapters, prompt tokens, the classifier as `classifier.*`), with the run, round and
//!   backbone in its header;
//! - `model.json`: what it is (run, round, held-out accuracy, backbone id and trunk sha256, the
//!   method, the classes in label order, the input preprocessing of the manifest);
//! - with `--onnx`, `model.onnx`: the trunk and the merged tail in one graph
//!   (`models/export_onnx.py`), `pixels` in, `logits` out, the preprocessing in its metadata;
//! - for LoRA on a backbone cut from a Hugging Face model (MiniLM), `hf-peft/`: the adapter in
//!   PEFT's format ([`fedpeft_backbone::hf_peft`]) and the classifier beside it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::cli::ExportArgs;
use crate::model::{Model, ModelOptions};

/// The folder of the Hugging Face PEFT adapter (LoRA on a text backbone).
pub const HF_PEFT_DIR: &str = "hf-peft";

/// `model.json`'s schema.
pub const MODEL_SCHEMA: &str = "fedpeft-model/1";

/// Runs the command; returns the files written.
pub fn run(args: &ExportArgs) -> anyhow::Result<Vec<std::path::PathBuf>> {
    if args.source.from_broker {
        bail!(
            "export writes a kept adapter with its run and round (--adapter); the broker's \
             retained global has no index"
        );
    }
    let adapter = crate::model::load(&args.source)?;
    let model = Model::open(
        &adapter,
        &ModelOptions {
            model_dir: args.source.model_dir.clone(),
            // The tail alone: exporting runs no trunk.
            runtime: None,
            threads: 1,
        },
    )?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let m = &adapter.index.model;
    let manifest = &model.backbone.manifest;
    let info = serde_json::json!({
        "schema": MODEL_SCHEMA,
        "fleet": adapter.index.fleet,
        "run_id": adapter.index.run_id,
        "round": adapter.round,
        "eval_accuracy": adapter.eval_accuracy,
        "adapter": adapter.file.display().to_string(),
        "backbone": manifest.id,
        "backbone_id": m.backbone_id,
        "trunk_sha256": model.backbone.trunk_sha256(),
        "family": manifest.family,
        "tail_hyper": manifest.tail.hyper,
        "peft": m.peft,
        "lora_rank": m.lora_rank,
        "lora_alpha": m.lora_alpha,
        "bottleneck": m.bottleneck,
        "prompt_tokens": m.prompt_tokens,
        "classes": model.classes,
        "image_size": model.image_size(),
        "max_seq_len": m.max_seq_len,
        "input": manifest.input,
    });
    let merged = model.merged();
    let tail = args.out.join("tail-merged.safetensors");
    let meta: HashMap<String, String> = [
        ("format", "fedpeft merged tail".to_string()),
        ("backbone", manifest.id.clone()),
        ("peft", m.peft.clone()),
        (
            "run",
            format!(
                "{} run {} round {}",
                adapter.index.fleet, adapter.index.run_id, adapter.round
            ),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    fedpeft_peft::write_safetensors(&tail, &merged, meta)?;
    let json = args.out.join("model.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&info)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let mut written = vec![tail.clone(), json.clone()];
    // A LoRA adapter on a tail cut from a Hugging Face model: also in PEFT's format.
    if let (Some(rank), Some(alpha), Some(_)) = (
        m.lora_rank,
        m.lora_alpha,
        fedpeft_backbone::hf_peft::hf_base(manifest),
    ) {
        let meta = [
            ("backbone".to_string(), manifest.id.clone()),
            (
                "run".to_string(),
                format!(
                    "{} run {} round {}",
                    adapter.index.fleet, adapter.index.run_id, adapter.round
                ),
            ),
        ]
        .into_iter()
        .collect();
        written.extend(fedpeft_backbone::hf_peft::write(
            &args.out.join(HF_PEFT_DIR),
            manifest,
            usize::from(rank),
            f64::from(alpha),
            &adapter.tensors,
            &meta,
        )?);
    }
    if args.onnx {
        let onnx = args.out.join("model.onnx");
        onnx_export(args, &model.backbone.dir, &tail, &json, &onnx)?;
        written.push(onnx);
    }
    Ok(written)
}

fn onnx_export(
    args: &ExportArgs,
    backbone: &Path,
    tail: &Path,
    json: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    if !args.script.is_file() {
        bail!(
            "--onnx: {} not found (run from a fedpeft checkout, or pass --script)",
            args.script.display()
        );
    }
    let status = std::process::Command::new(&args.python)
        .arg(&args.script)
        .arg("--backbone")
        .arg(backbone)
        .arg("--tail")
        .arg(tail)
        .arg("--model")
        .arg(json)
        .arg("--out")
        .arg(out)
        .status()
        .with_context(|| {
            format!(
                "--onnx: running {} (needs Python with the onnx package: make models sets up \
                 .venv-models; or pass --python)",
                args.python.display()
            )
        })?;
    if !status.success() {
        bail!("--onnx: {} exited with {status}", args.script.display());
    }
    Ok(())
}
