//! Edge-client configuration: a TOML file and command-line flags, merged and validated into a
//! typed [`EdgeConfig`] before anything connects.
//!
//! Precedence: a flag beats the file, the file beats the documented default. Unknown keys in
//! the file are rejected (a typo must not silently fall back to a default).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use fedpeft_protocol::VerifyingKey;
use serde::Deserialize;

use crate::tls::TlsFiles;

/// Longest client id / fleet name accepted. They become MQTT topic levels and are carried as
/// fixed-capacity strings on the wire, so they are short and topic-safe.
pub const MAX_NAME_LEN: usize = 32;

/// Smallest packet limit we accept: below this even a chunk header plus a topic would not fit.
pub const MIN_PACKET_BYTES: usize = 1024;

/// What went wrong while reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{field} is required (set it in the config file or with --{flag})")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn setting(e: crate::tls::broker::SettingError) -> ConfigError {
    invalid(e.key, e.message)
}

/// Which ONNX runtime runs the frozen trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// onnxruntime when this build has it and the library loads, tract otherwise.
    Auto,
    /// onnxruntime through `ort` (needs the `ort` feature and `ORT_DYLIB_PATH`).
    Ort,
    /// tract: pure Rust, no native library; runs everywhere (the armv7 choice).
    Tract,
}

/// How the shared data set is split across the fleet's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
}

impl PartitionKind {
    pub fn name(self) -> &'static str {
        match self {
            PartitionKind::Iid => "iid",
            PartitionKind::Dirichlet => "dirichlet",
            PartitionKind::Natural => "natural",
        }
    }
}

/// The data sets the edge client can load.
pub const DATASETS: [&str; 2] = ["fashion-mnist", "spam-assassin"];

/// The `[broker]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerFile {
    /// `mqtt://host[:port]` or `mqtts://host[:port]` (TLS, port 8883 by default). Default
    /// `mqtt://127.0.0.1:1883`.
    pub url: Option<String>,
    /// MQTT keep-alive in seconds. Default 30.
    pub keep_alive_secs: Option<u64>,
    /// Largest MQTT packet sent or accepted, in bytes; payloads above it are chunked. It must
    /// exceed the aggregator's `max_payload_bytes` (its adapter chunks) by 1 KiB at least.
    /// Default 1048576, the aggregator's broker limit.
    pub max_packet_bytes: Option<usize>,
    /// Username, if the broker wants one (with the example ACL: the client id).
    pub username: Option<String>,
    /// Password, if the broker wants one.
    pub password: Option<String>,
    /// A file whose first line is the password (instead of `password`).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password (instead of `password`).
    pub password_env: Option<String>,
    /// mqtts: PEM file of the CA the broker's certificate chains to. Required for mqtts.
    pub ca_file: Option<PathBuf>,
    /// mqtts: PEM client certificate, for brokers that authenticate by certificate.
    pub client_cert: Option<PathBuf>,
    /// mqtts: PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// The `[security]` table: signed messages (`docs/protocol.md`, "Signed envelopes").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityFile {
    /// This client's secret key file (`edge-client keygen`): Join, Status and updates are
    /// signed with it. Default: unsigned.
    pub signing_key: Option<PathBuf>,
    /// The aggregator's public key (64 hex digits, as `aggregator keygen` prints it): global
    /// adapters and round announcements must carry its signature. Default: not checked.
    pub aggregator_key: Option<String>,
}

/// The `[client]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Fleet name (the topic root is `fedpeft/v1/{fleet}/`). Default `fedpeft`, as the
    /// aggregator's.
    pub fleet: Option<String>,
    /// This client's id, unique in the fleet. Required.
    pub id: Option<String>,
    /// The training run to take part in (the aggregator's `run_id`). Default 1.
    pub run_id: Option<u64>,
}

/// The `[model]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
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

/// The PEFT method trained, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeftChoice {
    Head,
    Bias,
    Lora { rank: u16, alpha: f32 },
    Adapter { bottleneck: u16 },
    Prompt { tokens: u16 },
    FullTail,
}

