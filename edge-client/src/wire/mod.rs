//! Between MQTT publishes and session events: topics, decoding, chunk reassembly, update
//! encoding (dtype, top-k, error feedback) and chunking. Pure — no sockets, no clock — so it is
//! tested byte for byte.
//!
//! - this module: the [`Wire`] of one client (ids, run, keys, topics), [`Packet`], [`WireError`];
//! - [`decode`]: incoming publishes → session [`Event`](crate::session::Event)s: announcements,
//!   global adapters (reassembled from chunks), signature and run checks;
//! - [`encode`]: session [`Outbound`](crate::session::Outbound) messages → sealed (signed)
//!   envelopes → packets, chunked under the packet limit; updates with their dtype, top-k and
//!   error feedback.
//!
//! Runs: the client is configured with the fleet's run id (the aggregator's `run_id`, default
//! 1). Its Join, Status and updates carry it, and announcements or adapters of any other run
//! (e.g. a retained leftover of an earlier run) are refused.
//!
//! Signatures: with a signing key, every envelope this client sends (Join, Status and its last
//! will, updates before chunking) is a signed envelope; with the aggregator's public key, a
//! round announcement or global adapter (checked once reassembled) that is unsigned or does not
//! verify is refused ([`WireError::Signature`]).
//!
//! End of run: the aggregator publishes a final (retained) [`RoundAnnounce`] with
//! `deadline_unix_ms == 0` and an empty client list (`Sampling::Clients([])`,
//! [`RoundAnnounce::is_run_done`]); the client reads that as "the run is done" and exits cleanly.
//!
//! [`RoundAnnounce`]: fedpeft_protocol::RoundAnnounce
//! [`RoundAnnounce::is_run_done`]: fedpeft_protocol::RoundAnnounce::is_run_done

use std::collections::HashMap;

use fedpeft_protocol::mqtt::{MqttVersion, publish_wire_size};
use fedpeft_protocol::topic::filter;
use fedpeft_protocol::{
    Capabilities, ClientId, FleetName, Reassembler, ReassemblyError, ReassemblyLimits,
    SignatureError, SigningKey, Topic, TopicKind, VerifyingKey,
};

use crate::types::Round;

pub mod decode;
pub mod encode;
#[cfg(test)]
mod fixtures;

pub use decode::{adapter_from_wire, dtype_from_wire, plan_from_wire};
pub use encode::{dtype_to_wire, metrics_to_wire};

/// Why an incoming publish was not turned into an event, or an outgoing one not encoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("topic `{topic}`: {reason}")]
    Topic { topic: String, reason: String },
    #[error("payload on `{topic}` does not decode: {source}")]
    Decode {
        topic: String,
        #[source]
        source: fedpeft_protocol::DecodeError,
    },
    #[error("chunk on `{topic}` refused: {source}")]
    Chunk {
        topic: String,
        #[source]
        source: ReassemblyError,
    },
    #[error("a {kind} message on `{topic}` is not what that topic carries")]
    Unexpected { topic: String, kind: String },
    #[error("`{topic}` carries run {found}; this client belongs to run {expected}")]
    OtherRun {
        topic: String,
        found: u64,
        expected: u64,
    },
    #[error("{kind} on `{topic}` refused: {source}")]
    Signature {
        topic: String,
        kind: String,
        #[source]
        source: SignatureError,
    },
    #[error("global adapter of round {round}: {reason}")]
    Adapter { round: Round, reason: String },
    #[error("encoding the {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

/// One MQTT publish to make.
#[derive(Debug, Clone, PartialEq)]
pub struct Packet {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Packet {
    /// Bytes on the wire for this PUBLISH at QoS 1, MQTT 3.1.1 framing included.
    pub fn wire_size(&self) -> usize {
        publish_wire_size(
            self.topic.len(),
            self.payload.len(),
            fedpeft_protocol::QoS::AtLeastOnce,
            MqttVersion::V311,
        )
        .unwrap_or(usize::MAX)
    }
}

/// What the client says about itself in Join.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinInfo {
    pub capabilities: Capabilities,
    pub num_examples: u64,
}

