//! The `[model]` table: the backbone, its runtime, the PEFT method and the trunk's inputs.

use std::path::PathBuf;

use fedpeft_config::edge::{ModelTable, RuntimeChoice};
use fedpeft_config::{ConfigError, invalid};
use fedpeft_protocol::PeftMethod;

use super::Cli;

/// The validated model settings.
pub(super) struct Model {
    pub model_dir: PathBuf,
    pub runtime: RuntimeChoice,
    pub peft: PeftMethod,
    pub image_size: usize,
    pub trunk_batch: usize,
    pub max_seq_len: Option<usize>,
    pub threads: usize,
}

/// Flags over `[model]` over the defaults, validated; the folder is required.
pub(super) fn resolve(table: ModelTable, cli: &Cli) -> Result<Model, ConfigError> {
    let model_dir = cli
        .model_dir
        .clone()
        .or(table.dir.clone())
        .ok_or(ConfigError::Missing {
            field: "model.dir",
            flag: "model-dir",
        })?;
    let runtime = cli.runtime.or(table.runtime).unwrap_or(RuntimeChoice::Auto);
    let peft = peft(&table, cli)?;
    let image_size = cli.image_size.or(table.image_size).unwrap_or(96);
    if !(32..=1024).contains(&image_size) {
        return Err(invalid(
            "model.image_size",
            format!("{image_size} is not in 32..=1024"),
        ));
    }
    let trunk_batch = cli.trunk_batch.or(table.trunk_batch).unwrap_or(16);
    if !(1..=1024).contains(&trunk_batch) {
        return Err(invalid(
            "model.trunk_batch",
            format!("{trunk_batch} is not in 1..=1024"),
        ));
    }
    let max_seq_len = cli.max_seq_len.or(table.max_seq_len);
    if let Some(n) = max_seq_len
        && !(2..=512).contains(&n)
    {
        return Err(invalid(
            "model.max_seq_len",
            format!("{n} is not in 2..=512 (BERT-style position embeddings)"),
        ));
    }
    Ok(Model {
        model_dir,
        runtime,
        peft,
        image_size,
        trunk_batch,
        max_seq_len,
        threads: cli.threads.or(table.threads).unwrap_or(0),
    })
}

/// The PEFT method by name (default `head`), with the hyper-parameters it takes.
fn peft(table: &ModelTable, cli: &Cli) -> Result<PeftMethod, ConfigError> {
    let name = cli
        .peft
        .clone()
        .or(table.peft.clone())
        .unwrap_or_else(|| "head".to_string());
    let positive = |field: &'static str, v: u16| {
        if v == 0 {
            Err(invalid(field, "must be at least 1"))
        } else {
            Ok(v)
        }
    };
    Ok(match name.as_str() {
        "head" => PeftMethod::Head,
        "bias" => PeftMethod::Bias,
        "lora" => {
            let alpha = cli.lora_alpha.or(table.lora_alpha).unwrap_or(16.0);
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(invalid(
                    "model.lora_alpha",
                    format!("{alpha} must be finite and > 0"),
                ));
            }
            PeftMethod::Lora {
                rank: positive(
                    "model.lora_rank",
                    cli.lora_rank.or(table.lora_rank).unwrap_or(8),
                )?,
                alpha,
            }
        }
        "adapter" => PeftMethod::Adapter {
            bottleneck: positive(
                "model.bottleneck",
                cli.bottleneck.or(table.bottleneck).unwrap_or(16),
            )?,
        },
        "prompt" => PeftMethod::Prompt {
            tokens: positive(
                "model.prompt_tokens",
                cli.prompt_tokens.or(table.prompt_tokens).unwrap_or(4),
            )?,
        },
        "full-tail" => PeftMethod::FullTail,
        other => {
            return Err(invalid(
                "model.peft",
                format!("`{other}` is not head, bias, lora, adapter, prompt or full-tail"),
            ));
        }
    })
}
