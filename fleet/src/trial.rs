//! The trial file: one TOML document that says what federation to run, validated into a
//! [`Trial`] before any process starts.
//!
//! ```toml
//! name = "quickstart"          # results go to runs/<name>/ unless --out says otherwise
//! rounds = 5
//! clients = 8                  # edge-client processes
//! fraction = 1.0               # share of joined clients sampled per round
//! min_clients = 8              # clients needed to start a round, and the fewest sampled
//! start_clients = 8            # clients that must have joined before round 1, so round 1
//!                              # is sampled from the whole fleet     default: clients
//! quorum = 6                   # accepted updates needed at the deadline
//! round_timeout_secs = 300
//! seed = 42
//! cache_dir = "data/cache/activations"  # trunk activations kept between runs
//! shared_cache = false         # true: one trunk pass over the whole data set for the fleet
//! dropout = 0.0                # probability that a sampled client vanishes mid-round: it
//!                              # trains, then drops its connection without publishing (the
//!                              # broker publishes its last will) and comes back later; drawn
//!                              # per (seed, client index, round), so a trial's dropouts replay
//! dropout_offline_secs = 2.0   # how long a vanished client stays away
//!
//! signed = false              # true: every message Ed25519-signed and verified; the runner
//!                              # makes a key per client and for the aggregator in <out>/keys,
//!                              # enrols the clients, and the aggregator refuses anything
//!                              # unsigned (64 bytes more per message)
//!
//! global_dtype = "int8"        # f32 | f16 | int8: how the aggregator publishes the global
//!                              # adapter (it adopts the decoded value, so it and the clients
//!                              # hold the same one); default: local.update_dtype (f32)
//!
//! [stragglers]                 # slow devices (default: none)
//! fraction = 0.25              # share of the clients (round(fraction x clients), at least 1,
//!                              # chosen by the seed) that hold every update ...
//! delay_secs = 30.0            # ... this long after training; past the round's deadline the
//!                              # round closes without it (reported as late)
//!
//! [strategy]                   # the aggregator's table, checked here (see its config docs)
//! kind = "fedavg"              # fedavg | fedadam | fedyogi | median | trimmed-mean
//!
//! [model]
//! backbone = "models/build/efficientnet-lite0"
//! peft = "lora"                # head | bias | lora | adapter | prompt | full-tail
//! lora_rank = 8
//! lora_alpha = 16.0
//! runtime = "auto"             # auto | ort | tract (edge clients)
//! image_size = 96
//! eval_examples = 2000         # held-out examples the aggregator evaluates each round
//!
//! # bottleneck = 16           # adapter (transformer backbones)
//! # prompt_tokens = 4          # prompt (transformer backbones)
//! # max_seq_len = 64           # tokens per text (text backbones; default: the manifest's)
//!
//! [data]
//! dataset = "fashion-mnist"    # fashion-mnist (conv head) | spam-assassin (transformer)
//! partition = "dirichlet"      # iid | dirichlet | natural (spam-assassin: by mailing list)
//! alpha = 0.5                  # natural: Dirichlet over the mails from no list
//! max_examples = 500           # per client
//!
//! [local]                      # announced to clients each round
//! epochs = 2
//! batch_size = 32
//! learning_rate = 0.001
//! optimizer = "adamw"         # sgd | adamw
//! update_dtype = "f32"         # f32 | f16 | int8
//! # dp_clip_norm = 1.0         # sample-level DP-SGD on the clients: both or neither
//! # dp_noise_multiplier = 1.0
//!
//! [broker]
//! kind = "embedded"            # embedded (rumqttd inside the aggregator) | external
//! url = "mqtt://127.0.0.1:1883" # external only
//! max_packet_bytes = 65536
//! ```

use std::path::{Path, PathBuf};

use fedpeft_config::strategy::StrategyKind;
use serde::Deserialize;

use crate::links::{LinkPlan, LinksSpec, Mechanism};

/// The longest an edge client's largest MQTT packet may take on its uplink (rumqttc flushes
/// with a 5 s timeout; the rest is margin for the link's delay).
pub const FLUSH_BUDGET_SECS: f64 = 4.0;