/// The `[data]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    /// Data set: `fashion-mnist` (vision) or `spam-assassin` (text; its held-out 20 % is never
    /// trained on). Default `fashion-mnist`.
    pub dataset: Option<String>,
    /// Where the data set's files are. Default: the data set's usual place (backbone crate).
    pub root: Option<PathBuf>,
    /// `iid`, `dirichlet` or `natural` (spam-assassin only). Default `dirichlet`.
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconnectFile {
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportFile {
    /// Write a JSON summary (rounds, bytes up/down) here at exit. Default: none.
    pub summary_json: Option<PathBuf>,
}

/// The `[faults]` table: emulated unreliability, for fleet trials (a real device needs none).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsFile {
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
}

/// The TOML file as written, before validation. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub broker: BrokerFile,
    #[serde(default)]
    pub client: ClientFile,
    #[serde(default)]
    pub model: ModelFile,
    #[serde(default)]
    pub data: DataFile,
    #[serde(default)]
    pub cache: CacheFile,
    #[serde(default)]
    pub reconnect: ReconnectFile,
    #[serde(default)]
    pub report: ReportFile,
    #[serde(default)]
    pub security: SecurityFile,
    #[serde(default)]
    pub faults: FaultsFile,
}

impl FileConfig {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_path_buf(),
            source,
        })
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }
}

/// Command-line flags of `edge-client`. Each overrides the same setting of the config file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "edge-client",
    version,
    about = "fedpeft edge client: trains a PEFT tail on local data and publishes compact updates over MQTT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Broker URL, mqtt://host[:port] or mqtts://host[:port] (TLS).
    #[arg(long)]
    pub broker: Option<String>,
    /// mqtts: PEM file of the CA the broker's certificate chains to.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// mqtts: PEM client certificate (with --client-key).
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// mqtts: PEM private key of --client-cert.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// MQTT username.
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password (a password is never a flag).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Secret key file: sign Join, Status and updates (`edge-client keygen`).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// The aggregator's public key (64 hex digits): refuse unsigned or forged global adapters
    /// and round announcements.
    #[arg(long)]
    pub aggregator_key: Option<String>,
    /// Fleet name.
    #[arg(long)]
    pub fleet: Option<String>,
    /// This client's id.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Run id (must match the aggregator's).
    #[arg(long)]
    pub run_id: Option<u64>,
    /// Folder with the backbone manifest.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Trunk runtime.
    #[arg(long, value_enum)]
    pub runtime: Option<RuntimeChoice>,
    /// PEFT method (head, bias, lora, adapter, prompt, full-tail).
    #[arg(long)]
    pub peft: Option<String>,
    /// Image side for a vision trunk.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Samples per trunk batch while filling the activation cache (default 16).
    #[arg(long)]
    pub trunk_batch: Option<usize>,
    /// Tokens per text for a text trunk (default: the manifest's max_len).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_rank: Option<u16>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f32>,
    /// Adapter bottleneck width.
    #[arg(long)]
    pub bottleneck: Option<u16>,
    /// Prompt tokens.
    #[arg(long)]
    pub prompt_tokens: Option<u16>,
    /// Threads for the trunk runtime (0 = runtime default).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data set name.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Data set folder.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Partition kind.
    #[arg(long, value_enum)]
    pub partition: Option<PartitionKind>,
    /// Dirichlet alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Number of clients the data set is split across.
    #[arg(long)]
    pub num_clients: Option<usize>,
    /// This client's shard index.
    #[arg(long)]
    pub client_index: Option<usize>,
    /// Partition seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep at most this many local examples.
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Activation cache folder.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache the whole data set's activations in one entry shared by the fleet (`[cache] shared`).
    #[arg(long)]
    pub cache_shared: bool,
    /// Largest MQTT packet, bytes.
    #[arg(long)]
    pub max_packet_bytes: Option<usize>,
    /// JSON summary file written at exit.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Emulated dropout: probability of vanishing mid-round in a sampled round (`[faults] dropout`).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Seconds a client that vanished stays away (`[faults] dropout_offline_secs`).
    #[arg(long)]
    pub dropout_offline_secs: Option<f64>,
    /// Emulated straggler: hold each finished update this many seconds (`[faults] straggle_secs`).
    #[arg(long)]
    pub straggle_secs: Option<f64>,
}

