//! Configuration: a TOML file (every field optional, unknown keys rejected) plus command-line
//! overrides, validated into a typed [`Config`] before anything starts.
//!
//! The file format itself (every key, its default) is [`fedpeft_config::aggregator`], shared with
//! the fleet runner, and the book's reference page "Aggregator config" documents it; here it is
//! checked and completed.

use std::path::PathBuf;

pub use fedpeft_config::ConfigError;
pub use fedpeft_config::aggregator::AggregatorFile;
use fedpeft_config::aggregator::{
    DpTable, KeepGlobals, KeepPolicy, LocalTable, ModelTable, OutputTable, QuorumFailureSetting,
};
use fedpeft_config::broker::EmbeddedBrokerTable;
use fedpeft_config::{BrokerTable, SecurityTable, invalid};
use fedpeft_protocol::{DType, DpSgd, FleetName, LocalConfig, Optimizer, PeftMethod};

use crate::held_out::HeldOutData;
use crate::round::{QuorumFailure, RunSettings, SecureSettings};
use crate::strategy::{ClientDp, StrategyKind};
use crate::tls::TlsFiles;
use crate::tls::broker::BrokerList;

fn setting(e: crate::tls::broker::SettingError) -> ConfigError {
    invalid(e.key, e.message)
}

/// Where the MQTT broker is.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerTarget {
    /// Run rumqttd in-process on `host:port` (port 0 = a free one).
    Embedded { host: String, port: u16 },
    /// Connect to an external broker: one, or the nodes of a cluster, tried in turn.
    External(BrokerList),
}

/// A password, kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Broker connection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    pub target: BrokerTarget,
    pub max_packet_bytes: usize,
    /// Bytes of received publishes held before the machine has handled them.
    pub receive_buffer_bytes: usize,
    pub client_id: String,
    pub keep_alive_secs: u64,
    /// TLS to an external broker (`mqtts://`).
    pub tls: Option<TlsFiles>,
    /// MQTT username and password.
    pub credentials: Option<(String, Secret)>,
    /// The embedded broker's logins and ACL (`[embedded_broker]`); `None`: anyone who can
    /// connect may publish and subscribe anywhere.
    pub access: Option<crate::broker::Access>,
}

/// Signed messages: the aggregator's key and the enrolled clients' keys (files, read at start).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecurityConfig {
    pub signing_key: Option<PathBuf>,
    pub enrolled_keys: Option<PathBuf>,
}

/// The model part: which PEFT method on which backbone, or a model-less adapter layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub backbone: Option<PathBuf>,
    pub peft: PeftMethod,
    pub eval_examples: usize,
    /// The held-out set (`dataset`, `eval_root` and how to read it).
    pub eval: HeldOutData,
    pub image_size: usize,
    pub max_seq_len: Option<usize>,
    pub threads: usize,
    pub cache_dir: PathBuf,
    pub tensors: Vec<(String, Vec<u32>)>,
    /// A Hugging Face PEFT LoRA folder the run starts from.
    pub initial_adapter: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The rounds' settings (the round machine's part).
    pub run: RunSettings,
    pub max_payload_bytes: usize,
    /// Chunked updates being reassembled at once, and the bytes they may reserve together.
    pub reassembly: Reassembly,
    /// Whole-backbone parameters for the full-model comparison; 0 = from the model host.
    pub backbone_params: u64,
    pub strategy: StrategyKind,
    /// Client-level DP at the aggregator, if configured.
    pub dp: Option<ClientDp>,
    pub broker: BrokerConfig,
    pub model: ModelConfig,
    pub output_dir: PathBuf,
    pub resume: bool,
    /// `[output] keep_globals`.
    pub keep_globals: KeepGlobals,
    pub security: SecurityConfig,
    /// `[monitor]`, when it has an address.
    pub monitor: Option<MonitorConfig>,
}

/// The monitor: metrics and the dashboard over HTTP.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    pub listen: std::net::SocketAddr,
    pub token_file: Option<PathBuf>,
    /// Serving goes on this long after the run ends.
    pub linger_ms: u64,
    /// A label per client id (a fleet trial's link presets).
    pub labels: std::collections::BTreeMap<String, String>,
}

fn validate_monitor(
    m: fedpeft_config::aggregator::MonitorTable,
) -> Result<Option<MonitorConfig>, ConfigError> {
    let Some(listen) = m.listen else {
        if m != Default::default() {
            return Err(invalid(
                "monitor.listen",
                "the [monitor] table needs an address to serve on (e.g. \"127.0.0.1:9464\")",
            ));
        }
        return Ok(None);
    };
    let listen = listen.parse().map_err(|_| {
        invalid(
            "monitor.listen",
            format!("`{listen}` is not an ip:port address (e.g. \"127.0.0.1:9464\")"),
        )
    })?;
    let linger = m.linger_secs.unwrap_or(0.0);
    if !(0.0..=86_400.0).contains(&linger) {
        return Err(invalid(
            "monitor.linger_secs",
            format!("{linger} is not in 0..=86400"),
        ));
    }
    Ok(Some(MonitorConfig {
        listen,
        token_file: m.token_file,
        linger_ms: (linger * 1000.0) as u64,
        labels: m.labels.unwrap_or_default(),
    }))
}

/// `secure_aggregation`: `true`/`false` or a table; and what cannot combine with it.
fn validate_secure(
    value: Option<toml::Value>,
    file: &AggregatorFile,
    min_clients: usize,
) -> Result<Option<SecureSettings>, ConfigError> {
    use fedpeft_config::aggregator::SecureAggregationTable;
    let table =
        match value {
            None | Some(toml::Value::Boolean(false)) => return Ok(None),
            Some(toml::Value::Boolean(true)) => SecureAggregationTable::default(),
            Some(toml::Value::Table(t)) => toml::Value::Table(t)
                .try_into::<SecureAggregationTable>()
                .map_err(|e| invalid("secure_aggregation", e.message().to_string()))?,
            Some(other) => {
                return Err(invalid(
                    "secure_aggregation",
                    format!("`{other}`: give true, false or a [secure_aggregation] table"),
                ));
            }
        };
    if table.enabled == Some(false) {
        return Ok(None);
    }
    let refuse = |key: &'static str, why: &str| {
        Err(invalid(
            key,
            format!("cannot be combined with secure_aggregation: {why}"),
        ))
    };
    match &file.strategy {
        Some(StrategyKind::Median) | Some(StrategyKind::TrimmedMean { .. }) => {
            return refuse(
                "strategy",
                "order statistics (median, trimmed mean) need each client's update, and the \
                 aggregator sees only their sum (fedavg, fedadam and fedyogi work on the sum)",
            );
        }
        _ => {}
    }
    if file.local.top_k_fraction.is_some() {
        return refuse(
            "local.top_k_fraction",
            "top-k updates send different coordinates per client, which a masked sum cannot \
             add (and the chosen indices would leak); masked vectors are dense",
        );
    }
    if file.adaptive_norm_multiple.is_some() {
        return refuse(
            "adaptive_norm_multiple",
            "the adaptive bound follows the median of the clients' update norms, which the \
             aggregator no longer sees; give a fixed max_update_norm (devices apply it)",
        );
    }
    let settings = SecureSettings {
        neighbours: table.neighbours,
        threshold: table.threshold,
        modulus_bits: table.modulus_bits.unwrap_or(16),
        clip: table.clip.unwrap_or(0.25),
        stage_timeout_ms: match table.stage_timeout_secs {
            None => 30_000,
            Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => (s * 1000.0) as u64,
            Some(s) => {
                return Err(invalid(
                    "secure_aggregation.stage_timeout_secs",
                    format!("{s} is not in (0, 86400]"),
                ));
            }
        },
        // Filled in by `validate` once `[dp]` is checked.
        dp: None,
    };
    if !(settings.clip.is_finite() && settings.clip > 0.0) {
        return Err(invalid(
            "secure_aggregation.clip",
            format!("{} is not a positive number", settings.clip),
        ));
    }
    // The rules on k, t and m, for the smallest round the run may have.
    settings
        .params(min_clients.max(2))
        .check(min_clients.max(2))
        .map_err(|e| invalid("secure_aggregation", e.to_string()))?;
    Ok(Some(settings))
}

