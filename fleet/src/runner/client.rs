//! An edge client's command line: its id, shard and files (the user's own data: its own root,
//! and the fleet's class list in its config file), the model and method as the aggregator got
//! them, the trial's faults for it, and a signed trial's keys.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedpeft_config::edge::{DataTable, EdgeFile};

use super::child::Binaries;
use super::keys::keys_dir;
use crate::trial::Trial;

/// The command line of edge client `index`. `aggregator_key`: the aggregator's public key
/// (hex) in a signed trial, from [`super::make_keys`].
pub fn client_command(
    trial: &Trial,
    bins: &Binaries,
    index: usize,
    broker_url: &str,
    out_dir: &Path,
    aggregator_key: Option<&str>,
) -> Command {
    client_command_in(
        trial,
        bins,
        index,
        broker_url,
        out_dir,
        None,
        aggregator_key,
    )
}

/// The command line of edge client `index`, run inside network namespace `netns` if given
/// (`ip netns exec NS edge-client ...`: `ip` execs the client, so its pid is the client's).
pub fn client_command_in(
    trial: &Trial,
    bins: &Binaries,
    index: usize,
    broker_url: &str,
    out_dir: &Path,
    netns: Option<&str>,
    aggregator_key: Option<&str>,
) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bins.edge_client);
            c
        }
        None => Command::new(&bins.edge_client),
    };
    let id = trial.client_id(index);
    if let Some(path) = client_config(trial, index, out_dir) {
        cmd.arg("--config").arg(path);
    }
    cmd.arg("--broker")
        .arg(broker_url)
        .arg("--fleet")
        .arg(&trial.name)
        .arg("--client-id")
        .arg(&id)
        .arg("--run-id")
        .arg(trial.run_id.to_string())
        .arg("--model-dir")
        .arg(&trial.model.backbone)
        .arg("--runtime")
        .arg(&trial.model.runtime)
        .arg("--peft")
        .arg(&trial.model.peft)
        .arg("--image-size")
        .arg(trial.model.image_size.to_string())
        .arg("--dataset")
        .arg(&trial.data.dataset)
        .arg("--partition")
        .arg(&trial.data.partition)
        .arg("--alpha")
        .arg(trial.data.alpha.to_string())
        .arg("--num-clients")
        .arg(trial.clients.to_string())
        .arg("--client-index")
        .arg(index.to_string())
        .arg("--seed")
        .arg(trial.seed.to_string())
        .arg("--max-packet-bytes")
        .arg(trial.max_packet_bytes.to_string())
        .arg("--cache-dir")
        .arg(&trial.cache_dir)
        .arg("--summary-json")
        .arg(out_dir.join("clients").join(format!("{id}.json")));
    if let Some(root) = trial.client_root(index) {
        cmd.arg("--data-root").arg(root);
    }
    for (flag, value) in optional_args(trial) {
        if let Some(value) = value {
            cmd.arg(flag).arg(value);
        }
    }
    if trial.shared_cache {
        cmd.arg("--cache-shared");
    }
    if trial.dropout > 0.0 {
        cmd.arg("--dropout")
            .arg(trial.dropout.to_string())
            .arg("--dropout-offline-secs")
            .arg(trial.dropout_offline_secs.to_string());
    }
    if let Some(stage) = trial.secagg_dropouts.stage_of(index) {
        cmd.arg("--secagg-drop-after").arg(stage);
    }
    if trial.stragglers.contains(&index) {
        cmd.arg("--straggle-secs")
            .arg(trial.straggle_secs.to_string());
    }
    if trial.signed {
        cmd.arg("--signing-key")
            .arg(keys_dir(out_dir).join(format!("{id}.key")));
        if let Some(key) = aggregator_key {
            cmd.arg("--aggregator-key").arg(key);
        }
    }
    // One compute thread per client: N clients share the machine's cores.
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

/// The flags given only when the trial sets them: the shard's size, and the method's
/// hyper-parameters as the aggregator got them (its adapter layout must be the clients').
fn optional_args(trial: &Trial) -> [(&'static str, Option<String>); 6] {
    let m = &trial.model;
    [
        (
            "--max-examples",
            trial.data.max_examples.map(|v| v.to_string()),
        ),
        ("--lora-rank", m.lora_rank.map(|v| v.to_string())),
        ("--lora-alpha", m.lora_alpha.map(|v| v.to_string())),
        ("--bottleneck", m.bottleneck.map(|v| v.to_string())),
        ("--prompt-tokens", m.prompt_tokens.map(|v| v.to_string())),
        ("--max-seq-len", m.max_seq_len.map(|v| v.to_string())),
    ]
}

/// Client `index`'s config file, for the settings that are not flags: on an emulated link, a
/// keep-alive its link can honour; with the user's own data, the fleet's class list and how to
/// read the files. `None` when it needs none, or if the file cannot be written (the client then
/// stops, naming the setting it lacks).
fn client_config(trial: &Trial, index: usize, out_dir: &Path) -> Option<PathBuf> {
    let mut file = EdgeFile::default();
    if let Some(keep_alive) = keep_alive_secs(trial, index) {
        file.broker.keep_alive_secs = Some(keep_alive);
    }
    let d = &trial.data;
    file.data = DataTable {
        classes: d.classes.clone(),
        labels: d.labels.clone(),
        text_column: d.text_column.clone(),
        label_column: d.label_column.clone(),
        ..DataTable::default()
    };
    if file == EdgeFile::default() {
        return None;
    }
    let path = out_dir
        .join("clients")
        .join(format!("{}.toml", trial.client_id(index)));
    std::fs::write(&path, file.to_toml()).ok().map(|()| path)
}

/// On an emulated link, a keep-alive client `index`'s link can honour; `None` without links.
fn keep_alive_secs(trial: &Trial, index: usize) -> Option<u64> {
    // On a slow link a 64 KiB packet each way can take longer than MQTT's default 30 s
    // keep-alive: give the client room.
    let l = &trial.links.as_ref()?.clients[index].link;
    let packet = trial.max_packet_bytes as f64;
    let secs = 2.0 * (packet / l.up_bytes_per_sec() + packet / l.down_bytes_per_sec())
        + 4.0 * (l.latency_ms + l.jitter_ms) / 1000.0;
    Some((secs.ceil() as u64).clamp(30, 3600))
}
