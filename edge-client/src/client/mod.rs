//! The thin async shell around [`Session`](crate::session::Session): one MQTT connection
//! (rumqttc), one training at a time on a blocking thread, a shutdown future. It moves bytes
//! and counts them; every decision is the session's.
//!
//! - this module: [`ClientSettings`], [`run`] and its [`RunSummary`], [`termination_signal`];
//! - `shell`: the event loop of a run, a struct with one method per kind of event (MQTT
//!   packet in or out, connection error, finished training, shutdown) and per session action;
//! - `network`: the rumqttc event loop polled in its own task, which sleeps the reconnect
//!   backoff (exponential, with jitter) between failed attempts, moves each next attempt on to
//!   the next broker of the list, and carries out the emulated dropout; the requests handed to
//!   rumqttc; the size of our CONNECT.

use std::future::Future;
use std::time::Duration;

use fedpeft_protocol::{Capabilities, ClientId, FleetName, SigningKey, VerifyingKey};
use serde::Serialize;

use crate::accounting::ByteLedger;
use crate::config::{Backoff, BrokerList, EdgeConfig};
use crate::session::{ExitReason, SessionStats};
use crate::tls::{TlsError, TlsFiles};
use crate::trainer::LocalTrainer;
use crate::types::Round;
use crate::wire::WireError;

mod network;
mod shell;

/// Everything the shell needs to connect and introduce itself.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The broker, or the nodes of a cluster in the order they are tried.
    pub brokers: BrokerList,
    pub keep_alive: Duration,
    pub max_packet_bytes: usize,
    pub credentials: Option<(String, String)>,
    pub reconnect: Backoff,
    pub fleet: FleetName,
    pub client_id: ClientId,
    pub run_id: u64,
    pub capabilities: Capabilities,
    /// TLS files for an `mqtts://` broker.
    pub tls: Option<TlsFiles>,
    /// Signs Join, Status and updates when set.
    pub signing_key: Option<SigningKey>,
    /// Global adapters and announcements must be signed with this key when set.
    pub aggregator_key: Option<VerifyingKey>,
    /// Emulated dropout and straggling (none on a real device).
    pub faults: crate::config::FaultsSpec,
    /// Seed and fleet index of this client: keys of the dropout draws.
    pub fault_seed: u64,
    pub client_index: u64,
    /// `--serve`: every newer global adapter the session accepts is handed to this engine.
    pub serve: Option<crate::serve::Engine>,
}

/// Why the client could not run.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("fleet name: {0}")]
    Fleet(fedpeft_protocol::IdError),
    #[error("client id: {0}")]
    ClientId(fedpeft_protocol::IdError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Key(#[from] fedpeft_protocol::sign::KeyFileError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("secure aggregation: {0}")]
    Secure(String),
}

impl ClientSettings {
    /// Settings from a validated config and the trainer's capabilities.
    pub fn from_config(
        cfg: &EdgeConfig,
        capabilities: Capabilities,
    ) -> Result<ClientSettings, ClientError> {
        Ok(ClientSettings {
            brokers: cfg.brokers.clone(),
            keep_alive: cfg.keep_alive,
            max_packet_bytes: cfg.max_packet_bytes,
            credentials: cfg.credentials.clone(),
            reconnect: cfg.reconnect,
            fleet: FleetName::new(&cfg.fleet).map_err(ClientError::Fleet)?,
            client_id: ClientId::new(&cfg.client_id).map_err(ClientError::ClientId)?,
            run_id: cfg.run_id,
            capabilities,
            tls: cfg.tls.clone(),
            signing_key: match &cfg.signing_key {
                Some(path) => Some(fedpeft_protocol::sign::read_signing_key(path)?),
                None => None,
            },
            aggregator_key: cfg.aggregator_key,
            faults: cfg.faults,
            fault_seed: cfg.data.seed,
            client_index: cfg.data.index as u64,
            serve: None,
        })
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub client_id: String,
    pub exit: &'static str,
    pub rounds_trained: u32,
    pub updates_sent: u32,
    pub updates_resent: u32,
    pub rounds_not_sampled: u32,
    pub stale_dropped: u32,
    pub training_failures: u32,
    /// Rounds in which the client vanished instead of publishing (emulated dropout).
    pub dropped_rounds: Vec<Round>,
    pub connects: u32,
    pub connection_errors: u32,
    pub rejected_messages: u32,
    pub bytes: ByteLedger,
}

impl RunSummary {
    fn new(
        client_id: &str,
        exit: ExitReason,
        stats: SessionStats,
        dropped_rounds: Vec<Round>,
        shell: &ShellCounters,
        bytes: ByteLedger,
    ) -> Self {
        RunSummary {
            client_id: client_id.to_string(),
            exit: match exit {
                ExitReason::RunDone => "run_done",
                ExitReason::Signal => "signal",
            },
            rounds_trained: stats.rounds_trained,
            updates_sent: stats.updates_sent,
            updates_resent: stats.updates_resent,
            rounds_not_sampled: stats.rounds_not_sampled,
            stale_dropped: stats.stale_dropped,
            training_failures: stats.training_failures,
            dropped_rounds,
            connects: stats.connects,
            connection_errors: shell.connection_errors,
            rejected_messages: shell.rejected_messages,
            bytes,
        }
    }
}

#[derive(Debug, Default)]
struct ShellCounters {
    connection_errors: u32,
    rejected_messages: u32,
}

/// Runs the client until the aggregator says the run is done or `shutdown` resolves.
/// Connection failures are retried forever with backoff; only setup errors are returned.
pub async fn run<T, S>(
    settings: ClientSettings,
    trainer: T,
    shutdown: S,
) -> Result<RunSummary, ClientError>
where
    T: LocalTrainer + 'static,
    S: Future<Output = ()>,
{
    let mut shell = shell::Shell::start(settings, trainer)?;
    let exit = shell.serve(shutdown).await;
    shell.drain().await;
    Ok(shell.finish(exit))
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the client");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
