//! The aggregator's config file as written: every field optional, unknown keys refused. The
//! aggregator validates it into its typed `Config` (ranges, defaults, files); the fleet runner
//! builds one of these for each trial and writes it as TOML.
//!
//! The book's reference page "Aggregator config" documents every key with its default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::broker::EmbeddedBrokerTable;
use crate::error::{ConfigError, parse_toml, read_toml};
use crate::strategy::StrategyKind;
use crate::{BrokerTable, SecurityTable};

/// The aggregator's config file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorFile {
    /// Topic namespace `fedpeft/v1/{fleet}/…`. Default `fedpeft`.
    pub fleet: Option<String>,
    /// Tags every message; clients drop other runs. Default 1.
    pub run_id: Option<u64>,
    /// Rounds after the initial adapter. Default 5.
    pub rounds: Option<u32>,
    /// Sampling and per-round seeds. Default 42.
    pub seed: Option<u64>,
    /// Joined clients needed to start a round; the fewest sampled. Default 2.
    pub min_clients: Option<usize>,
    /// Joined clients needed before round 1 only. Default `min_clients`.
    pub start_clients: Option<usize>,
    /// Fraction of available clients sampled, in (0, 1]. Default 1.0.
    pub fraction: Option<f64>,
    /// Accepted updates needed at the deadline. Default `min_clients`.
    pub quorum: Option<usize>,
    /// Deadline after the announcement, seconds. Default 120.
    pub round_timeout_secs: Option<f64>,
    /// `"skip"` or `{ extend = { max_extensions = N } }`. Default `"skip"`.
    pub on_quorum_failure: Option<QuorumFailureSetting>,
    /// Largest update on the wire (all chunks), bytes. Default 16 MiB.
    pub max_update_bytes: Option<u64>,
    /// Publishes above this are chunked. Default 256 KiB or less, to fit the packet limit.
    pub max_payload_bytes: Option<usize>,
    /// Chunked updates held at once while their other chunks arrive. Default 64.
    pub max_chunked_updates: Option<usize>,
    /// Bytes those may reserve, all together. Default 4 × `max_update_bytes`.
    pub max_reassembly_bytes: Option<u64>,
    /// L2 bound on each client delta. Default none.
    pub max_update_norm: Option<f64>,
    /// Bound = this × the median norm of the previous round's updates. Default none.
    pub adaptive_norm_multiple: Option<f64>,
    /// Whole-backbone parameters for the full-model comparison; 0 = from the model. Default 0.
    pub backbone_params: Option<u64>,
    /// f32 | f16 | int8: encoding of the published global adapter. Default f32.
    pub global_dtype: Option<String>,
    /// The `[strategy]` table. Default FedAvg.
    pub strategy: Option<StrategyKind>,
    /// `[dp]`: client-level DP at the aggregator. Default none.
    pub dp: Option<DpTable>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub local: LocalTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub broker: BrokerTable,
    /// `[embedded_broker]`: logins and the topic ACL of the embedded broker. Default none.
    #[serde(default, skip_serializing_if = "is_default")]
    pub embedded_broker: EmbeddedBrokerTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub model: ModelTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub output: OutputTable,
    #[serde(default, skip_serializing_if = "is_default")]
    pub security: SecurityTable,
    /// `[monitor]`: Prometheus metrics and the live dashboard. Default off.
    #[serde(default, skip_serializing_if = "is_default")]
    pub monitor: MonitorTable,
    /// `secure_aggregation = true`, or a `[secure_aggregation]` table
    /// ([`SecureAggregationTable`]): the aggregator learns only the sum of the updates. Kept as
    /// TOML here and checked by the aggregator, so an error names the key. Default off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<toml::Value>,
    /// `[site]`: run as a site under a root aggregator, whose topics reach this broker over a
    /// bridge. Default none (a root, or a flat run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteTable>,
    /// `[async]`: asynchronous buffered aggregation (FedBuff): no round barrier. Default none
    /// (synchronous rounds).
    #[serde(default, rename = "async", skip_serializing_if = "Option::is_none")]
    pub buffered: Option<AsyncTable>,
}

/// `[async]`: a new global adapter from every `buffer` accepted updates, stale ones weighted
/// down; clients train whenever they are free on the newest adapter they hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AsyncTable {
    /// K: updates folded into each new global adapter. Required.
    pub buffer: Option<usize>,
    /// Updates trained for up to this many versions before the current one are accepted.
    /// Default 4.
    pub max_staleness: Option<u32>,
    /// An update τ versions behind weighs (1 + τ)^-a. Default 0.5.
    pub staleness_exponent: Option<f64>,
}

/// `[site]`: this aggregator serves the devices on its broker for a root aggregator, and
/// forwards one exact partial aggregate per round.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteTable {
    /// The root's fleet name (its topics, bridged to this broker). Required.
    pub root_fleet: Option<String>,
    /// The root's run id. Default 1 (the root's default).
    pub root_run_id: Option<u64>,
    /// This site's client id in the root's fleet. Required.
    pub id: Option<String>,
    /// The site closes its round this many seconds before the root's deadline, so its
    /// aggregate reaches the root in time. Default 2.
    pub margin_secs: Option<f64>,
}

