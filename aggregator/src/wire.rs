//! Incoming MQTT messages → round-machine events: topic routing, chunk reassembly, envelope
//! decoding and the mapping of decoder errors to rejection reasons. Pure (time is passed in).

use std::collections::BTreeMap;

use fedpeft_protocol::{
    Chunk, ClientId, DecodeError, Envelope, FleetName, Message, QoS, Reassembler, ReassemblyError,
    ReassemblyLimits, SignatureError, Topic, TopicKind, peek_header, sign,
};
use tracing::{debug, warn};

use crate::accounting::wire_size;
use crate::keys::Enrolment;
use crate::round::{DecodeFailure, Event, JoinInfo, RejectReason};

/// Turns received publishes into [`Event`]s.
#[derive(Debug)]
pub struct Inbox {
    fleet: FleetName,
    run_id: u64,
    reassembler: Reassembler<PayloadKey>,
    /// Wire bytes of the chunks the reassembler holds, per payload.
    partial_bytes: BTreeMap<PayloadKey, u64>,
    /// When set, joins, statuses and updates must be signed by the named client's key.
    enrolment: Option<Enrolment>,
    /// A site's root: its fleet and run, and its chunked global adapters being put together.
    root: Option<Root>,
}

/// What a site's inbox knows of its root.
#[derive(Debug)]
struct Root {
    fleet: FleetName,
    run_id: u64,
    /// Chunks of the root's global adapter, keyed by message id.
    chunks: Reassembler<u32>,
}

/// A chunked payload being put together: the client whose topic its chunks came on and the
/// whole claim they carry, as the reassembler keys it. A stray or refused chunk that reuses a
/// real payload's message id is not counted in that payload's wire size (which could make it
/// oversized: refused, and counted failed when signed).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PayloadKey {
    client: String,
    message_id: u32,
    count: u32,
    total_len: u32,
    crc32: u32,
}

impl PayloadKey {
    fn of(client: &ClientId, chunk: &Chunk) -> PayloadKey {
        PayloadKey {
            client: client.as_str().to_string(),
            message_id: chunk.message_id,
            count: chunk.count,
            total_len: chunk.total_len,
            crc32: chunk.crc32,
        }
    }
}

fn failure(reason: RejectReason, round: Option<u32>, detail: impl ToString) -> DecodeFailure {
    DecodeFailure {
        reason,
        round,
        detail: detail.to_string(),
    }
}

fn decode_reason(e: &DecodeError) -> RejectReason {
    match e {
        DecodeError::UnsupportedVersion { .. } => RejectReason::WrongVersion,
        DecodeError::CrcMismatch { .. } => RejectReason::BadChecksum,
        _ => RejectReason::Malformed,
    }
}

fn reassembly_reason(e: &ReassemblyError) -> RejectReason {
    match e {
        ReassemblyError::Oversized { .. }
        | ReassemblyError::TooManyInFlight { .. }
        | ReassemblyError::OverBudget { .. } => RejectReason::Oversized,
        // A redelivered chunk (QoS 1): idempotent, like a redelivered update.
        ReassemblyError::Duplicate { .. } => RejectReason::Duplicate,
        ReassemblyError::CrcMismatch { .. } => RejectReason::BadChecksum,
        ReassemblyError::Incomplete { .. } => RejectReason::Incomplete,
        _ => RejectReason::Malformed,
    }
}

impl Inbox {
    /// `max_update_bytes` bounds a reassembled update; at most 64 chunked updates, 4 ×
    /// `max_update_bytes` together, are in flight (see [`Inbox::with_reassembly`]), and
    /// `chunk_timeout_ms` after its first chunk an incomplete one is dropped.
    pub fn new(
        fleet: FleetName,
        run_id: u64,
        max_update_bytes: u64,
        chunk_timeout_ms: u64,
    ) -> Inbox {
        let max = usize::try_from(max_update_bytes).unwrap_or(usize::MAX);
        Inbox {
            fleet,
            run_id,
            reassembler: Reassembler::new(ReassemblyLimits {
                max_in_flight: 64,
                max_total_bytes: max.saturating_mul(4),
                max_message_bytes: max,
                timeout_ms: chunk_timeout_ms,
            }),
            partial_bytes: BTreeMap::new(),
            enrolment: None,
            root: None,
        }
    }

