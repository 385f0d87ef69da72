//! The event loop of one run: [`Shell`] holds the state (session, wire, outbox, byte ledger,
//! the trainer and its channel, the poller's ends), has one method per kind of event (an MQTT
//! packet in or out, a connection error, a finished training, the shutdown request) and one per
//! kind of session action, and [`Shell::serve`] is the short loop that waits and dispatches.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnAck, Event as MqttEvent, LastWill, MqttOptions, Outgoing,
    Packet as MqttPacket, Publish, QoS,
};
use tokio::sync::mpsc;

use super::network::{self, Net, Poller, Request};
use super::{ClientError, ClientSettings, RunSummary, ShellCounters};
use crate::accounting::{ByteLedger, packet_size};
use crate::config::BrokerAddr;
use crate::session::{Action, Event, ExitReason, Faults, Outbound, Session};
use crate::tls::failover::Failover;
use crate::trainer::LocalTrainer;
use crate::types::{Round, SharedAdapter, TrainPlan, TrainedUpdate};
use crate::wire::{JoinInfo, Packet, Wire, fnv1a};

/// How long a clean shutdown waits for the DISCONNECT to go out.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A training that finished on its blocking thread.
struct TrainingDone {
    round: Round,
    sequence: u32,
    result: Result<TrainedUpdate, String>,
}

/// The state of one run of the client, between the network and the session.
pub(super) struct Shell<T> {
    settings: ClientSettings,
    client_id: String,
    session: Session,
    wire: Wire,
    subscriptions: Vec<String>,
    mqtt: AsyncClient,
    poller: Poller,
    /// Bytes of our CONNECT, booked when its CONNACK arrives.
    connect_size: usize,
    trainer: Arc<Mutex<T>>,
    train_tx: mpsc::UnboundedSender<TrainingDone>,
    train_rx: mpsc::UnboundedReceiver<TrainingDone>,
    outbox: VecDeque<Request>,
    /// The packets of the last update published, for a resend after a reconnect.
    last_update: Option<(Round, Vec<Packet>)>,
    ledger: ByteLedger,
    counters: ShellCounters,
    started: Instant,
    /// The round whose bytes are logged when the session moves past it.
    logged_round: Option<Round>,
    /// Secure-aggregation rounds: keys, shares, masking.
    secure: crate::secure::SecureClient,
}

