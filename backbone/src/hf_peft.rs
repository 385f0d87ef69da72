//! LoRA adapters in the Hugging Face PEFT format, both ways, for backbones whose tail is a run
//! of a Hugging Face model's encoder layers (all-MiniLM-L6-v2: the tail is
//! `sentence-transformers/all-MiniLM-L6-v2`'s layers 4 and 5).
//!
//! A folder holds what `PeftModel.from_pretrained(AutoModel.from_pretrained(base), folder)`
//! reads:
//! - `adapter_config.json`: `peft_type` LORA, `r`, `lora_alpha`, `target_modules` (the base
//!   model's module names: `query`, `value`, ...), `layers_to_transform` with
//!   `layers_pattern = "layer"` (only the tail's layers carry LoRA), `task_type`
//!   `FEATURE_EXTRACTION`, `base_model_name_or_path`;
//! - `adapter_model.safetensors`: `base_model.model.encoder.layer.{n}.{module}.lora_A.weight`
//!   (`[r, in]`) and `.lora_B.weight` (`[out, r]`), the scaling `lora_alpha / r` as in fedpeft;
//! - `fedpeft-head.safetensors`: the classifier (`head.weight`, `head.bias`) that reads the
//!   masked mean of the last hidden state. PEFT has no place for a head on a mean-pooled
//!   encoder (BERT's own classification head reads the pooler), so it travels beside the
//!   adapter; the embeddings need only the adapter.
//!
//! Reading refuses a folder for another base model, a method other than LoRA, settings PEFT
//! would apply differently (bias training, rank patterns, DoRA, fan-in/fan-out weights),
//! layers outside the tail, and tensors of the wrong name or shape, each with the file named.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use fedpeft_peft::{FrozenWeights, NamedTensor};
use serde_json::json;

use crate::error::{BackboneError, Result};
use crate::manifest::{Family, Manifest};

/// PEFT's adapter settings file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// fedpeft's classifier beside the adapter.
pub const HEAD_WEIGHTS: &str = "fedpeft-head.safetensors";

/// The Hugging Face model a tail was cut from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HfBase {
    /// The model's id on the Hugging Face hub.
    pub model_id: &'static str,
    /// The model's encoder layer that is the tail's first block.
    pub first_layer: usize,
}

/// The Hugging Face model `manifest`'s tail is part of, if it is one.
pub fn hf_base(manifest: &Manifest) -> Option<HfBase> {
    match (manifest.id.as_str(), &manifest.family) {
        // models/export_minilm.py: the trunk ends after encoder layer 3 of 6; the tail is
        // layers 4 and 5 (k = 2).
        ("all-minilm-l6-v2", Family::Transformer) => Some(HfBase {
            model_id: "sentence-transformers/all-MiniLM-L6-v2",
            first_layer: 4,
        }),
        _ => None,
    }
}

/// fedpeft's linear layers in a transformer block and the BERT modules they are.
const MODULES: [(&str, &str); 6] = [
    ("attn.q", "attention.self.query"),
    ("attn.k", "attention.self.key"),
    ("attn.v", "attention.self.value"),
    ("attn.o", "attention.output.dense"),
    ("ffn.up", "intermediate.dense"),
    ("ffn.down", "output.dense"),
];

/// The short name PEFT's `target_modules` matches (the last part of the module's path).
fn short(hf_module: &str) -> &str {
    hf_module.rsplit('.').next().unwrap_or(hf_module)
}

/// A LoRA adapter read from a PEFT folder, in fedpeft's tensor names.
#[derive(Debug, Clone)]
pub struct HfLora {
    pub rank: usize,
    pub alpha: f64,
    /// `blocks.{i}.{module}.lora_a` / `.lora_b`.
    pub lora: Vec<NamedTensor>,
    /// `head.weight` / `head.bias`, when `fedpeft-head.safetensors` is there.
    pub head: Vec<NamedTensor>,
}