/// A trial file that cannot be used; every variant names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("cannot read trial file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trial file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("trial file {path}: `{field}` {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

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
    /// seeded 20 % held-out split is the aggregator's evaluation set and no client's data).
    /// Default `fashion-mnist`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Data set folder. Default: the data set's usual place.
    pub root: Option<PathBuf>,
    /// `iid`, `dirichlet` or `natural` (spam-assassin only: each mailing list whole on one
    /// client, the mails from no list spread by Dirichlet(`alpha`)). Default `dirichlet`.
    #[serde(default = "default_partition")]
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
}

/// Where the clients find the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// rumqttd inside the aggregator, on this loopback port (chosen free at start).
    Embedded,
    /// An external broker the trial does not start.
    External { url: String },
}

/// A validated trial.
#[derive(Debug, Clone)]
pub struct Trial {
    pub name: String,
    pub rounds: u32,
    pub clients: usize,
    pub fraction: f64,
    pub min_clients: usize,
    /// Joined clients the aggregator waits for before round 1.
    pub start_clients: usize,
    pub quorum: usize,
    pub round_timeout_secs: f64,
    pub seed: u64,
    pub strategy: Option<StrategyKind>,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub local: LocalSpec,
    pub broker: Broker,
    pub max_packet_bytes: usize,
    pub cache_dir: PathBuf,
    pub shared_cache: bool,
    /// One emulated link per client, or `None` (straight to the broker on loopback).
    pub links: Option<LinkPlan>,
    /// Probability that a sampled client vanishes mid-round, and how long it stays away.
    pub dropout: f64,
    pub dropout_offline_secs: f64,
    /// Indices of the straggling clients (sorted) and how long each holds its updates.
    pub stragglers: Vec<usize>,
    pub straggle_secs: f64,
    /// Encoding of the published global adapter: f32, f16 or int8.
    pub global_dtype: String,
    /// Every message signed with Ed25519 and verified (keys made by the runner).
    pub signed: bool,
    /// The trial file, for error messages.
    pub path: PathBuf,
}