/// `[dp]` in a secure run: distributed DP, the noise added on the devices (see
/// [`crate::round::SecureDp`]). The DP settings themselves were checked by [`validate_dp`].
fn validate_secure_dp(
    dp: &ClientDp,
    min_contributions: Option<usize>,
    quorum: usize,
) -> Result<crate::round::SecureDp, ConfigError> {
    let min_contributions = min_contributions.unwrap_or(quorum).max(1);
    if min_contributions > dp.expected_clients {
        return Err(invalid(
            "dp.min_contributions",
            format!(
                "{min_contributions} is more than dp.expected_clients ({}): no round could \
                 reach it",
                dp.expected_clients
            ),
        ));
    }
    Ok(crate::round::SecureDp {
        clip_norm: dp.clip_norm,
        noise_multiplier: dp.noise_multiplier,
        expected_clients: dp.expected_clients,
        min_contributions,
    })
}

/// What a site cannot combine with, read from the file before its parts are taken apart.
struct SiteChecks {
    strategy: Option<StrategyKind>,
    secure: bool,
    dp: bool,
}

/// `[site]`: the root's fleet and run, this site's id there, and what a site cannot do.
fn validate_site(
    table: fedpeft_config::aggregator::SiteTable,
    checks: &SiteChecks,
    fleet: &FleetName,
    max_packet_bytes: usize,
) -> Result<crate::round::SiteSettings, ConfigError> {
    let refuse = |key: &'static str, why: &str| Err(invalid(key, format!("a site {why}")));
    match &checks.strategy {
        None | Some(StrategyKind::FedAvg) => {}
        Some(_) => {
            return refuse(
                "strategy",
                "forwards the exact weighted sum of its devices' updates (fedavg); the root's \
                 strategy (fedavg, fedadam, fedyogi) turns the sums into the global adapter",
            );
        }
    }
    if checks.secure {
        return refuse(
            "secure_aggregation",
            "sees and forwards the sum of its devices' updates; secure aggregation across \
             sites is not supported",
        );
    }
    if checks.dp {
        return refuse(
            "dp",
            "forwards a weighted sum, while client-level DP weighs every device alike and adds \
             noise once, at the aggregator that sees every update",
        );
    }
    let root = table
        .root_fleet
        .ok_or_else(|| invalid("site.root_fleet", "is required: the root's fleet name"))?;
    let upstream_fleet =
        FleetName::new(&root).map_err(|e| invalid("site.root_fleet", e.to_string()))?;
    if upstream_fleet == *fleet {
        return Err(invalid(
            "site.root_fleet",
            format!(
                "`{root}` is this site's own fleet; the site's devices need a fleet of their own \
                 (the bridge carries only the root's)"
            ),
        ));
    }
    let id = table
        .id
        .ok_or_else(|| invalid("site.id", "is required: this site's client id at the root"))?;
    let id = fedpeft_protocol::ClientId::new(&id).map_err(|e| invalid("site.id", e.to_string()))?;
    let margin = table.margin_secs.unwrap_or(2.0);
    if !(margin.is_finite() && (0.0..=3600.0).contains(&margin)) {
        return Err(invalid(
            "site.margin_secs",
            format!("{margin} is not in 0..=3600"),
        ));
    }
    Ok(crate::round::SiteSettings {
        upstream_fleet,
        upstream_run_id: table.root_run_id.unwrap_or(1),
        id,
        margin_ms: (margin * 1000.0).round() as u64,
        max_packet_bytes: u32::try_from(max_packet_bytes).unwrap_or(u32::MAX),
    })
}

/// `[async]`: the buffer and the staleness rule, and what an asynchronous run cannot do.
fn validate_buffered(
    table: fedpeft_config::aggregator::AsyncTable,
    strategy: &StrategyKind,
    secure: bool,
    site: bool,
    dp: bool,
    quorum: Option<usize>,
    min_clients: usize,
) -> Result<crate::round::BufferedSettings, ConfigError> {
    let refuse = |key: &'static str, why: &str| {
        Err(invalid(
            key,
            format!("cannot be combined with [async]: {why}"),
        ))
    };
    if matches!(
        strategy,
        StrategyKind::Median | StrategyKind::TrimmedMean { .. }
    ) {
        return refuse(
            "strategy",
            "order statistics need a round's updates side by side, and an asynchronous buffer \
             mixes updates of different versions (fedavg, fedadam and fedyogi work)",
        );
    }
    if secure {
        return refuse(
            "secure_aggregation",
            "its stages need every sampled client of one round at once",
        );
    }
    if site {
        return refuse("site", "a site follows its root's rounds");
    }
    if dp {
        return refuse(
            "dp",
            "the accountant assumes each round samples its clients independently, which \
             buffered updates of different versions do not",
        );
    }
    let buffer = table.buffer.ok_or_else(|| {
        invalid(
            "async.buffer",
            "is required: updates per new global adapter",
        )
    })?;
    if buffer == 0 || buffer > min_clients {
        return Err(invalid(
            "async.buffer",
            format!(
                "{buffer} must be between 1 and min_clients ({min_clients}), so a round's sample \
                 can fill it"
            ),
        ));
    }
    if let Some(quorum) = quorum
        && quorum > buffer
    {
        return Err(invalid(
            "quorum",
            format!("{quorum} is more than async.buffer ({buffer}): no buffer could reach it"),
        ));
    }
    let exponent = table.staleness_exponent.unwrap_or(0.5);
    if !(exponent.is_finite() && (0.0..=8.0).contains(&exponent)) {
        return Err(invalid(
            "async.staleness_exponent",
            format!("{exponent} is not in 0..=8"),
        ));
    }
    Ok(crate::round::BufferedSettings {
        buffer,
        max_staleness: table.max_staleness.unwrap_or(4),
        exponent,
    })
}

