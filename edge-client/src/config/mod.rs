//! Edge-client configuration: a TOML file and command-line flags, merged and validated into a
//! typed [`EdgeConfig`] before anything connects.
//!
//! Precedence: a flag beats the file, the file beats the documented default. Unknown keys in
//! the file are rejected (a typo must not silently fall back to a default).
//!
//! The file as written is [`EdgeFile`] (crate `fedpeft-config`, where every key is documented
//! with its default); its `[broker]` and `[security]` tables are the aggregator's too, so the
//! keys only the aggregator reads are refused here by name. One resolver per table:
//! - `cli`: the flags ([`Cli`]) and subcommands ([`Command`]);
//! - `broker`: `[broker]` → addresses, keep-alive, packet limit, credentials, TLS files;
//! - `security`: `[security]` → signing key file and the aggregator's public key;
//! - `identity`: `[client]` → fleet, client id, run ([`validate_name`]);
//! - `model`: `[model]` → backbone folder, runtime, PEFT method, trunk inputs;
//! - `data`: `[data]` → [`DataSpec`] (a named set, or the device's own files with the fleet's
//!   class list: [`DataSource`]); `cache`: `[cache]`;
//! - `reconnect`: `[reconnect]` → [`Backoff`]; `faults`: `[faults]` → [`FaultsSpec`].

use std::path::PathBuf;
use std::time::Duration;

use fedpeft_protocol::{PeftMethod, VerifyingKey};

use crate::tls::TlsFiles;

mod broker;
mod cache;
pub mod cli;
mod data;
mod faults;
mod identity;
mod model;
mod reconnect;
mod security;
#[cfg(test)]
mod tests;

pub use cli::{Cli, Command};
pub use data::{DataSource, DataSpec};
pub use faults::FaultsSpec;
pub use fedpeft_config::ConfigError;
pub use fedpeft_config::DatasetKind;
pub use fedpeft_config::edge::{EdgeFile, PartitionKind, RuntimeChoice};
pub use identity::{MAX_NAME_LEN, validate_name};
pub use reconnect::Backoff;

/// The file as written, under its earlier name here (the config fuzz target reads it so).
pub use fedpeft_config::edge::EdgeFile as FileConfig;

/// Where the broker is (one URL, or the nodes of a cluster in the order they are tried): read
/// as the aggregator reads it.
pub use crate::tls::broker::{BrokerAddr, BrokerList};

/// Smallest packet limit we accept: below this even a chunk header plus a topic would not fit.
pub const MIN_PACKET_BYTES: usize = 1024;

/// The trunk runtime a `--runtime` / `[model] runtime` choice names.
pub fn runtime(choice: RuntimeChoice) -> fedpeft_backbone::Runtime {
    match choice {
        RuntimeChoice::Auto => fedpeft_backbone::Runtime::Auto,
        RuntimeChoice::Ort => fedpeft_backbone::Runtime::Ort,
        RuntimeChoice::Tract => fedpeft_backbone::Runtime::Tract,
    }
}

/// The validated configuration the client runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeConfig {
    /// The broker, or the nodes of a cluster: the first is tried first, a failed connection
    /// moves on to the next.
    pub brokers: BrokerList,
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
    /// The PEFT method trained, with its hyper-parameters (as announced in Join).
    pub peft: PeftMethod,
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
    /// `--serve`: answer predictions on this address while taking part.
    pub serve: Option<std::net::SocketAddr>,
}

impl EdgeConfig {
    /// Reads the file named by `--config` (if any), merges the flags and validates.
    pub fn from_cli(cli: &Cli) -> Result<EdgeConfig, ConfigError> {
        let file = match &cli.config {
            Some(path) => EdgeFile::read(path)?,
            None => EdgeFile::default(),
        };
        EdgeConfig::resolve(file, cli)
    }

    /// Merges flags over the file over the defaults, then validates every field, table by
    /// table in the file's order (the first bad field is the one reported).
    pub fn resolve(file: EdgeFile, cli: &Cli) -> Result<EdgeConfig, ConfigError> {
        let connection = broker::resolve(file.broker, cli)?;
        let keys = security::resolve(file.security, cli)?;
        let identity = identity::resolve(file.client, cli)?;
        let model = model::resolve(file.model, cli)?;
        let data = data::resolve(file.data, cli)?;
        let cache = cache::resolve(file.cache, cli);
        let reconnect = reconnect::resolve(file.reconnect)?;
        let faults = faults::resolve(file.faults, cli)?;
        Ok(EdgeConfig {
            brokers: connection.brokers,
            keep_alive: connection.keep_alive,
            max_packet_bytes: connection.max_packet_bytes,
            credentials: connection.credentials,
            tls: connection.tls,
            signing_key: keys.signing_key,
            aggregator_key: keys.aggregator_key,
            fleet: identity.fleet,
            client_id: identity.client_id,
            run_id: identity.run_id,
            model_dir: model.model_dir,
            runtime: model.runtime,
            peft: model.peft,
            image_size: model.image_size,
            trunk_batch: model.trunk_batch,
            max_seq_len: model.max_seq_len,
            threads: model.threads,
            data,
            cache_dir: cache.dir,
            cache_memory_bytes: cache.memory_bytes,
            cache_persist: cache.persist,
            cache_shared: cache.shared,
            frozen_budget_bytes: cache.frozen_budget_bytes,
            reconnect,
            summary_json: cli.summary_json.clone().or(file.report.summary_json),
            faults,
            serve: cli.serve,
        })
    }
}
