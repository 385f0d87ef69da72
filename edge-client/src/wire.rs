//! Between MQTT publishes and session events: topics, decoding, chunk reassembly, update
//! encoding (dtype, top-k, error feedback) and chunking. Pure — no sockets, no clock — so it is
//! tested byte for byte.
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
//! `deadline_unix_ms == 0` and an empty client list (`Sampling::Clients([])`); the client reads
//! that as "the run is done" and exits cleanly.

use std::collections::HashMap;

use fedpeft_protocol::mqtt::{MqttVersion, publish_wire_size};
use fedpeft_protocol::topic::filter;
use fedpeft_protocol::{
    Capabilities, ClientId, ClientState, ClientUpdate, Codec, DType, Envelope, FleetName, Join,
    LocalConfig, Message, Optimizer, Reassembler, ReassemblyError, ReassemblyLimits, RoundAnnounce,
    Sampling, SignatureError, SigningKey, SplitMix64, Status, Tensor as WireTensor, Topic,
    TopicKind, TrainMetrics, VerifyingKey,
};

use crate::session::{Event, Outbound};
use crate::types::{
    Announcement, DpPlan, GlobalAdapter, OptimizerPlan, Round, Tensor, TrainPlan, TrainedUpdate,
    WireDtype,
};

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

/// Converts a protocol dtype to ours.
pub fn dtype_from_wire(d: DType) -> WireDtype {
    match d {
        DType::F32 => WireDtype::F32,
        DType::F16 => WireDtype::F16,
        DType::I8 => WireDtype::Int8,
    }
}

/// Converts our dtype to the protocol's.
pub fn dtype_to_wire(d: WireDtype) -> DType {
    match d {
        WireDtype::F32 => DType::F32,
        WireDtype::F16 => DType::F16,
        WireDtype::Int8 => DType::I8,
    }
}

/// Maps a round's local config to the trainer's plan.
pub fn plan_from_wire(c: &LocalConfig) -> TrainPlan {
    TrainPlan {
        local_epochs: u32::from(c.epochs),
        batch_size: c.batch_size,
        learning_rate: c.learning_rate,
        optimizer: match c.optimizer {
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => OptimizerPlan::Sgd {
                momentum,
                weight_decay,
            },
            Optimizer::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            } => OptimizerPlan::AdamW {
                beta1,
                beta2,
                epsilon,
                weight_decay,
            },
        },
        dp: c.dp_sgd.map(|d| DpPlan {
            clip_norm: d.clip_norm,
            noise_multiplier: d.noise_multiplier,
        }),
        proximal_mu: c.fedprox_mu,
        dtype: dtype_from_wire(c.update_dtype),
        top_k: c.top_k_fraction,
        seed: c.seed,
    }
}