    /// A site's inbox: also takes its root's announcements and global adapter (fleet `fleet`,
    /// run `run_id`), bridged to this broker.
    pub fn with_root(mut self, fleet: FleetName, run_id: u64, max_global_bytes: usize) -> Inbox {
        self.root = Some(Root {
            fleet,
            run_id,
            chunks: Reassembler::new(ReassemblyLimits {
                max_in_flight: 4,
                max_total_bytes: max_global_bytes.saturating_mul(2),
                max_message_bytes: max_global_bytes,
                timeout_ms: 600_000,
            }),
        });
        self
    }

    /// At most `max_in_flight` chunked updates, reserving `max_bytes` together, wait for
    /// their other chunks; a chunk that would start one more is refused as `oversized`.
    pub fn with_reassembly(mut self, max_in_flight: usize, max_bytes: u64) -> Inbox {
        let limits = ReassemblyLimits {
            max_in_flight,
            max_total_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
            ..self.reassembler.limits()
        };
        self.reassembler = Reassembler::new(limits);
        self
    }

    /// Requires every join, status and update to be signed with the enrolled key of the client
    /// it names (see `docs/protocol.md`, "Signed envelopes").
    pub fn with_enrolment(mut self, enrolment: Enrolment) -> Inbox {
        self.enrolment = Some(enrolment);
        self
    }

    /// The event for `update` on `client`'s topic: the update if its payload passes
    /// [`Inbox::authenticate`], marked signed when the fleet signs.
    fn checked(
        &self,
        client: &ClientId,
        payload: &[u8],
        update: fedpeft_protocol::ClientUpdate,
        wire_bytes: u64,
    ) -> Event {
        let (update, signed) = match self.authenticate(client.as_str(), payload) {
            Ok(()) => (Ok(update), self.enrolment.is_some()),
            Err((reason, detail)) => (Err(failure(reason, Some(update.round), detail)), false),
        };
        Event::Update {
            topic_client: client.clone(),
            update: Box::new(update),
            wire_bytes,
            signed,
        }
    }

    /// The event for a site's aggregate on `client`'s update topic, authenticated like an
    /// update.
    fn partial(
        &self,
        client: &ClientId,
        payload: &[u8],
        partial: fedpeft_protocol::SiteAggregate,
        wire_bytes: u64,
    ) -> Event {
        let (partial, signed) = match self.authenticate(client.as_str(), payload) {
            Ok(()) => (Ok(partial), self.enrolment.is_some()),
            Err((reason, detail)) => (Err(failure(reason, Some(partial.round), detail)), false),
        };
        Event::Partial {
            topic_client: client.clone(),
            partial: Box::new(partial),
            wire_bytes,
            signed,
        }
    }

    /// The event for a secure-aggregation message on `client`'s update topic, authenticated
    /// like an update; `None` for any other kind.
    fn secure(
        &self,
        client: &ClientId,
        payload: &[u8],
        message: Message,
        wire_bytes: u64,
    ) -> Result<Event, Box<Message>> {
        use crate::round::secure::Uplink;
        let round = message.body_round();
        let uplink = match message {
            Message::SecAggKeys(m) => Uplink::Keys(m),
            Message::SecAggShares(m) => Uplink::Shares(m),
            Message::SecAggMasked(m) => Uplink::Masked(m),
            Message::SecAggReveal(m) => Uplink::Reveal(m),
            other => return Err(Box::new(other)),
        };
        Ok(match self.authenticate(client.as_str(), payload) {
            Ok(()) => Event::SecAgg {
                topic_client: client.clone(),
                message: Box::new(uplink),
                wire_bytes,
                signed: self.enrolment.is_some(),
            },
            Err((reason, detail)) => Event::Update {
                topic_client: client.clone(),
                update: Box::new(Err(failure(reason, round, detail))),
                wire_bytes,
                signed: false,
            },
        })
    }

    /// Checks the signature of a whole (reassembled) payload from `client`, when enrolment is
    /// configured.
    fn authenticate(&self, client: &str, payload: &[u8]) -> Result<(), (RejectReason, String)> {
        let Some(enrolment) = &self.enrolment else {
            return Ok(());
        };
        let key = enrolment.key(client).ok_or((
            RejectReason::NotEnrolled,
            "no enrolled public key".to_string(),
        ))?;
        sign::verify(payload, &self.fleet, key).map_err(|e| match e {
            SignatureError::Unsigned => (RejectReason::Unsigned, e.to_string()),
            _ => (RejectReason::BadSignature, e.to_string()),
        })
    }

