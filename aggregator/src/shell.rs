//! The async shell: moves bytes between MQTT and the round machine, and nothing else.
//!
//! One task owns rumqttc's event loop and forwards what arrives over a channel (so publishing
//! from the main loop can never deadlock against an unpolled event loop). The [`Shell`] is the
//! main loop's state, with one method per thing that happens: a broker connection, a
//! subscription, a publish, a tick; each feeds the [`RoundMachine`] through the [`Inbox`] and
//! carries out its actions: publish (through the [`Outbox`]), checkpoint, evaluate, report. It
//! stops when the run is done or `shutdown` resolves.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, SubscribeFilter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{error, info, warn};

use crate::broker::{self, BrokerError};
use crate::checkpoint::{self, CheckpointError};
use crate::checkpoint::{Saved, SavedRef};
use crate::config::{BrokerTarget, Config};
use crate::globals::GlobalStore;
use crate::host::{HostError, ModelHost};
use crate::keys::{Enrolment, KeysError};
use crate::outbox::{Outbox, Outgoing};
use crate::report::{Report, RunInfo};
use crate::round::{Action, Event, RestoreError, RoundMachine, Rules};
use crate::strategy;
use crate::tls::broker::{BrokerAddr, BrokerList};
use crate::tls::failover::Failover;
use crate::wire::Inbox;
use fedpeft_config::report::RoundTiming;
use fedpeft_config::report::{AdapterModel, TensorLayout};

/// Why a run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("initial adapter has no tensors: nothing to train")]
    EmptyAdapter,
    #[error("MQTT client: {0}")]
    Mqtt(String),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("monitor: {0}")]
    Monitor(String),
    #[error("report in {dir}: {source}")]
    Report {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    /// Whether every round ran (false: stopped by a signal).
    pub finished: bool,
    pub broker: SocketAddr,
}

/// Milliseconds since the Unix epoch (the machine's clock; announced deadlines use it too).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds, to 0.01 ms.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// The round rules a config describes, with the host's backbone facts.
pub fn rules(config: &Config, host: &dyn ModelHost) -> Rules {
    let mut run = config.run.clone();
    // With client-level DP every delta is clipped to the DP clip norm S.
    if let Some(dp) = &config.dp {
        run.max_update_norm = Some(dp.clip_norm);
    }
    Rules {
        run,
        dp_sample_rate: config.dp.as_ref().map(|dp| dp.sample_rate()),
        backbone_params: if config.backbone_params > 0 {
            config.backbone_params
        } else {
            host.backbone_params()
        },
        checkpoint_every_update: true,
        backbone_id: host.backbone_id(),
        backbone_sha256: host.backbone_sha256(),
        peft: config.model.backbone.as_ref().map(|_| config.model.peft),
    }
}

/// A site's last will: its offline status in the root's fleet, as the root's run reads it.
fn site_will(
    site: &crate::round::SiteSettings,
    key: Option<&fedpeft_protocol::SigningKey>,
) -> Result<(String, Vec<u8>), RunError> {
    use fedpeft_protocol::{ClientState, Envelope, Status, Topic, TopicKind};
    let status = Status {
        client: site.id.clone(),
        state: ClientState::Offline,
    };
    let env = Envelope::new(site.upstream_run_id, 0, status);
    let payload = match key {
        Some(k) => env.encode_signed(&site.upstream_fleet, k),
        None => env.encode(),
    }
    .map_err(|e| RunError::Mqtt(format!("site last will: {e}")))?;
    let topic = Topic::new(
        site.upstream_fleet.clone(),
        TopicKind::Status(site.id.clone()),
    );
    Ok((topic.to_topic_string().to_string(), payload))
}

/// The newest global adapter of a run, in its output folder: the envelope exactly as clients
/// receive it (`fedpeft-decode` prints it).
pub const GLOBAL_ADAPTER_FILE: &str = "global-adapter.bin";

/// Most client messages handled as one batch: one checkpoint (one fsync) covers them all before
/// they are acknowledged, instead of one per accepted update or join.
const MAX_BATCH: usize = 1024;

/// Requests (publishes, subscriptions, acknowledgements) the machine may queue for the MQTT
/// task. Acknowledgements are one per received QoS 1 publish, and a broker cannot have more
/// than 65 535 of those unacknowledged (packet ids are 16 bits): with room for all of them and
/// the machine's own publishes, queueing a request never waits, so the machine never blocks on
/// the MQTT task while that task waits for receive budget the machine would release.
const REQUEST_CAPACITY: usize = 65_536 + 4_096;