/// `[secure_aggregation]`: SecAgg+ rounds. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationTable {
    /// Off with `false` (the table kept for later). Default true.
    pub enabled: Option<bool>,
    /// k, each client's neighbourhood size (even). Default 2·⌈log2 n⌉ for n sampled clients,
    /// everyone when that is n − 1 or more.
    pub neighbours: Option<u16>,
    /// t, shares needed to reconstruct, k/2 < t <= k. Default ⌊k/2⌋ + 1.
    pub threshold: Option<u16>,
    /// m, the masked sum is in Z_{2^m}, m bits per value on the wire (12..=32). Default 16.
    pub modulus_bits: Option<u8>,
    /// Update values are clipped to [-clip, clip] before quantization. Default 0.25.
    pub clip: Option<f32>,
    /// Deadline of each key, share and unmask stage, seconds. Default 30.
    pub stage_timeout_secs: Option<f64>,
}

/// `[monitor]`: the aggregator serves `/metrics` (Prometheus text format), a live dashboard at
/// `/` and its data at `/api/state` and `/api/events` (server-sent events).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorTable {
    /// Address to serve on, e.g. `"127.0.0.1:9464"`; port 0 picks a free one (logged). Default
    /// none: no monitor.
    pub listen: Option<String>,
    /// File whose first line (16 characters or more) is a bearer token every request must
    /// carry. Default none (and a warning in the log when `listen` is not loopback).
    pub token_file: Option<PathBuf>,
    /// Keep serving the final state this many seconds after the run ends. Default 0.
    pub linger_secs: Option<f64>,
    /// A label per client id for the dashboard's client table (a fleet trial sets each
    /// client's link preset). Default none.
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

impl AggregatorFile {
    /// Parses TOML text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<AggregatorFile, ConfigError> {
        parse_toml(text, path)
    }

    /// Reads and parses a TOML file.
    pub fn read(path: &Path) -> Result<AggregatorFile, ConfigError> {
        read_toml(path)
    }

    /// The file as TOML text (what [`AggregatorFile::parse`] reads back).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an aggregator file always serializes")
    }
}

/// `[dp]`: client-level DP at the aggregator (DP-FedAvg).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DpTable {
    /// S: each delta clipped to this L2 norm. Required.
    pub clip_norm: Option<f64>,
    /// σ: noise std σ·S/expected_clients per coordinate. Required.
    pub noise_multiplier: Option<f64>,
    /// N: clients that could be sampled (q = W/N). Required.
    pub fleet_size: Option<usize>,
    /// W: fixed denominator. Default max(min_clients, ⌈fraction·N⌉).
    pub expected_clients: Option<usize>,
    /// δ at which ε is reported. Default 1/N^1.1.
    pub delta: Option<f64>,
    /// Tests only: deterministic noise. Default: the operating system's randomness.
    pub noise_seed: Option<u64>,
    /// Secure aggregation only (distributed DP): the fewest masked inputs a round's sum may
    /// hold; the devices' noise is calibrated so that this many carry the full noise.
    /// Default: the quorum.
    pub min_contributions: Option<usize>,
}

/// What to do when a round's deadline passes short of its quorum.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum QuorumFailureSetting {
    /// Record the round as failed, keep the global adapter, go on.
    Skip,
    /// Extend the deadline by one round timeout at most `max_extensions` times, then skip.
    Extend { max_extensions: u32 },
}

/// `[local]`: the local training instructions announced to clients every round.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTable {
    /// Default 1.
    pub epochs: Option<u16>,
    /// Default 32.
    pub batch_size: Option<u32>,
    /// Default 0.05.
    pub learning_rate: Option<f32>,
    /// sgd | adamw. Default sgd.
    pub optimizer: Option<String>,
    /// sgd. Default 0.
    pub momentum: Option<f32>,
    /// Default 0.
    pub weight_decay: Option<f32>,
    /// FedProx proximal term μ. Default 0.
    pub fedprox_mu: Option<f32>,
    /// f32 | f16 | int8. Default f32.
    pub update_dtype: Option<String>,
    /// Top-k sparsification of updates, in (0, 1]. Default none.
    pub top_k_fraction: Option<f32>,
    /// DP-SGD on the clients: both or neither. Default none.
    pub dp_clip_norm: Option<f32>,
    pub dp_noise_multiplier: Option<f32>,
}