/// `edge-client` subcommands (none: run the client).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Generate an Ed25519 key pair: writes the secret key to a new owner-only file and prints
    /// the public key (enrol it with the aggregator under this client's id).
    Keygen {
        /// Secret key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Where the broker is: read as the aggregator reads it.
pub use crate::tls::broker::BrokerAddr;

/// Exponential backoff with jitter between reconnect attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of each wait that is randomised away, in `[0, 1]`.
    pub jitter: f64,
}

impl Backoff {
    /// The wait before reconnect attempt `attempt` (0-based), given a uniform sample
    /// `u ∈ [0, 1)`. Pure, so tests pin it; the shell draws `u` from a seeded RNG.
    pub fn delay(&self, attempt: u32, u: f64) -> Duration {
        let base = self.initial.as_secs_f64() * self.multiplier.powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        // Jitter spreads the reconnects of a fleet that lost its broker at the same moment.
        let factor = 1.0 - self.jitter * u.clamp(0.0, 1.0);
        Duration::from_secs_f64((capped * factor).max(0.0))
    }
}

/// Which slice of which data set this client trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub dataset: String,
    pub root: Option<PathBuf>,
    pub partition: PartitionKind,
    pub alpha: f64,
    pub num_clients: usize,
    pub index: usize,
    pub seed: u64,
    pub max_examples: Option<usize>,
}

/// Validated `[faults]`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct FaultsSpec {
    pub dropout: f64,
    pub dropout_offline: Duration,
    pub straggle: Duration,
}

/// The validated configuration the client runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeConfig {
    pub broker: BrokerAddr,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub credentials: Option<(String, String)>,
    /// TLS files, for an `mqtts://` broker.
    pub tls: Option<TlsFiles>,
    /// Secret key file this client signs its messages with.
    pub signing_key: Option<PathBuf>,
    /// The aggregator's public key: its adapters and announcements must be signed with it.
    pub aggregator_key: Option<VerifyingKey>,
    pub fleet: String,
    pub client_id: String,
    pub run_id: u64,
    pub model_dir: PathBuf,
    pub runtime: RuntimeChoice,
    pub peft: PeftChoice,
    pub image_size: usize,
    /// Samples per trunk batch while filling the activation cache.
    pub trunk_batch: usize,
    /// Tokens per text; `None`: the manifest's `max_len`.
    pub max_seq_len: Option<usize>,
    pub threads: usize,
    pub data: DataSpec,
    pub cache_dir: PathBuf,
    pub cache_memory_bytes: usize,
    pub cache_persist: bool,
    pub cache_shared: bool,
    /// Largest frozen prefix the trainer keeps, bytes (`[cache] frozen_mb`).
    pub frozen_budget_bytes: usize,
    pub reconnect: Backoff,
    pub summary_json: Option<PathBuf>,
    pub faults: FaultsSpec,
}

