//! The edge client's config file as written (`edge.toml`): every field optional, unknown keys
//! refused. The edge client merges its flags over it and validates the result into its typed
//! config; the ranges and defaults given here are the ones it applies.
//!
//! ```toml
//! [broker]
//! url = "mqtt://aggregator.local:1883"
//! [client]
//! id = "pi-01"
//! [model]
//! dir = "models/build/efficientnet-lite0"
//! peft = "lora"
//! ```
//!
//! With the `clap` feature, [`RuntimeChoice`] and [`PartitionKind`] are also `clap::ValueEnum`s,
//! so a flag takes exactly the spellings the file does.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{parse_toml, read_toml};
use crate::{BrokerTable, ConfigError, SecurityTable};

/// Which ONNX runtime runs the frozen trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// onnxruntime when this build has it and the library loads, tract otherwise.
    Auto,
    /// onnxruntime through `ort` (needs the `ort` feature and `ORT_DYLIB_PATH`).
    Ort,
    /// tract: pure Rust, no native library; runs everywhere (the armv7 choice).
    Tract,
}

/// How a data set shared by the fleet is split across its clients, or `none`: not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum PartitionKind {
    /// Uniformly random, equal-size shards.
    Iid,
    /// Label proportions per client drawn from Dirichlet(alpha): the usual non-IID split.
    Dirichlet,
    /// The data set's own split (SpamAssassin: by mailing list). Each list stays whole on one
    /// client (largest first to the client with the fewest); mails from no list are spread by
    /// Dirichlet(alpha) over their labels. Only for data sets with natural keys.
    Natural,
    /// No split: the client trains on all of its local data, as a real device does (its
    /// `num_clients` and `index` are not used). Spelled `none`.
    #[serde(rename = "none")]
    #[cfg_attr(feature = "clap", value(name = "none"))]
    Whole,
}

impl PartitionKind {
    /// The name as written in the file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PartitionKind::Iid => "iid",
            PartitionKind::Dirichlet => "dirichlet",
            PartitionKind::Natural => "natural",
            PartitionKind::Whole => "none",
        }
    }
}

/// The `[client]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTable {
    /// Fleet name (the topic root is `fedpeft/v1/{fleet}/`). Default `fedpeft`, as the
    /// aggregator's.
    pub fleet: Option<String>,
    /// This client's id, unique in the fleet. Required.
    pub id: Option<String>,
    /// The training run to take part in (the aggregator's `run_id`). Default 1.
    pub run_id: Option<u64>,
}

/// The `[model]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    /// Folder holding the backbone manifest and its files. Required.
    pub dir: Option<PathBuf>,
    /// Trunk runtime. Default `auto`.
    pub runtime: Option<RuntimeChoice>,
    /// PEFT method: head | bias | lora | adapter | prompt | full-tail (must match the
    /// aggregator's). Default `head`.
    pub peft: Option<String>,
    /// LoRA rank. Default 8.
    pub lora_rank: Option<u16>,
    /// LoRA alpha. Default 16.
    pub lora_alpha: Option<f32>,
    /// Adapter bottleneck width. Default 16.
    pub bottleneck: Option<u16>,
    /// Prompt tokens. Default 4.
    pub prompt_tokens: Option<u16>,
    /// Image side fed to a vision trunk. Default 96.
    pub image_size: Option<usize>,
    /// Tokens per text fed to a text trunk (`[CLS]` and `[SEP]` included; longer texts are
    /// truncated, shorter ones padded). Part of the activation cache key; must match the
    /// aggregator's. Default: the backbone manifest's `max_len` (128 for all-MiniLM-L6-v2).
    pub max_seq_len: Option<usize>,
    /// Threads for the trunk runtime (0 = runtime default). Default 0.
    pub threads: Option<usize>,
    /// Samples per trunk batch while filling the activation cache: the trunk's intermediate
    /// tensors grow with it (the cold start's peak memory on a board). Default 16.
    pub trunk_batch: Option<usize>,
}