/// `[model]`: what the run trains and how it is evaluated.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    /// Backbone directory (manifest). Default none.
    pub backbone: Option<PathBuf>,
    /// head | bias | lora | adapter | prompt | full-tail. Default head.
    pub peft: Option<String>,
    /// lora. Default 8.
    pub lora_rank: Option<u16>,
    /// lora. Default 16.
    pub lora_alpha: Option<f32>,
    /// adapter. Default 16.
    pub bottleneck: Option<u16>,
    /// prompt. Default 4.
    pub prompt_tokens: Option<u16>,
    /// Held-out examples evaluated each round. Default 2000.
    pub eval_examples: Option<usize>,
    /// Held-out set: fashion-mnist | spam-assassin, or the user's own data: image-folder |
    /// idx | csv | jsonl (read from `eval_root`). Default fashion-mnist.
    pub dataset: Option<String>,
    /// Where the held-out data is. fashion-mnist: the folder with `t10k-*-ubyte.gz` (default
    /// `$FEDPEFT_FASHION_MNIST`, else Debian's); spam-assassin: the corpus (its seeded 20 %
    /// is held out; default `$FEDPEFT_SPAM_ASSASSIN`, else `data/cache/spam-assassin`). Own
    /// data (required): the class folders, the IDX images file, the CSV or JSONL file.
    pub eval_root: Option<PathBuf>,
    /// idx: the held-out labels file. Default: beside `eval_root`, by MNIST's naming.
    pub eval_labels: Option<PathBuf>,
    /// csv | jsonl: the text column (field). Default `text`.
    pub text_column: Option<String>,
    /// csv | jsonl: the label column (field). Default `label`.
    pub label_column: Option<String>,
    /// Own data: the fleet's class list, in label-id order; every client's `data.classes`
    /// must be the same. Default for image-folder: the sub-folder names of `eval_root`,
    /// sorted; required for idx, csv and jsonl.
    pub classes: Option<Vec<String>>,
    /// Trunk input side (the clients' must match). Default 96.
    pub image_size: Option<usize>,
    /// Tokens per text (the clients' must match). Default: the manifest's.
    pub max_seq_len: Option<usize>,
    /// Trunk threads for the held-out activations. Default 2.
    pub threads: Option<usize>,
    /// Held-out activations kept for the next run. Default `data/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Without a backbone: the adapter is these zero tensors and nothing is evaluated.
    pub tensors: Option<Vec<TensorShape>>,
    /// lora on a backbone cut from a Hugging Face model (all-minilm-l6-v2): start the run
    /// from this Hugging Face PEFT LoRA folder (`adapter_config.json` +
    /// `adapter_model.safetensors`, and `fedpeft-head.safetensors` if it is there) instead of
    /// a fresh adapter. Its rank and alpha must be `lora_rank` and `lora_alpha`. Default none.
    pub initial_adapter: Option<PathBuf>,
}

/// A named tensor shape (`[model] tensors`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TensorShape {
    pub name: String,
    pub shape: Vec<u32>,
}

/// `[output]`: where the report and checkpoint go.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputTable {
    /// report.json, report.csv, aggregator.ckpt. Default `runs/latest`.
    pub dir: Option<PathBuf>,
    /// Resume from `dir/aggregator.ckpt` if present. Default true.
    pub resume: Option<bool>,
    /// Which rounds' global adapters stay in `dir/globals/`: `"all"`, `"best"` (the best
    /// evaluated and the last), or a number N (the last N, and the best). Default `"all"`.
    pub keep_globals: Option<KeepGlobals>,
}

/// `[output] keep_globals`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum KeepGlobals {
    /// `"all"` or `"best"`.
    Policy(KeepPolicy),
    /// The last N rounds' (and the best).
    Last(u32),
}

/// The named `keep_globals` policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepPolicy {
    All,
    Best,
}

impl std::fmt::Display for KeepGlobals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeepGlobals::Policy(KeepPolicy::All) => f.write_str("all"),
            KeepGlobals::Policy(KeepPolicy::Best) => f.write_str("best"),
            KeepGlobals::Last(n) => write!(f, "last {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_as_toml_reads_back_the_same() {
        let text = r#"
            fleet = "demo"
            rounds = 3
            on_quorum_failure = { extend = { max_extensions = 2 } }
            [strategy]
            kind = "trimmed-mean"
            trim = 0.1
            [local]
            epochs = 2
            [broker]
            url = "embedded"
            max_packet_bytes = 65536
            [embedded_broker]
            password_file = "deploy/mosquitto/passwd"
            acl_file = "deploy/mosquitto/acl"
            [model]
            tensors = [{ name = "head.weight", shape = [10, 1280] }]
        "#;
        let file = AggregatorFile::parse(text, Path::new("t.toml")).unwrap();
        let again = AggregatorFile::parse(&file.to_toml(), Path::new("again.toml")).unwrap();
        assert_eq!(file, again);
        assert_eq!(file.rounds, Some(3));
        assert_eq!(file.broker.max_packet_bytes, Some(65536));
        assert_eq!(
            file.embedded_broker.acl_file.as_deref(),
            Some(Path::new("deploy/mosquitto/acl"))
        );
        // Unset keys and empty tables are not written (TOML has no null).
        assert_eq!(AggregatorFile::default().to_toml().trim(), "");
        assert!(!file.to_toml().contains("[output]"));
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_file_and_the_key() {
        let err = AggregatorFile::parse("[local]\nepoch = 1\n", Path::new("agg.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("agg.toml") && msg.contains("epoch"), "{msg}");
    }
}