/// Whether an announcement is the aggregator's "run is done" marker.
pub fn is_run_done(a: &RoundAnnounce) -> bool {
    a.deadline_unix_ms == 0 && matches!(&a.sampling, Sampling::Clients(c) if c.is_empty())
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

    /// Encodes an outgoing envelope, signed when this client has a key.
    fn seal(&self, what: &'static str, envelope: Envelope) -> Result<Vec<u8>, WireError> {
        match &self.signing_key {
            Some(key) => envelope.encode_signed(&self.fleet, key),
            None => envelope.encode(),
        }
        .map_err(|e| WireError::Encode {
            what,
            reason: e.to_string(),
        })
    }

    /// Checks the aggregator's signature on a whole payload, when its key is configured.
    fn check_aggregator(&self, topic: &str, kind: &str, payload: &[u8]) -> Result<(), WireError> {
        match &self.aggregator_key {
            None => Ok(()),
            Some(key) => {
                fedpeft_protocol::sign::verify(payload, &self.fleet, key).map_err(|source| {
                    WireError::Signature {
                        topic: topic.to_string(),
                        kind: kind.to_string(),
                        source,
                    }
                })
            }
        }
    }

    fn topic(&self, kind: TopicKind) -> String {
        Topic::new(self.fleet.clone(), kind).to_string()
    }

    /// Topic filters to subscribe to (QoS 1), in this order: the global adapter with its chunk
    /// sub-topics, then the round announcement. Brokers hand out retained messages filter by
    /// filter, so after a reconnect the adapter arrives before the announcement that uses it.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            filter::global(&self.fleet).as_str().to_string(),
            self.topic(TopicKind::Round),
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

    /// The last will registered at CONNECT: Status offline, retained, on our status topic.
    pub fn last_will(&self) -> Result<Packet, WireError> {
        self.status(ClientState::Offline)
    }

    fn status(&self, state: ClientState) -> Result<Packet, WireError> {
        let status = Status {
            client: self.client.clone(),
            state,
        };
        let payload = self.seal("status", Envelope::new(self.run_id, 0, status))?;
        Ok(Packet {
            topic: self.status_topic(),
            payload,
            retain: true,
        })
    }

    /// The run id outgoing messages carry and incoming ones must carry.
    pub fn run_id(&self) -> u64 {
        self.run_id
    }

    /// Largest payload that still fits one packet on `topic` after MQTT framing.
    fn payload_budget(&self, topic: &str) -> usize {
        let framing = publish_wire_size(
            topic.len(),
            0,
            fedpeft_protocol::QoS::AtLeastOnce,
            MqttVersion::V311,
        )
        .unwrap_or(0);
        // The remaining-length varint grows with the payload: reserve its largest form.
        self.max_packet_bytes.saturating_sub(framing + 3)
    }

    /// Turns one incoming publish into a session event. `Ok(None)` means "nothing yet" (a
    /// chunk of an incomplete adapter, or a message this client does not act on).
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Option<Event>, WireError> {
        let parsed = Topic::parse(topic).map_err(|e| WireError::Topic {
            topic: topic.to_string(),
            reason: e.to_string(),
        })?;
        if parsed.fleet != self.fleet {
            return Err(WireError::Topic {
                topic: topic.to_string(),
                reason: format!("belongs to fleet `{}`, not `{}`", parsed.fleet, self.fleet),
            });
        }
        if payload.is_empty() {
            // An empty retained publish clears a retained message; nothing to act on.
            return Ok(None);
        }
        let env = Envelope::decode(payload).map_err(|source| WireError::Decode {
            topic: topic.to_string(),
            source,
        })?;
        if env.run_id != self.run_id {
            return Err(WireError::OtherRun {
                topic: topic.to_string(),
                found: env.run_id,
                expected: self.run_id,
            });
        }
        let unexpected = |m: &Message| WireError::Unexpected {
            topic: topic.to_string(),
            kind: m.kind().to_string(),
        };
        match (&parsed.kind, env.message) {
            (TopicKind::Round, Message::RoundAnnounce(a)) => {
                self.check_aggregator(topic, "round announcement", payload)?;
                if is_run_done(&a) {
                    return Ok(Some(Event::RunDone));
                }
                let sampled = match &a.sampling {
                    Sampling::Clients(ids) => ids.iter().map(|c| c.as_str().to_string()).collect(),
                    // `All` and `Rate` are resolved by the aggregator into explicit lists; a
                    // client cannot know who else is connected, so it trains when told "all".
                    Sampling::All => vec![self.client.as_str().to_string()],
                    Sampling::Rate(_) => Vec::new(),
                };
                Ok(Some(Event::Announce(Announcement {
                    run_id: env.run_id,
                    round: a.round,
                    sampled,
                    plan: plan_from_wire(&a.config),
                    deadline_unix_ms: a.deadline_unix_ms,
                })))
            }
            (TopicKind::Global, Message::GlobalAdapter(g))
            | (TopicKind::GlobalChunk(_), Message::GlobalAdapter(g)) => {
                self.check_aggregator(topic, "global adapter", payload)?;
                Ok(Some(Event::Adapter(adapter_from_wire(env.run_id, g)?)))
            }
            (TopicKind::Global | TopicKind::GlobalChunk(_), Message::Chunk(c)) => {
                let whole = self
                    .reassembler
                    .push(format!("global/{}", env.run_id), c, now_ms)
                    .map_err(|source| WireError::Chunk {
                        topic: topic.to_string(),
                        source,
                    })?;
                match whole {
                    None => Ok(None),
                    Some(bytes) => {
                        let inner =
                            Envelope::decode(&bytes).map_err(|source| WireError::Decode {
                                topic: topic.to_string(),
                                source,
                            })?;
                        match inner.message {
                            Message::GlobalAdapter(g) => {
                                self.check_aggregator(topic, "global adapter", &bytes)?;
                                Ok(Some(Event::Adapter(adapter_from_wire(inner.run_id, g)?)))
                            }
                            other => Err(unexpected(&other)),
                        }
                    }
                }
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    /// Drops incomplete reassemblies older than the timeout; returns what was dropped.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ReassemblyError> {
        self.reassembler
            .expire(now_ms)
            .into_iter()
            .map(|(_, e)| e)
            .collect()
    }

    /// Encodes one outbound message into the packets to publish (several when chunked).
    pub fn encode(&mut self, out: &Outbound) -> Result<Vec<Packet>, WireError> {
        match out {
            Outbound::StatusOnline => Ok(vec![self.status(ClientState::Online)?]),
            Outbound::StatusOffline => Ok(vec![self.status(ClientState::Offline)?]),
            Outbound::Join => {
                let join = Join {
                    client: self.client.clone(),
                    capabilities: self.join.capabilities.clone(),
                    num_examples: self.join.num_examples,
                };
                let payload = self.seal("join", Envelope::new(self.run_id, 0, join))?;
                self.split("join", self.topic(TopicKind::Join), payload, 0, false)
            }
            Outbound::Update {
                round,
                sequence,
                update,
                plan,
            } => {
                let payload = self.encode_update(*round, *sequence, update, plan)?;
                self.split("update", self.update_topic(), payload, *round, false)
            }
        }
    }

    /// The encoded ClientUpdate envelope (before chunking).
    pub fn encode_update(
        &mut self,
        round: Round,
        sequence: u32,
        update: &TrainedUpdate,
        plan: &TrainPlan,
    ) -> Result<Vec<u8>, WireError> {
        let codec = Codec {
            dtype: dtype_to_wire(plan.dtype),
            top_k_fraction: plan.top_k,
        };
        let lossy = plan.dtype != WireDtype::F32 || plan.top_k.is_some();
        // Stochastic rounding differs per client and round, but is reproducible.
        let mut rng = SplitMix64::new(
            plan.seed ^ u64::from(round).rotate_left(32) ^ fnv1a(self.client.as_str()),
        );
        let mut tensors = Vec::with_capacity(update.deltas.len());
        for t in &update.deltas {
            let shape = shape_to_wire(&t.name, &t.shape)?;
            let encoded = match self.residuals.get_mut(&t.name) {
                // Error feedback: what earlier rounds did not send is added to this delta.
                Some(residual) if residual.len() == t.data.len() => {
                    WireTensor::encode_with_feedback(
                        &t.name, &shape, &t.data, residual, codec, &mut rng,
                    )
                }
                _ if lossy => {
                    let mut residual = vec![0.0; t.data.len()];
                    let enc = WireTensor::encode_with_feedback(
                        &t.name,
                        &shape,
                        &t.data,
                        &mut residual,
                        codec,
                        &mut rng,
                    );
                    self.residuals.insert(t.name.clone(), residual);
                    enc
                }
                _ => WireTensor::encode(&t.name, &shape, &t.data, codec, &mut rng),
            }
            .map_err(|e| WireError::Encode {
                what: "update",
                reason: e.to_string(),
            })?;
            tensors.push(encoded);
        }
        let m = &update.metrics;
        let msg = ClientUpdate {
            client: self.client.clone(),
            round,
            sequence,
            num_examples: m.num_examples,
            metrics: TrainMetrics {
                loss: m.loss,
                accuracy: m.accuracy,
                steps: m.steps,
                elapsed_ms: m.elapsed_ms,
                epsilon: m.epsilon,
            },
            tensors,
        };
        self.seal("update", Envelope::new(self.run_id, round, msg))
    }

    /// The error-feedback residual kept for `tensor` (what was not sent yet).
    pub fn residual(&self, tensor: &str) -> Option<&[f32]> {
        self.residuals.get(tensor).map(Vec::as_slice)
    }

    fn split(
        &mut self,
        what: &'static str,
        topic: String,
        payload: Vec<u8>,
        round: Round,
        retain: bool,
    ) -> Result<Vec<Packet>, WireError> {
        let budget = self.payload_budget(&topic);
        if payload.len() <= budget {
            return Ok(vec![Packet {
                topic,
                payload,
                retain,
            }]);
        }
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1);
        let parts = fedpeft_protocol::chunk::split(&payload, budget, self.run_id, round, id)
            .map_err(|e| WireError::Encode {
                what,
                reason: e.to_string(),
            })?;
        Ok(parts
            .into_iter()
            .map(|payload| Packet {
                topic: topic.clone(),
                payload,
                retain,
            })
            .collect())
    }
}

fn shape_to_wire(name: &str, shape: &[usize]) -> Result<Vec<u32>, WireError> {
    shape
        .iter()
        .map(|&d| {
            u32::try_from(d).map_err(|_| WireError::Encode {
                what: "update",
                reason: format!("tensor `{name}` dimension {d} does not fit u32"),
            })
        })
        .collect()
}

/// Decodes a global adapter's tensors to f32, refusing NaN/Inf.
pub fn adapter_from_wire(
    run_id: u64,
    g: fedpeft_protocol::GlobalAdapter,
) -> Result<GlobalAdapter, WireError> {
    g.validate().map_err(|e| WireError::Adapter {
        round: g.round,
        reason: e.to_string(),
    })?;
    Ok(GlobalAdapter {
        run_id,
        round: g.round,
        tensors: g
            .tensors
            .iter()
            .map(|t| Tensor {
                name: t.name().to_string(),
                shape: t.shape().iter().map(|&d| d as usize).collect(),
                data: t.to_f32(),
            })
            .collect(),
    })
}

/// FNV-1a: a stable 64-bit hash of a client id for seeding (std's hasher is randomised).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::{PeftMethod, RoundAnnounce};

    use super::*;
    use crate::types::Metrics;

    fn caps() -> Capabilities {
        let mut dtypes = heapless::Vec::new();
        dtypes.push(DType::F32).unwrap();
        Capabilities {
            backbone_id: heapless::String::try_from("tiny").unwrap(),
            backbone_sha256: [7; 32],
            peft: PeftMethod::Head,
            accepted_dtypes: dtypes,
            max_packet_size: 4096,
        }
    }

    fn wire(max_packet: usize) -> Wire {
        Wire::new(
            FleetName::new("lab").unwrap(),
            ClientId::new("c1").unwrap(),
            77,
            JoinInfo {
                capabilities: caps(),
                num_examples: 50,
            },
            max_packet,
        )
    }

    fn config(dtype: DType, top_k: Option<f32>) -> LocalConfig {
        LocalConfig {
            epochs: 2,
            batch_size: 8,
            learning_rate: 0.05,
            optimizer: Optimizer::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            },
            fedprox_mu: 0.0,
            dp_sgd: None,
            update_dtype: dtype,
            top_k_fraction: top_k,
            seed: 9,
        }
    }

    fn announce(round: u32, sampled: &[&str], deadline_unix_ms: u64) -> Vec<u8> {
        let a = RoundAnnounce {
            round,
            deadline_unix_ms,
            sampling: Sampling::Clients(
                sampled.iter().map(|s| ClientId::new(s).unwrap()).collect(),
            ),
            config: config(DType::F16, None),
        };
        Envelope::new(77, round, a).encode().unwrap()
    }

    fn update(n: usize) -> TrainedUpdate {
        TrainedUpdate {
            deltas: vec![Tensor {
                name: "head.weight".into(),
                shape: vec![n],
                data: (0..n).map(|i| ((i as f32) * 0.37).sin()).collect(),
            }],
            metrics: Metrics {
                loss: 0.5,
                accuracy: 0.75,
                num_examples: 50,
                steps: 4,
                elapsed_ms: 10,
                epsilon: None,
            },
        }
    }

    fn decode_update(packets: &[Packet]) -> ClientUpdate {
        // Reassemble the way the aggregator does.
        let mut r = Reassembler::<String>::new(ReassemblyLimits::default());
        let mut whole = None;
        for p in packets {
            let env = Envelope::decode(&p.payload).unwrap();
            match env.message {
                Message::ClientUpdate(u) => return u,
                Message::Chunk(c) => whole = r.push(p.topic.clone(), c, 0).unwrap().or(whole),
                other => panic!("unexpected {other:?}"),
            }
        }
        match Envelope::decode(&whole.expect("complete")).unwrap().message {
            Message::ClientUpdate(u) => u,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn topics_follow_the_protocol_layout() {
        let w = wire(4096);
        assert_eq!(
            w.subscriptions(),
            vec![
                "fedpeft/v1/lab/global/#".to_string(),
                "fedpeft/v1/lab/round".to_string()
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
    fn an_announcement_decodes_with_its_run_sampled_ids_and_plan() {
        let mut w = wire(4096);
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(3, &["c1", "c9"], 123), 0)
            .unwrap()
            .unwrap();
        let Event::Announce(a) = ev else {
            panic!("{ev:?}")
        };
        assert_eq!((a.run_id, a.round), (77, 3));
        assert_eq!(a.sampled, vec!["c1", "c9"]);
        assert_eq!(a.plan.dtype, WireDtype::F16);
        assert_eq!(a.plan.local_epochs, 2);
        assert_eq!(a.deadline_unix_ms, 123);
        assert_eq!(w.run_id(), 77);
    }

    #[test]
    fn no_deadline_and_nobody_sampled_means_the_run_is_done() {
        let mut w = wire(4096);
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(9, &[], 0), 0)
            .unwrap();
        assert!(matches!(ev, Some(Event::RunDone)));
        // Nobody sampled with a real deadline is just a round this client sits out.
        let ev = w
            .decode("fedpeft/v1/lab/round", &announce(9, &[], 5), 0)
            .unwrap();
        assert!(matches!(ev, Some(Event::Announce(_))));
    }

    #[test]
    fn messages_of_another_run_are_refused() {
        let mut w = wire(4096);
        let a = RoundAnnounce {
            round: 1,
            deadline_unix_ms: 5,
            sampling: Sampling::Clients(vec![ClientId::new("c1").unwrap()]),
            config: config(DType::F32, None),
        };
        let other = Envelope::new(78, 1, a).encode().unwrap();
        let err = w.decode("fedpeft/v1/lab/round", &other, 0).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::OtherRun {
                    found: 78,
                    expected: 77,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_chunked_global_adapter_is_reassembled() {
        let mut w = wire(4096);
        let data: Vec<f32> = (0..3000).map(|i| i as f32 * 0.001).collect();
        let t = WireTensor::encode(
            "head.weight",
            &[3000],
            &data,
            Codec::dense(DType::F32),
            &mut SplitMix64::new(1),
        )
        .unwrap();
        let g = fedpeft_protocol::GlobalAdapter {
            round: 4,
            tensors: vec![t],
        };
        let bytes = Envelope::new(77, 4, g).encode().unwrap();
        let chunks = fedpeft_protocol::chunk::split(&bytes, 2000, 77, 4, 1).unwrap();
        assert!(chunks.len() > 3);
        let mut got = None;
        // Out of order, as retained sub-topics may be delivered.
        for (i, c) in chunks.iter().enumerate().rev() {
            let topic = format!("fedpeft/v1/lab/global/{i}");
            if let Some(ev) = w.decode(&topic, c, 0).unwrap() {
                assert!(got.is_none());
                got = Some(ev);
            }
        }
        let Some(Event::Adapter(a)) = got else {
            panic!("{got:?}")
        };
        assert_eq!((a.run_id, a.round), (77, 4));
        assert_eq!(a.tensors[0].data, data);
    }

    #[test]
    fn malformed_and_foreign_messages_are_errors_not_panics() {
        let mut w = wire(4096);
        assert!(matches!(
            w.decode("fedpeft/v1/lab/round", &[1, 2, 3], 0),
            Err(WireError::Decode { .. })
        ));
        assert!(matches!(
            w.decode("fedpeft/v1/other/round", &announce(1, &["c1"], 1), 0),
            Err(WireError::Topic { .. })
        ));
        assert!(matches!(
            w.decode("somewhere/else", &announce(1, &["c1"], 1), 0),
            Err(WireError::Topic { .. })
        ));
        // An announcement on the adapter topic.
        assert!(matches!(
            w.decode("fedpeft/v1/lab/global", &announce(1, &["c1"], 1), 0),
            Err(WireError::Unexpected { .. })
        ));
        let mut wrong_version = announce(1, &["c1"], 1);
        wrong_version[0] = 9;
        let err = w
            .decode("fedpeft/v1/lab/round", &wrong_version, 0)
            .unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        // A retained message being cleared.
        assert!(w.decode("fedpeft/v1/lab/round", &[], 0).unwrap().is_none());
    }

    #[test]
    fn a_global_adapter_with_nan_is_refused() {
        let mut w = wire(4096);
        let t = WireTensor::encode(
            "b",
            &[2],
            &[1.0, f32::NAN],
            Codec::dense(DType::F32),
            &mut SplitMix64::new(1),
        );
        // The codec may refuse NaN itself; build the values directly if it does.
        let t = t.unwrap_or_else(|_| {
            WireTensor::dense(
                "b",
                &[2],
                fedpeft_protocol::Values::F32(vec![1.0, f32::NAN]),
            )
            .unwrap()
        });
        let g = fedpeft_protocol::GlobalAdapter {
            round: 1,
            tensors: vec![t],
        };
        let bytes = Envelope::new(77, 1, g).encode().unwrap();
        assert!(matches!(
            w.decode("fedpeft/v1/lab/global", &bytes, 0),
            Err(WireError::Adapter { round: 1, .. })
        ));
    }

    #[test]
    fn a_small_f32_update_is_one_packet_that_decodes_exactly() {
        let mut w = wire(4096);
        let u = update(100);
        let plan = plan_from_wire(&config(DType::F32, None));
        let packets = w
            .encode(&Outbound::Update {
                round: 2,
                sequence: 5,
                update: u.clone(),
                plan,
            })
            .unwrap();
        assert_eq!(packets.len(), 1);
        assert!(!packets[0].retain);
        assert_eq!(packets[0].topic, "fedpeft/v1/lab/update/c1");
        let back = decode_update(&packets);
        assert_eq!((back.round, back.sequence, back.num_examples), (2, 5, 50));
        assert_eq!(back.client.as_str(), "c1");
        assert_eq!(back.tensors[0].to_f32(), u.deltas[0].data);
        assert!(
            w.residual("head.weight").is_none(),
            "exact f32 keeps no residual"
        );
    }

    #[test]
    fn a_large_update_is_chunked_below_the_packet_limit_and_reassembles() {
        let max = 2048;
        let mut w = wire(max);
        let u = update(3000);
        let plan = plan_from_wire(&config(DType::F32, None));
        let packets = w
            .encode(&Outbound::Update {
                round: 1,
                sequence: 0,
                update: u.clone(),
                plan,
            })
            .unwrap();
        assert!(packets.len() >= 6, "{} packets", packets.len());
        for p in &packets {
            assert!(p.wire_size() <= max, "packet of {} bytes", p.wire_size());
        }
        assert_eq!(
            decode_update(&packets).tensors[0].to_f32(),
            u.deltas[0].data
        );
    }

    #[test]
    fn top_k_keeps_what_it_did_not_send_and_sends_it_later() {
        let mut w = wire(1 << 20);
        let plan = plan_from_wire(&config(DType::F32, Some(0.1)));
        let u = update(200);
        let first = w.encode_update(0, 0, &u, &plan).unwrap();
        let Message::ClientUpdate(first) = Envelope::decode(&first).unwrap().message else {
            panic!()
        };
        let sent = first.tensors[0].to_f32();
        assert_eq!(sent.iter().filter(|v| **v != 0.0).count(), 20);
        // sent + residual == the delta: nothing is lost, only delayed.
        let residual = w.residual("head.weight").unwrap().to_vec();
        for i in 0..200 {
            assert!((sent[i] + residual[i] - u.deltas[0].data[i]).abs() < 1e-6);
        }
        // A zero delta next round still sends the largest leftovers.
        let mut zero = u.clone();
        zero.deltas[0].data.iter_mut().for_each(|v| *v = 0.0);
        let second = w.encode_update(1, 1, &zero, &plan).unwrap();
        let Message::ClientUpdate(second) = Envelope::decode(&second).unwrap().message else {
            panic!()
        };
        let leftovers = second.tensors[0].to_f32();
        assert_eq!(leftovers.iter().filter(|v| **v != 0.0).count(), 20);
        for (i, v) in leftovers.iter().enumerate() {
            if *v != 0.0 {
                assert!((v - residual[i]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn int8_updates_are_about_a_quarter_of_f32() {
        let mut w = wire(1 << 20);
        let u = update(4000);
        let f32_len = w
            .encode_update(0, 0, &u, &plan_from_wire(&config(DType::F32, None)))
            .unwrap()
            .len();
        let i8_len = w
            .encode_update(0, 1, &u, &plan_from_wire(&config(DType::I8, None)))
            .unwrap()
            .len();
        assert!(i8_len * 3 < f32_len, "int8 {i8_len} vs f32 {f32_len}");
    }

    #[test]
    fn join_carries_capabilities_and_examples() {
        let mut w = wire(4096);
        let packets = w.encode(&Outbound::Join).unwrap();
        assert_eq!(packets[0].topic, "fedpeft/v1/lab/join");
        let Message::Join(j) = Envelope::decode(&packets[0].payload).unwrap().message else {
            panic!()
        };
        assert_eq!(j.num_examples, 50);
        assert_eq!(j.capabilities, caps());
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