/// Codec state of one client: ids, topics, the reassembler and the error-feedback residuals.
#[derive(Debug)]
pub struct Wire {
    fleet: FleetName,
    client: ClientId,
    join: JoinInfo,
    max_packet_bytes: usize,
    reassembler: Reassembler<String>,
    /// The fleet's run: outgoing envelopes carry it, incoming ones must.
    run_id: u64,
    /// What top-k / quantization did not send yet, per tensor, carried into the next round.
    residuals: HashMap<String, Vec<f32>>,
    next_message_id: u32,
    /// Signs outgoing envelopes when set.
    signing_key: Option<SigningKey>,
    /// Incoming announcements and adapters must be signed with this key when set.
    aggregator_key: Option<VerifyingKey>,
}

impl Wire {
    pub fn new(
        fleet: FleetName,
        client: ClientId,
        run_id: u64,
        join: JoinInfo,
        max_packet_bytes: usize,
    ) -> Wire {
        let limits = ReassemblyLimits {
            // Only the aggregator's global adapter is chunked towards a client.
            max_in_flight: 4,
            ..ReassemblyLimits::default()
        };
        Wire {
            fleet,
            client,
            join,
            max_packet_bytes,
            reassembler: Reassembler::new(limits),
            run_id,
            residuals: HashMap::new(),
            next_message_id: 0,
            signing_key: None,
            aggregator_key: None,
        }
    }

    /// Signs every outgoing envelope with `key`.
    pub fn with_signing_key(mut self, key: SigningKey) -> Wire {
        self.signing_key = Some(key);
        self
    }

    /// Refuses round announcements and global adapters not signed with `key`.
    pub fn with_aggregator_key(mut self, key: VerifyingKey) -> Wire {
        self.aggregator_key = Some(key);
        self
    }

    fn topic(&self, kind: TopicKind) -> String {
        Topic::new(self.fleet.clone(), kind).to_string()
    }

    /// Topic filters to subscribe to (QoS 1), in this order: the global adapter with its chunk
    /// sub-topics, then the round announcement, then the secure-aggregation stage topic and
    /// this client's inbox. Brokers hand out retained messages filter by
    /// filter, so after a reconnect the adapter arrives before the announcement that uses it.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            filter::global(&self.fleet).as_str().to_string(),
            self.topic(TopicKind::Round),
            self.topic(TopicKind::SecAgg),
            self.topic(TopicKind::Inbox(self.client.clone())),
        ]
    }

    /// This client's status topic (also the last will's).
    pub fn status_topic(&self) -> String {
        self.topic(TopicKind::Status(self.client.clone()))
    }

    /// This client's update topic.
    pub fn update_topic(&self) -> String {
        self.topic(TopicKind::Update(self.client.clone()))
    }

    /// The run id outgoing messages carry and incoming ones must carry.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }
}

