//! The aggregator's config file for a trial, as the type `fedpeft_config` defines for it.

use std::path::Path;

use fedpeft_config::aggregator::{AggregatorFile, LocalTable, ModelTable, OutputTable};
use fedpeft_config::{BrokerTable, SecurityTable};

use super::keys::keys_dir;
use crate::trial::{Broker, LocalSpec, Trial};

/// The aggregator's config file for this trial; written with [`AggregatorFile::to_toml`].
pub fn aggregator_config(trial: &Trial, out_dir: &Path, port: Option<u16>) -> AggregatorFile {
    let broker = match &trial.broker {
        Broker::External { url } => BrokerTable {
            url: Some(url.clone()),
            ..BrokerTable::default()
        },
        Broker::Embedded => BrokerTable {
            url: Some("embedded".into()),
            port: Some(port.unwrap_or(0)),
            ..BrokerTable::default()
        },
    };
    let security = if trial.signed {
        let keys = keys_dir(out_dir);
        SecurityTable {
            signing_key: Some(keys.join("aggregator.key")),
            enrolled_keys: Some(keys.join("enrolled.toml")),
            ..SecurityTable::default()
        }
    } else {
        SecurityTable::default()
    };
    AggregatorFile {
        fleet: Some(trial.name.clone()),
        run_id: Some(trial.run_id),
        rounds: Some(trial.rounds),
        seed: Some(trial.seed),
        min_clients: Some(trial.min_clients),
        start_clients: Some(trial.start_clients),
        fraction: Some(trial.fraction),
        quorum: Some(trial.quorum),
        round_timeout_secs: Some(trial.round_timeout_secs),
        global_dtype: Some(trial.global_dtype.clone()),
        strategy: trial.strategy.clone(),
        local: local_table(&trial.local),
        broker: BrokerTable {
            max_packet_bytes: Some(trial.max_packet_bytes),
            ..broker
        },
        model: model_table(trial),
        security,
        output: OutputTable {
            dir: Some(out_dir.to_path_buf()),
            resume: Some(false),
            keep_globals: None,
        },
        monitor: monitor_table(trial),
        secure_aggregation: trial.secure_aggregation.clone(),
        buffered: trial.buffered.clone(),
        ..AggregatorFile::default()
    }
}

/// The trial's `[monitor]`, each client labelled with its link preset (when links are
/// emulated and the trial names none itself).
fn monitor_table(trial: &Trial) -> fedpeft_config::aggregator::MonitorTable {
    let Some(mut m) = trial.monitor.clone() else {
        return Default::default();
    };
    if m.labels.is_none()
        && let Some(plan) = &trial.links
    {
        m.labels = Some(
            plan.clients
                .iter()
                .enumerate()
                .map(|(i, c)| (trial.client_id(i), c.profile.clone()))
                .collect(),
        );
    }
    m
}

/// The trial's `[local]` as the aggregator's (which holds `f32`s).
fn local_table(local: &LocalSpec) -> LocalTable {
    let f = |v: Option<f64>| v.map(as_f32);
    LocalTable {
        epochs: local.epochs,
        batch_size: local.batch_size,
        learning_rate: f(local.learning_rate),
        optimizer: local.optimizer.clone(),
        momentum: f(local.momentum),
        weight_decay: f(local.weight_decay),
        fedprox_mu: f(local.fedprox_mu),
        update_dtype: local.update_dtype.clone(),
        top_k_fraction: f(local.top_k_fraction),
        dp_clip_norm: f(local.dp_clip_norm),
        dp_noise_multiplier: f(local.dp_noise_multiplier),
    }
}

/// The aggregator's `[model]`: the trial's model, the held-out data (the same data set as the
/// clients', from `data.eval_root`, else a named set's `data.root`) and the fleet's class list.
fn model_table(trial: &Trial) -> ModelTable {
    let m = &trial.model;
    ModelTable {
        backbone: Some(m.backbone.clone()),
        peft: Some(m.peft.clone()),
        lora_rank: m.lora_rank,
        lora_alpha: m.lora_alpha.map(as_f32),
        bottleneck: m.bottleneck,
        prompt_tokens: m.prompt_tokens,
        max_seq_len: m.max_seq_len,
        image_size: Some(m.image_size),
        dataset: Some(trial.data.dataset.clone()),
        eval_root: trial.eval_root(),
        eval_labels: trial.data.eval_labels.clone(),
        text_column: trial.data.text_column.clone(),
        label_column: trial.data.label_column.clone(),
        classes: trial.data.classes.clone(),
        eval_examples: Some(m.eval_examples),
        cache_dir: Some(trial.cache_dir.clone()),
        ..ModelTable::default()
    }
}

/// The `f32` the aggregator reads from the number as the trial file wrote it: the shortest text
/// of the `f64`, parsed as `f32` (rounding the `f64` instead could land one ulp away).
pub(super) fn as_f32(v: f64) -> f32 {
    v.to_string().parse().unwrap_or(v as f32)
}