/// The `[data]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataTable {
    /// Data set (see [`crate::DatasetKind`]): `fashion-mnist` or `spam-assassin` (its held-out
    /// 20 % is never trained on), or the device's own files: `image-folder`, `idx`, `csv`,
    /// `jsonl`. Default `fashion-mnist`.
    pub dataset: Option<String>,
    /// Where the data is. Named sets: their folder (default: their usual place). Own data
    /// (required): the folder of class folders (`image-folder`), the images file (`idx`), the
    /// `.csv` or `.jsonl` file.
    pub root: Option<PathBuf>,
    /// `idx`: the labels file. Default: beside the images file, its name with `images-idx3`
    /// replaced by `labels-idx1`.
    pub labels: Option<PathBuf>,
    /// `csv` / `jsonl`: the column (field) holding the text. Default `text`.
    pub text_column: Option<String>,
    /// `csv` / `jsonl`: the column (field) holding the label. Default `label`.
    pub label_column: Option<String>,
    /// Own data: the fleet's class list, in label-id order, as the aggregator's
    /// `model.classes` (every device numbers its labels the same way). Required with own data;
    /// refused with a named set (their classes are fixed).
    pub classes: Option<Vec<String>>,
    /// `iid`, `dirichlet`, `natural` (spam-assassin only) or `none` (all of the local data,
    /// as a real device). Default `dirichlet` for a named set, `none` for own data.
    pub partition: Option<PartitionKind>,
    /// Dirichlet concentration (smaller = more skewed). Default 0.5.
    pub alpha: Option<f64>,
    /// How many clients the data set is split across. Default 1.
    pub num_clients: Option<usize>,
    /// This client's shard, `0..num_clients`. Default 0.
    pub index: Option<usize>,
    /// Seed of the split (all clients of a fleet must use the same). Default 42.
    pub seed: Option<u64>,
    /// Keep at most this many local examples (small devices, quick trials). Default: all.
    pub max_examples: Option<usize>,
}

/// The `[cache]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheTable {
    /// Where trunk activations are cached. Default `data/cache`.
    pub dir: Option<PathBuf>,
    /// Activations kept in memory, MiB; beyond that they are read from the cache file.
    /// Default 256.
    pub memory_mb: Option<usize>,
    /// Keep activations on disk for the next run of this client (same trunk, same shard, same
    /// preprocessing). Default true.
    pub persist: Option<bool>,
    /// Key the cache on the whole data set, not this client's shard: the first client of a
    /// fleet runs the trunk once over every sample, every other client (on the same machine
    /// and cache folder) reads its own rows from that one entry. Default false.
    pub shared: Option<bool>,
    /// MiB for the tail's frozen prefix of the local examples: the part of the tail's forward
    /// pass no trained tensor affects (the pooled features when only the head trains, the
    /// conv head's frozen product for bias and LoRA), computed at the first round and reused
    /// by every later step. 0 turns it off. Default 128.
    pub frozen_mb: Option<usize>,
}

/// The `[reconnect]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectTable {
    /// First wait after a lost connection, in ms. Default 500.
    pub initial_ms: Option<u64>,
    /// Longest wait, in ms. Default 30000.
    pub max_ms: Option<u64>,
    /// Growth factor per failed attempt. Default 2.0.
    pub multiplier: Option<f64>,
    /// Random fraction taken off each wait (0 = none, 1 = "full jitter"). Default 0.5.
    pub jitter: Option<f64>,
}

/// The `[report]` table.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportTable {
    /// Write a JSON summary (rounds, bytes up/down) here at exit. Default: none.
    pub summary_json: Option<PathBuf>,
}

/// The `[faults]` table: emulated unreliability, for fleet trials (a real device needs none).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsTable {
    /// Probability that a round this client is sampled in ends with it vanishing mid-round:
    /// it trains, then drops its connection without DISCONNECT and without publishing (the
    /// broker publishes its last will), and comes back `dropout_offline_secs` later. Drawn per
    /// round from (`data.seed`, `data.index`, round), so a trial's dropouts replay. Default 0.
    pub dropout: Option<f64>,
    /// How long a client that vanished stays away before reconnecting, seconds. Default 2.
    pub dropout_offline_secs: Option<f64>,
    /// A straggler: hold every finished update this long before publishing it, seconds (a slow
    /// device). An update the round's deadline has passed by is not sent. Default 0.
    pub straggle_secs: Option<f64>,
    /// In secure-aggregation rounds, go silent for the rest of the round after sending this
    /// stage's message: `"keys"`, `"shares"` or `"masked"`, in every secure round, or in round
    /// N only with `"shares@N"` (a device that drops out mid-protocol). Default none.
    pub secagg_drop_after: Option<String>,
}