/// FNV-1a: a stable 64-bit hash of a client id for seeding (std's hasher is randomised).
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::{
        ClientState, Codec, DType, Envelope, Message, RoundAnnounce, Sampling, SplitMix64, Status,
        Tensor as WireTensor,
    };

    use super::fixtures::{config, decode_update, update, wire};
    use super::*;
    use crate::session::{Event, Outbound};

    #[test]
    fn topics_follow_the_protocol_layout() {
        let w = wire(4096);
        assert_eq!(
            w.subscriptions(),
            vec![
                "fedpeft/v1/lab/global/#".to_string(),
                "fedpeft/v1/lab/round".to_string(),
                "fedpeft/v1/lab/secagg".to_string(),
                "fedpeft/v1/lab/inbox/c1".to_string(),
            ]
        );
        assert_eq!(w.status_topic(), "fedpeft/v1/lab/status/c1");
        assert_eq!(w.update_topic(), "fedpeft/v1/lab/update/c1");
        let will = w.last_will().unwrap();
        assert!(will.retain);
        let env = Envelope::decode(&will.payload).unwrap();
        assert_eq!(
            env.message,
            Message::Status(Status {
                client: ClientId::new("c1").unwrap(),
                state: ClientState::Offline
            })
        );
    }

    #[test]
    fn with_keys_outgoing_messages_are_signed_and_only_the_aggregators_signature_is_accepted() {
        let fleet = FleetName::new("lab").unwrap();
        let mine = SigningKey::from_bytes(&[1; 32]);
        let aggregator = SigningKey::from_bytes(&[2; 32]);
        let impostor = SigningKey::from_bytes(&[3; 32]);
        let mut w = wire(4096)
            .with_signing_key(mine.clone())
            .with_aggregator_key(aggregator.verifying_key());
        // Join, last will and a (chunked) update: each whole payload verifies with our key.
        let join = w.encode(&Outbound::Join).unwrap();
        let will = w.last_will().unwrap();
        for p in [&join[0], &will] {
            fedpeft_protocol::sign::verify(&p.payload, &fleet, &mine.verifying_key()).unwrap();
        }
        let plan = plan_from_wire(&config(DType::F32, None));
        let whole = w.encode_update(2, 5, &update(3000), &plan).unwrap();
        fedpeft_protocol::sign::verify(&whole, &fleet, &mine.verifying_key()).unwrap();
        assert_eq!(
            decode_update(
                &w.encode(&Outbound::Update {
                    round: 2,
                    sequence: 6,
                    update: update(3000),
                    plan
                })
                .unwrap()
            )
            .sequence,
            6
        );

        let a = || RoundAnnounce {
            round: 3,
            deadline_unix_ms: 5,
            sampling: Sampling::Clients(vec![ClientId::new("c1").unwrap()]),
            config: config(DType::F32, None),
        };
        let topic = "fedpeft/v1/lab/round";
        let signed = Envelope::new(77, 3, a())
            .encode_signed(&fleet, &aggregator)
            .unwrap();
        assert!(matches!(
            w.decode(topic, &signed, 0),
            Ok(Some(Event::Announce(_)))
        ));
        for (payload, expected) in [
            (
                Envelope::new(77, 3, a()).encode().unwrap(),
                SignatureError::Unsigned,
            ),
            (
                Envelope::new(77, 3, a())
                    .encode_signed(&fleet, &impostor)
                    .unwrap(),
                SignatureError::Invalid,
            ),
        ] {
            match w.decode(topic, &payload, 0) {
                Err(WireError::Signature { source, .. }) => assert_eq!(source, expected),
                other => panic!("expected a signature error, got {other:?}"),
            }
        }

        // A chunked global adapter is checked once reassembled.
        let t = WireTensor::encode(
            "head.weight",
            &[3000],
            &vec![0.5; 3000],
            Codec::dense(DType::F32),
            &mut SplitMix64::new(1),
        )
        .unwrap();
        let g = fedpeft_protocol::GlobalAdapter {
            round: 4,
            tensors: vec![t],
        };
        for (key, ok) in [(&aggregator, true), (&impostor, false)] {
            let bytes = Envelope::new(77, 4, g.clone())
                .encode_signed(&fleet, key)
                .unwrap();
            let chunks =
                fedpeft_protocol::chunk::split(&bytes, 2000, 77, 4, u32::from(ok)).unwrap();
            let mut last = None;
            for (i, c) in chunks.iter().enumerate() {
                last = Some(w.decode(&format!("fedpeft/v1/lab/global/{i}"), c, 0));
            }
            match last.unwrap() {
                Ok(Some(Event::Adapter(a))) => assert!(ok && a.round == 4),
                Err(WireError::Signature { .. }) => assert!(!ok),
                other => panic!("{other:?}"),
            }
        }
    }
}