impl<T: LocalTrainer + 'static> Shell<T> {
    /// Builds the wire and the MQTT options (last will, credentials, TLS) and starts polling.
    pub(super) fn start(settings: ClientSettings, trainer: T) -> Result<Shell<T>, ClientError> {
        let wire = wire(&settings, trainer.num_examples());
        let client_id = settings.client_id.as_str().to_string();
        let settings_client_id = settings.client_id.clone();
        let settings_drop_after = settings.faults.secagg_drop_after;
        let will = wire.last_will()?;
        let failover = Failover::new(settings.brokers.clone(), |addr| {
            mqtt_options(&settings, &will, addr)
        })?;
        let opts = failover.options();
        let connect_size = network::connect_packet_size(&opts);
        let (mqtt, eventloop) = AsyncClient::new(opts, 64);
        let poller =
            network::spawn_poller(eventloop, failover, settings.reconnect, fnv1a(&client_id));
        let (train_tx, train_rx) = mpsc::unbounded_channel();
        let session = Session::new(&client_id).with_faults(Faults {
            dropout: settings.faults.dropout,
            seed: settings.fault_seed,
            client_index: settings.client_index,
        });
        Ok(Shell {
            subscriptions: wire.subscriptions(),
            settings,
            client_id,
            session,
            wire,
            mqtt,
            poller,
            connect_size,
            trainer: Arc::new(Mutex::new(trainer)),
            train_tx,
            train_rx,
            outbox: VecDeque::new(),
            last_update: None,
            ledger: ByteLedger::default(),
            counters: ShellCounters::default(),
            started: Instant::now(),
            logged_round: None,
            secure: crate::secure::SecureClient::new(settings_client_id, settings_drop_after)
                .map_err(ClientError::Secure)?,
        })
    }

    /// Waits for the next event and hands it to the session until the session says exit.
    pub(super) async fn serve<S: Future<Output = ()>>(&mut self, shutdown: S) -> ExitReason {
        tokio::pin!(shutdown);
        let mut shutdown_seen = false;
        loop {
            self.flush();
            let event = tokio::select! {
                _ = &mut shutdown, if !shutdown_seen => {
                    shutdown_seen = true;
                    Some(self.on_shutdown())
                }
                Some(done) = self.train_rx.recv() => Some(on_training_done(done)),
                Some(net) = self.poller.events.recv() => self.on_net(net),
            };
            if let Some(event) = event
                && let Some(exit) = self.apply(event)
            {
                return exit;
            }
        }
    }

    fn on_shutdown(&mut self) -> Event {
        tracing::info!("shutdown requested");
        Event::Shutdown
    }

    /// What the event loop saw: a connection, a packet in or out, or a failed connection.
    fn on_net(&mut self, net: Net) -> Option<Event> {
        match net {
            Net::Connected { broker, ack } => self.on_connected(&broker, ack),
            Net::Event(MqttEvent::Incoming(packet)) => self.on_incoming(packet),
            Net::Event(MqttEvent::Outgoing(packet)) => {
                self.on_outgoing(packet);
                None
            }
            Net::Error {
                reason,
                retry_in,
                next,
            } => self.on_connection_error(reason, retry_in, &next),
        }
    }

    /// Connected to `broker` (the first of the list, or the one a failed connection moved on
    /// to).
    fn on_connected(&mut self, broker: &BrokerAddr, ack: ConnAck) -> Option<Event> {
        let round = self.session.current_round();
        let session_present = ack.session_present;
        self.ledger.received(round, MqttPacket::ConnAck(ack).size());
        // Our CONNECT went out just before this answer.
        self.ledger.sent(round, self.connect_size);
        tracing::info!(%broker, session_present, "connected");
        Some(Event::Connected { session_present })
    }

    fn on_incoming(&mut self, packet: MqttPacket) -> Option<Event> {
        let round = self.session.current_round();
        self.ledger.received(round, packet.size());
        match packet {
            MqttPacket::Publish(p) => self.on_publish(p),
            _ => None,
        }
    }

    /// A message from the aggregator (or a chunk of one): decoded, or counted and ignored.
    fn on_publish(&mut self, p: Publish) -> Option<Event> {
        let now_ms = self.started.elapsed().as_millis() as u64;
        for dropped in self.wire.expire(now_ms) {
            tracing::warn!(%dropped, "incomplete global adapter dropped");
        }
        match self.wire.decode(&p.topic, &p.payload, now_ms) {
            Ok(ev) => ev,
            Err(e) => {
                self.counters.rejected_messages += 1;
                tracing::warn!(error = %e, "message ignored");
                None
            }
        }
    }

    /// Books what the event loop sent on its own. Publishes and subscribes are booked when
    /// handed over (their contents are known there, not here).
    fn on_outgoing(&mut self, packet: Outgoing) {
        let round = self.session.current_round();
        match packet {
            Outgoing::PubAck(_)
            | Outgoing::PubRec(_)
            | Outgoing::PubRel(_)
            | Outgoing::PubComp(_) => self.ledger.sent(round, packet_size::ACK),
            Outgoing::PingReq | Outgoing::Disconnect => self.ledger.sent(round, packet_size::EMPTY),
            _ => {}
        }
    }

    /// The poller retries by itself after `retry_in`, on `next`; the session hears of the first
    /// loss only.
    fn on_connection_error(
        &mut self,
        reason: String,
        retry_in: Duration,
        next: &BrokerAddr,
    ) -> Option<Event> {
        self.counters.connection_errors += 1;
        tracing::warn!(%reason, retry_in_ms = retry_in.as_millis() as u64, %next, "connection lost or refused; retrying");
        self.session.is_connected().then_some(Event::ConnectionLost)
    }

    /// Hands `event` to the session and carries out its actions; `Some` when it says exit.
    fn apply(&mut self, event: Event) -> Option<ExitReason> {
        let mut exit = None;
        let held = self.session.adapter().cloned();
        let actions = self.session.on_event(event);
        if let Some(engine) = &self.settings.serve
            && let Some(now) = self.session.adapter()
            && !held.as_ref().is_some_and(|h| Arc::ptr_eq(h, now))
        {
            engine.swap(now.clone(), format!("round {} from the broker", now.round));
        }
        for action in actions {
            match action {
                Action::Subscribe => self
                    .outbox
                    .push_back(Request::Subscribe(self.subscriptions.clone())),
                Action::Send(out) => self.send(&out),
                Action::Train {
                    round,
                    sequence,
                    adapter,
                    plan,
                } => self.train(round, sequence, adapter, plan),
                Action::ResendUpdate { round } => self.resend(round),
                Action::Vanish { round } => self.vanish(round),
                Action::Disconnect => self.outbox.push_back(Request::Disconnect),
                Action::Exit(reason) => exit = Some(reason),
                Action::Secure(step) => match self.secure.step(*step) {
                    Ok(Some(message)) => self.send(&Outbound::SecAgg(Box::new(message))),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "secure round: this client drops out of it")
                    }
                },
            }
        }
        self.log_round_change();
        exit
    }

    /// Encodes (and chunks) an outgoing message into the outbox; an update is kept for a
    /// resend.
    fn send(&mut self, out: &Outbound) {
        let packets = match self.wire.encode(out) {
            Ok(packets) => packets,
            Err(e) => {
                tracing::error!(error = %e, "could not encode an outgoing message");
                return;
            }
        };
        if let Outbound::Update {
            round,
            sequence,
            update,
            ..
        } = out
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
            self.last_update = Some((*round, packets.clone()));
        }
        self.outbox
            .extend(packets.into_iter().map(Request::Publish));
    }

    /// Trains on a blocking thread (one at a time: the session never asks for two), holding
    /// the result back by the straggle delay, and reports to [`Shell::serve`].
    fn train(&mut self, round: Round, sequence: u32, adapter: SharedAdapter, plan: TrainPlan) {
        tracing::info!(round, sequence, epochs = plan.local_epochs, "training");
        let trainer = self.trainer.clone();
        let tx = self.train_tx.clone();
        let straggle = self.settings.faults.straggle;
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

    /// Publishes the stored update of `round` again, byte for byte.
    fn resend(&mut self, round: Round) {
        match &self.last_update {
            Some((r, packets)) if *r == round => {
                tracing::info!(
                    round,
                    packets = packets.len(),
                    "update published again after reconnecting"
                );
                self.outbox
                    .extend(packets.iter().cloned().map(Request::Publish));
            }
            _ => tracing::warn!(round, "no stored update for this round to send again"),
        }
    }

    /// Emulated dropout: the poller drops the connection and stays away.
    fn vanish(&mut self, round: Round) {
        let away = self.settings.faults.dropout_offline;
        tracing::warn!(
            round,
            offline_secs = away.as_secs_f64(),
            "dropping the connection (emulated dropout)"
        );
        // Whatever was queued for the old connection goes with it.
        self.outbox.clear();
        let _ = self.poller.vanish.send(away);
    }

    fn flush(&mut self) {
        let round = self.session.current_round();
        network::flush(&self.mqtt, &mut self.outbox, &mut self.ledger, round);
    }

    /// Logs the bytes of the round the session just moved past.
    fn log_round_change(&mut self) {
        let current = self.session.current_round();
        if current != self.logged_round {
            if let Some(prev) = self.logged_round {
                self.log_round_bytes(prev);
            }
            self.logged_round = current;
        }
    }

    fn log_round_bytes(&self, round: Round) {
        let b = self.ledger.round(round);
        tracing::info!(
            round,
            up_bytes = b.up.bytes,
            down_bytes = b.down.bytes,
            up_packets = b.up.packets,
            down_packets = b.down.packets,
            "round bytes"
        );
    }

    /// Lets the Status offline and the DISCONNECT go out (when the session asked for them)
    /// before the event loop stops; gives up after [`DRAIN_TIMEOUT`], and the broker then
    /// publishes our last will.
    pub(super) async fn drain(&mut self) {
        if !self.outbox.iter().any(|r| matches!(r, Request::Disconnect)) {
            return;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            self.flush();
            let round = self.session.current_round();
            match tokio::time::timeout_at(deadline, self.poller.events.recv()).await {
                Ok(Some(Net::Event(MqttEvent::Outgoing(Outgoing::Disconnect)))) => {
                    self.ledger.sent(round, packet_size::EMPTY);
                    return;
                }
                Ok(Some(Net::Event(MqttEvent::Incoming(p)))) => {
                    self.ledger.received(round, p.size())
                }
                Ok(Some(Net::Event(MqttEvent::Outgoing(Outgoing::PubAck(_))))) => {
                    self.ledger.sent(round, packet_size::ACK)
                }
                Ok(Some(Net::Connected { ack, .. })) => {
                    self.ledger.received(round, MqttPacket::ConnAck(ack).size())
                }
                Ok(Some(Net::Event(_))) => {}
                Ok(Some(Net::Error { .. })) | Ok(None) | Err(_) => {
                    tracing::warn!(
                        "could not disconnect cleanly; the broker will publish our last will"
                    );
                    return;
                }
            }
        }
    }

    /// Stops polling and reports the run.
    pub(super) fn finish(self, exit: ExitReason) -> RunSummary {
        self.poller.task.abort();
        if let Some(round) = self.logged_round {
            self.log_round_bytes(round);
        }
        RunSummary::new(
            &self.client_id,
            exit,
            self.session.stats(),
            self.session.dropped_rounds().to_vec(),
            &self.counters,
            self.ledger,
        )
    }
}

fn on_training_done(done: TrainingDone) -> Event {
    Event::TrainingFinished {
        round: done.round,
        sequence: done.sequence,
        result: done.result,
    }
}

/// The client's codec: ids, run, what Join says, the packet limit and the keys.
fn wire(settings: &ClientSettings, num_examples: u64) -> Wire {
    let join = JoinInfo {
        capabilities: settings.capabilities.clone(),
        num_examples,
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
    wire
}

/// CONNECT to `broker` as this client sends it: a persistent session, the packet limit both
/// ways, the last will, credentials and TLS.
fn mqtt_options(
    settings: &ClientSettings,
    will: &Packet,
    broker: &BrokerAddr,
) -> Result<MqttOptions, ClientError> {
    let mut opts = MqttOptions::new(settings.client_id.as_str(), &broker.host, broker.port);
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
    Ok(opts)
}