/// The edge client's TOML file as written, before validation. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeFile {
    /// The `[broker]` table, as the aggregator spells it. For an edge client: `url` defaults to
    /// `mqtt://127.0.0.1:1883`; keep-alive 30 s; `max_packet_bytes` must exceed the
    /// aggregator's `max_payload_bytes` (its adapter chunks) by 1 KiB at least (default
    /// 1048576, the aggregator's broker limit); `username` is, with the example ACL, the client
    /// id; `password`, `password_file` or `password_env` give its password. The aggregator's
    /// own keys (`host`, `port`, `client_id`) are refused.
    #[serde(default, skip_serializing_if = "is_default")]
    pub broker: BrokerTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub client: ClientTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub model: ModelTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub data: DataTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache: CacheTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub reconnect: ReconnectTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub report: ReportTable,
    /// The `[security]` table (`docs/protocol.md`, "Signed envelopes"). For an edge client:
    /// `signing_key` is this client's secret key file (`edge-client keygen`), which signs Join,
    /// Status and updates; `aggregator_key` is the aggregator's public key (64 hex digits, as
    /// `aggregator keygen` prints it). `enrolled_keys` is the aggregator's and is refused.
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: SecurityTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub faults: FaultsTable,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

impl EdgeFile {
    /// Parses TOML text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<EdgeFile, ConfigError> {
        parse_toml(text, path)
    }

    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<EdgeFile, ConfigError> {
        read_toml(path)
    }

    /// The file as TOML text (what [`EdgeFile::parse`] reads back); empty tables are left out.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an edge file always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<EdgeFile, ConfigError> {
        EdgeFile::parse(text, Path::new("edge.toml"))
    }

    #[test]
    fn every_table_is_read_and_absent_ones_are_empty() {
        let file = parse(
            r#"
            [broker]
            url = "mqtts://broker.lan"
            ca_file = "ca.crt"
            [client]
            id = "pi-07"
            [model]
            runtime = "tract"
            peft = "lora"
            [data]
            partition = "natural"
            [faults]
            dropout = 0.25
            "#,
        )
        .unwrap();
        assert_eq!(file.broker.url.as_deref(), Some("mqtts://broker.lan"));
        assert_eq!(file.client.id.as_deref(), Some("pi-07"));
        assert_eq!(file.model.runtime, Some(RuntimeChoice::Tract));
        assert_eq!(file.data.partition, Some(PartitionKind::Natural));
        assert_eq!(file.faults.dropout, Some(0.25));
        assert_eq!(file.cache, CacheTable::default());
        assert_eq!(file.security, SecurityTable::default());
        assert_eq!(parse("").unwrap(), EdgeFile::default());
    }

    #[test]
    fn unknown_keys_and_tables_are_refused_with_their_name_and_the_file() {
        for (text, key) in [
            ("[client]\nfleat = \"x\"\n", "fleat"),
            ("[brokr]\nurl = \"mqtt://x\"\n", "brokr"),
            ("[model]\nmax_seq_length = 64\n", "max_seq_length"),
            ("[faults]\nvanish = 1\n", "vanish"),
            ("[data]\npartition = \"shards\"\n", "shards"),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(key), "{text}: {msg}");
            assert!(msg.contains("edge.toml"), "{text}: {msg}");
        }
    }

    #[test]
    fn a_file_written_back_reads_the_same() {
        let file = parse(
            "[client]\nid = \"a\"\n[model]\nruntime = \"auto\"\n[data]\npartition = \"iid\"\n",
        )
        .unwrap();
        let text = file.to_toml();
        assert_eq!(parse(&text).unwrap(), file);
        assert!(!text.contains("[cache]"), "{text}");
        assert_eq!(EdgeFile::default().to_toml().trim(), "");
    }

    #[test]
    fn partition_names_are_the_spellings_of_the_file() {
        for kind in [
            PartitionKind::Iid,
            PartitionKind::Dirichlet,
            PartitionKind::Natural,
            PartitionKind::Whole,
        ] {
            let text = format!("[data]\npartition = \"{}\"\n", kind.name());
            assert_eq!(parse(&text).unwrap().data.partition, Some(kind));
        }
    }
}