/// Checks every field of the file and fills in defaults.
pub fn validate(file: AggregatorFile) -> Result<Config, ConfigError> {
    let rounds = validate_rounds(&file)?;
    let explicit_quorum = file.quorum;
    let file_site_checks = SiteChecks {
        strategy: file.strategy.clone(),
        secure: false,
        dp: file.dp.is_some(),
    };
    let secure = validate_secure(file.secure_aggregation.clone(), &file, rounds.min_clients)?;
    let run_id = file.run_id.unwrap_or(1);
    let mut broker = validate_broker(file.broker, run_id)?;
    broker.access = validate_embedded_broker(file.embedded_broker, &broker, &rounds.fleet)?;
    let max_payload_bytes = validate_payload(file.max_payload_bytes, broker.max_packet_bytes)?;
    let max_update_bytes = file.max_update_bytes.unwrap_or(16 << 20);
    let reassembly = validate_reassembly(
        file.max_chunked_updates,
        file.max_reassembly_bytes,
        max_update_bytes,
    )?;
    let max_update_norm = positive(file.max_update_norm, "max_update_norm", "is not positive")?;
    let adaptive_norm_multiple = positive(
        file.adaptive_norm_multiple,
        "adaptive_norm_multiple",
        "is not a positive number",
    )?;
    let strategy = validate_strategy(file.strategy.unwrap_or(StrategyKind::FedAvg))?;
    let file_min_contributions = file.dp.as_ref().and_then(|d| d.min_contributions);
    let dp = match file.dp {
        None => None,
        Some(raw) => Some(validate_dp(
            raw,
            &strategy,
            max_update_norm,
            adaptive_norm_multiple,
            rounds.min_clients,
            rounds.fraction,
        )?),
    };
    let dp = dp.map(|d| ClientDp {
        on_devices: secure.is_some(),
        ..d
    });
    let secure = match (secure, &dp) {
        (Some(mut settings), Some(dp)) => {
            settings.dp = Some(validate_secure_dp(
                dp,
                file_min_contributions,
                rounds.quorum,
            )?);
            Some(settings)
        }
        (secure, _) => {
            if file_min_contributions.is_some() {
                return Err(invalid(
                    "dp.min_contributions",
                    "is for distributed DP, which needs secure_aggregation; with DP at the \
                     aggregator every accepted update is in the sum",
                ));
            }
            secure
        }
    };
    let site = match file.site {
        None => None,
        Some(table) => Some(validate_site(
            table,
            &SiteChecks {
                secure: secure.is_some(),
                ..file_site_checks
            },
            &rounds.fleet,
            broker.max_packet_bytes,
        )?),
    };
    let buffered = match file.buffered {
        None => None,
        Some(table) => Some(validate_buffered(
            table,
            &strategy,
            secure.is_some(),
            site.is_some(),
            dp.is_some(),
            explicit_quorum,
            rounds.min_clients,
        )?),
    };
    // Asynchronous: a buffer closes with `quorum` updates at its deadline, at most `buffer`.
    let quorum = match (&buffered, explicit_quorum) {
        (Some(b), None) => rounds.quorum.min(b.buffer),
        _ => rounds.quorum,
    };
    let output: OutputTable = file.output;
    Ok(Config {
        run: RunSettings {
            global_dtype: validate_dtype(file.global_dtype.as_deref())?,
            fleet: rounds.fleet,
            run_id,
            rounds: rounds.rounds,
            seed: file.seed.unwrap_or(42),
            min_clients: rounds.min_clients,
            start_clients: rounds.start_clients,
            fraction: rounds.fraction,
            quorum,
            round_timeout_ms: rounds.round_timeout_ms,
            on_quorum_failure: rounds.on_quorum_failure,
            max_update_bytes,
            max_update_norm,
            adaptive_norm_multiple,
            local: validate_local(file.local)?,
            secure,
            site,
            buffered,
        },
        max_payload_bytes,
        reassembly,
        backbone_params: file.backbone_params.unwrap_or(0),
        strategy,
        dp,
        broker,
        model: validate_model(file.model)?,
        output_dir: output.dir.unwrap_or_else(|| PathBuf::from("runs/latest")),
        resume: output.resume.unwrap_or(true),
        keep_globals: match output.keep_globals {
            Some(KeepGlobals::Last(0)) => {
                return Err(invalid(
                    "output.keep_globals",
                    "keeping the last 0 rounds keeps nothing; give \"all\", \"best\" or N >= 1",
                ));
            }
            Some(k) => k,
            None => KeepGlobals::Policy(KeepPolicy::All),
        },
        security: validate_security(file.security)?,
        monitor: validate_monitor(file.monitor)?,
    })
}

/// The round part of the file, checked.
struct RoundSettings {
    fleet: FleetName,
    rounds: u32,
    min_clients: usize,
    start_clients: usize,
    fraction: f64,
    quorum: usize,
    round_timeout_ms: u64,
    on_quorum_failure: QuorumFailure,
}

fn validate_rounds(file: &AggregatorFile) -> Result<RoundSettings, ConfigError> {
    let fleet_s = file.fleet.clone().unwrap_or_else(|| "fedpeft".into());
    let fleet = FleetName::new(&fleet_s).map_err(|e| invalid("fleet", e.to_string()))?;
    let rounds = file.rounds.unwrap_or(5);
    if rounds == 0 {
        return Err(invalid("rounds", "must be at least 1"));
    }
    let min_clients = file.min_clients.unwrap_or(2);
    if min_clients == 0 {
        return Err(invalid("min_clients", "must be at least 1"));
    }
    let start_clients = file.start_clients.unwrap_or(min_clients);
    if start_clients < min_clients {
        return Err(invalid(
            "start_clients",
            format!("{start_clients} is below min_clients ({min_clients})"),
        ));
    }
    let fraction = file.fraction.unwrap_or(1.0);
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(invalid("fraction", format!("{fraction} is not in (0, 1]")));
    }
    let quorum = file.quorum.unwrap_or(min_clients);
    if quorum == 0 || quorum > min_clients {
        return Err(invalid(
            "quorum",
            format!("{quorum} must be between 1 and min_clients ({min_clients})"),
        ));
    }
    let timeout = file.round_timeout_secs.unwrap_or(120.0);
    if !(timeout.is_finite() && timeout > 0.0) {
        return Err(invalid(
            "round_timeout_secs",
            format!("{timeout} is not a positive number of seconds"),
        ));
    }
    let on_quorum_failure = match file
        .on_quorum_failure
        .clone()
        .unwrap_or(QuorumFailureSetting::Skip)
    {
        QuorumFailureSetting::Skip => QuorumFailure::Skip,
        QuorumFailureSetting::Extend { max_extensions } => QuorumFailure::Extend { max_extensions },
    };
    Ok(RoundSettings {
        fleet,
        rounds,
        min_clients,
        start_clients,
        fraction,
        quorum,
        round_timeout_ms: (timeout * 1000.0).round() as u64,
        on_quorum_failure,
    })
}