fn bad(path: &Path, reason: impl Into<String>) -> BackboneError {
    BackboneError::Manifest {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn base_of(manifest: &Manifest, dir: &Path) -> Result<HfBase> {
    hf_base(manifest).ok_or_else(|| {
        bad(
            dir,
            format!(
                "backbone `{}` is not part of a Hugging Face model fedpeft maps (only \
                 all-minilm-l6-v2 has a PEFT adapter format)",
                manifest.id
            ),
        )
    })
}

/// Writes a LoRA adapter (`trainable`: a LoRA tail's trainable tensors, fedpeft names) as a
/// PEFT folder in `dir` (created), with the classifier beside it. `metadata` goes into both
/// safetensors headers. Returns the files written.
pub fn write(
    dir: &Path,
    manifest: &Manifest,
    rank: usize,
    alpha: f64,
    trainable: &[NamedTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<PathBuf>> {
    let base = base_of(manifest, dir)?;
    let mut lora = Vec::new();
    let mut head = Vec::new();
    let mut targets = BTreeSet::new();
    let mut layers = BTreeSet::new();
    for t in trainable {
        if t.name.starts_with("head.") {
            head.push(t.clone());
            continue;
        }
        let (block, module, factor) = parse_fedpeft(&t.name).ok_or_else(|| {
            bad(
                dir,
                format!(
                    "tensor `{}` is not a LoRA factor of a tail block: only LoRA adapters have \
                     a PEFT format",
                    t.name
                ),
            )
        })?;
        let hf_module = MODULES
            .iter()
            .find(|(f, _)| *f == module)
            .map(|(_, h)| *h)
            .ok_or_else(|| {
                bad(
                    dir,
                    format!("tensor `{}`: unknown module `{module}`", t.name),
                )
            })?;
        let layer = base.first_layer + block;
        targets.insert(short(hf_module).to_string());
        layers.insert(layer);
        let ab = if factor == "lora_a" {
            "lora_A"
        } else {
            "lora_B"
        };
        lora.push(NamedTensor {
            name: format!("base_model.model.encoder.layer.{layer}.{hf_module}.{ab}.weight"),
            shape: t.shape.clone(),
            values: t.values.clone(),
        });
    }
    if lora.is_empty() {
        return Err(bad(dir, "no LoRA factor among the adapter's tensors"));
    }
    std::fs::create_dir_all(dir).map_err(|e| BackboneError::io(dir, e))?;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base.model_id,
        "revision": null,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets.iter().collect::<Vec<_>>(),
        "layers_to_transform": layers.iter().collect::<Vec<_>>(),
        "layers_pattern": "layer",
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let config_path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    std::fs::write(&config_path, text + "\n").map_err(|e| BackboneError::io(&config_path, e))?;
    let meta: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .chain([("format".to_string(), "pt".to_string())])
        .collect();
    let weights = dir.join(ADAPTER_WEIGHTS);
    let st_err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: fedpeft_peft::PeftError| bad(&p, e.to_string())
    };
    fedpeft_peft::write_safetensors(&weights, &lora, meta.clone()).map_err(st_err(&weights))?;
    let mut files = vec![config_path, weights];
    if !head.is_empty() {
        let path = dir.join(HEAD_WEIGHTS);
        fedpeft_peft::write_safetensors(&path, &head, meta).map_err(st_err(&path))?;
        files.push(path);
    }
    Ok(files)
}

/// `blocks.{i}.{module}.{lora_a|lora_b}` → (i, module, factor).
fn parse_fedpeft(name: &str) -> Option<(usize, &str, &str)> {
    let rest = name.strip_prefix("blocks.")?;
    let (block, rest) = rest.split_once('.')?;
    let (module, factor) = rest.rsplit_once('.')?;
    matches!(factor, "lora_a" | "lora_b").then_some(())?;
    Some((block.parse().ok()?, module, factor))
}

/// Reads a PEFT LoRA folder for `manifest`'s tail: the factors in fedpeft's names, the rank
/// and alpha, and the classifier if it is beside the adapter. `blocks`: the tail's number of
/// blocks.
pub fn read(dir: &Path, manifest: &Manifest, blocks: usize) -> Result<HfLora> {
    let base = base_of(manifest, dir)?;
    let config_path = dir.join(ADAPTER_CONFIG);
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| BackboneError::io(&config_path, e))?;
    let c: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&config_path, format!("not JSON: {e}")))?;
    let field = |k: &str| c.get(k).filter(|v| !v.is_null());
    let peft_type = field("peft_type").and_then(|v| v.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(
            &config_path,
            format!("peft_type `{peft_type}`: only LORA adapters are read"),
        ));
    }
    // The hub id, or a local copy of it (a folder whose path names the model).
    let names_base = |b: &str| {
        let b = b.to_ascii_lowercase().replace('_', "-");
        b == base.model_id.to_ascii_lowercase() || b.contains(&manifest.id)
    };
    if let Some(b) = field("base_model_name_or_path").and_then(|v| v.as_str())
        && !names_base(b)
    {
        return Err(bad(
            &config_path,
            format!(
                "an adapter for `{b}`, not for {} (backbone `{}`)",
                base.model_id, manifest.id
            ),
        ));
    }
    let rank = field("r")
        .and_then(|v| v.as_u64())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad(&config_path, "`r` is not a positive integer"))? as usize;
    let alpha = field("lora_alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| bad(&config_path, "`lora_alpha` is not a number"))?;
    for (key, ok) in [
        ("bias", field("bias").is_none_or(|v| v == "none")),
        ("use_dora", field("use_dora").is_none_or(|v| v == false)),
        ("use_rslora", field("use_rslora").is_none_or(|v| v == false)),
        (
            "fan_in_fan_out",
            field("fan_in_fan_out").is_none_or(|v| v == false),
        ),
        (
            "rank_pattern",
            field("rank_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            field("alpha_pattern").is_none_or(|v| v.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "modules_to_save",
            field("modules_to_save").is_none_or(|v| v.as_array().is_some_and(|a| a.is_empty())),
        ),
    ] {
        if !ok {
            return Err(bad(
                &config_path,
                format!("`{key}` = {}: fedpeft's LoRA has no such setting", c[key]),
            ));
        }
    }

    let weights_path = dir.join(ADAPTER_WEIGHTS);
    let weights = FrozenWeights::from_safetensors(&weights_path)
        .map_err(|e| bad(&weights_path, e.to_string()))?;
    let mut lora = Vec::new();
    for name in weights.names() {
        let (block, module, factor) = parse_hf(name, base.first_layer).ok_or_else(|| {
            bad(
                &weights_path,
                format!(
                    "tensor `{name}` is not a LoRA factor of encoder layers {}..{} \
                     (base_model.model.encoder.layer.N.<module>.lora_A|lora_B.weight)",
                    base.first_layer,
                    base.first_layer + blocks - 1
                ),
            )
        })?;
        if block >= blocks {
            return Err(bad(
                &weights_path,
                format!(
                    "tensor `{name}`: layer {} is in the frozen trunk (the tail is layers \
                     {}..{})",
                    base.first_layer + block,
                    base.first_layer,
                    base.first_layer + blocks - 1
                ),
            ));
        }
        let shape = weights.shape(name).unwrap_or(&[]).to_vec();
        let values = weights
            .get::<f32>(name, &shape.iter().map(|&s| Some(s)).collect::<Vec<_>>())
            .map_err(|e| bad(&weights_path, e.to_string()))?
            .into_raw_vec_and_offset()
            .0;
        let factor_rank = if factor == "lora_a" {
            shape.first()
        } else {
            shape.get(1)
        };
        if shape.len() != 2 || factor_rank != Some(&rank) {
            return Err(bad(
                &weights_path,
                format!("tensor `{name}` has shape {shape:?}, not rank r = {rank}"),
            ));
        }
        lora.push(NamedTensor {
            name: format!("blocks.{block}.{module}.{factor}"),
            shape,
            values,
        });
    }
    if lora.is_empty() {
        return Err(bad(&weights_path, "no LoRA factor in the file"));
    }
    lora.sort_by(|a, b| a.name.cmp(&b.name));
    let head_path = dir.join(HEAD_WEIGHTS);
    let head = if head_path.is_file() {
        let w = FrozenWeights::from_safetensors(&head_path)
            .map_err(|e| bad(&head_path, e.to_string()))?;
        let mut head = Vec::new();
        for name in ["head.weight", "head.bias"] {
            let shape = w
                .shape(name)
                .ok_or_else(|| bad(&head_path, format!("no `{name}`")))?
                .to_vec();
            let values = w
                .get::<f32>(name, &shape.iter().map(|&s| Some(s)).collect::<Vec<_>>())
                .map_err(|e| bad(&head_path, e.to_string()))?
                .into_raw_vec_and_offset()
                .0;
            head.push(NamedTensor {
                name: name.into(),
                shape,
                values,
            });
        }
        head
    } else {
        Vec::new()
    };
    Ok(HfLora {
        rank,
        alpha,
        lora,
        head,
    })
}

/// `base_model.model.encoder.layer.{n}.{module}.lora_{A|B}.weight` → (block, fedpeft module,
/// factor), PEFT's adapter-name infix (`.default`) allowed.
fn parse_hf(name: &str, first_layer: usize) -> Option<(usize, &'static str, &'static str)> {
    let rest = name
        .strip_prefix("base_model.model.")
        .unwrap_or(name)
        .strip_prefix("encoder.layer.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (module, factor) = rest.rsplit_once('.')?;
    let factor = match factor {
        "lora_A" => "lora_a",
        "lora_B" => "lora_b",
        _ => return None,
    };
    let fedpeft = MODULES.iter().find(|(_, h)| *h == module)?.0;
    Some((layer.checked_sub(first_layer)?, fedpeft, factor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            parse_hf(
                "base_model.model.encoder.layer.5.attention.self.value.lora_B.weight",
                4
            ),
            Some((1, "attn.v", "lora_b"))
        );
        assert_eq!(
            parse_hf("encoder.layer.4.output.dense.lora_A.default.weight", 4),
            Some((0, "ffn.down", "lora_a"))
        );
        assert_eq!(
            parse_hf(
                "base_model.model.encoder.layer.3.attention.self.query.lora_A.weight",
                4
            ),
            None,
            "layer 3 is in the trunk"
        );
        assert_eq!(
            parse_hf("base_model.model.pooler.dense.lora_A.weight", 4),
            None
        );
        assert_eq!(
            parse_fedpeft("blocks.1.attn.q.lora_a"),
            Some((1, "attn.q", "lora_a"))
        );
        assert_eq!(parse_fedpeft("head.weight"), None);
    }
}
