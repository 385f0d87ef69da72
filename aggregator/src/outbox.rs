//! Outgoing messages: what the round machine decided to publish → MQTT packets, and the byte
//! ledger. The mirror of [`crate::wire::Inbox`].
//!
//! The machine speaks in domain messages ([`Outgoing`]: the global adapter, a round
//! announcement, the "run done" marker). The [`Outbox`] wraps each in an envelope of the run,
//! seals it (signs it when the run has a key), chunks it above the payload limit, names its
//! topic, and counts every packet in the [`Ledger`]: per client, per round, up and down. It does
//! no I/O: the shell sends the [`Packet`]s it returns.

use fedpeft_protocol::{
    AsyncRoundAnnounce, ClientId, EncodeError, Envelope, FleetName, GlobalAdapter, Join, QoS,
    RoundAnnounce, SecAggRelay, SecAggRoster, SecAggUnmask, SecureRoundAnnounce, SigningKey,
    SiteAggregate, Status, Topic, TopicKind,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::accounting::{Ledger, wire_size};

/// A message the round machine publishes, before it is sealed and named.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// The global adapter (retained; chunked on `global/{n}` above the payload limit).
    Global(GlobalAdapter),
    /// A round's announcement (retained).
    Announce(RoundAnnounce),
    /// The run is over: the announcement clients exit on ([`RoundAnnounce::is_run_done`]'s
    /// form), on the round topic.
    RunDone(RoundAnnounce),
    /// A secure round's announcement (retained, on the round topic).
    SecureAnnounce(SecureRoundAnnounce),
    /// An asynchronous run's announcement (retained, on the round topic).
    AsyncAnnounce(AsyncRoundAnnounce),
    /// A secure round's roster (retained, on the secagg topic).
    Roster(SecAggRoster),
    /// The shares relayed to one client (its inbox topic).
    Relay { to: ClientId, relay: SecAggRelay },
    /// A secure round's unmask request (retained, on the secagg topic).
    Unmask(SecAggUnmask),
    /// A site joins its root (the root's join topic).
    Join(Join),
    /// A site's status at its root (retained, on its status topic).
    Status(Status),
    /// A site's partial aggregate (its update topic; chunked above the payload limit).
    Aggregate(SiteAggregate),
}

impl Outgoing {
    /// The envelope's round.
    fn round(&self) -> u32 {
        match self {
            Outgoing::Global(g) => g.round,
            Outgoing::Announce(a) | Outgoing::RunDone(a) => a.round,
            Outgoing::SecureAnnounce(a) => a.announce.round,
            Outgoing::AsyncAnnounce(a) => a.announce.round,
            Outgoing::Roster(r) => r.round,
            Outgoing::Relay { relay, .. } => relay.round,
            Outgoing::Unmask(u) => u.round,
            Outgoing::Join(_) | Outgoing::Status(_) => 0,
            Outgoing::Aggregate(a) => a.round,
        }
    }

    /// The topic it goes to (the global adapter's chunks aside).
    fn topic(&self) -> TopicKind {
        match self {
            Outgoing::Global(_) => TopicKind::Global,
            Outgoing::Announce(_)
            | Outgoing::RunDone(_)
            | Outgoing::SecureAnnounce(_)
            | Outgoing::AsyncAnnounce(_) => TopicKind::Round,
            Outgoing::Roster(_) | Outgoing::Unmask(_) => TopicKind::SecAgg,
            Outgoing::Relay { to, .. } => TopicKind::Inbox(to.clone()),
            Outgoing::Join(_) => TopicKind::Join,
            Outgoing::Status(s) => TopicKind::Status(s.client.clone()),
            Outgoing::Aggregate(a) => TopicKind::Update(a.site.clone()),
        }
    }
}

/// One MQTT PUBLISH to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    pub qos: QoS,
}

/// What the outbox keeps across a restart (checkpointed beside the machine state).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxState {
    pub ledger: Ledger,
    /// Message id of the next chunked publish.
    pub next_message_id: u32,
}

/// Turns [`Outgoing`] messages into packets and counts them.
#[derive(Debug)]
pub struct Outbox {
    fleet: FleetName,
    run_id: u64,
    signing_key: Option<SigningKey>,
    max_payload_bytes: usize,
    state: OutboxState,
}

/// A sealed message: its packets and the whole envelope (what a client reassembles).
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub envelope: Vec<u8>,
    pub packets: Vec<Packet>,
}

impl Outbox {
    pub fn new(
        fleet: FleetName,
        run_id: u64,
        signing_key: Option<SigningKey>,
        max_payload_bytes: usize,
    ) -> Outbox {
        Outbox {
            fleet,
            run_id,
            signing_key,
            max_payload_bytes,
            state: OutboxState::default(),
        }
    }

    /// Continues from a checkpointed state.
    pub fn with_state(mut self, state: OutboxState) -> Outbox {
        self.state = state;
        self
    }

    pub fn state(&self) -> &OutboxState {
        &self.state
    }

    pub fn ledger(&self) -> &Ledger {
        &self.state.ledger
    }

    /// A client's message of `wire_bytes` arrived; it counts in `round`.
    pub fn count_incoming(&mut self, round: u32, client: &str, kind: &str, wire_bytes: u64) {
        self.state.ledger.client_up(round, client, kind, wire_bytes);
    }