    /// The topic filters the aggregator subscribes to.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut filters: Vec<String> = ["join", "update/+", "status/+"]
            .iter()
            .map(|t| format!("{}/{}/{t}", fedpeft_protocol::topic::ROOT, self.fleet))
            .collect();
        if let Some(root) = &self.root {
            filters.extend(
                ["round", "global", "global/+"]
                    .iter()
                    .map(|t| format!("{}/{}/{t}", fedpeft_protocol::topic::ROOT, root.fleet)),
            );
        }
        filters
    }

    /// Drops chunked updates that never completed; one rejection event each.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Event> {
        self.reassembler
            .expire(now_ms)
            .into_iter()
            .filter_map(|(key, e)| {
                let bytes = self.partial_bytes.remove(&key).unwrap_or(0);
                let topic_client = ClientId::new(&key.client).ok()?;
                Some(Event::Update {
                    topic_client,
                    update: Box::new(Err(failure(reassembly_reason(&e), None, &e))),
                    wire_bytes: bytes,
                    signed: false,
                })
            })
            .collect()
    }

    /// One received publish.
    pub fn on_publish(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> Option<Event> {
        let bytes = wire_size(topic, payload.len(), QoS::AtLeastOnce);
        tracing::debug!(topic, bytes, "publish received");
        let parsed = match Topic::parse(topic) {
            Ok(t) if t.fleet == self.fleet => t,
            Ok(t) if self.root.as_ref().is_some_and(|r| r.fleet == t.fleet) => {
                return self.on_root_publish(topic, t.kind, payload, now_ms);
            }
            Ok(_) | Err(_) => {
                debug!(topic, "ignoring a publish on a foreign topic");
                return None;
            }
        };
        match parsed.kind {
            TopicKind::Join => self.on_join(payload, bytes),
            TopicKind::Status(client) => self.on_status(client, payload, bytes),
            TopicKind::Update(client) => self.on_update(client, payload, bytes, now_ms),
            // Our own retained publishes echo back only if subscribed to them; evaluation
            // results from clients are not used yet.
            _ => None,
        }
    }

    /// A message on the root's topics (a site's inbox only): its announcement or global
    /// adapter, whole or from chunks. Anything else, undecodable or of another run is logged and
    /// dropped: it is not a client's, so nothing is counted against anyone.
    fn on_root_publish(
        &mut self,
        topic: &str,
        kind: TopicKind,
        payload: &[u8],
        now_ms: u64,
    ) -> Option<Event> {
        use crate::round::UpstreamMessage;
        let root = self.root.as_mut()?;
        if payload.is_empty() {
            // A cleared retained message.
            return None;
        }
        let decode = |bytes: &[u8], run_id: u64| -> Result<Envelope, String> {
            let env = Envelope::decode(bytes).map_err(|e| e.to_string())?;
            if env.run_id != run_id {
                return Err(format!("run {} (the root's run is {run_id})", env.run_id));
            }
            Ok(env)
        };
        let env = match decode(payload, root.run_id) {
            Ok(env) => env,
            Err(e) => {
                warn!(topic, error = %e, "ignoring a message from the root");
                return None;
            }
        };
        let message = match (kind, env.message) {
            (TopicKind::GlobalChunk(_), Message::Chunk(chunk)) => {
                let id = chunk.message_id;
                match root.chunks.push(id, chunk, now_ms) {
                    Ok(None) => return None,
                    Ok(Some(whole)) => match decode(&whole, root.run_id) {
                        Ok(env) => env.message,
                        Err(e) => {
                            warn!(topic, error = %e, "ignoring the root's chunked global adapter");
                            return None;
                        }
                    },
                    // A retained chunk delivered again on reconnect: already held.
                    Err(ReassemblyError::Duplicate { .. }) => return None,
                    Err(e) => {
                        warn!(topic, error = %e, "ignoring a chunk of the root's global adapter");
                        return None;
                    }
                }
            }
            (_, m) => m,
        };
        match message {
            Message::RoundAnnounce(a) => {
                Some(Event::Upstream(Box::new(UpstreamMessage::Announce(a))))
            }
            Message::GlobalAdapter(g) => {
                Some(Event::Upstream(Box::new(UpstreamMessage::Global(g))))
            }
            other => {
                warn!(topic, kind = %other.kind(), "ignoring a message from the root a site does not take");
                None
            }
        }
    }

    fn decode_ours(&self, payload: &[u8]) -> Result<Envelope, DecodeFailure> {
        let round = peek_header(payload).ok().map(|h| h.round);
        let env = Envelope::decode(payload).map_err(|e| failure(decode_reason(&e), round, &e))?;
        if env.run_id != self.run_id {
            return Err(failure(
                RejectReason::WrongRun,
                Some(env.round),
                format!("run {} (this run is {})", env.run_id, self.run_id),
            ));
        }
        Ok(env)
    }

    fn on_join(&mut self, payload: &[u8], wire_bytes: u64) -> Option<Event> {
        match self.decode_ours(payload) {
            Ok(Envelope {
                message: Message::Join(j),
                ..
            }) => {
                if let Err((reason, detail)) = self.authenticate(j.client.as_str(), payload) {
                    return Some(Event::Refused {
                        client: j.client.as_str().to_string(),
                        kind: "join",
                        reason,
                        detail,
                        wire_bytes,
                    });
                }
                Some(Event::Joined {
                    client: j.client,
                    info: JoinInfo {
                        num_examples: j.num_examples,
                        backbone_id: j.capabilities.backbone_id.as_str().to_string(),
                        backbone_sha256: j.capabilities.backbone_sha256,
                        peft: j.capabilities.peft,
                    },
                    wire_bytes,
                })
            }
            Ok(other) => {
                warn!(kind = %other.kind(), "ignoring a non-Join message on the join topic");
                None
            }
            Err(f) => {
                warn!(reason = %f.reason, detail = %f.detail, "ignoring an undecodable join");
                None
            }
        }
    }

    fn on_status(&mut self, client: ClientId, payload: &[u8], wire_bytes: u64) -> Option<Event> {
        if payload.is_empty() {
            // An empty retained publish clears a status: nothing to report.
            return None;
        }
        // A last will is registered at connect time with the client's run id: another run's
        // status (a retained leftover on a shared broker) says nothing about this run.
        match self.decode_ours(payload) {
            Ok(Envelope {
                message: Message::Status(s),
                ..
            }) if s.client == client => match self.authenticate(client.as_str(), payload) {
                Ok(()) => Some(Event::Status {
                    client,
                    state: s.state,
                    wire_bytes,
                }),
                Err((reason, detail)) => Some(Event::Refused {
                    client: client.as_str().to_string(),
                    kind: "status",
                    reason,
                    detail,
                    wire_bytes,
                }),
            },
            Ok(_) => {
                warn!(client = %client, "ignoring a status message that is not this client's Status");
                None
            }
            Err(f) => {
                warn!(client = %client, reason = %f.reason, detail = %f.detail,
                      "ignoring a status message");
                None
            }
        }
    }

    fn on_update(
        &mut self,
        client: ClientId,
        payload: &[u8],
        wire_bytes: u64,
        now_ms: u64,
    ) -> Option<Event> {
        let ev = |update: Result<_, DecodeFailure>, wire_bytes| Event::Update {
            topic_client: client.clone(),
            update: Box::new(update),
            wire_bytes,
            signed: false,
        };
        let env = match self.decode_ours(payload) {
            Ok(env) => env,
            Err(f) => return Some(ev(Err(f), wire_bytes)),
        };
        match env.message {
            Message::ClientUpdate(u) => Some(self.checked(&client, payload, u, wire_bytes)),
            Message::SiteAggregate(a) => Some(self.partial(&client, payload, a, wire_bytes)),
            Message::Chunk(chunk) => {
                let key = PayloadKey::of(&client, &chunk);
                let round = env.round;
                match self.reassembler.push(key.clone(), chunk, now_ms) {
                    Ok(None) => {
                        // Held: its bytes count in its payload when that completes or expires.
                        *self.partial_bytes.entry(key).or_default() += wire_bytes;
                        None
                    }
                    Ok(Some(whole)) => {
                        let total = self.partial_bytes.remove(&key).unwrap_or(0) + wire_bytes;
                        match self.decode_ours(&whole) {
                            Ok(Envelope {
                                message: Message::ClientUpdate(u),
                                ..
                            }) => Some(self.checked(&client, &whole, u, total)),
                            Ok(Envelope {
                                message: Message::SiteAggregate(a),
                                ..
                            }) => Some(self.partial(&client, &whole, a, total)),
                            Ok(Envelope {
                                message: m @ Message::SecAggMasked(_),
                                ..
                            }) => self.secure(&client, &whole, m, total).ok(),
                            Ok(other) => Some(ev(
                                Err(failure(
                                    RejectReason::Malformed,
                                    Some(other.round),
                                    format!("chunks reassemble into a {}", other.kind()),
                                )),
                                total,
                            )),
                            Err(f) => Some(ev(Err(f), total)),
                        }
                    }
                    Err(e) => {
                        let reason = reassembly_reason(&e);
                        // A refused chunk counts alone and leaves the rest of its payload in
                        // place, except a CRC mismatch, which drops the payload it completed.
                        let total = if matches!(e, ReassemblyError::CrcMismatch { .. }) {
                            self.partial_bytes.remove(&key).unwrap_or(0) + wire_bytes
                        } else {
                            wire_bytes
                        };
                        Some(ev(Err(failure(reason, Some(round), &e)), total))
                    }
                }
            }
            other => match self.secure(&client, payload, other, wire_bytes) {
                Ok(event) => Some(event),
                Err(other) => Some(ev(
                    Err(failure(
                        RejectReason::Malformed,
                        Some(env.round),
                        format!("a {} on an update topic", other.kind()),
                    )),
                    wire_bytes,
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::{ClientUpdate, Codec, DType, SplitMix64, TrainMetrics};

    use super::*;

    const RUN: u64 = 5;

    fn inbox() -> Inbox {
        Inbox::new(FleetName::new("f").unwrap(), RUN, 100_000, 1_000)
    }

    fn update_bytes(run: u64, client: &str) -> Vec<u8> {
        let mut rng = SplitMix64::new(0);
        let t = fedpeft_protocol::Tensor::encode(
            "w",
            &[64],
            &[0.25; 64],
            Codec::dense(DType::F32),
            &mut rng,
        )
        .unwrap();
        let u = ClientUpdate {
            client: ClientId::new(client).unwrap(),
            round: 3,
            sequence: 3,
            num_examples: 10,
            metrics: TrainMetrics {
                loss: 0.0,
                accuracy: 0.0,
                steps: 0,
                elapsed_ms: 0,
                epsilon: None,
            },
            tensors: vec![t],
        };
        Envelope::new(run, 3, u).encode().unwrap()
    }

    fn reason(ev: Option<Event>) -> Result<u32, (RejectReason, Option<u32>)> {
        match ev {
            Some(Event::Update { update, .. }) => match *update {
                Ok(u) => Ok(u.round),
                Err(f) => Err((f.reason, f.round)),
            },
            other => panic!("expected an update event, got {other:?}"),
        }
    }

    const TOPIC: &str = "fedpeft/v1/f/update/c1";

    #[test]
    fn a_good_update_decodes_with_its_wire_size() {
        let bytes = update_bytes(RUN, "c1");
        let ev = inbox().on_publish(TOPIC, &bytes, 0);
        let Some(Event::Update { wire_bytes, .. }) = &ev else {
            panic!("{ev:?}")
        };
        assert_eq!(*wire_bytes, wire_size(TOPIC, bytes.len(), QoS::AtLeastOnce));
        assert_eq!(reason(ev), Ok(3));
    }

    #[test]
    fn corrupted_truncated_wrong_version_and_wrong_run_payloads_map_to_reasons() {
        let good = update_bytes(RUN, "c1");
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert_eq!(
            reason(inbox().on_publish(TOPIC, &flipped, 0)),
            Err((RejectReason::BadChecksum, Some(3)))
        );
        // Truncation loses the trailing CRC: caught as a checksum mismatch or a malformed body.
        let cut = reason(inbox().on_publish(TOPIC, &good[..good.len() / 2], 0));
        assert!(
            matches!(
                cut,
                Err((RejectReason::BadChecksum | RejectReason::Malformed, _))
            ),
            "{cut:?}"
        );
        let mut v3 = good.clone();
        v3[0] = 3; // version varint (1 unsigned and 2 signed are known)
        assert!(matches!(
            reason(inbox().on_publish(TOPIC, &v3, 0)),
            Err((RejectReason::WrongVersion, _))
        ));
        assert_eq!(
            reason(inbox().on_publish(TOPIC, &update_bytes(RUN + 1, "c1"), 0)),
            Err((RejectReason::WrongRun, Some(3)))
        );
        assert_eq!(
            reason(inbox().on_publish(TOPIC, b"\x01", 0)),
            Err((RejectReason::Malformed, None))
        );
    }

    #[test]
    fn chunked_update_is_reassembled_and_incomplete_one_expires() {
        let whole = update_bytes(RUN, "c1");
        let parts = fedpeft_protocol::chunk::split(&whole, 200, RUN, 3, 9).unwrap();
        assert!(parts.len() > 1);
        let mut ib = inbox();
        let mut total = 0;
        let mut last = None;
        for p in &parts {
            total += wire_size(TOPIC, p.len(), QoS::AtLeastOnce);
            last = ib.on_publish(TOPIC, p, 10);
        }
        let Some(Event::Update { wire_bytes, .. }) = &last else {
            panic!("{last:?}")
        };
        assert_eq!(*wire_bytes, total);
        assert_eq!(reason(last), Ok(3));
        // Only the first chunk of another copy: dropped as incomplete after the timeout.
        assert!(ib.on_publish(TOPIC, &parts[0], 20).is_none());
        assert!(ib.expire(500).is_empty());
        let expired = ib.expire(1_020);
        assert_eq!(expired.len(), 1);
        assert!(matches!(
            reason(expired.into_iter().next()),
            Err((RejectReason::Incomplete, None))
        ));
    }

    #[test]
    fn the_reassembly_limits_are_the_configured_ones() {
        let topic = |c: &str| format!("fedpeft/v1/f/update/{c}");
        let first_chunk = |c: &str| {
            let whole = update_bytes(RUN, c);
            fedpeft_protocol::chunk::split(&whole, 200, RUN, 3, 9).unwrap()[0].clone()
        };
        // The default: 64 chunked updates at once.
        let mut ib = inbox();
        for i in 0..64 {
            let c = format!("c{i}");
            assert!(
                ib.on_publish(&topic(&c), &first_chunk(&c), 0).is_none(),
                "{c}"
            );
        }
        assert!(matches!(
            reason(ib.on_publish(&topic("c64"), &first_chunk("c64"), 0)),
            Err((RejectReason::Oversized, _))
        ));
        // Configured: two.
        let mut ib = inbox().with_reassembly(2, 1 << 20);
        for c in ["a", "b"] {
            assert!(
                ib.on_publish(&topic(c), &first_chunk(c), 0).is_none(),
                "{c}"
            );
        }
        assert!(matches!(
            reason(ib.on_publish(&topic("c"), &first_chunk("c"), 0)),
            Err((RejectReason::Oversized, _))
        ));
    }

    #[test]
    fn a_refused_or_stray_chunk_counts_alone_not_in_the_payload_that_shares_its_id() {
        let whole = update_bytes(RUN, "c1");
        let parts = fedpeft_protocol::chunk::split(&whole, 200, RUN, 3, 9).unwrap();
        let size = |p: &[u8]| wire_size(TOPIC, p.len(), QoS::AtLeastOnce);
        let forged = |count, crc32, data: Vec<u8>| {
            let c = Chunk {
                message_id: 9,
                index: 0,
                count,
                total_len: 10,
                crc32,
                data,
            };
            Envelope::new(RUN, 3, c).encode().unwrap()
        };
        let mut ib = inbox();
        // Refused (no chunks): counted in its own event. Held as a stray (another claim).
        let refused = forged(0, 0, vec![0; 1000]);
        let ev = ib.on_publish(TOPIC, &refused, 0);
        assert!(
            matches!(ev, Some(Event::Update { wire_bytes, .. }) if wire_bytes == size(&refused))
        );
        assert!(ib.on_publish(TOPIC, &forged(2, 1, vec![0; 5]), 0).is_none());
        // A redelivered chunk of the real payload: refused, counted alone.
        assert!(ib.on_publish(TOPIC, &parts[0], 1).is_none());
        let ev = ib.on_publish(TOPIC, &parts[0], 1);
        assert!(
            matches!(ev, Some(Event::Update { wire_bytes, .. }) if wire_bytes == size(&parts[0]))
        );
        let mut last = None;
        for p in &parts[1..] {
            last = ib.on_publish(TOPIC, p, 2);
        }
        let Some(Event::Update { wire_bytes, .. }) = &last else {
            panic!("{last:?}")
        };
        assert_eq!(*wire_bytes, parts.iter().map(|p| size(p)).sum::<u64>());
        assert_eq!(reason(last), Ok(3));
    }

    #[test]
    fn foreign_topics_are_ignored() {
        let bytes = update_bytes(RUN, "c1");
        assert!(
            inbox()
                .on_publish("fedpeft/v1/other/update/c1", &bytes, 0)
                .is_none()
        );
        assert!(inbox().on_publish("elsewhere/x", &bytes, 0).is_none());
    }
}
