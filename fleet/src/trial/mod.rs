//! The trial file: one TOML document that says what federation to run, validated into a
//! [`Trial`] before any process starts.
//!
//! - `file`: the file as written, a struct per table (defaults, unknown keys refused).
//! - `validate`: one check per table, into a [`Trial`]; stragglers picked by the seed.
//! - `preflight`: checks against this machine (backbone built, kernel links possible).
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

mod file;
mod preflight;
mod validate;

use std::path::{Path, PathBuf};

use fedpeft_config::DatasetKind;
use fedpeft_config::strategy::StrategyKind;

pub use file::{BrokerSpec, DataSpec, LocalSpec, ModelSpec, StragglersSpec, TrialFile};
pub use validate::pick_stragglers;

use crate::links::{LinkPlan, Mechanism};

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
    /// The aggregator's `[monitor]`, if any.
    pub monitor: Option<fedpeft_config::aggregator::MonitorTable>,
    /// The aggregator's `secure_aggregation`, if any.
    pub secure_aggregation: Option<toml::Value>,
    /// Emulated secure-aggregation dropouts.
    pub secagg_dropouts: file::SecAggDropouts,
    /// The aggregator's `[async]`, if any.
    pub buffered: Option<fedpeft_config::aggregator::AsyncTable>,
    /// The run's id, fresh for every trial read (not the seed): messages another run left on
    /// a shared broker (a retained "run done", an old global adapter) carry another id, and
    /// the aggregator and the clients refuse them.
    pub run_id: u64,
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
        validate::trial(raw, path).map_err(|e| e.in_file(path))
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

    /// The client id of client `index` (`client-00`, `client-01`, …).
    pub fn client_id(&self, index: usize) -> String {
        format!("client-{index:02}")
    }

    /// Where client `index`'s data is: its entry of `data.client_roots`, `data.root` with
    /// `{client}` and `{index}` filled in, or `data.root` (`None`: the named set's usual place).
    pub fn client_root(&self, index: usize) -> Option<PathBuf> {
        if let Some(roots) = &self.data.client_roots {
            return roots.get(index).cloned();
        }
        let root = self.data.root.as_ref()?;
        if !validate::is_pattern(root) {
            return Some(root.clone());
        }
        let text = root
            .to_string_lossy()
            .replace("{client}", &self.client_id(index))
            .replace("{index}", &index.to_string());
        Some(PathBuf::from(text))
    }

    /// The aggregator's held-out data: `data.eval_root`, else (a named set) `data.root`.
    pub fn eval_root(&self) -> Option<PathBuf> {
        self.data.eval_root.clone().or_else(|| {
            let own = DatasetKind::parse(&self.data.dataset).is_some_and(DatasetKind::is_own);
            (!own).then(|| self.data.root.clone()).flatten()
        })
    }
}

#[cfg(test)]
mod tests;