/// `value` if it is absent or a positive finite number.
fn positive(
    value: Option<f64>,
    field: &'static str,
    what: &str,
) -> Result<Option<f64>, ConfigError> {
    match value {
        Some(n) if !(n.is_finite() && n > 0.0) => Err(invalid(field, format!("{n} {what}"))),
        n => Ok(n),
    }
}

/// Bounds on chunked updates that are still missing chunks: their memory, whatever the fleet's
/// size (see `max_chunked_updates` in the configuration reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reassembly {
    pub max_in_flight: usize,
    pub max_bytes: u64,
}

fn validate_reassembly(
    max_chunked_updates: Option<usize>,
    max_reassembly_bytes: Option<u64>,
    max_update_bytes: u64,
) -> Result<Reassembly, ConfigError> {
    let max_in_flight = max_chunked_updates.unwrap_or(64);
    if max_in_flight == 0 {
        return Err(invalid("max_chunked_updates", "must be at least 1"));
    }
    let max_bytes = max_reassembly_bytes.unwrap_or(max_update_bytes.saturating_mul(4));
    if max_bytes < max_update_bytes {
        return Err(invalid(
            "max_reassembly_bytes",
            format!(
                "{max_bytes} is less than max_update_bytes ({max_update_bytes}): no update of that \
                 size could be reassembled"
            ),
        ));
    }
    Ok(Reassembly {
        max_in_flight,
        max_bytes,
    })
}

fn validate_payload(
    max_payload_bytes: Option<usize>,
    max_packet_bytes: usize,
) -> Result<usize, ConfigError> {
    // Chunks carry a header, and the PUBLISH a topic: leave 1 KiB of room in the packet.
    let max_payload_bytes = max_payload_bytes
        .unwrap_or_else(|| (256 * 1024).min(max_packet_bytes.saturating_sub(1024)));
    if max_payload_bytes < 1024 || max_payload_bytes + 1024 > max_packet_bytes {
        return Err(invalid(
            "max_payload_bytes",
            format!(
                "{max_payload_bytes} must be at least 1024 and at most broker.max_packet_bytes - 1024 ({})",
                max_packet_bytes.saturating_sub(1024)
            ),
        ));
    }
    Ok(max_payload_bytes)
}

fn validate_strategy(strategy: StrategyKind) -> Result<StrategyKind, ConfigError> {
    match &strategy {
        StrategyKind::TrimmedMean { trim } if !(0.0..0.5).contains(trim) => {
            return Err(invalid(
                "strategy.trim",
                format!("{trim} is not in [0, 0.5)"),
            ));
        }
        StrategyKind::FedAdam(p) | StrategyKind::FedYogi(p) => {
            if p.server_lr.is_nan() || p.server_lr <= 0.0 || !(0.0..1.0).contains(&p.beta1) {
                return Err(invalid(
                    "strategy",
                    "server_lr must be > 0 and beta1 in [0, 1)",
                ));
            }
            if !(0.0..1.0).contains(&p.beta2) || p.tau.is_nan() || p.tau <= 0.0 {
                return Err(invalid("strategy", "beta2 must be in [0, 1) and tau > 0"));
            }
        }
        _ => {}
    }
    Ok(strategy)
}

fn validate_dtype(dtype: Option<&str>) -> Result<DType, ConfigError> {
    match dtype.unwrap_or("f32") {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "int8" | "i8" => Ok(DType::I8),
        other => Err(invalid(
            "global_dtype",
            format!("{other:?} is not f32, f16 or int8"),
        )),
    }
}

fn validate_security(s: SecurityTable) -> Result<SecurityConfig, ConfigError> {
    if s.aggregator_key.is_some() {
        return Err(invalid(
            "security.aggregator_key",
            "is an edge client's setting (the aggregator's own public key); the aggregator \
             signs with security.signing_key",
        ));
    }
    Ok(SecurityConfig {
        signing_key: s.signing_key,
        enrolled_keys: s.enrolled_keys,
    })
}

fn validate_dp(
    raw: DpTable,
    strategy: &StrategyKind,
    max_update_norm: Option<f64>,
    adaptive_norm_multiple: Option<f64>,
    min_clients: usize,
    fraction: f64,
) -> Result<ClientDp, ConfigError> {
    match strategy {
        StrategyKind::Median | StrategyKind::TrimmedMean { .. } => {
            return Err(invalid(
                "dp",
                "client-level DP is supported with strategy fedavg, fedadam or fedyogi only: its \
                 noise is calibrated to the sensitivity of a sum of clipped updates (S), while one \
                 client can move a coordinate-wise median or trimmed mean of every coordinate at \
                 once (sensitivity up to S·√parameters), so the reported ε would not hold",
            ));
        }
        _ => {}
    }
    if max_update_norm.is_some() {
        return Err(invalid(
            "max_update_norm",
            "with [dp], dp.clip_norm is the bound on each update; remove max_update_norm",
        ));
    }
    if adaptive_norm_multiple.is_some() {
        return Err(invalid(
            "adaptive_norm_multiple",
            "a bound taken from this round's updates' norms depends on their data, which the DP \
             accounting does not cover; with [dp] the bound is the fixed dp.clip_norm",
        ));
    }
    let clip_norm = raw
        .clip_norm
        .ok_or_else(|| invalid("dp.clip_norm", "required with [dp]"))?;
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(invalid(
            "dp.clip_norm",
            format!("{clip_norm} is not positive"),
        ));
    }
    let noise_multiplier = raw
        .noise_multiplier
        .ok_or_else(|| invalid("dp.noise_multiplier", "required with [dp]"))?;
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(invalid(
            "dp.noise_multiplier",
            format!("{noise_multiplier} is not positive (σ = 0 gives no privacy)"),
        ));
    }
    let fleet_size = raw.fleet_size.ok_or_else(|| {
        invalid(
            "dp.fleet_size",
            "required with [dp] (q = expected_clients / fleet_size)",
        )
    })?;
    if fleet_size == 0 {
        return Err(invalid("dp.fleet_size", "must be at least 1"));
    }
    let expected_clients = raw.expected_clients.unwrap_or_else(|| {
        ((fraction * fleet_size as f64).ceil() as usize)
            .max(min_clients)
            .min(fleet_size)
    });
    if expected_clients == 0 || expected_clients > fleet_size {
        return Err(invalid(
            "dp.expected_clients",
            format!("{expected_clients} must be between 1 and dp.fleet_size ({fleet_size})"),
        ));
    }
    let delta = raw
        .delta
        .unwrap_or_else(|| 1.0 / (fleet_size as f64).powf(1.1));
    if !(delta > 0.0 && delta < 1.0) {
        return Err(invalid("dp.delta", format!("{delta} is not in (0, 1)")));
    }
    Ok(ClientDp {
        clip_norm,
        noise_multiplier,
        expected_clients,
        fleet_size,
        delta,
        noise_seed: raw.noise_seed,
        // Set by `validate` for a secure run.
        on_devices: false,
    })
}