/// Checks that `name` can be one MQTT topic level and a fixed-capacity wire string.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!(
                "`{name}` is {} bytes long; at most {MAX_NAME_LEN}",
                name.len()
            ),
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.'))
    {
        return Err(invalid(
            field,
            format!("`{name}` contains `{bad}`; use ASCII letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(())
}

impl EdgeConfig {
    /// Reads the file named by `--config` (if any), merges the flags and validates.
    pub fn from_cli(cli: &Cli) -> Result<EdgeConfig, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        EdgeConfig::resolve(file, cli)
    }

    /// Merges flags over the file over the defaults, then validates every field.
    pub fn resolve(file: FileConfig, cli: &Cli) -> Result<EdgeConfig, ConfigError> {
        let url = cli
            .broker
            .clone()
            .or(file.broker.url)
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_string());
        let broker = BrokerAddr::parse(&url).map_err(setting)?;

        let keep_alive_secs = file.broker.keep_alive_secs.unwrap_or(30);
        if !(1..=65_535).contains(&keep_alive_secs) {
            return Err(invalid(
                "broker.keep_alive_secs",
                format!("{keep_alive_secs} is not in 1..=65535"),
            ));
        }

        let max_packet_bytes = cli
            .max_packet_bytes
            .or(file.broker.max_packet_bytes)
            .unwrap_or(1 << 20);
        // MQTT's remaining-length field tops out at 256 MiB.
        if !(MIN_PACKET_BYTES..=268_435_455).contains(&max_packet_bytes) {
            return Err(invalid(
                "broker.max_packet_bytes",
                format!("{max_packet_bytes} is not in {MIN_PACKET_BYTES}..=268435455"),
            ));
        }

        let password_file = cli.password_file.clone().or(file.broker.password_file);
        let password = crate::tls::broker::password(
            file.broker.password,
            password_file,
            file.broker.password_env,
        )
        .map_err(setting)?;
        let credentials = crate::tls::broker::credentials(
            cli.username.clone().or(file.broker.username),
            password,
        )
        .map_err(setting)?;
        let tls = crate::tls::broker::tls_files(
            &broker,
            cli.ca_file.clone().or(file.broker.ca_file),
            cli.client_cert.clone().or(file.broker.client_cert),
            cli.client_key.clone().or(file.broker.client_key),
            " (--ca-file)",
        )
        .map_err(setting)?;
        let signing_key = cli.signing_key.clone().or(file.security.signing_key);
        let aggregator_key = match cli.aggregator_key.clone().or(file.security.aggregator_key) {
            Some(hex) => Some(
                fedpeft_protocol::sign::parse_public_key(&hex)
                    .map_err(|e| invalid("security.aggregator_key", e.to_string()))?,
            ),
            None => None,
        };

        let fleet = cli
            .fleet
            .clone()
            .or(file.client.fleet)
            .unwrap_or_else(|| "fedpeft".to_string());
        validate_name("client.fleet", &fleet)?;

        let client_id = cli
            .client_id
            .clone()
            .or(file.client.id)
            .ok_or(ConfigError::Missing {
                field: "client.id",
                flag: "client-id",
            })?;
        validate_name("client.id", &client_id)?;
        let run_id = cli.run_id.or(file.client.run_id).unwrap_or(1);

        let model_dir = cli
            .model_dir
            .clone()
            .or(file.model.dir)
            .ok_or(ConfigError::Missing {
                field: "model.dir",
                flag: "model-dir",
            })?;
        let runtime = cli
            .runtime
            .or(file.model.runtime)
            .unwrap_or(RuntimeChoice::Auto);
        let peft_name = cli
            .peft
            .clone()
            .or(file.model.peft)
            .unwrap_or_else(|| "head".to_string());
        let positive = |field: &'static str, v: u16| {
            if v == 0 {
                Err(invalid(field, "must be at least 1"))
            } else {
                Ok(v)
            }
        };
        let peft = match peft_name.as_str() {
            "head" => PeftChoice::Head,
            "bias" => PeftChoice::Bias,
            "lora" => {
                let alpha = cli.lora_alpha.or(file.model.lora_alpha).unwrap_or(16.0);
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(invalid(
                        "model.lora_alpha",
                        format!("{alpha} must be finite and > 0"),
                    ));
                }
                PeftChoice::Lora {
                    rank: positive(
                        "model.lora_rank",
                        cli.lora_rank.or(file.model.lora_rank).unwrap_or(8),
                    )?,
                    alpha,
                }
            }
            "adapter" => PeftChoice::Adapter {
                bottleneck: positive(
                    "model.bottleneck",
                    cli.bottleneck.or(file.model.bottleneck).unwrap_or(16),
                )?,
            },
            "prompt" => PeftChoice::Prompt {
                tokens: positive(
                    "model.prompt_tokens",
                    cli.prompt_tokens.or(file.model.prompt_tokens).unwrap_or(4),
                )?,
            },
            "full-tail" => PeftChoice::FullTail,
            other => {
                return Err(invalid(
                    "model.peft",
                    format!("`{other}` is not head, bias, lora, adapter, prompt or full-tail"),
                ));
            }
        };
        let image_size = cli.image_size.or(file.model.image_size).unwrap_or(96);
        if !(32..=1024).contains(&image_size) {
            return Err(invalid(
                "model.image_size",
                format!("{image_size} is not in 32..=1024"),
            ));
        }
        let trunk_batch = cli.trunk_batch.or(file.model.trunk_batch).unwrap_or(16);
        if !(1..=1024).contains(&trunk_batch) {
            return Err(invalid(
                "model.trunk_batch",
                format!("{trunk_batch} is not in 1..=1024"),
            ));
        }
        let threads = cli.threads.or(file.model.threads).unwrap_or(0);
        let max_seq_len = cli.max_seq_len.or(file.model.max_seq_len);
        if let Some(n) = max_seq_len
            && !(2..=512).contains(&n)
        {
            return Err(invalid(
                "model.max_seq_len",
                format!("{n} is not in 2..=512 (BERT-style position embeddings)"),
            ));
        }

        let dataset = cli
            .dataset
            .clone()
            .or(file.data.dataset)
            .unwrap_or_else(|| "fashion-mnist".to_string());
        if !DATASETS.contains(&dataset.as_str()) {
            return Err(invalid(
                "data.dataset",
                format!("`{dataset}` is not one of {}", DATASETS.join(", ")),
            ));
        }
        let partition = cli
            .partition
            .or(file.data.partition)
            .unwrap_or(PartitionKind::Dirichlet);
        if partition == PartitionKind::Natural && dataset != "spam-assassin" {
            return Err(invalid(
                "data.partition",
                format!(
                    "natural needs a data set with a natural client key (spam-assassin: its \
                     mailing lists); `{dataset}` has none: use iid or dirichlet"
                ),
            ));
        }
        let alpha = cli.alpha.or(file.data.alpha).unwrap_or(0.5);
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(invalid(
                "data.alpha",
                format!("{alpha} must be finite and > 0"),
            ));
        }
        let num_clients = cli.num_clients.or(file.data.num_clients).unwrap_or(1);
        if num_clients == 0 {
            return Err(invalid("data.num_clients", "must be at least 1"));
        }
        let index = cli.client_index.or(file.data.index).unwrap_or(0);
        if index >= num_clients {
            return Err(invalid(
                "data.index",
                format!(
                    "{index} is out of range for num_clients = {num_clients} (0..{num_clients})"
                ),
            ));
        }
        let seed = cli.seed.or(file.data.seed).unwrap_or(42);
        let max_examples = cli.max_examples.or(file.data.max_examples);
        if max_examples == Some(0) {
            return Err(invalid("data.max_examples", "must be at least 1 when set"));
        }

        let cache_dir = cli
            .cache_dir
            .clone()
            .or(file.cache.dir)
            .unwrap_or_else(|| PathBuf::from("data/cache"));
        let cache_memory_bytes = file.cache.memory_mb.unwrap_or(256).saturating_mul(1 << 20);
        let cache_persist = file.cache.persist.unwrap_or(true);
        let cache_shared = cli.cache_shared || file.cache.shared.unwrap_or(false);
        let frozen_budget_bytes = file.cache.frozen_mb.unwrap_or(128).saturating_mul(1 << 20);

        let initial_ms = file.reconnect.initial_ms.unwrap_or(500);
        let max_ms = file.reconnect.max_ms.unwrap_or(30_000);
        let multiplier = file.reconnect.multiplier.unwrap_or(2.0);
        let jitter = file.reconnect.jitter.unwrap_or(0.5);
        if initial_ms == 0 {
            return Err(invalid("reconnect.initial_ms", "must be at least 1"));
        }
        if max_ms < initial_ms {
            return Err(invalid(
                "reconnect.max_ms",
                format!("{max_ms} is smaller than reconnect.initial_ms = {initial_ms}"),
            ));
        }
        if !(multiplier.is_finite() && multiplier >= 1.0) {
            return Err(invalid(
                "reconnect.multiplier",
                format!("{multiplier} must be finite and >= 1"),
            ));
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(invalid(
                "reconnect.jitter",
                format!("{jitter} is not in [0, 1]"),
            ));
        }

        let dropout = cli.dropout.or(file.faults.dropout).unwrap_or(0.0);
        if !(0.0..=1.0).contains(&dropout) {
            return Err(invalid(
                "faults.dropout",
                format!("{dropout} is not a probability in [0, 1]"),
            ));
        }
        let secs = |field: &'static str, v: Option<f64>, default: f64| {
            let v = v.unwrap_or(default);
            if v.is_finite() && (0.0..=86_400.0).contains(&v) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(invalid(field, format!("{v} is not in 0..=86400 seconds")))
            }
        };
        let faults = FaultsSpec {
            dropout,
            dropout_offline: secs(
                "faults.dropout_offline_secs",
                cli.dropout_offline_secs
                    .or(file.faults.dropout_offline_secs),
                2.0,
            )?,
            straggle: secs(
                "faults.straggle_secs",
                cli.straggle_secs.or(file.faults.straggle_secs),
                0.0,
            )?,
        };

        Ok(EdgeConfig {
            faults,
            broker,
            keep_alive: Duration::from_secs(keep_alive_secs),
            max_packet_bytes,
            credentials,
            tls,
            signing_key,
            aggregator_key,
            fleet,
            client_id,
            run_id,
            model_dir,
            runtime,
            peft,
            image_size,
            trunk_batch,
            max_seq_len,
            threads,
            data: DataSpec {
                dataset,
                root: cli.data_root.clone().or(file.data.root),
                partition,
                alpha,
                num_clients,
                index,
                seed,
                max_examples,
            },
            cache_dir,
            cache_memory_bytes,
            cache_persist,
            cache_shared,
            frozen_budget_bytes,
            reconnect: Backoff {
                initial: Duration::from_millis(initial_ms),
                max: Duration::from_millis(max_ms),
                multiplier,
                jitter,
            },
            summary_json: cli.summary_json.clone().or(file.report.summary_json),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["edge-client"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("flags parse")
    }

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(text, Path::new("edge.toml"))
    }

    #[test]
    fn a_full_file_is_read_and_defaults_fill_the_rest() {
        let file = parse(
            r#"
            [broker]
            url = "mqtt://broker.local:1884"
            [client]
            fleet = "lab"
            id = "pi-07"
            run_id = 9
            [model]
            dir = "models/build/efficientnet-lite0"
            runtime = "tract"
            peft = "lora"
            lora_rank = 4
            [data]
            partition = "iid"
            num_clients = 8
            index = 7
            "#,
        )
        .unwrap();
        let cfg = EdgeConfig::resolve(file, &cli(&[])).unwrap();
        assert_eq!(
            cfg.broker,
            BrokerAddr {
                host: "broker.local".into(),
                port: 1884,
                tls: false,
            }
        );
        assert_eq!(cfg.fleet, "lab");
        assert_eq!(cfg.client_id, "pi-07");
        assert_eq!(cfg.run_id, 9);
        assert_eq!(cfg.runtime, RuntimeChoice::Tract);
        assert_eq!(
            cfg.peft,
            PeftChoice::Lora {
                rank: 4,
                alpha: 16.0
            }
        );
        assert_eq!((cfg.image_size, cfg.trunk_batch), (96, 16));
        assert_eq!(cfg.data.partition, PartitionKind::Iid);
        assert_eq!((cfg.data.index, cfg.data.num_clients), (7, 8));
        assert_eq!(cfg.data.dataset, "fashion-mnist");
        assert_eq!(cfg.data.seed, 42);
        assert_eq!(cfg.max_packet_bytes, 1 << 20);
        assert_eq!(cfg.keep_alive, Duration::from_secs(30));
        assert_eq!(cfg.cache_dir, PathBuf::from("data/cache"));
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            "[client]\nid = \"a\"\n[model]\ndir = \"m\"\n[data]\nnum_clients = 4\nindex = 1\n",
        )
        .unwrap();
        let cfg = EdgeConfig::resolve(
            file,
            &cli(&[
                "--client-id",
                "b",
                "--client-index",
                "3",
                "--broker",
                "mqtt://10.0.0.2",
            ]),
        )
        .unwrap();
        assert_eq!(cfg.client_id, "b");
        assert_eq!(cfg.data.index, 3);
        assert_eq!(cfg.broker.port, 1883);
        assert_eq!(cfg.broker.host, "10.0.0.2");
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_name() {
        let err = parse("[client]\nid = \"a\"\nfleat = \"x\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("fleat"), "{msg}");
        assert!(msg.contains("edge.toml"), "{msg}");
        let err = parse("[brokr]\nurl = \"mqtt://x\"\n").unwrap_err();
        assert!(err.to_string().contains("brokr"), "{err}");
    }

    #[test]
    fn a_missing_client_id_names_the_field_and_the_flag() {
        let err =
            EdgeConfig::resolve(FileConfig::default(), &cli(&["--model-dir", "m"])).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Missing {
                    field: "client.id",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("--client-id"));
    }

    #[test]
    fn a_shard_index_outside_the_fleet_is_rejected() {
        let err = EdgeConfig::resolve(
            FileConfig::default(),
            &cli(&[
                "--client-id",
                "a",
                "--model-dir",
                "m",
                "--num-clients",
                "4",
                "--client-index",
                "4",
            ]),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "data.index",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn client_ids_that_would_break_topics_are_rejected() {
        for bad in ["a/b", "a+b", "#", "", "x".repeat(33).as_str(), "é"] {
            let err = EdgeConfig::resolve(
                FileConfig::default(),
                &cli(&["--client-id", bad, "--model-dir", "m"]),
            )
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        field: "client.id",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn out_of_range_numbers_are_rejected() {
        let base = ["--client-id", "a", "--model-dir", "m"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            EdgeConfig::resolve(FileConfig::default(), &cli(&v))
        };
        assert!(with(&["--max-packet-bytes", "100"]).is_err());
        assert!(with(&["--alpha", "0"]).is_err());
        assert!(with(&["--num-clients", "0"]).is_err());
        assert!(with(&["--max-examples", "0"]).is_err());
        assert!(with(&["--image-size", "8"]).is_err());
        let err = with(&["--peft", "loar"]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    field: "model.peft",
                    ..
                }
            ),
            "{err}"
        );
        let file = parse("[reconnect]\njitter = 1.5\n").unwrap();
        assert!(EdgeConfig::resolve(file, &cli(&base)).is_err());
        let file = parse("[reconnect]\ninitial_ms = 1000\nmax_ms = 10\n").unwrap();
        assert!(EdgeConfig::resolve(file, &cli(&base)).is_err());
    }

    #[test]
    fn faults_come_from_the_file_or_flags_and_bad_values_name_their_key() {
        let base = ["--client-id", "a", "--model-dir", "m"];
        let cfg = EdgeConfig::resolve(FileConfig::default(), &cli(&base)).unwrap();
        assert_eq!(cfg.faults.dropout, 0.0);
        assert_eq!(cfg.faults.straggle, Duration::ZERO);
        assert_eq!(cfg.faults.dropout_offline, Duration::from_secs(2));
        let file = parse(
            "[faults]
dropout = 0.3
dropout_offline_secs = 0.5
straggle_secs = 4
",
        )
        .unwrap();
        let cfg = EdgeConfig::resolve(file.clone(), &cli(&base)).unwrap();
        assert_eq!(cfg.faults.dropout, 0.3);
        assert_eq!(cfg.faults.dropout_offline, Duration::from_millis(500));
        assert_eq!(cfg.faults.straggle, Duration::from_secs(4));
        let mut flags = base.to_vec();
        flags.extend(["--dropout", "0.5", "--straggle-secs", "1"]);
        let cfg = EdgeConfig::resolve(file, &cli(&flags)).unwrap();
        assert_eq!(cfg.faults.dropout, 0.5, "a flag beats the file");
        assert_eq!(cfg.faults.straggle, Duration::from_secs(1));
        for (text, field) in [
            ("[faults]\ndropout = 1.5\n", "faults.dropout"),
            (
                "[faults]\ndropout_offline_secs = -1.0\n",
                "faults.dropout_offline_secs",
            ),
            ("[faults]\nstraggle_secs = nan\n", "faults.straggle_secs"),
            ("[model]\ntrunk_batch = 0\n", "model.trunk_batch"),
        ] {
            let err = EdgeConfig::resolve(parse(text).unwrap(), &cli(&base)).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: f, .. } if f == field),
                "{text}: {err}"
            );
        }
        assert!(parse("[faults]\nvanish = 1\n").is_err());
    }

    #[test]
    fn text_settings_come_from_flags_or_the_file_and_bad_combinations_name_their_key() {
        let base = ["--client-id", "a", "--model-dir", "m"];
        let with = |file: &str, extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            EdgeConfig::resolve(parse(file).unwrap(), &cli(&v))
        };
        let cfg = with(
            "[model]\npeft = \"prompt\"\nprompt_tokens = 8\nmax_seq_len = 64\n\
             [data]\ndataset = \"spam-assassin\"\npartition = \"natural\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(cfg.peft, PeftChoice::Prompt { tokens: 8 });
        assert_eq!(cfg.max_seq_len, Some(64));
        assert_eq!(cfg.data.partition, PartitionKind::Natural);
        let cfg = with(
            "[model]\nmax_seq_len = 64\n",
            &[
                "--max-seq-len",
                "32",
                "--peft",
                "adapter",
                "--bottleneck",
                "8",
                "--dataset",
                "spam-assassin",
            ],
        )
        .unwrap();
        assert_eq!(cfg.max_seq_len, Some(32));
        assert_eq!(cfg.peft, PeftChoice::Adapter { bottleneck: 8 });
        assert_eq!(with("", &[]).unwrap().max_seq_len, None);
        let lora = with(
            "",
            &["--peft", "lora", "--lora-rank", "4", "--lora-alpha", "8"],
        )
        .unwrap();
        assert_eq!(
            lora.peft,
            PeftChoice::Lora {
                rank: 4,
                alpha: 8.0
            }
        );
        for (file, extra, field) in [
            ("", &["--partition", "natural"][..], "data.partition"),
            (
                "[data]\npartition = \"natural\"\n",
                &[][..],
                "data.partition",
            ),
            ("", &["--dataset", "cifar-10"][..], "data.dataset"),
            ("", &["--max-seq-len", "1"][..], "model.max_seq_len"),
            ("[model]\nmax_seq_len = 513\n", &[][..], "model.max_seq_len"),
            (
                "",
                &["--peft", "prompt", "--prompt-tokens", "0"][..],
                "model.prompt_tokens",
            ),
            (
                "",
                &["--peft", "adapter", "--bottleneck", "0"][..],
                "model.bottleneck",
            ),
        ] {
            let err = with(file, extra).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{file:?} {extra:?}: {err}"
            );
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(parse("[model]\nmax_seq_length = 64\n").is_err());
    }

    #[test]
    fn tls_password_and_keys_are_read_from_files_and_flags_and_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\n").unwrap();
        let key = fedpeft_protocol::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let hex = fedpeft_protocol::sign::public_key_hex(&key);
        let pw_arg = pw.display().to_string();
        let base = ["--client-id", "pi-01", "--model-dir", "m"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            EdgeConfig::resolve(FileConfig::default(), &cli(&v))
        };
        let cfg = with(&[
            "--broker",
            "mqtts://broker.lan",
            "--ca-file",
            "ca.crt",
            "--username",
            "pi-01",
            "--password-file",
            &pw_arg,
            "--signing-key",
            "pi-01.key",
            "--aggregator-key",
            &hex,
        ])
        .unwrap();
        assert!(cfg.broker.tls);
        assert_eq!(cfg.tls.unwrap().ca_file, PathBuf::from("ca.crt"));
        assert_eq!(
            cfg.credentials,
            Some(("pi-01".to_string(), "hunter2".to_string()))
        );
        assert_eq!(cfg.aggregator_key, Some(key));
        assert_eq!(cfg.signing_key, Some(PathBuf::from("pi-01.key")));
        for (extra, field) in [
            (&["--broker", "mqtts://h"][..], "broker.ca_file"),
            (&["--ca-file", "ca.crt"][..], "broker.ca_file"),
            (&["--aggregator-key", "00"][..], "security.aggregator_key"),
            (
                &["--username", "u", "--password-file", "/nonexistent/pw"][..],
                "broker.password_file",
            ),
        ] {
            let err = with(extra).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { field: f, .. } if *f == field),
                "{extra:?}: {err}"
            );
        }
        // A password is never a flag.
        assert!(Cli::try_parse_from(["edge-client", "--password", "x"]).is_err());
    }

    #[test]
    fn backoff_grows_exponentially_caps_and_jitters_downwards() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.5,
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay(4, 0.0), Duration::from_millis(1000));
        assert_eq!(b.delay(40, 0.0), Duration::from_millis(1000));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(200));
        let mid = b.delay(2, 0.5);
        assert!(mid > Duration::from_millis(200) && mid < Duration::from_millis(400));
    }
}