impl Trial {
    /// Reads and validates a trial file.
    pub fn load(path: &Path) -> Result<Trial, TrialError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrialError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Trial::parse(&text, path)
    }

    /// Parses and validates trial text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Trial, TrialError> {
        let raw: TrialFile = toml::from_str(text).map_err(|source| TrialError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |field: &'static str, reason: String| TrialError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(
                "name",
                format!("{:?} must be non-empty [A-Za-z0-9_.-]", raw.name),
            ));
        }
        if raw.rounds == 0 {
            return Err(bad("rounds", "must be at least 1".into()));
        }
        if raw.clients == 0 || raw.clients > 512 {
            return Err(bad("clients", format!("{} is not in 1..=512", raw.clients)));
        }
        if !(raw.fraction > 0.0 && raw.fraction <= 1.0) {
            return Err(bad(
                "fraction",
                format!("{} is not in (0, 1]", raw.fraction),
            ));
        }
        let min_clients = raw.min_clients.unwrap_or(raw.clients);
        if min_clients == 0 || min_clients > raw.clients {
            return Err(bad(
                "min_clients",
                format!("{min_clients} is not in 1..={} (clients)", raw.clients),
            ));
        }
        let start_clients = raw.start_clients.unwrap_or(raw.clients);
        if start_clients < min_clients || start_clients > raw.clients {
            return Err(bad(
                "start_clients",
                format!(
                    "{start_clients} is not in {min_clients}..={} (min_clients..=clients)",
                    raw.clients
                ),
            ));
        }
        let sampled = ((raw.fraction * min_clients as f64).ceil() as usize).max(1);
        let quorum = raw.quorum.unwrap_or(sampled);
        if quorum == 0 || quorum > raw.clients {
            return Err(bad(
                "quorum",
                format!("{quorum} is not in 1..={} (clients)", raw.clients),
            ));
        }
        if !(raw.round_timeout_secs.is_finite() && raw.round_timeout_secs > 0.0) {
            return Err(bad(
                "round_timeout_secs",
                format!("{} must be a positive number", raw.round_timeout_secs),
            ));
        }
        if !matches!(raw.data.dataset.as_str(), "fashion-mnist" | "spam-assassin") {
            return Err(bad(
                "data.dataset",
                format!(
                    "{:?} is not fashion-mnist or spam-assassin",
                    raw.data.dataset
                ),
            ));
        }
        match raw.data.partition.as_str() {
            "iid" | "dirichlet" => {}
            "natural" if raw.data.dataset == "spam-assassin" => {}
            "natural" => {
                return Err(bad(
                    "data.partition",
                    format!(
                        "\"natural\" needs a data set with a natural client key (spam-assassin: \
                         its mailing lists); {:?} has none: use iid or dirichlet",
                        raw.data.dataset
                    ),
                ));
            }
            other => {
                return Err(bad(
                    "data.partition",
                    format!("{other:?} is not iid, dirichlet or natural"),
                ));
            }
        }
        if let Some(n) = raw.model.max_seq_len
            && !(2..=512).contains(&n)
        {
            return Err(bad("model.max_seq_len", format!("{n} is not in 2..=512")));
        }
        for (field, v) in [
            ("model.bottleneck", raw.model.bottleneck),
            ("model.prompt_tokens", raw.model.prompt_tokens),
            ("model.lora_rank", raw.model.lora_rank),
        ] {
            if v == Some(0) {
                return Err(bad(field, "must be at least 1".into()));
            }
        }
        if !(raw.data.alpha.is_finite() && raw.data.alpha > 0.0) {
            return Err(bad("data.alpha", format!("{} must be > 0", raw.data.alpha)));
        }
        if !matches!(raw.model.runtime.as_str(), "auto" | "ort" | "tract") {
            return Err(bad(
                "model.runtime",
                format!("{:?} is not auto, ort or tract", raw.model.runtime),
            ));
        }
        let broker = match (raw.broker.kind.as_str(), &raw.broker.url) {
            ("embedded", None) => Broker::Embedded,
            ("embedded", Some(_)) => {
                return Err(bad("broker.url", "is only for kind = \"external\"".into()));
            }
            ("external", Some(url)) if url.starts_with("mqtt://") => {
                Broker::External { url: url.clone() }
            }
            ("external", _) => {
                return Err(bad(
                    "broker.url",
                    "an external broker needs mqtt://host:port".into(),
                ));
            }
            (other, _) => {
                return Err(bad(
                    "broker.kind",
                    format!("{other:?} is not embedded or external"),
                ));
            }
        };
        if raw.broker.max_packet_bytes < 1024 {
            return Err(bad(
                "broker.max_packet_bytes",
                format!("{} is below 1024", raw.broker.max_packet_bytes),
            ));
        }
        let links = match &raw.links {
            None => None,
            Some(spec) => {
                let plan = spec
                    .plan(raw.clients)
                    .map_err(|(key, reason)| TrialError::Invalid {
                        path: path.to_path_buf(),
                        field: key,
                        reason,
                    })?;
                // The edge client's MQTT library gives each flush of its socket 5 s (rumqttc's
                // network timeout) and reconnects when it is exceeded: on a slow uplink a whole
                // packet must fit in that, or no update ever gets through.
                for link in &plan.clients {
                    let secs = raw.broker.max_packet_bytes as f64 / link.link.up_bytes_per_sec();
                    if secs > FLUSH_BUDGET_SECS {
                        return Err(bad(
                            "broker.max_packet_bytes",
                            format!(
                                "{} B take {secs:.1} s on the {} uplink ({} kbit/s), more than \
                                 the {FLUSH_BUDGET_SECS} s an edge client's MQTT flush may take \
                                 (its 5 s network timeout less a margin): use at most {} here",
                                raw.broker.max_packet_bytes,
                                link.profile,
                                link.link.up_kbit,
                                (FLUSH_BUDGET_SECS * link.link.up_bytes_per_sec()) as u64
                            ),
                        ));
                    }
                }
                (plan.mechanism != Mechanism::None).then_some(plan)
            }
        };
        if raw.local.dp_clip_norm.is_some() != raw.local.dp_noise_multiplier.is_some() {
            return Err(bad(
                "local.dp_clip_norm",
                "DP-SGD needs both dp_clip_norm and dp_noise_multiplier".into(),
            ));
        }
        if !(0.0..1.0).contains(&raw.dropout) {
            return Err(bad(
                "dropout",
                format!(
                    "{} is not a probability in [0, 1) (at 1 no update would ever arrive)",
                    raw.dropout
                ),
            ));
        }
        if !(raw.dropout_offline_secs.is_finite()
            && (0.0..=3600.0).contains(&raw.dropout_offline_secs))
        {
            return Err(bad(
                "dropout_offline_secs",
                format!("{} is not in 0..=3600 seconds", raw.dropout_offline_secs),
            ));
        }
        let (stragglers, straggle_secs) = match &raw.stragglers {
            None => (Vec::new(), 0.0),
            Some(st) => {
                if !(st.fraction > 0.0 && st.fraction <= 1.0) {
                    return Err(bad(
                        "stragglers.fraction",
                        format!("{} is not in (0, 1]", st.fraction),
                    ));
                }
                if !(st.delay_secs.is_finite() && st.delay_secs > 0.0 && st.delay_secs <= 86_400.0)
                {
                    return Err(bad(
                        "stragglers.delay_secs",
                        format!("{} is not in (0, 86400] seconds", st.delay_secs),
                    ));
                }
                (
                    pick_stragglers(raw.clients, st.fraction, raw.seed),
                    st.delay_secs,
                )
            }
        };
        let global_dtype = raw
            .global_dtype
            .clone()
            .or_else(|| raw.local.update_dtype.clone())
            .unwrap_or_else(|| "f32".into());
        if !matches!(global_dtype.as_str(), "f32" | "f16" | "int8") {
            let field = if raw.global_dtype.is_some() {
                "global_dtype"
            } else {
                "local.update_dtype"
            };
            return Err(bad(
                field,
                format!("{global_dtype:?} is not f32, f16 or int8"),
            ));
        }
        Ok(Trial {
            global_dtype,
            signed: raw.signed,
            dropout: raw.dropout,
            dropout_offline_secs: raw.dropout_offline_secs,
            stragglers,
            straggle_secs,
            shared_cache: raw.shared_cache,
            links,
            path: path.to_path_buf(),
            name: raw.name,
            rounds: raw.rounds,
            clients: raw.clients,
            fraction: raw.fraction,
            min_clients,
            start_clients,
            quorum,
            round_timeout_secs: raw.round_timeout_secs,
            seed: raw.seed,
            strategy: raw.strategy,
            model: raw.model,
            data: raw.data,
            local: raw.local,
            broker,
            max_packet_bytes: raw.broker.max_packet_bytes,
            cache_dir: raw
                .cache_dir
                .unwrap_or_else(|| PathBuf::from("data/cache/activations")),
        })
    }

    /// Overrides the link mechanism (`--links`); a trial without `[links]` cannot be shaped.
    pub fn set_mechanism(&mut self, mechanism: Mechanism) -> Result<(), TrialError> {
        match (&mut self.links, mechanism) {
            (_, Mechanism::None) => self.links = None,
            (Some(plan), m) => plan.mechanism = m,
            (None, _) => {
                return Err(TrialError::Invalid {
                    path: self.path.clone(),
                    field: "links".into(),
                    reason:
                        "is missing: --links needs a [links] table saying each client's profile"
                            .into(),
                });
            }
        }
        Ok(())
    }

    /// Checks what parsing cannot: that the model exists, and that kernel links can be made
    /// here. Resolves `auto` to the mechanism that will run. Nothing has started yet.
    pub fn preflight(&mut self) -> Result<(), TrialError> {
        let bad = |field: &str, reason: String| TrialError::Invalid {
            path: self.path.clone(),
            field: field.into(),
            reason,
        };
        let manifest = self.model.backbone.join("manifest.json");
        if !manifest.is_file() {
            return Err(bad(
                "model.backbone",
                format!(
                    "{} has no manifest.json: build the backbones first (`make models`)",
                    self.model.backbone.display()
                ),
            ));
        }
        let family = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str::<ManifestFamily>(&t).ok())
            .and_then(|m| m.family);
        let (wanted, blocks) = match family.as_deref() {
            Some("conv_head") => ("fashion-mnist", false),
            Some("transformer") => ("spam-assassin", true),
            _ => {
                return Err(bad(
                    "model.backbone",
                    format!(
                        "{} names no known family (conv_head or transformer)",
                        manifest.display()
                    ),
                ));
            }
        };
        if self.data.dataset != wanted {
            return Err(bad(
                "data.dataset",
                format!(
                    "{:?} cannot feed {} (a {} backbone): use {wanted:?}",
                    self.data.dataset,
                    self.model.backbone.display(),
                    family.unwrap_or_default()
                ),
            ));
        }
        if !blocks && matches!(self.model.peft.as_str(), "adapter" | "prompt") {
            return Err(bad(
                "model.peft",
                format!(
                    "{:?} needs transformer blocks; {} is a conv head: use head, bias, lora or \
                     full-tail",
                    self.model.peft,
                    self.model.backbone.display()
                ),
            ));
        }
        if let Some(plan) = &mut self.links {
            let why = crate::netns::unavailable();
            match (plan.mechanism, why) {
                (Mechanism::Kernel, Some(why)) => {
                    return Err(bad(
                        "links.mechanism",
                        format!(
                            "= kernel: {why}; use mechanism = \"userspace\" (or --links userspace) \
                     for the in-process shaper"
                        ),
                    ));
                }
                (Mechanism::Auto, None) => plan.mechanism = Mechanism::Kernel,
                (Mechanism::Auto, Some(_)) => plan.mechanism = Mechanism::Userspace,
                _ => {}
            }
        }
        Ok(())
    }

    /// The client id of client `index` (`client-00`, `client-01`, …).
    pub fn client_id(&self, index: usize) -> String {
        format!("client-{index:02}")
    }
}

