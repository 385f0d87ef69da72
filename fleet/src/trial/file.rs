//! The trial file as written: one struct per table, defaults filled in by serde, unknown keys
//! refused. [`super::validate`] turns it into a [`super::Trial`].

use std::path::PathBuf;

use fedpeft_config::strategy::StrategyKind;
use serde::Deserialize;

use crate::links::LinksSpec;

/// `[model]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Built backbone folder (manifest.json, trunk.onnx, tail.safetensors). Required.
    pub backbone: PathBuf,
    /// PEFT method. Default `lora`.
    #[serde(default = "default_peft")]
    pub peft: String,
    /// LoRA rank. Default: the aggregator's default.
    pub lora_rank: Option<u16>,
    /// LoRA alpha. Default: the aggregator's default.
    pub lora_alpha: Option<f64>,
    /// Adapter bottleneck width. Default: the aggregator's default (16).
    pub bottleneck: Option<u16>,
    /// Prompt tokens. Default: the aggregator's default (4).
    pub prompt_tokens: Option<u16>,
    /// Tokens per text for a text backbone (clients and the aggregator's held-out set).
    /// Default: the backbone manifest's `max_len`.
    pub max_seq_len: Option<usize>,
    /// Trunk runtime of the edge clients. Default `auto` (onnxruntime when its library loads, else tract).
    #[serde(default = "default_runtime")]
    pub runtime: String,
    /// Image side for a vision trunk. Default 96.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Held-out examples evaluated by the aggregator each round. Default 2000.
    #[serde(default = "default_eval_examples")]
    pub eval_examples: usize,
}

/// `[data]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `fashion-mnist` (for a conv-head backbone) or `spam-assassin` (for a transformer; its
    /// seeded 20 % held-out split is the aggregator's evaluation set and no client's data), or
    /// the user's own files: `image-folder` or `idx` (conv head), `csv` or `jsonl`
    /// (transformer). Default `fashion-mnist`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Where the data is. A named set: its folder (default: its usual place). Own data: the
    /// class folders / IDX images file / CSV / JSONL file split across the clients by
    /// `partition`, or, with `{client}` (the client id) or `{index}` in it, each client's own.
    pub root: Option<PathBuf>,
    /// Own data: one root per client, in client order (instead of `root`); each client trains
    /// on all of its own (`partition = "none"`).
    pub client_roots: Option<Vec<PathBuf>>,
    /// `idx` with one images file: its labels file. Default: found beside it by MNIST's naming.
    pub labels: Option<PathBuf>,
    /// `csv` / `jsonl`: the text column (field). Default `text`.
    pub text_column: Option<String>,
    /// `csv` / `jsonl`: the label column (field). Default `label`.
    pub label_column: Option<String>,
    /// Own data: the fleet's class list, in label-id order, given to the aggregator and every
    /// client. Default for `image-folder`: the sub-folder names of `eval_root`, sorted;
    /// required for the other formats.
    pub classes: Option<Vec<String>>,
    /// The aggregator's held-out data, in the same format. Own data: required. Named sets:
    /// default `root` (Fashion-MNIST's `t10k-*` files, SpamAssassin's held-out 20 %).
    pub eval_root: Option<PathBuf>,
    /// `idx`: the held-out labels file. Default: beside `eval_root` by MNIST's naming.
    pub eval_labels: Option<PathBuf>,
    /// `iid`, `dirichlet`, `natural` (spam-assassin only: each mailing list whole on one
    /// client, the mails from no list spread by Dirichlet(`alpha`)) or `none` (each client all
    /// of its data: the only choice with a root per client, and its default). Default
    /// `dirichlet`. Filled in when the trial is read.
    #[serde(default)]
    pub partition: String,
    /// Dirichlet concentration. Default 0.5.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Local examples kept per client. Default: all of its shard.
    pub max_examples: Option<usize>,
}

/// `[local]` as written: the hyper-parameters the aggregator announces.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fedprox_mu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k_fraction: Option<f64>,
    /// Per-sample gradient clipping norm of DP-SGD (with `dp_noise_multiplier`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_clip_norm: Option<f64>,
    /// Gaussian noise of DP-SGD as a multiple of `dp_clip_norm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dp_noise_multiplier: Option<f64>,
}

/// `[stragglers]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StragglersSpec {
    /// Share of the clients that straggle: round(fraction x clients), at least 1, picked by
    /// the trial's seed.
    pub fraction: f64,
    /// Seconds a straggler holds each finished update before publishing it.
    pub delay_secs: f64,
}

