//! The thin async shell around [`Session`]: one MQTT connection (rumqttc), one training at a
//! time on a blocking thread, a shutdown future. It moves bytes and counts them; every decision
//! is the session's.
//!
//! The rumqttc event loop runs in its own task and forwards what it sees over a channel, so
//! the main loop only ever waits on cancel-safe channel receives. That task also sleeps the
//! reconnect backoff (exponential, with jitter) between failed connection attempts.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedpeft_protocol::{Capabilities, ClientId, FleetName, SigningKey, VerifyingKey};
use rand::{Rng, SeedableRng};
use rumqttc::{
    AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Outgoing, Packet as MqttPacket, QoS,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::accounting::{ByteLedger, packet_size};
use crate::config::{Backoff, BrokerAddr, EdgeConfig};
use crate::session::{Action, Event, ExitReason, Session, SessionStats};
use crate::tls::{TlsError, TlsFiles};
use crate::trainer::LocalTrainer;
use crate::types::Round;
use crate::wire::{JoinInfo, Packet, Wire, WireError};

/// How long a clean shutdown waits for the DISCONNECT to go out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything the shell needs to connect and introduce itself.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub broker: BrokerAddr,
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
}

impl ClientSettings {
    /// Settings from a validated config and the trainer's capabilities.
    pub fn from_config(
        cfg: &EdgeConfig,
        capabilities: Capabilities,
    ) -> Result<ClientSettings, ClientError> {
        Ok(ClientSettings {
            broker: cfg.broker.clone(),
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

/// What the event-loop task forwards.
enum Net {
    Event(MqttEvent),
    /// A failed poll; the task sleeps `retry_in` before trying again.
    Error {
        reason: String,
        retry_in: Duration,
    },
}

/// A publish or disconnect waiting for room in rumqttc's request channel.
enum Request {
    Publish(Packet),
    Subscribe(Vec<String>),
    Disconnect,
}

struct TrainingDone {
    round: Round,
    sequence: u32,
    result: Result<crate::types::TrainedUpdate, String>,
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
    let join = JoinInfo {
        capabilities: settings.capabilities.clone(),
        num_examples: trainer.num_examples(),
    };
    let mut wire = Wire::new(
        settings.fleet.clone(),
        settings.client_id.clone(),
        settings.run_id,
        join,
        settings.max_packet_bytes,
    );
    if let Some(key) = settings.signing_key.clone() {
        wire = wire.with_signing_key(key);
    }
    if let Some(key) = settings.aggregator_key {
        wire = wire.with_aggregator_key(key);
    }
    let will = wire.last_will()?;
    let client_id = settings.client_id.as_str().to_string();

    let mut opts = MqttOptions::new(&client_id, &settings.broker.host, settings.broker.port);
    opts.set_keep_alive(settings.keep_alive)
        // Persistent session: QoS 1 messages queued while we were away are delivered on return.
        .set_clean_session(false)
        .set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes)
        .set_last_will(LastWill::new(
            &will.topic,
            will.payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some((user, pass)) = &settings.credentials {
        opts.set_credentials(user, pass);
    }
    if let Some(files) = &settings.tls {
        opts.set_transport(crate::tls::transport(files)?);
    }
    let connect_size = connect_packet_size(&opts);
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 64);

    let (net_tx, mut net_rx) = mpsc::unbounded_channel::<Net>();
    // Emulated dropout: the poller drops the connection and stays away this long.
    let (vanish_tx, mut vanish_rx) = mpsc::unbounded_channel::<Duration>();
    let backoff = settings.reconnect;
    let seed = fnv(&client_id);
    let poller = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut attempt = 0u32;
        loop {
            let polled = tokio::select! {
                biased;
                Some(away) = vanish_rx.recv() => {
                    // Closing the socket without DISCONNECT: to the broker this is a device
                    // that fell off the network, so it publishes our last will.
                    eventloop.clean();
                    tokio::time::sleep(away).await;
                    continue;
                }
                polled = eventloop.poll() => polled,
            };
            match polled {
                Ok(ev) => {
                    if matches!(ev, MqttEvent::Incoming(MqttPacket::ConnAck(_))) {
                        attempt = 0;
                    }
                    if net_tx.send(Net::Event(ev)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let retry_in = backoff.delay(attempt, rng.random::<f64>());
                    attempt = attempt.saturating_add(1);
                    if net_tx
                        .send(Net::Error {
                            reason: e.to_string(),
                            retry_in,
                        })
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(retry_in).await;
                }
            }
        }
    });

    let trainer = Arc::new(Mutex::new(trainer));
    let (train_tx, mut train_rx) = mpsc::unbounded_channel::<TrainingDone>();
    let mut session = Session::new(&client_id).with_faults(crate::session::Faults {
        dropout: settings.faults.dropout,
        seed: settings.fault_seed,
        client_index: settings.client_index,
    });
    let straggle = settings.faults.straggle;
    let mut ledger = ByteLedger::default();
    let mut counters = ShellCounters::default();
    let mut outbox: VecDeque<Request> = VecDeque::new();
    // The packets of the last update published, for a resend after a reconnect.
    let mut last_update: Option<(u32, Vec<Packet>)> = None;
    let subscriptions = wire.subscriptions();
    let started = Instant::now();
    let mut logged_round: Option<Round> = None;
    tokio::pin!(shutdown);
    let mut shutdown_seen = false;
    let exit: ExitReason;

    loop {
        flush(&mqtt, &mut outbox, &mut ledger, session.current_round());
        let event = tokio::select! {
            _ = &mut shutdown, if !shutdown_seen => {
                shutdown_seen = true;
                tracing::info!("shutdown requested");
                Some(Event::Shutdown)
            }
            Some(done) = train_rx.recv() => Some(Event::TrainingFinished {
                round: done.round,
                sequence: done.sequence,
                result: done.result,
            }),
            Some(net) = net_rx.recv() => {
                let round = session.current_round();
                match net {
                    Net::Event(MqttEvent::Incoming(packet)) => {
                        ledger.received(round, packet.size());
                        match packet {
                            MqttPacket::ConnAck(ack) => {
                                // Our CONNECT went out just before this answer.
                                ledger.sent(round, connect_size);
                                tracing::info!(broker = %settings.broker, session_present = ack.session_present, "connected");
                                Some(Event::Connected { session_present: ack.session_present })
                            }
                            MqttPacket::Publish(p) => {
                                let now_ms = started.elapsed().as_millis() as u64;
                                for dropped in wire.expire(now_ms) {
                                    tracing::warn!(%dropped, "incomplete global adapter dropped");
                                }
                                match wire.decode(&p.topic, &p.payload, now_ms) {
                                    Ok(ev) => ev,
                                    Err(e) => {
                                        counters.rejected_messages += 1;
                                        tracing::warn!(error = %e, "message ignored");
                                        None
                                    }
                                }
                            }
                            _ => None,
                        }
                    }
                    Net::Event(MqttEvent::Outgoing(o)) => {
                        match o {
                            Outgoing::PubAck(_) | Outgoing::PubRec(_) | Outgoing::PubRel(_) | Outgoing::PubComp(_) => {
                                ledger.sent(round, packet_size::ACK)
                            }
                            Outgoing::PingReq | Outgoing::Disconnect => ledger.sent(round, packet_size::EMPTY),
                            // Publishes and subscribes are booked when handed over (their
                            // contents are known there, not here).
                            _ => {}
                        }
                        None
                    }
                    Net::Error { reason, retry_in } => {
                        counters.connection_errors += 1;
                        tracing::warn!(%reason, retry_in_ms = retry_in.as_millis() as u64, "connection lost or refused; retrying");
                        session.is_connected().then_some(Event::ConnectionLost)
                    }
                }
            }
        };
        let Some(event) = event else { continue };
        let mut exit_now = None;
        for action in session.on_event(event) {
            match action {
                Action::Subscribe => outbox.push_back(Request::Subscribe(subscriptions.clone())),
                Action::Send(out) => match wire.encode(&out) {
                    Ok(packets) => {
                        if let crate::session::Outbound::Update {
                            round,
                            sequence,
                            update,
                            ..
                        } = &out
                        {
                            let bytes: usize = packets.iter().map(Packet::wire_size).sum();
                            tracing::info!(
                                round,
                                sequence,
                                packets = packets.len(),
                                bytes,
                                loss = update.metrics.loss,
                                accuracy = update.metrics.accuracy,
                                "update published"
                            );
                            last_update = Some((*round, packets.clone()));
                        }
                        outbox.extend(packets.into_iter().map(Request::Publish));
                    }
                    Err(e) => tracing::error!(error = %e, "could not encode an outgoing message"),
                },
                Action::Train {
                    round,
                    sequence,
                    adapter,
                    plan,
                } => {
                    tracing::info!(round, sequence, epochs = plan.local_epochs, "training");
                    let trainer = trainer.clone();
                    let tx = train_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = match trainer.lock() {
                            Ok(mut t) => t.train(&adapter, &plan).map_err(|e| e.to_string()),
                            Err(_) => Err("trainer poisoned by an earlier panic".to_string()),
                        };
                        if !straggle.is_zero() {
                            // Emulated straggler: a slow device finishes this much later.
                            tracing::info!(
                                round,
                                straggle_secs = straggle.as_secs_f64(),
                                "straggling: holding the update"
                            );
                            std::thread::sleep(straggle);
                        }
                        let _ = tx.send(TrainingDone {
                            round,
                            sequence,
                            result,
                        });
                    });
                }
                Action::ResendUpdate { round } => match &last_update {
                    Some((r, packets)) if *r == round => {
                        tracing::info!(
                            round,
                            packets = packets.len(),
                            "update published again after reconnecting"
                        );
                        outbox.extend(packets.iter().cloned().map(Request::Publish));
                    }
                    _ => tracing::warn!(round, "no stored update for this round to send again"),
                },
                Action::Vanish { round } => {
                    tracing::warn!(
                        round,
                        offline_secs = settings.faults.dropout_offline.as_secs_f64(),
                        "dropping the connection (emulated dropout)"
                    );
                    // Whatever was queued for the old connection goes with it.
                    outbox.clear();
                    let _ = vanish_tx.send(settings.faults.dropout_offline);
                }
                Action::Disconnect => outbox.push_back(Request::Disconnect),
                Action::Exit(reason) => exit_now = Some(reason),
            }
        }
        let current = session.current_round();
        if current != logged_round {
            if let Some(prev) = logged_round {
                let b = ledger.round(prev);
                tracing::info!(
                    round = prev,
                    up_bytes = b.up.bytes,
                    down_bytes = b.down.bytes,
                    up_packets = b.up.packets,
                    down_packets = b.down.packets,
                    "round bytes"
                );
            }
            logged_round = current;
        }
        if let Some(reason) = exit_now {
            exit = reason;
            break;
        }
    }

    // Let the Status offline and the DISCONNECT go out before stopping the event loop.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let wants_disconnect = outbox.iter().any(|r| matches!(r, Request::Disconnect));
    if wants_disconnect {
        loop {
            flush(&mqtt, &mut outbox, &mut ledger, session.current_round());
            match tokio::time::timeout_at(deadline, net_rx.recv()).await {
                Ok(Some(Net::Event(MqttEvent::Outgoing(Outgoing::Disconnect)))) => {
                    ledger.sent(session.current_round(), packet_size::EMPTY);
                    break;
                }
                Ok(Some(Net::Event(MqttEvent::Incoming(p)))) => {
                    ledger.received(session.current_round(), p.size())
                }
                Ok(Some(Net::Event(MqttEvent::Outgoing(Outgoing::PubAck(_))))) => {
                    ledger.sent(session.current_round(), packet_size::ACK)
                }
                Ok(Some(Net::Event(_))) => {}
                Ok(Some(Net::Error { .. })) | Ok(None) | Err(_) => {
                    tracing::warn!(
                        "could not disconnect cleanly; the broker will publish our last will"
                    );
                    break;
                }
            }
        }
    }
    poller.abort();
    if let Some(r) = logged_round {
        let b = ledger.round(r);
        tracing::info!(
            round = r,
            up_bytes = b.up.bytes,
            down_bytes = b.down.bytes,
            "round bytes"
        );
    }
    Ok(RunSummary::new(
        &client_id,
        exit,
        session.stats(),
        session.dropped_rounds().to_vec(),
        &counters,
        ledger,
    ))
}

/// Hands queued requests to rumqttc while its channel has room, booking publish sizes.
fn flush(
    mqtt: &AsyncClient,
    outbox: &mut VecDeque<Request>,
    ledger: &mut ByteLedger,
    round: Option<Round>,
) {
    while let Some(req) = outbox.pop_front() {
        let (result, size) = match &req {
            Request::Publish(p) => (
                mqtt.try_publish(
                    p.topic.clone(),
                    QoS::AtLeastOnce,
                    p.retain,
                    p.payload.clone(),
                ),
                p.wire_size(),
            ),
            Request::Subscribe(filters) => (
                mqtt.try_subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                ),
                packet_size::subscribe(filters),
            ),
            // DISCONNECT is booked when the event loop reports it sent.
            Request::Disconnect => (mqtt.try_disconnect(), 0),
        };
        match result {
            Ok(()) => {
                if size > 0 {
                    ledger.sent(round, size);
                }
            }
            Err(_) => {
                // Channel full: keep order and retry after the event loop made progress.
                outbox.push_front(req);
                break;
            }
        }
    }
}

/// Size of our CONNECT packet (sent on every (re)connect).
fn connect_packet_size(opts: &MqttOptions) -> usize {
    let connect = rumqttc::Connect {
        protocol: rumqttc::Protocol::V4,
        keep_alive: opts.keep_alive().as_secs() as u16,
        client_id: opts.client_id(),
        clean_session: opts.clean_session(),
        last_will: opts.last_will(),
        login: opts.credentials(),
    };
    connect.size()
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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