    /// Seals `message` into packets and counts them in `round`, each delivered by the broker
    /// to every one of `receivers`. `None` (logged) if it cannot be encoded or chunked: the
    /// global adapter is built by strategies that refuse non-finite values, so that means a
    /// tensor too large for the wire format, and there is nothing sensible to send.
    pub fn send(&mut self, message: Outgoing, round: u32, receivers: &[String]) -> Option<Sealed> {
        let (what, kind) = match &message {
            Outgoing::Global(_) => ("global adapter", "global"),
            Outgoing::Announce(_) => ("round announcement", "round"),
            Outgoing::RunDone(_) => ("final announcement", "round"),
            Outgoing::SecureAnnounce(_) => ("secure round announcement", "round"),
            Outgoing::AsyncAnnounce(_) => ("round announcement", "round"),
            Outgoing::Roster(_) => ("secure aggregation roster", "secagg"),
            Outgoing::Relay { .. } => ("relayed shares", "secagg"),
            Outgoing::Unmask(_) => ("unmask request", "secagg"),
            Outgoing::Join(_) => ("site join", "join"),
            Outgoing::Status(_) => ("site status", "status"),
            Outgoing::Aggregate(_) => ("site aggregate", "update"),
        };
        let topic = message.topic();
        let header_round = message.round();
        let global = matches!(message, Outgoing::Global(_));
        let sealed = self.seal(message).map_err(|e| e.to_string());
        let sealed = sealed.and_then(|envelope| {
            let packets = if global {
                self.global_packets(header_round, &envelope)?
            } else if let TopicKind::Update(_) = topic {
                self.chunked_packets(topic, header_round, &envelope)?
            } else {
                vec![self.packet(topic, envelope.clone())]
            };
            Ok(Sealed { envelope, packets })
        });
        match sealed {
            Ok(sealed) => {
                for p in &sealed.packets {
                    let bytes = wire_size(&p.topic, p.payload.len(), p.qos);
                    self.state.ledger.aggregator_publish(
                        round,
                        kind,
                        bytes,
                        receivers.iter().map(String::as_str),
                    );
                }
                Some(sealed)
            }
            Err(e) => {
                warn!(round, error = %e, "{what} cannot be sent");
                None
            }
        }
    }

    /// The whole envelope, signed when the run has a key.
    fn seal(&self, message: Outgoing) -> Result<Vec<u8>, EncodeError> {
        let round = message.round();
        let envelope = match message {
            Outgoing::Global(g) => Envelope::new(self.run_id, round, g),
            Outgoing::Announce(a) | Outgoing::RunDone(a) => Envelope::new(self.run_id, round, a),
            Outgoing::SecureAnnounce(a) => Envelope::new(self.run_id, round, a),
            Outgoing::AsyncAnnounce(a) => Envelope::new(self.run_id, round, a),
            Outgoing::Roster(r) => Envelope::new(self.run_id, round, r),
            Outgoing::Relay { relay, .. } => Envelope::new(self.run_id, round, relay),
            Outgoing::Unmask(u) => Envelope::new(self.run_id, round, u),
            Outgoing::Join(j) => Envelope::new(self.run_id, round, j),
            Outgoing::Status(s) => Envelope::new(self.run_id, round, s),
            Outgoing::Aggregate(a) => Envelope::new(self.run_id, round, a),
        };
        match &self.signing_key {
            Some(key) => envelope.encode_signed(&self.fleet, key),
            None => envelope.encode(),
        }
    }

    /// The global adapter's packets: the whole envelope on `global`, or its chunks on
    /// `global/{n}` above the payload limit (each chunked publish gets a new message id).
    fn global_packets(&mut self, round: u32, envelope: &[u8]) -> Result<Vec<Packet>, String> {
        let parts = self.split(round, envelope)?;
        if parts.len() == 1 {
            return Ok(vec![self.packet(TopicKind::Global, envelope.to_vec())]);
        }
        Ok(parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| self.packet(TopicKind::GlobalChunk(i as u32), part))
            .collect())
    }

    /// A message on one topic: the whole envelope, or its chunks on the same topic above the
    /// payload limit (as devices send updates).
    fn chunked_packets(
        &mut self,
        kind: TopicKind,
        round: u32,
        envelope: &[u8],
    ) -> Result<Vec<Packet>, String> {
        if envelope.len() <= self.max_payload_bytes {
            return Ok(vec![self.packet(kind, envelope.to_vec())]);
        }
        Ok(self
            .split(round, envelope)?
            .into_iter()
            .map(|part| self.packet(kind.clone(), part))
            .collect())
    }

    /// `envelope` as chunk envelopes of at most the payload limit, under a new message id.
    fn split(&mut self, round: u32, envelope: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let id = self.state.next_message_id;
        self.state.next_message_id = id.wrapping_add(1);
        fedpeft_protocol::chunk::split(envelope, self.max_payload_bytes, self.run_id, round, id)
            .map_err(|e| format!("cannot be chunked: {e}"))
    }

    fn packet(&self, kind: TopicKind, payload: Vec<u8>) -> Packet {
        let topic = Topic::new(self.fleet.clone(), kind);
        Packet {
            topic: topic.to_topic_string().to_string(),
            payload,
            retain: topic.retain(),
            qos: topic.qos(),
        }
    }
}