fn validate_broker(b: BrokerTable, run_id: u64) -> Result<BrokerConfig, ConfigError> {
    let url = b.url.unwrap_or_else(|| "embedded".into());
    let (target, tls) = if url == "embedded" {
        if b.ca_file.is_some() || b.client_cert.is_some() || b.client_key.is_some() {
            return Err(invalid(
                "broker.ca_file",
                "TLS files are set but the broker is `embedded` (plain MQTT on this host); \
                 TLS is for an external mqtts:// broker",
            ));
        }
        let target = BrokerTarget::Embedded {
            host: b.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: b.port.unwrap_or(0),
        };
        (target, None)
    } else {
        if url.split(',').any(|u| u.trim() == "embedded") {
            return Err(invalid(
                "broker.url",
                format!(
                    "`{url}`: `embedded` (the broker in this process) stands alone; a list \
                     names the nodes of an external broker"
                ),
            ));
        }
        if b.host.is_some() || b.port.is_some() {
            return Err(invalid(
                "broker.host",
                "host and port are for the embedded broker; put them in the url",
            ));
        }
        let brokers = BrokerList::parse(&url).map_err(setting)?;
        let tls =
            crate::tls::broker::tls_files(&brokers, b.ca_file, b.client_cert, b.client_key, "")
                .map_err(setting)?;
        (BrokerTarget::External(brokers), tls)
    };
    if b.password.is_some() {
        return Err(invalid(
            "broker.password",
            "the aggregator never reads its password from the config text: use \
             broker.password_file or broker.password_env",
        ));
    }
    let password =
        crate::tls::broker::password(None, b.password_file, b.password_env).map_err(setting)?;
    let credentials = crate::tls::broker::credentials(b.username, password)
        .map_err(setting)?
        .map(|(user, password)| (user, Secret(password)));
    let max_packet_bytes = b.max_packet_bytes.unwrap_or(1 << 20);
    if !(4096..=256 << 20).contains(&max_packet_bytes) {
        return Err(invalid(
            "broker.max_packet_bytes",
            format!("{max_packet_bytes} is not between 4096 and 256 MiB"),
        ));
    }
    let receive_buffer_bytes = b.receive_buffer_bytes.unwrap_or(16 << 20);
    if !(max_packet_bytes..=1 << 30).contains(&receive_buffer_bytes) {
        return Err(invalid(
            "broker.receive_buffer_bytes",
            format!(
                "{receive_buffer_bytes} is not between broker.max_packet_bytes \
                 ({max_packet_bytes}: one message must fit) and 1 GiB"
            ),
        ));
    }
    // One session per run: a broker's queue for an earlier run (or a message that could never
    // be delivered to it) is not this run's.
    let client_id = b
        .client_id
        .unwrap_or_else(|| format!("fedpeft-aggregator-{run_id}"));
    if client_id.is_empty() || client_id.len() > 64 {
        return Err(invalid("broker.client_id", "must be 1 to 64 bytes"));
    }
    Ok(BrokerConfig {
        target,
        max_packet_bytes,
        receive_buffer_bytes,
        client_id,
        keep_alive_secs: b.keep_alive_secs.unwrap_or(30).max(5),
        tls,
        credentials,
        access: None,
    })
}

/// `[embedded_broker]`: reads the password and ACL files, and checks that the aggregator itself
/// can log in and do its work under them.
fn validate_embedded_broker(
    t: EmbeddedBrokerTable,
    broker: &BrokerConfig,
    fleet: &FleetName,
) -> Result<Option<crate::broker::Access>, ConfigError> {
    use crate::broker::{Access, Acl, PasswordFile};
    let Some(password_file) = t.password_file else {
        if t.acl_file.is_some() {
            return Err(invalid(
                "embedded_broker.acl_file",
                "needs embedded_broker.password_file: an ACL on usernames nobody verified \
                 restricts nothing",
            ));
        }
        return Ok(None);
    };
    if !matches!(broker.target, BrokerTarget::Embedded { .. }) {
        return Err(invalid(
            "embedded_broker.password_file",
            "the broker is external (broker.url): give the password and ACL files to that broker",
        ));
    }
    let access = Access {
        passwords: PasswordFile::read(&password_file)
            .map_err(|e| invalid("embedded_broker.password_file", e.to_string()))?,
        acl: match &t.acl_file {
            Some(path) => {
                Acl::read(path).map_err(|e| invalid("embedded_broker.acl_file", e.to_string()))?
            }
            None => Acl::fedpeft(),
        },
    };
    let Some((user, password)) = &broker.credentials else {
        return Err(invalid(
            "broker.username",
            "the embedded broker checks every login, the aggregator's too: set broker.username \
             and broker.password_file (or broker.password_env)",
        ));
    };
    if !access.passwords.verify(user, password.0.as_bytes()) {
        return Err(invalid(
            "broker.password_file",
            format!(
                "user `{user}` with this password is not in {}",
                password_file.display()
            ),
        ));
    }
    access
        .check_aggregator(user, &broker.client_id, fleet.as_str())
        .map_err(|m| {
            let file = t
                .acl_file
                .as_deref()
                .unwrap_or(std::path::Path::new("deploy/mosquitto/acl (the default)"));
            invalid(
                "embedded_broker.acl_file",
                format!("{}: {m}", file.display()),
            )
        })?;
    Ok(Some(access))
}

fn validate_local(l: LocalTable) -> Result<LocalConfig, ConfigError> {
    let learning_rate = l.learning_rate.unwrap_or(0.05);
    if !(learning_rate.is_finite() && learning_rate > 0.0) {
        return Err(invalid("local.learning_rate", "must be positive"));
    }
    let weight_decay = l.weight_decay.unwrap_or(0.0);
    let optimizer = match l.optimizer.as_deref().unwrap_or("sgd") {
        "sgd" => Optimizer::Sgd {
            momentum: l.momentum.unwrap_or(0.0),
            weight_decay,
        },
        "adamw" | "adam" => Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay,
        },
        other => {
            return Err(invalid(
                "local.optimizer",
                format!("`{other}` is not sgd or adamw"),
            ));
        }
    };
    let update_dtype = match l.update_dtype.as_deref().unwrap_or("f32") {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "int8" | "i8" => DType::I8,
        other => {
            return Err(invalid(
                "local.update_dtype",
                format!("`{other}` is not f32, f16 or int8"),
            ));
        }
    };
    if let Some(k) = l.top_k_fraction
        && !(k > 0.0 && k <= 1.0)
    {
        return Err(invalid(
            "local.top_k_fraction",
            format!("{k} is not in (0, 1]"),
        ));
    }
    let dp_sgd = match (l.dp_clip_norm, l.dp_noise_multiplier) {
        (None, None) => None,
        (Some(clip_norm), Some(noise_multiplier)) if clip_norm > 0.0 && noise_multiplier >= 0.0 => {
            Some(DpSgd {
                clip_norm,
                noise_multiplier,
            })
        }
        _ => {
            return Err(invalid(
                "local.dp_clip_norm",
                "DP-SGD needs both dp_clip_norm > 0 and dp_noise_multiplier >= 0",
            ));
        }
    };
    let epochs = l.epochs.unwrap_or(1);
    let batch_size = l.batch_size.unwrap_or(32);
    if epochs == 0 || batch_size == 0 {
        return Err(invalid(
            "local.epochs",
            "epochs and batch_size must be at least 1",
        ));
    }
    Ok(LocalConfig {
        epochs,
        batch_size,
        learning_rate,
        optimizer,
        fedprox_mu: l.fedprox_mu.unwrap_or(0.0),
        dp_sgd,
        update_dtype,
        top_k_fraction: l.top_k_fraction,
        seed: 0,
    })
}