/// The one field of a backbone's `manifest.json` the runner reads: which kind of trunk it is.
#[derive(Deserialize)]
struct ManifestFamily {
    family: Option<String>,
}

/// [`fedpeft_protocol::keyed_unit`]'s purpose for picking stragglers.
const STRAGGLER_PURPOSE: u64 = 0x51_0e;

/// The straggling clients: the round(fraction x clients) (at least 1) with the smallest keyed
/// draws for this seed, sorted.
pub fn pick_stragglers(clients: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let n = ((fraction * clients as f64).round() as usize).clamp(1, clients);
    let mut order: Vec<(f64, usize)> = (0..clients)
        .map(|i| {
            (
                fedpeft_protocol::keyed_unit(seed, STRAGGLER_PURPOSE, i as u64, 0),
                i,
            )
        })
        .collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut picked: Vec<usize> = order.into_iter().take(n).map(|(_, i)| i).collect();
    picked.sort_unstable();
    picked
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
fn default_partition() -> String {
    "dirichlet".into()
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "t"
        rounds = 2
        clients = 4
        [model]
        backbone = "models/build/efficientnet-lite0"
        [data]
    "#;

    #[test]
    fn a_minimal_trial_gets_documented_defaults() {
        let t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!((t.min_clients, t.start_clients), (4, 4));
        assert_eq!(t.quorum, 4);
        assert_eq!(t.model.peft, "lora");
        assert_eq!(t.model.image_size, 96);
        assert_eq!(t.data.partition, "dirichlet");
        assert_eq!(t.broker, Broker::Embedded);
        assert_eq!(t.client_id(3), "client-03");
    }

    #[test]
    fn an_unknown_key_is_rejected_with_the_file_name() {
        let text = format!("{MINIMAL}\nbogus = 1\n");
        let err = Trial::parse(&text, Path::new("trials/x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("trials/x.toml") && msg.contains("bogus"),
            "{msg}"
        );
    }

    #[test]
    fn impossible_settings_name_their_field() {
        for (patch, field) in [
            ("rounds = 0", "rounds"),
            ("fraction = 1.5", "fraction"),
            ("min_clients = 9", "min_clients"),
            ("start_clients = 9", "start_clients"),
            ("quorum = 0", "quorum"),
            ("round_timeout_secs = -1.0", "round_timeout_secs"),
            ("dropout = 1.0", "dropout"),
            ("dropout = -0.1", "dropout"),
            ("dropout_offline_secs = -2.0", "dropout_offline_secs"),
        ] {
            let text = MINIMAL.replace("rounds = 2", &format!("rounds = 2\n{patch}"));
            let text = if patch.starts_with("rounds") {
                MINIMAL.replace("rounds = 2", patch)
            } else {
                text
            };
            let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
            assert!(err.to_string().contains(field), "{patch}: {err}");
        }
    }

    #[test]
    fn the_strategy_is_the_aggregators_table_checked_before_anything_runs() {
        let text = format!("{MINIMAL}\n[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.2\n");
        let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(t.strategy, Some(StrategyKind::TrimmedMean { trim: 0.2 }));
        let text = format!("{MINIMAL}\n[strategy]\nkind = \"krum\"\n");
        let err = Trial::parse(&text, Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("t.toml") && err.contains("krum"), "{err}");
    }

    #[test]
    fn dropout_and_stragglers_are_read_validated_and_seeded() {
        let t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(t.dropout, 0.0);
        assert!(t.stragglers.is_empty());
        assert_eq!(t.global_dtype, "f32");
        let text = MINIMAL.replace("clients = 4", "clients = 8\ndropout = 0.3")
            + "[stragglers]\nfraction = 0.25\ndelay_secs = 30.0\n";
        let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(t.dropout, 0.3);
        assert_eq!(t.stragglers.len(), 2);
        assert_eq!(t.straggle_secs, 30.0);
        assert_eq!(t.stragglers, pick_stragglers(8, 0.25, 42), "seeded");
        assert_ne!(
            (0..20)
                .map(|s| pick_stragglers(8, 0.25, s))
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            1,
            "the seed picks them"
        );
        assert_eq!(pick_stragglers(8, 0.01, 1).len(), 1, "at least one");
        for (table, key) in [
            ("fraction = 0.0\ndelay_secs = 1.0", "stragglers.fraction"),
            ("fraction = 0.5\ndelay_secs = 0.0", "stragglers.delay_secs"),
            ("fraction = 0.5", "delay_secs"),
            ("fraction = 0.5\ndelay_secs = 1.0\nslowdown = 2", "slowdown"),
        ] {
            let text = format!("{MINIMAL}\n[stragglers]\n{table}\n");
            let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
            assert!(err.to_string().contains(key), "{table}: {err}");
        }
    }

    #[test]
    fn text_trials_parse_and_impossible_data_settings_name_their_key() {
        let text = r#"
            name = "spam"
            rounds = 2
            clients = 8
            [model]
            backbone = "models/build/all-minilm-l6-v2"
            peft = "prompt"
            prompt_tokens = 8
            max_seq_len = 64
            [data]
            dataset = "spam-assassin"
            partition = "natural"
        "#;
        let t = Trial::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(t.data.partition, "natural");
        assert_eq!(
            (t.model.prompt_tokens, t.model.max_seq_len),
            (Some(8), Some(64))
        );
        for (from, to, field) in [
            (
                "dataset = \"spam-assassin\"",
                "dataset = \"fashion-mnist\"",
                "data.partition",
            ),
            (
                "dataset = \"spam-assassin\"",
                "dataset = \"imdb\"",
                "data.dataset",
            ),
            (
                "partition = \"natural\"",
                "partition = \"shards\"",
                "data.partition",
            ),
            ("max_seq_len = 64", "max_seq_len = 1", "model.max_seq_len"),
            (
                "prompt_tokens = 8",
                "prompt_tokens = 0",
                "model.prompt_tokens",
            ),
            ("max_seq_len = 64", "max_seq_length = 64", "max_seq_length"),
        ] {
            let err = Trial::parse(&text.replace(from, to), Path::new("t.toml")).unwrap_err();
            assert!(err.to_string().contains(field), "{to}: {err}");
        }
    }

    #[test]
    fn the_global_dtype_follows_the_update_dtype_unless_set() {
        let int8 = format!("{MINIMAL}\n[local]\nupdate_dtype = \"int8\"\n");
        assert_eq!(
            Trial::parse(&int8, Path::new("t.toml"))
                .unwrap()
                .global_dtype,
            "int8"
        );
        let f32_down = int8.replace("rounds = 2", "rounds = 2\nglobal_dtype = \"f32\"");
        assert_eq!(
            Trial::parse(&f32_down, Path::new("t.toml"))
                .unwrap()
                .global_dtype,
            "f32"
        );
        let bad = MINIMAL.replace("rounds = 2", "rounds = 2\nglobal_dtype = \"int4\"");
        let err = Trial::parse(&bad, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("global_dtype"), "{err}");
    }

    #[test]
    fn preflight_refuses_a_data_set_or_method_the_backbone_cannot_train() {
        let dir = tempfile::tempdir().unwrap();
        let conv = dir.path().join("conv");
        let text = dir.path().join("text");
        for (d, family) in [(&conv, "conv_head"), (&text, "transformer")] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(
                d.join("manifest.json"),
                format!("{{\"family\": \"{family}\"}}"),
            )
            .unwrap();
        }
        let check = |backbone: &Path, peft: &str, dataset: &str| {
            let mut t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
            t.model.backbone = backbone.to_path_buf();
            t.model.peft = peft.into();
            t.data.dataset = dataset.into();
            t.preflight()
        };
        check(&conv, "lora", "fashion-mnist").unwrap();
        check(&text, "adapter", "spam-assassin").unwrap();
        for (backbone, peft, dataset, field) in [
            (&conv, "prompt", "fashion-mnist", "model.peft"),
            (&conv, "adapter", "fashion-mnist", "model.peft"),
            (&conv, "lora", "spam-assassin", "data.dataset"),
            (&text, "lora", "fashion-mnist", "data.dataset"),
        ] {
            let err = check(backbone, peft, dataset).unwrap_err();
            assert!(err.to_string().contains(field), "{peft} {dataset}: {err}");
        }
    }

    #[test]
    fn an_external_broker_needs_a_url() {
        let text = format!("{MINIMAL}\n[broker]\nkind = \"external\"\n");
        let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("broker.url"), "{err}");
        let text =
            format!("{MINIMAL}\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:1884\"\n");
        let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(
            t.broker,
            Broker::External {
                url: "mqtt://127.0.0.1:1884".into()
            }
        );
    }

    #[test]
    fn links_name_their_key_and_mix_profiles() {
        let text = format!(
            "{MINIMAL}\n[broker]\nmax_packet_bytes = 16384\n[links]\nassign = [{{ profile = \"lte-m\", share = 0.5 }}, {{ profile = \"nb-iot\", share = 0.5 }}]\n"
        );
        let t = Trial::parse(&text, Path::new("t.toml")).unwrap();
        let plan = t.links.unwrap();
        assert_eq!(plan.clients[1].profile, "lte-m");
        assert_eq!(plan.clients[2].profile, "nb-iot");
        let text = format!("{MINIMAL}\n[links]\nprofile = \"nb-iot\"\n");
        let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
        assert!(err.to_string().contains("broker.max_packet_bytes"), "{err}");
        for (table, key) in [
            ("profile = \"nb-iot\"\nbogus = 1", "bogus"),
            ("profile = \"satellite\"", "links.profile"),
            (
                "profile = \"x\"\n[links.profiles.x]\nup_kbit = -1.0\ndown_kbit = 8.0",
                "links.profiles.x.up_kbit",
            ),
            (
                "profile = \"x\"\n[links.profiles.x]\nup_kbit = 1.0\ndown_kbit = 8.0\nrate = 3",
                "rate",
            ),
        ] {
            let text = format!("{MINIMAL}\n[links]\n{table}\n");
            let err = Trial::parse(&text, Path::new("t.toml")).unwrap_err();
            assert!(err.to_string().contains(key), "{table}: {err}");
        }
    }

    #[test]
    fn preflight_refuses_a_missing_model_and_kernel_links_without_root() {
        let mut t = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
        t.model.backbone = PathBuf::from("/nonexistent/backbone");
        let err = t.preflight().unwrap_err();
        assert!(err.to_string().contains("model.backbone"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("manifest.json"),
            r#"{"family": "conv_head"}"#,
        )
        .unwrap();
        let text = format!("{MINIMAL}\n[links]\nprofile = \"wifi\"\nmechanism = \"kernel\"\n");
        let mut t = Trial::parse(&text, Path::new("t.toml")).unwrap();
        t.model.backbone = dir.path().to_path_buf();
        match crate::netns::unavailable() {
            Some(_) => {
                let err = t.preflight().unwrap_err();
                assert!(err.to_string().contains("links.mechanism"), "{err}");
            }
            None => {
                eprintln!("running as root: kernel links are available, so preflight accepts them");
                t.preflight().unwrap();
            }
        }
        // auto resolves to something concrete.
        t.set_mechanism(Mechanism::Auto).unwrap();
        t.preflight().unwrap();
        assert_ne!(t.links.as_ref().unwrap().mechanism, Mechanism::Auto);
        // --links on a trial without [links] names the table.
        let mut plain = Trial::parse(MINIMAL, Path::new("t.toml")).unwrap();
        let err = plain.set_mechanism(Mechanism::Userspace).unwrap_err();
        assert!(err.to_string().contains("`links`"), "{err}");
    }

    #[test]
    fn every_trial_file_in_the_repository_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trials");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Trial::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 4, "{n} trial files in {}", dir.display());
        let mixed = Trial::load(&dir.join("links-mixed.toml")).unwrap();
        let names: Vec<_> = mixed
            .links
            .unwrap()
            .clients
            .into_iter()
            .map(|c| c.profile)
            .collect();
        assert_eq!(names[2..4], ["lte-m", "nb-iot"]);
        assert_eq!(names[6..], ["rural-3g", "rural-3g"]);
    }
}