/// `[broker]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSpec {
    /// `embedded` (rumqttd inside the aggregator, on a free loopback port) or `external`.
    #[serde(default = "default_broker_kind")]
    pub kind: String,
    /// `mqtt://host:port` of an external broker.
    pub url: Option<String>,
    /// Largest MQTT packet; payloads above it are chunked. Default 65536.
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
}

impl Default for BrokerSpec {
    fn default() -> Self {
        BrokerSpec {
            kind: default_broker_kind(),
            url: None,
            max_packet_bytes: default_max_packet(),
        }
    }
}

/// The trial file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrialFile {
    pub name: String,
    pub rounds: u32,
    pub clients: usize,
    #[serde(default = "one")]
    pub fraction: f64,
    pub min_clients: Option<usize>,
    pub start_clients: Option<usize>,
    pub quorum: Option<usize>,
    #[serde(default = "default_timeout")]
    pub round_timeout_secs: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The aggregator's `[strategy]` table, spelled as in its config file. Default: FedAvg.
    pub strategy: Option<StrategyKind>,
    pub model: ModelSpec,
    pub data: DataSpec,
    #[serde(default)]
    pub local: LocalSpec,
    #[serde(default)]
    pub broker: BrokerSpec,
    /// Where clients and the aggregator keep trunk activations between runs (keyed by trunk,
    /// samples and preprocessing, so trials share it safely). Default `data/cache/activations`.
    pub cache_dir: Option<PathBuf>,
    /// Key the activation cache on the whole data set: the runner starts client 0 alone, waits
    /// for its one trunk pass over every sample, then starts the rest, which read their rows
    /// from that entry. Default false (each client caches its own shard).
    #[serde(default)]
    pub shared_cache: bool,
    /// Emulated links between each client and the broker (see [`crate::links`]). Default none.
    pub links: Option<LinksSpec>,
    /// Probability that a sampled client vanishes mid-round. Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Seconds a vanished client stays away. Default 2.
    #[serde(default = "default_offline")]
    pub dropout_offline_secs: f64,
    /// Slow clients. Default none.
    pub stragglers: Option<StragglersSpec>,
    /// Encoding of the published global adapter. Default: `local.update_dtype`.
    pub global_dtype: Option<String>,
    /// Sign and verify every message (enrolment). Default false.
    #[serde(default)]
    pub signed: bool,
    /// The aggregator's `[monitor]` (metrics and the live dashboard), as in its config file;
    /// the runner adds each client's link preset as its label. Default none.
    pub monitor: Option<fedpeft_config::aggregator::MonitorTable>,
    /// The aggregator's `secure_aggregation` (`true` or a table), as in its config file.
    /// Default none.
    pub secure_aggregation: Option<toml::Value>,
    /// Clients (by index) that go silent in every secure round after a stage: emulated
    /// mid-protocol dropouts. Default none.
    pub secagg_dropouts: Option<SecAggDropouts>,
    /// The aggregator's `[async]` (asynchronous buffered aggregation), as in its config file.
    /// Default none (synchronous rounds).
    #[serde(rename = "async")]
    pub buffered: Option<fedpeft_config::aggregator::AsyncTable>,
}

/// `[secagg_dropouts]`: client indices that stop answering every secure round after sending
/// their keys, their shares or their masked input.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecAggDropouts {
    #[serde(default)]
    pub keys: Vec<usize>,
    #[serde(default)]
    pub shares: Vec<usize>,
    #[serde(default)]
    pub masked: Vec<usize>,
}

impl SecAggDropouts {
    /// The stage client `index` drops after, if any.
    pub fn stage_of(&self, index: usize) -> Option<&'static str> {
        [
            (&self.keys, "keys"),
            (&self.shares, "shares"),
            (&self.masked, "masked"),
        ]
        .into_iter()
        .find(|(list, _)| list.contains(&index))
        .map(|(_, stage)| stage)
    }
}

fn default_offline() -> f64 {
    2.0
}
fn one() -> f64 {
    1.0
}
fn default_peft() -> String {
    "lora".into()
}
fn default_runtime() -> String {
    "auto".into()
}
fn default_image_size() -> usize {
    96
}
fn default_eval_examples() -> usize {
    2000
}
fn default_dataset() -> String {
    "fashion-mnist".into()
}
fn default_alpha() -> f64 {
    0.5
}
fn default_broker_kind() -> String {
    "embedded".into()
}
fn default_max_packet() -> usize {
    65536
}
fn default_timeout() -> f64 {
    300.0
}
fn default_seed() -> u64 {
    42
}