fn validate_model(m: ModelTable) -> Result<ModelConfig, ConfigError> {
    let peft = match m.peft.as_deref().unwrap_or("head") {
        "head" => PeftMethod::Head,
        "bias" => PeftMethod::Bias,
        "lora" => PeftMethod::Lora {
            rank: m.lora_rank.unwrap_or(8),
            alpha: m.lora_alpha.unwrap_or(16.0),
        },
        "adapter" => PeftMethod::Adapter {
            bottleneck: m.bottleneck.unwrap_or(16),
        },
        "prompt" => PeftMethod::Prompt {
            tokens: m.prompt_tokens.unwrap_or(4),
        },
        "full-tail" => PeftMethod::FullTail,
        other => {
            return Err(invalid(
                "model.peft",
                format!("`{other}` is not head, bias, lora, adapter, prompt or full-tail"),
            ));
        }
    };
    let eval = HeldOutData::from_table(&m)?;
    let tensors: Vec<(String, Vec<u32>)> = m
        .tensors
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    if m.backbone.is_none() && tensors.is_empty() {
        return Err(invalid(
            "model.backbone",
            "set a backbone directory, or list the adapter's tensors in model.tensors",
        ));
    }
    for (i, (name, shape)) in tensors.iter().enumerate() {
        if name.is_empty() || shape.is_empty() || shape.contains(&0) {
            return Err(invalid(
                "model.tensors",
                format!("tensor #{i} `{name}` needs a name and a non-empty shape without zeros"),
            ));
        }
        if tensors[..i].iter().any(|(n, _)| n == name) {
            return Err(invalid(
                "model.tensors",
                format!("tensor `{name}` listed twice"),
            ));
        }
    }
    if let Some(dir) = &m.initial_adapter {
        if m.backbone.is_none() {
            return Err(invalid(
                "model.initial_adapter",
                "needs a backbone (model.backbone) for the adapter to fit",
            ));
        }
        if !matches!(peft, PeftMethod::Lora { .. }) {
            return Err(invalid(
                "model.initial_adapter",
                "a Hugging Face PEFT adapter is LoRA: set peft = \"lora\"",
            ));
        }
        if !dir.join("adapter_config.json").is_file() {
            return Err(invalid(
                "model.initial_adapter",
                format!("{}: no adapter_config.json in this folder", dir.display()),
            ));
        }
    }
    let image_size = m.image_size.unwrap_or(96);
    if !(32..=1024).contains(&image_size) {
        return Err(invalid(
            "model.image_size",
            format!("{image_size} is not in 32..=1024"),
        ));
    }
    if let Some(n) = m.max_seq_len
        && !(2..=512).contains(&n)
    {
        return Err(invalid(
            "model.max_seq_len",
            format!("{n} is not in 2..=512"),
        ));
    }
    Ok(ModelConfig {
        backbone: m.backbone,
        peft,
        eval_examples: m.eval_examples.unwrap_or(2000),
        eval,
        image_size,
        max_seq_len: m.max_seq_len,
        threads: m.threads.unwrap_or(2).max(1),
        cache_dir: m.cache_dir.unwrap_or_else(|| PathBuf::from("data/cache")),
        tensors,
        initial_adapter: m.initial_adapter,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MINIMAL: &str = "[model]\ntensors = [{ name = \"w\", shape = [2, 3] }]\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        validate(AggregatorFile::parse(text, Path::new("agg.toml"))?)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.run.fleet.as_str(), "fedpeft");
        assert_eq!((c.run.rounds, c.run.min_clients, c.run.quorum), (5, 2, 2));
        assert_eq!(c.run.round_timeout_ms, 120_000);
        assert_eq!(c.strategy, StrategyKind::FedAvg);
        assert_eq!(c.broker.max_packet_bytes, 1 << 20);
        assert_eq!(c.broker.receive_buffer_bytes, 16 << 20);
        assert_eq!(
            c.broker.target,
            BrokerTarget::Embedded {
                host: "127.0.0.1".into(),
                port: 0
            }
        );
        assert_eq!(c.model.tensors, vec![("w".to_string(), vec![2, 3])]);
    }

    #[test]
    fn the_embedded_broker_acl_needs_logins_and_lets_the_aggregator_work() {
        let dir = tempfile::tempdir().unwrap();
        // `mosquitto_passwd -U` of `fedpeft-aggregator:agg` (Mosquitto 2.0.11).
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "fedpeft-aggregator:$7$101$/kuz7+Sc5zUghDRP$G/4AeYJrfwTC+42gvRPhUaa/qr4gpnc4E5xMOsLOmh+MhsEg2zzz+o5PNDfGF8Fgi2fhn2vokoper8E7IdTE7A==\n",
        )
        .unwrap();
        let pw = dir.path().join("agg.pw");
        std::fs::write(&pw, "agg\n").unwrap();
        let login = format!(
            "[broker]\nusername = \"fedpeft-aggregator\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        let table = format!(
            "[embedded_broker]\npassword_file = \"{}\"\n",
            passwd.display()
        );
        let c = parse(&format!("{login}{table}{MINIMAL}")).unwrap();
        let access = c.broker.access.expect("logins and ACL on");
        assert_eq!(access.acl, crate::broker::Acl::fedpeft());
        // Off by default, as before.
        assert_eq!(parse(MINIMAL).unwrap().broker.access, None);
        let narrow = dir.path().join("acl");
        std::fs::write(
            &narrow,
            "user fedpeft-aggregator\ntopic read fedpeft/v1/+/join\n",
        )
        .unwrap();
        for (text, field, words) in [
            (
                format!("{table}{MINIMAL}"),
                "broker.username",
                "aggregator's too",
            ),
            (
                format!("[embedded_broker]\nacl_file = \"x\"\n{MINIMAL}"),
                "embedded_broker.acl_file",
                "password_file",
            ),
            (
                format!(
                    "[broker]\nurl = \"mqtt://h\"\nusername = \"fedpeft-aggregator\"\n{table}{MINIMAL}"
                ),
                "embedded_broker.password_file",
                "external",
            ),
            (
                format!("{login}{table}{MINIMAL}").replace(
                    &passwd.display().to_string(),
                    &dir.path().join("missing").display().to_string(),
                ),
                "embedded_broker.password_file",
                "cannot read",
            ),
            (
                format!(
                    "{login}{table}acl_file = \"{}\"\n{MINIMAL}",
                    narrow.display()
                ),
                "embedded_broker.acl_file",
                "subscribe to `fedpeft/v1/fedpeft/update/+`",
            ),
            (
                format!("{login}{table}{MINIMAL}").replace("agg.pw", "missing.pw"),
                "broker.password_file",
                "cannot read",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(words), "{text}\n{err}");
        }
        std::fs::write(&pw, "wrong\n").unwrap();
        let err = parse(&format!("{login}{table}{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broker.password_file") && err.contains("is not in"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_naming_the_file_and_key() {
        let err = parse("roundz = 3\n").unwrap_err().to_string();
        assert!(err.contains("agg.toml") && err.contains("roundz"), "{err}");
        let err = parse("[broker]\nprot = 1\n").unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (text, field) in [
            ("fraction = 0.0\n", "fraction"),
            ("min_clients = 2\nquorum = 3\n", "quorum"),
            ("min_clients = 4\nstart_clients = 3\n", "start_clients"),
            ("round_timeout_secs = -1.0\n", "round_timeout_secs"),
            ("fleet = \"a/b\"\n", "fleet"),
            ("[local]\nupdate_dtype = \"f8\"\n", "local.update_dtype"),
            ("global_dtype = \"int4\"\n", "global_dtype"),
            ("[local]\ndp_clip_norm = 1.0\n", "local.dp_clip_norm"),
            ("[broker]\nurl = \"http://x\"\n", "broker.url"),
            (
                "[broker]\nmax_packet_bytes = 100\n",
                "broker.max_packet_bytes",
            ),
            (
                "[broker]\nmax_packet_bytes = 65536\nreceive_buffer_bytes = 65535\n",
                "broker.receive_buffer_bytes",
            ),
            ("max_payload_bytes = 2000000\n", "max_payload_bytes"),
            ("max_chunked_updates = 0\n", "max_chunked_updates"),
            (
                "max_update_bytes = 1000000\nmax_reassembly_bytes = 999999\n",
                "max_reassembly_bytes",
            ),
            (
                "[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.5\n",
                "strategy.trim",
            ),
            ("[model]\npeft = \"lorax\"\n", "model.peft"),
        ] {
            let full = if text.contains("[model]") {
                text.to_string()
            } else {
                format!("{text}{MINIMAL}")
            };
            let err = parse(&full).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_held_out_data_set_and_sequence_length_are_checked() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            (&c.model.eval, c.model.max_seq_len),
            (&HeldOutData::FashionMnist { root: None }, None)
        );
        let c = parse(&format!(
            "{MINIMAL}dataset = \"spam-assassin\"\nmax_seq_len = 64\n"
        ))
        .unwrap();
        assert_eq!(c.model.eval, HeldOutData::SpamAssassin { root: None });
        assert_eq!(c.model.max_seq_len, Some(64));
        for (extra, field) in [
            ("dataset = \"cifar-10\"", "model.dataset"),
            ("max_seq_len = 1", "model.max_seq_len"),
            ("max_seq_len = 600", "model.max_seq_len"),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    #[test]
    fn strategies_and_external_broker_parse() {
        let c = parse(&format!(
            "[strategy]\nkind = \"fedyogi\"\nserver_lr = 0.1\n[broker]\nurl = \"mqtt://10.0.0.2:1884\"\n{MINIMAL}"
        ))
        .unwrap();
        assert!(
            matches!(c.strategy, StrategyKind::FedYogi(ref p) if p.server_lr == 0.1 && p.beta1 == 0.9)
        );
        assert_eq!(c.broker.target, external("mqtt://10.0.0.2:1884"));
        let c = parse(&format!("[strategy]\nkind = \"median\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.strategy, StrategyKind::Median);
        // URLs are read as the edge client reads them (`crate::tls::broker::BrokerAddr`).
        for bad in [
            "mqtt://user@host",
            "mqtt://host/path",
            "mqtt://[::1",
            "http://host",
        ] {
            let err = parse(&format!("[broker]\nurl = \"{bad}\"\n{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("`broker.url`"), "{bad}: {err}");
        }
        let c = parse(&format!("[broker]\nurl = \"mqtt://[::1]:1999\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.broker.target, external("mqtt://[::1]:1999"));
    }

    fn external(urls: &str) -> BrokerTarget {
        BrokerTarget::External(BrokerList::parse(urls).unwrap())
    }

    #[test]
    fn the_url_may_list_the_nodes_of_a_cluster_with_one_scheme() {
        let c = parse(&format!(
            "[broker]\nurl = \"mqtt://n1:1883, mqtt://n2:1884,mqtt://n3\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.broker.target,
            external("mqtt://n1:1883,mqtt://n2:1884,mqtt://n3:1883")
        );
        let c = parse(&format!(
            "[broker]\nurl = \"mqtts://n1,mqtts://n2\"\nca_file = \"ca.crt\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.broker.target, external("mqtts://n1,mqtts://n2"));
        assert!(c.broker.tls.is_some());
        for (url, says) in [
            ("mqtt://n1,mqtts://n2", "mixes plain and TLS"),
            ("mqtt://n1,,mqtt://n2", "entry 2 of the list is empty"),
            ("mqtt://n1,n2:1883", "entry 2 of the list"),
            ("mqtt://n1,mqtt://n1:1883", "twice"),
            ("embedded,mqtt://n1", "stands alone"),
            ("mqtt://n1,embedded", "stands alone"),
        ] {
            let err = parse(&format!("[broker]\nurl = \"{url}\"\n{MINIMAL}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`broker.url`") && err.contains(says),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn tls_needs_a_ca_file_and_the_password_never_comes_from_the_config_text() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("agg.pw");
        std::fs::write(&pw, "s3cret\nignored\n").unwrap();
        let c = parse(&format!(
            "[broker]\nurl = \"mqtts://broker.lan\"\nca_file = \"ca.crt\"\nusername = \"agg\"\npassword_file = \"{}\"\n{MINIMAL}",
            pw.display()
        ))
        .unwrap();
        assert_eq!(c.broker.target, external("mqtts://broker.lan:8883"));
        assert_eq!(
            c.broker.tls.as_ref().unwrap().ca_file,
            PathBuf::from("ca.crt")
        );
        assert_eq!(
            c.broker.credentials,
            Some(("agg".to_string(), Secret("s3cret".into())))
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        for (text, field) in [
            ("[broker]\nurl = \"mqtts://h\"\n", "broker.ca_file"),
            (
                "[broker]\nurl = \"mqtt://h\"\nca_file = \"ca.crt\"\n",
                "broker.ca_file",
            ),
            (
                "[broker]\nurl = \"mqtts://h\"\nca_file = \"c\"\nclient_cert = \"a\"\n",
                "broker.client_cert",
            ),
            (
                "[broker]\nusername = \"u\"\npassword_env = \"FEDPEFT_SURELY_UNSET_VAR\"\n",
                "broker.password_env",
            ),
            (
                "[broker]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
                "broker.password_file",
            ),
        ] {
            let err = parse(&format!("{text}{MINIMAL}")).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{text:?}: {err}");
        }
        // A password in the file itself is an unknown key.
        assert!(parse(&format!("[broker]\npassword = \"x\"\n{MINIMAL}")).is_err());
    }

    #[test]
    fn shipped_trial_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/trial.toml");
        let c = validate(AggregatorFile::read(&path).unwrap()).unwrap();
        assert_eq!((c.run.min_clients, c.run.quorum), (8, 6));
        assert!(matches!(c.model.peft, PeftMethod::Lora { rank: 8, .. }));
    }

    #[test]
    fn quorum_failure_policy_parses_both_forms() {
        let c = parse(&format!(
            "on_quorum_failure = {{ extend = {{ max_extensions = 2 }} }}\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.run.on_quorum_failure,
            QuorumFailure::Extend { max_extensions: 2 }
        );
    }

    #[test]
    fn secure_aggregation_refuses_what_needs_individual_updates_and_takes_dp_on_devices() {
        let secure = "min_clients = 8\nsecure_aggregation = true\n";
        let c = parse(&format!("{secure}{MINIMAL}")).unwrap();
        let s = c.run.secure.expect("secure aggregation on");
        assert_eq!((s.modulus_bits, s.clip, s.dp), (16, 0.25, None));
        for (text, field, words) in [
            (
                "[strategy]\nkind = \"median\"\n",
                "strategy",
                "order statistics",
            ),
            (
                "[local]\ntop_k_fraction = 0.1\n",
                "local.top_k_fraction",
                "top-k",
            ),
            (
                "adaptive_norm_multiple = 2.0\n",
                "adaptive_norm_multiple",
                "median",
            ),
            (
                "[secure_aggregation]\nthreshold = 1\nneighbours = 4\n",
                "secure_aggregation",
                "threshold",
            ),
        ] {
            let text = text.replace("secure_aggregation = true\n", "");
            let base = if text.contains("[secure_aggregation]") {
                "min_clients = 8\n".to_string()
            } else {
                secure.to_string()
            };
            let e = parse(&format!("{base}{text}{MINIMAL}")).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(field) && msg.contains(words), "{text}: {msg}");
        }
        // [dp] with secure aggregation: distributed, the noise added on the devices.
        let dp = "[dp]\nclip_norm = 1.0\nnoise_multiplier = 0.8\nfleet_size = 40\n";
        let c = parse(&format!(
            "{secure}quorum = 6\nfraction = 0.2\n{dp}{MINIMAL}"
        ))
        .unwrap();
        assert!(c.dp.as_ref().unwrap().on_devices);
        let d = c.run.secure.unwrap().dp.expect("distributed DP");
        assert_eq!((d.expected_clients, d.min_contributions), (8, 6));
        assert_eq!((d.clip_norm, d.noise_multiplier), (1.0, 0.8));
        let c = parse(&format!("{dp}{MINIMAL}")).unwrap();
        assert!(
            !c.dp.unwrap().on_devices,
            "without secure aggregation DP is central"
        );
        for (text, words) in [
            (
                format!("{secure}fraction = 0.2\n{dp}min_contributions = 9\n"),
                "more than",
            ),
            (
                format!("{dp}min_contributions = 2\n"),
                "needs secure_aggregation",
            ),
        ] {
            let msg = parse(&format!("{text}{MINIMAL}")).unwrap_err().to_string();
            assert!(
                msg.contains("dp.min_contributions") && msg.contains(words),
                "{text}: {msg}"
            );
        }
    }

    #[test]
    fn dp_and_adaptive_bound_keys_are_validated_naming_the_key() {
        let c = parse(&format!(
            "fraction = 0.1\n[dp]\nclip_norm = 0.5\nnoise_multiplier = 1.2\nfleet_size = 100\n{MINIMAL}"
        ))
        .unwrap();
        let dp = c.dp.unwrap();
        // W defaults to max(min_clients, ⌈fraction·N⌉) = 10; δ to 1/N^1.1.
        assert_eq!((dp.expected_clients, dp.fleet_size), (10, 100));
        assert!((dp.sample_rate() - 0.1).abs() < 1e-12);
        assert!((dp.delta - 100f64.powf(-1.1)).abs() < 1e-15);
        assert!((dp.noise_std() - 1.2 * 0.5 / 10.0).abs() < 1e-15);
        let c = parse(&format!("adaptive_norm_multiple = 3.0\n{MINIMAL}")).unwrap();
        assert_eq!(c.run.adaptive_norm_multiple, Some(3.0));
        let ok_dp = "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nfleet_size = 20\n";
        for (text, field, words) in [
            (
                "adaptive_norm_multiple = 0.0\n",
                "adaptive_norm_multiple",
                "positive",
            ),
            (
                "[dp]\nnoise_multiplier = 1.0\nfleet_size = 20\n",
                "dp.clip_norm",
                "required",
            ),
            (
                "[dp]\nclip_norm = -1.0\nnoise_multiplier = 1.0\nfleet_size = 20\n",
                "dp.clip_norm",
                "positive",
            ),
            (
                "[dp]\nclip_norm = 1.0\nfleet_size = 20\n",
                "dp.noise_multiplier",
                "required",
            ),
            (
                "[dp]\nclip_norm = 1.0\nnoise_multiplier = 0.0\nfleet_size = 20\n",
                "dp.noise_multiplier",
                "no privacy",
            ),
            (
                "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n",
                "dp.fleet_size",
                "required",
            ),
            (
                "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nfleet_size = 20\nexpected_clients = 21\n",
                "dp.expected_clients",
                "between",
            ),
            (
                "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nfleet_size = 20\ndelta = 1.0\n",
                "dp.delta",
                "(0, 1)",
            ),
            (
                "[dp]\nclip_norm = 1.0\nnoise_multiplier = 1.0\nfleet_size = 20\nsigma = 1.0\n",
                "sigma",
                "unknown",
            ),
        ] {
            let err = parse(&format!("{text}{MINIMAL}")).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")) && err.contains(words),
                "{text:?}: {err}"
            );
        }
        for (prefix, field, words) in [
            (
                "[strategy]\nkind = \"median\"\n",
                "dp",
                "fedavg, fedadam or fedyogi",
            ),
            (
                "[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.2\n",
                "dp",
                "would not hold",
            ),
            ("max_update_norm = 1.0\n", "max_update_norm", "dp.clip_norm"),
            (
                "adaptive_norm_multiple = 2.0\n",
                "adaptive_norm_multiple",
                "fixed dp.clip_norm",
            ),
        ] {
            // Top-level keys or the [strategy] table first, then [dp].
            let text = format!("{prefix}{ok_dp}{MINIMAL}");
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{field}`")) && err.contains(words),
                "{text:?}: {err}"
            );
        }
    }
}