enum FromMqtt {
    /// Connected (again) to this broker of the list; whether it still held our session.
    Connected {
        broker: BrokerAddr,
        session_present: bool,
    },
    Subscribed,
    /// A publish, with its share of the receive budget (released when it is handled).
    Publish(rumqttc::Publish, OwnedSemaphorePermit),
    /// The connection failed or broke; the next attempt goes to `next`.
    Error {
        reason: String,
        next: BrokerAddr,
    },
    /// A delivery over the packet limit broke the connection; the next one starts a clean
    /// session, in which the broker no longer holds it.
    Oversized {
        bytes: usize,
        limit: usize,
    },
}

/// The size of an incoming packet that broke the connection by exceeding the limit.
fn oversized_delivery(e: &rumqttc::ConnectionError) -> Option<usize> {
    match e {
        rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(bytes),
        )) => Some(*bytes),
        _ => None,
    }
}

/// Runs the aggregator until all rounds are done or `shutdown` resolves. `ready` receives the
/// broker address once the aggregator is subscribed (clients may join from then on).
pub async fn run(
    config: Config,
    host: Box<dyn ModelHost>,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<Outcome, RunError> {
    let mut shell = Shell::open(config, host, ready)?;
    if let Some(m) = &shell.config.monitor {
        let monitor = crate::monitor::Monitor::start(m, &shell.config)
            .await
            .map_err(|e| RunError::Monitor(format!("{e:#}")))?;
        shell.monitor = Some(monitor);
        shell.publish_live(true);
    }
    let (client, mut rx, pump) = shell.connect()?;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut stopped = false;
    // A message taken from the channel while a batch of publishes was gathered: next in line.
    let mut held: Option<FromMqtt> = None;
    while !shell.finished {
        let events = match held.take() {
            Some(msg) => {
                shell
                    .on_mqtt(Some(msg), &client, &mut rx, &mut held)
                    .await?
            }
            None => tokio::select! {
                _ = &mut shutdown => {
                    info!("shutdown requested; stopping");
                    stopped = true;
                    break;
                }
                msg = rx.recv() => shell.on_mqtt(msg, &client, &mut rx, &mut held).await?,
                _ = ticker.tick() => {
                    shell.arrived = Instant::now();
                    shell.on_tick()
                }
            },
        };
        shell.handle(events, &client).await?;
        shell.ack(&client).await?;
        let force = std::mem::take(&mut shell.round_closed) || shell.finished;
        shell.publish_live(force);
    }
    // Let queued publishes (the final global adapter and the "done" announcement) reach the
    // broker before disconnecting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    pump.abort();
    let report = shell.write_report()?;
    shell.publish_live(true);
    if let Some(m) = &shell.monitor {
        info!(
            snapshots = m.snapshots,
            ms = format!("{:.1}", m.snapshot_time.as_secs_f64() * 1e3),
            "monitor: time the run spent building snapshots"
        );
    }
    if let Some(m) = &shell.monitor
        && !m.linger.is_zero()
        && !stopped
    {
        info!(secs = m.linger.as_secs_f64(), addr = %m.addr, "run over; the monitor serves its final state until then (or a signal)");
        tokio::select! {
            _ = tokio::time::sleep(m.linger) => {}
            _ = &mut shutdown => {}
        }
    }
    Ok(Outcome {
        report,
        finished: shell.finished,
        broker: shell.broker_addr,
    })
}

/// The main loop's state.
struct Shell {
    config: Config,
    host: Box<dyn ModelHost>,
    machine: RoundMachine,
    inbox: Inbox,
    outbox: Outbox,
    /// A site's messages to its root (`[site]`): sealed with the root's fleet and run.
    upstream: Option<Outbox>,
    /// A site's last will: its offline status at the root (topic, payload).
    will: Option<(String, Vec<u8>)>,
    info: RunInfo,
    ckpt_path: PathBuf,
    global_path: PathBuf,
    globals: GlobalStore,
    broker_addr: SocketAddr,
    /// `mqtt` or `mqtts`, for the ready line.
    scheme: &'static str,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    /// Subscribed once: later subscriptions are reconnections.
    started: bool,
    /// Events that arrived before the first subscription completed.
    pending: Vec<Event>,
    /// Messages handled (or queued in `pending`) but not yet acknowledged to the broker.
    unacked: Vec<rumqttc::Publish>,
    finished: bool,
    /// `[monitor]`, once started.
    monitor: Option<crate::monitor::Monitor>,
    /// A round closed since the last snapshot (the monitor gets one at once).
    round_closed: bool,
    /// When the message (or tick) being handled arrived: where a round's handover starts.
    arrived: Instant,
    /// The round the event being handled closed, and when its closing message arrived, until
    /// the next round's announcement is handed to the broker.
    handover: Option<(u32, Instant)>,
    /// The aggregator's time between rounds, per round this process closed.
    timing: BTreeMap<u32, RoundTiming>,
    /// A checkpoint action is waiting: the machine's state is written before any other
    /// action is carried out and at the end of each batch, so a batch of accepted updates
    /// costs one checkpoint, and nothing is published or acknowledged before the state that
    /// led to it is on disk.
    pending_checkpoint: bool,
    /// Publishes gathered for the next batch (see [`Shell::on_mqtt`]), not decoded yet.
    batch: Vec<(rumqttc::Publish, OwnedSemaphorePermit)>,
}

impl Shell {
    /// Reads the keys, resumes or starts the machine, starts the embedded broker if configured.
    fn open(
        config: Config,
        mut host: Box<dyn ModelHost>,
        ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    ) -> Result<Shell, RunError> {
        let rules = rules(&config, host.as_ref());
        let signing_key = match &config.security.signing_key {
            Some(path) => {
                let key =
                    fedpeft_protocol::sign::read_signing_key(path).map_err(KeysError::from)?;
                info!(key = %path.display(), public_key = %fedpeft_protocol::sign::public_key_hex(&key.verifying_key()),
                      "signing global adapters and announcements");
                Some(key)
            }
            None => None,
        };
        let mut inbox = Inbox::new(
            config.run.fleet.clone(),
            config.run.run_id,
            config.run.max_update_bytes,
            config.run.round_timeout_ms,
        )
        .with_reassembly(config.reassembly.max_in_flight, config.reassembly.max_bytes);
        let mut upstream = None;
        let mut will = None;
        if let Some(site) = &config.run.site {
            inbox = inbox.with_root(
                site.upstream_fleet.clone(),
                site.upstream_run_id,
                config.broker.max_packet_bytes.saturating_mul(64),
            );
            let outbox = Outbox::new(
                site.upstream_fleet.clone(),
                site.upstream_run_id,
                signing_key.clone(),
                config.max_payload_bytes,
            )
            .with_state(crate::outbox::OutboxState {
                // Chunk message ids of a restarted site start elsewhere than the last run's.
                next_message_id: now_ms() as u32,
                ..Default::default()
            });
            will = Some(site_will(site, signing_key.as_ref())?);
            upstream = Some(outbox);
            info!(root_fleet = %site.upstream_fleet, root_run = site.upstream_run_id, site = %site.id,
                  "site mode: rounds follow the root's, aggregates go to it");
        }
        if let Some(path) = &config.security.enrolled_keys {
            let e = Enrolment::read(path)?;
            info!(file = %path.display(), clients = e.len(), "enrolment: joins, statuses and updates must be signed");
            inbox = inbox.with_enrolment(e);
        }
        std::fs::create_dir_all(&config.output_dir).map_err(|source| RunError::Report {
            dir: config.output_dir.clone(),
            source,
        })?;
        let ckpt_path = config.output_dir.join("aggregator.ckpt");
        let outbox = Outbox::new(
            config.run.fleet.clone(),
            config.run.run_id,
            signing_key,
            config.max_payload_bytes,
        );
        let (machine, outbox) =
            resume_or_start(&config, &rules, host.as_mut(), &ckpt_path, outbox)?;
        let broker_addr = start_broker(&config)?;
        let globals = GlobalStore::open(
            &config.output_dir,
            config.keep_globals,
            config.run.fleet.as_str(),
            config.run.run_id,
            adapter_model(&config, host.as_ref())?,
        )
        .map_err(|source| RunError::Report {
            dir: config.output_dir.join(crate::globals::GLOBALS_DIR),
            source,
        })?;
        Ok(Shell {
            globals,
            info: RunInfo {
                fleet: config.run.fleet.to_string(),
                peft: format!("{:?}", config.model.peft),
                rounds_planned: config.run.rounds,
                backbone_params: rules.backbone_params,
            },
            global_path: config.output_dir.join(GLOBAL_ADAPTER_FILE),
            scheme: if config.broker.tls.is_some() {
                "mqtts"
            } else {
                "mqtt"
            },
            config,
            host,
            machine,
            inbox,
            outbox,
            upstream,
            will,
            ckpt_path,
            broker_addr,
            ready,
            started: false,
            pending: Vec::new(),
            unacked: Vec::new(),
            finished: false,
            monitor: None,
            round_closed: false,
            arrived: Instant::now(),
            handover: None,
            timing: BTreeMap::new(),
            pending_checkpoint: false,
            batch: Vec::new(),
        })
    }

    /// The brokers to connect to: the embedded one, or the external broker's list (each by
    /// the name it was given: it may not be an IP address).
    fn brokers(&self) -> BrokerList {
        match &self.config.broker.target {
            BrokerTarget::External(brokers) => brokers.clone(),
            BrokerTarget::Embedded { .. } => BrokerList::from(BrokerAddr {
                host: self.broker_addr.ip().to_string(),
                port: self.broker_addr.port(),
                tls: false,
            }),
        }
    }

    /// The MQTT client and the task that polls its event loop into a channel. A connection
    /// that fails or breaks is tried again on the next broker of the list (the same one when
    /// there is one).
    #[allow(clippy::type_complexity)]
    fn connect(
        &self,
    ) -> Result<
        (
            AsyncClient,
            mpsc::UnboundedReceiver<FromMqtt>,
            tokio::task::JoinHandle<()>,
        ),
        RunError,
    > {
        let b = &self.config.broker;
        let mut failover = Failover::new(self.brokers(), |addr| self.mqtt_options(addr))?;
        let (client, mut eventloop) = AsyncClient::new(failover.options(), REQUEST_CAPACITY);
        let (tx, rx) = mpsc::unbounded_channel();
        let limit = b.max_packet_bytes;
        // The bytes of received publishes this task may hand over before the machine has
        // handled them (`broker.receive_buffer_bytes`, at least one packet). When the machine
        // falls behind, the task stops polling the event loop, so nothing more is read from the
        // socket: TCP's flow control leaves the rest of a burst in the broker, which queues it
        // for this session, instead of in this process. MQTT 3.1.1 has no receive maximum, and
        // a broker's own in-flight limit (Mosquitto's `max_inflight_messages`) is the broker's
        // setting: without this bound a burst of 10 000 updates of 100 KB moved up to 400 MB
        // into the aggregator (docs/src/results/swarm.md).
        let budget = b.receive_buffer_bytes.max(limit);
        let receive = Arc::new(Semaphore::new(budget));
        let pump = tokio::spawn(async move {
            loop {
                let msg = match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                        // After a clean start, resume this new session on later reconnects.
                        eventloop.mqtt_options.set_clean_session(false);
                        FromMqtt::Connected {
                            broker: failover.current().clone(),
                            session_present: ack.session_present,
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::SubAck(_))) => FromMqtt::Subscribed,
                    Ok(MqttEvent::Incoming(Packet::Publish(mut p))) => {
                        // Not polled while it waits: no more is read from the socket.
                        let share =
                            u32::try_from(p.payload.len().clamp(1, budget)).unwrap_or(u32::MAX);
                        let Ok(permit) = receive.clone().acquire_many_owned(share).await else {
                            break;
                        };
                        // The payload is a slice of rumqttc's read buffer, and one live slice
                        // keeps the whole buffer (grown to hold every packet read with it)
                        // allocated. Copied out, a waiting message costs its own size, which
                        // the budget counts, and the buffer is reused.
                        p.payload = bytes::Bytes::copy_from_slice(&p.payload);
                        FromMqtt::Publish(p, permit)
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        let oversized = oversized_delivery(&e);
                        if oversized.is_some() {
                            // Too large to read, so never acknowledged: the broker would hand
                            // the same message to this session on every reconnect. A clean
                            // session drops it (with whatever else was queued: those clients
                            // count as silent in this round at worst).
                            eventloop.mqtt_options.set_clean_session(true);
                        }
                        // The next attempt goes to the next broker of the list, with the
                        // session flag just set.
                        let next = failover.advance(&mut eventloop).clone();
                        let msg = match oversized {
                            Some(bytes) => FromMqtt::Oversized { bytes, limit },
                            None => FromMqtt::Error {
                                reason: e.to_string(),
                                next,
                            },
                        };
                        let _ = tx.send(msg);
                        // rumqttc reconnects on the next poll; don't spin while the broker is
                        // away.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
        });
        Ok((client, rx, pump))
    }

    /// The aggregator's CONNECT to `addr`.
    fn mqtt_options(&self, addr: &BrokerAddr) -> Result<MqttOptions, RunError> {
        let b = &self.config.broker;
        let mut opts = MqttOptions::new(b.client_id.clone(), &addr.host, addr.port);
        opts.set_keep_alive(Duration::from_secs(b.keep_alive_secs));
        // A persistent session: QoS 1 updates published while the aggregator is briefly away
        // are kept by an external broker and delivered when it reconnects.
        opts.set_clean_session(false);
        // A message is acknowledged to the broker only once the machine has handled it and
        // every action it caused (the checkpoint among them) is done: an aggregator that dies
        // in between gets it again from an external broker's session when it restarts,
        // instead of losing an update it had logged as accepted but not yet persisted.
        opts.set_manual_acks(true);
        opts.set_max_packet_size(b.max_packet_bytes, b.max_packet_bytes);
        opts.set_inflight(100);
        if let Some((topic, payload)) = &self.will {
            // The broker tells the root (over the bridge) when this site goes away.
            opts.set_last_will(rumqttc::LastWill::new(
                topic.clone(),
                payload.clone(),
                rumqttc::QoS::AtLeastOnce,
                true,
            ));
        }
        if let Some(files) = &b.tls {
            opts.set_transport(crate::tls::transport(files)?);
        }
        if let Some((user, password)) = &b.credentials {
            opts.set_credentials(user.clone(), password.0.clone());
        }
        Ok(opts)
    }

    /// One message from the MQTT task. A publish takes the publishes already waiting behind
    /// it along into `batch` (at most [`MAX_BATCH`]; any other message is left in `held`): the
    /// next [`Shell::handle`] handles the batch as one, with one checkpoint, before any of it
    /// is acknowledged (group commit).
    async fn on_mqtt(
        &mut self,
        msg: Option<FromMqtt>,
        client: &AsyncClient,
        rx: &mut mpsc::UnboundedReceiver<FromMqtt>,
        held: &mut Option<FromMqtt>,
    ) -> Result<Vec<Event>, RunError> {
        Ok(match msg {
            Some(FromMqtt::Connected {
                broker,
                session_present,
            }) => self.on_connected(client, &broker, session_present).await?,
            Some(FromMqtt::Subscribed) => self.on_subscribed(),
            Some(FromMqtt::Publish(p, permit)) => {
                self.arrived = Instant::now();
                // Decoded one at a time by `handle`.
                self.batch.push((p, permit));
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(FromMqtt::Publish(p, permit)) => self.batch.push((p, permit)),
                        Ok(other) => {
                            *held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                Vec::new()
            }
            Some(FromMqtt::Error { reason, next }) => {
                warn!(error = %reason, next = %next, "MQTT connection error; reconnecting");
                Vec::new()
            }
            Some(FromMqtt::Oversized { bytes, limit }) => {
                warn!(bytes, limit, client_id = %self.config.broker.client_id,
                    "dropped a delivery over broker.max_packet_bytes; reconnecting with a \
                     clean session so the broker does not deliver it again");
                // What was received but not acknowledged belonged to the old session.
                self.unacked.clear();
                Vec::new()
            }
            None => return Err(RunError::Mqtt("event loop ended".into())),
        })
    }

    /// Connected (or reconnected): subscribe to the fleet's client topics.
    async fn on_connected(
        &mut self,
        client: &AsyncClient,
        broker: &BrokerAddr,
        session_present: bool,
    ) -> Result<Vec<Event>, RunError> {
        info!(%broker, session_present, "connected to broker");
        let filters: Vec<SubscribeFilter> = self
            .inbox
            .subscriptions()
            .into_iter()
            .map(|f| SubscribeFilter::new(f, rumqttc::QoS::AtLeastOnce))
            .collect();
        client
            .subscribe_many(filters)
            .await
            .map_err(|e| RunError::Mqtt(e.to_string()))?;
        Ok(Vec::new())
    }

    /// Subscribed: the run starts, or, after a lost connection, publishes its state again (the
    /// broker may have restarted without its retained messages).
    fn on_subscribed(&mut self) -> Vec<Event> {
        if self.started {
            return vec![Event::Reconnected];
        }
        self.started = true;
        // Tests and scripts wait for this line before starting clients.
        println!(
            "aggregator ready: broker {}://{} fleet {} run {}",
            self.scheme, self.broker_addr, self.config.run.fleet, self.config.run.run_id
        );
        if let Some(tx) = self.ready.take() {
            let _ = tx.send(self.broker_addr);
        }
        let mut events = vec![Event::Start];
        events.append(&mut self.pending);
        events
    }

    /// A client's publish, decoded by the inbox; held until the run has started.
    fn on_publish(&mut self, mut publish: rumqttc::Publish) -> Vec<Event> {
        let ev = self
            .inbox
            .on_publish(&publish.topic, &publish.payload, now_ms());
        if publish.qos != rumqttc::QoS::AtMostOnce {
            // The acknowledgement needs the packet id and QoS only. The payload is a slice of
            // rumqttc's read buffer: kept until the batch is acknowledged, each one would pin
            // a whole buffer allocation, and a burst of updates the aggregator's memory.
            publish.payload = bytes::Bytes::new();
            self.unacked.push(publish);
        }
        match ev {
            Some(ev) if self.started => vec![ev],
            Some(ev) => {
                self.pending.push(ev);
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Time passed: chunked updates that timed out, and the machine's deadline check.
    fn on_tick(&mut self) -> Vec<Event> {
        let mut events = self.inbox.expire(now_ms());
        if self.started {
            events.push(Event::Tick);
        }
        events
    }

    /// Feeds `events` to the machine, counting each client message in its round, and carries
    /// out every action, including those that evaluations add.
    async fn handle(&mut self, events: Vec<Event>, client: &AsyncClient) -> Result<(), RunError> {
        let mut queue: VecDeque<Action> = VecDeque::new();
        let mut events: VecDeque<Event> = events.into();
        // The batch's publishes, decoded one at a time as their turn comes (decoded all at
        // once, a batch of updates would be held twice over).
        let mut batch = std::mem::take(&mut self.batch).into_iter();
        loop {
            let ev = match events.pop_front() {
                Some(ev) => ev,
                None => match batch.next() {
                    Some((publish, permit)) => {
                        events.extend(self.on_publish(publish));
                        // Its bytes are decoded (or refused): the MQTT task may read on.
                        drop(permit);
                        continue;
                    }
                    None => break,
                },
            };
            if let Some((sender, bytes)) = ev.sender() {
                let round = self.machine.accounting_round();
                let kind = ev.kind().unwrap_or("other");
                self.outbox.count_incoming(round, sender, kind, bytes);
                if let Some(m) = &mut self.monitor {
                    m.seen(sender, now_ms());
                }
            }
            let open_before = self.machine.open_round();
            let started = Instant::now();
            queue.extend(self.machine.on_event(ev, now_ms()));
            if let Some(round) = open_before
                && self.machine.open_round() != Some(round)
            {
                self.timing.insert(
                    round,
                    RoundTiming {
                        round,
                        handover_ms: None,
                        close_ms: ms(started.elapsed()),
                        evaluation_ms: None,
                    },
                );
                self.handover = Some((round, self.arrived));
            }
            while let Some(action) = queue.pop_front() {
                queue.extend(self.carry_out(action, client).await?);
            }
            // A round announced later (waiting for clients) is not a handover.
            self.handover = None;
        }
        self.flush_checkpoint()
    }

    /// Writes the pending checkpoint, if any.
    fn flush_checkpoint(&mut self) -> Result<(), RunError> {
        if std::mem::take(&mut self.pending_checkpoint) {
            checkpoint::save(
                &SavedRef {
                    machine: self.machine.state(),
                    outbox: self.outbox.state(),
                },
                &self.ckpt_path,
            )?;
        }
        Ok(())
    }

    /// One action; returns the actions it caused (an evaluation's result).
    async fn carry_out(
        &mut self,
        action: Action,
        client: &AsyncClient,
    ) -> Result<Vec<Action>, RunError> {
        if let Action::Checkpoint = action {
            // Written with the machine's newest state (see `pending_checkpoint`).
            self.pending_checkpoint = true;
            return Ok(Vec::new());
        }
        self.flush_checkpoint()?;
        match action {
            Action::Publish {
                message,
                round,
                receivers,
            } => self.publish(message, round, &receivers, client).await?,
            Action::Checkpoint => {}
            Action::Evaluate { round, adapter } => return self.evaluate(round, &adapter),
            Action::RoundClosed(r) => {
                self.print_round(&r);
                self.write_report()?;
                self.round_closed = true;
            }
            Action::Finished => self.finished = true,
            Action::Upstream(message) => self.send_upstream(message, client).await?,
            Action::SecureSum { round, sum } => {
                if let Some(dir) = std::env::var_os("FEDPEFT_SECAGG_DUMP_DIR") {
                    let path = std::path::Path::new(&dir).join(format!("aggregator-r{round}.sum"));
                    let bytes: Vec<u8> = sum.iter().flat_map(|v| v.to_le_bytes()).collect();
                    if let Err(e) = std::fs::write(&path, bytes) {
                        warn!(path = %path.display(), error = %e, "could not write the unmasked sum");
                    }
                }
            }
        }
        Ok(Vec::new())
    }

    /// A site's message to its root, on the root's topics (which the bridge carries).
    async fn send_upstream(
        &mut self,
        message: Outgoing,
        client: &AsyncClient,
    ) -> Result<(), RunError> {
        let Some(outbox) = self.upstream.as_mut() else {
            return Ok(());
        };
        let round = self.machine.accounting_round();
        let Some(sealed) = outbox.send(message, round, &[]) else {
            return Ok(());
        };
        for p in sealed.packets {
            client
                .publish(p.topic, rumqttc::QoS::AtLeastOnce, p.retain, p.payload)
                .await
                .map_err(|e| RunError::Mqtt(e.to_string()))?;
        }
        Ok(())
    }

    /// Seals and sends a message; a global adapter is also kept as the run's trained adapter.
    async fn publish(
        &mut self,
        message: Outgoing,
        round: u32,
        receivers: &[String],
        client: &AsyncClient,
    ) -> Result<(), RunError> {
        let global = match &message {
            Outgoing::Global(g) => Some(g.round),
            _ => None,
        };
        let announced = match &message {
            Outgoing::Announce(a) => Some(a.round),
            Outgoing::SecureAnnounce(a) => Some(a.announce.round),
            Outgoing::AsyncAnnounce(a) => Some(a.announce.round),
            _ => None,
        };
        let Some(sealed) = self.outbox.send(message, round, receivers) else {
            return Ok(());
        };
        if let Some(global_round) = global {
            self.globals
                .published(global_round, &sealed.envelope, &self.global_path)
                .map_err(|source| RunError::Report {
                    dir: self.config.output_dir.clone(),
                    source,
                })?;
            tracing::debug!(bytes = sealed.envelope.len(), path = %self.global_path.display(), "global adapter saved");
        }
        for p in sealed.packets {
            client
                .publish(p.topic, rumqttc::QoS::AtLeastOnce, p.retain, p.payload)
                .await
                .map_err(|e| RunError::Mqtt(e.to_string()))?;
        }
        if let (Some(next), Some((closed, arrived))) = (announced, self.handover)
            && next == closed + 1
        {
            let handover = ms(arrived.elapsed());
            if let Some(t) = self.timing.get_mut(&closed) {
                t.handover_ms = Some(handover);
            }
            self.handover = None;
            info!(
                round = closed,
                handover_ms = format!("{handover:.1}"),
                "next round announced"
            );
        }
        Ok(())
    }

    fn evaluate(
        &mut self,
        round: u32,
        adapter: &crate::adapter::Adapter,
    ) -> Result<Vec<Action>, RunError> {
        let started = Instant::now();
        let result = tokio::task::block_in_place(|| self.host.evaluate(adapter));
        if let Some(t) = self.timing.get_mut(&round) {
            t.evaluation_ms = Some(ms(started.elapsed()));
        }
        if let Ok(Some(e)) = &result {
            self.globals
                .evaluated(round, e.accuracy, e.loss)
                .map_err(|source| RunError::Report {
                    dir: self.config.output_dir.clone(),
                    source,
                })?;
        }
        let actions = match result {
            Ok(Some(e)) => self.machine.on_event(
                Event::Evaluated {
                    round,
                    loss: e.loss,
                    accuracy: e.accuracy,
                },
                now_ms(),
            ),
            Ok(None) => Vec::new(),
            Err(e) => {
                error!(round, error = %e, "evaluation failed");
                Vec::new()
            }
        };
        self.write_report()?;
        Ok(actions)
    }

    /// The progress line of a closed round.
    fn print_round(&self, r: &crate::round::RoundRecord) {
        // Evaluation ran just before this action: read it from the state.
        let acc = self
            .machine
            .state()
            .records
            .iter()
            .rev()
            .find(|x| x.round == r.round)
            .and_then(|x| x.eval_accuracy)
            .map(|a| format!("{:.2}%", 100.0 * a))
            .unwrap_or_else(|| "-".into());
        let traffic = self.outbox.ledger().round(r.round);
        println!(
            "round {:>3} {:<6} acc {:>7} ok {:>3} failed {:>3} rejected {:>3} up {:>10} B down {:>10} B full-model {:>12} B {:>6.1} s",
            r.round,
            r.status,
            acc,
            r.clients_ok,
            r.clients_failed,
            r.rejected.values().sum::<u64>(),
            traffic.up_bytes,
            traffic.down_bytes,
            r.full_model_fedavg_bytes,
            r.duration_ms as f64 / 1000.0
        );
    }

    /// Acknowledges what the last events' actions have made durable.
    async fn ack(&mut self, client: &AsyncClient) -> Result<(), RunError> {
        if !self.started {
            return Ok(());
        }
        for publish in self.unacked.drain(..) {
            client
                .ack(&publish)
                .await
                .map_err(|e| RunError::Mqtt(e.to_string()))?;
        }
        Ok(())
    }

    /// Hands the monitor a snapshot (throttled unless `force`).
    fn publish_live(&mut self, force: bool) {
        if let Some(m) = &mut self.monitor {
            m.publish(
                crate::monitor::View {
                    state: self.machine.state(),
                    ledger: self.outbox.ledger(),
                    info: &self.info,
                    finished: self.finished,
                },
                now_ms(),
                force,
            );
        }
    }

    fn write_report(&self) -> Result<Report, RunError> {
        let mut report = crate::report::build(
            self.machine.state(),
            self.outbox.ledger(),
            &self.info,
            self.finished,
        );
        report.globals = Some(self.globals.index().clone());
        report.round_timing = self.timing.values().cloned().collect();
        crate::report::write(&report, &self.config.output_dir).map_err(|source| {
            RunError::Report {
                dir: self.config.output_dir.clone(),
                source,
            }
        })?;
        Ok(report)
    }
}

/// What the run's adapters fit, for `globals/index.json`.
fn adapter_model(config: &Config, host: &dyn ModelHost) -> Result<AdapterModel, RunError> {
    let m = &config.model;
    let p = m.peft.fields();
    let tensors = host
        .initial_adapter()?
        .tensors
        .iter()
        .map(|t| TensorLayout {
            name: t.name.clone(),
            shape: t.shape.clone(),
        })
        .collect();
    Ok(AdapterModel {
        backbone: m.backbone.as_ref().map(|p| p.display().to_string()),
        backbone_id: host.backbone_id(),
        backbone_sha256: host.backbone_sha256().map(hex::encode),
        peft: p.name.into(),
        lora_rank: p.lora_rank,
        lora_alpha: p.lora_alpha,
        bottleneck: p.bottleneck,
        prompt_tokens: p.prompt_tokens,
        classes: host.classes(),
        image_size: (m.backbone.is_some() && !m.eval.is_text()).then_some(m.image_size),
        max_seq_len: m.max_seq_len,
        tensors,
    })
}

/// The machine and the outbox resumed from the checkpoint in the output folder, or a fresh run
/// from the host's initial adapter.
fn resume_or_start(
    config: &Config,
    rules: &Rules,
    host: &mut dyn ModelHost,
    ckpt_path: &std::path::Path,
    outbox: Outbox,
) -> Result<(RoundMachine, Outbox), RunError> {
    let strategy =
        || strategy::build_with(&config.strategy, config.dp.as_ref()).map_err(RestoreError::from);
    let resumed: Option<Saved> = if config.resume {
        checkpoint::load(ckpt_path)?
    } else {
        None
    };
    if let Some(saved) = resumed {
        let state = saved.machine;
        info!(checkpoint = %ckpt_path.display(), global_round = state.global_round,
              accepted_updates = state.accepted_updates.len(), "resuming from checkpoint");
        let machine = RoundMachine::restore(rules.clone(), strategy()?, state)?;
        return Ok((machine, outbox.with_state(saved.outbox)));
    }
    let initial = host.initial_adapter()?;
    if initial.tensors.is_empty() {
        return Err(RunError::EmptyAdapter);
    }
    Ok((
        RoundMachine::new(rules.clone(), strategy()?, initial),
        outbox,
    ))
}

/// Starts the embedded broker if configured; the address to connect to.
fn start_broker(config: &Config) -> Result<SocketAddr, RunError> {
    let (host_name, port) = match &config.broker.target {
        BrokerTarget::Embedded { host, port } => {
            let b = broker::start_with(
                host,
                *port,
                config.broker.max_packet_bytes,
                config.broker.access.clone(),
            )?;
            info!(addr = %b.addr, max_packet_bytes = config.broker.max_packet_bytes, "embedded broker listening");
            (b.addr.ip().to_string(), b.addr.port())
        }
        BrokerTarget::External(brokers) => (brokers.first().host.clone(), brokers.first().port),
    };
    Ok(format!("{host_name}:{port}")
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], port))))
}
