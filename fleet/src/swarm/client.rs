//! One virtual client: a real MQTT session that behaves as an edge client does on the wire.
//!
//! On every (re)connect: CONNECT with a persistent session and the last will (Status offline,
//! retained), SUBSCRIBE to the edge client's four filters (`global/#`, `round`, `secagg`, its
//! own `inbox/{id}`), Status online (retained), Join. It holds the newest global adapter of the
//! run and trains round r only when sampled in r's announcement and holding an adapter from
//! before r, at most once per round; "training" is an optional deterministic delay, then the
//! update (chunked above the packet budget, QoS 1) goes out. A bad client first sends its bad
//! input, then its honest update. On "run done" (or a stop): Status offline, DISCONNECT.
//! A lost connection is counted and reconnected with backoff; an honest update not fully
//! acknowledged before the loss is published again while its round is still announced (the
//! aggregator refuses a copy it already has as a duplicate).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fedpeft_protocol::mqtt::{MqttVersion, publish_wire_size};
use fedpeft_protocol::{
    Capabilities, ClientId, ClientState, ClientUpdate, DType, Envelope, FleetName, Join, Status,
    Tensor, TopicKind, TrainMetrics, Values, keyed_unit,
};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::mqtt::{self, Out};
use super::shared::{BadKind, Claim, Counters, Incoming, Shared, Source};
use super::template::{JoinFacts, VariantKey, Variants, dtype_code, num_examples, pick};

/// Purposes of the keyed draws (see [`keyed_unit`]).
const BAD_PURPOSE: u64 = 0x5_bad0;
const BAD_KIND_PURPOSE: u64 = 0x5_bad1;
const TRAIN_PURPOSE: u64 = 0x5_7a17;

/// What every session needs, fixed for the run.
#[derive(Debug)]
pub struct Settings {
    pub fleet: FleetName,
    pub run_id: u64,
    pub broker: SocketAddr,
    pub binds: Vec<IpAddr>,
    pub prefix: String,
    /// Digits of the zero-padded client index.
    pub width: usize,
    pub first_index: u64,
    pub clients: u64,
    pub keep_alive: Duration,
    pub clean_session: bool,
    /// Largest packet accepted and sent.
    pub max_packet_bytes: usize,
    /// Update payloads above this (with MQTT framing) are chunked.
    pub chunk_bytes: usize,
    /// Local "training": a delay uniform in [0, train_ms) per client and round.
    pub train_ms: u64,
    /// The dtype of updates; `None`: the announced one.
    pub dtype: Option<DType>,
    pub seed: u64,
    pub bad_fraction: f64,
    /// The aggregator's `max_update_bytes` (sizes the oversized bad updates).
    pub max_update_bytes: usize,
    pub variants: Vec<Variants>,
    pub join: JoinFacts,
}

impl Settings {
    pub fn client_id(&self, index: u64) -> String {
        format!("{}-{index:0width$}", self.prefix, width = self.width)
    }

    fn variants(&self, dtype: DType) -> Option<&Variants> {
        self.variants.iter().find(|v| v.dtype == dtype)
    }

    /// Which bad input client `index` sends, if it is a bad client.
    pub fn bad_kind(&self, index: u64) -> Option<BadKind> {
        if keyed_unit(self.seed, BAD_PURPOSE, index, 0) >= self.bad_fraction {
            return None;
        }
        let u = keyed_unit(self.seed, BAD_KIND_PURPOSE, index, 0);
        Some(BadKind::ALL[((u * 4.0) as usize).min(3)])
    }

    fn topic(&self, kind: TopicKind) -> String {
        fedpeft_protocol::Topic::new(self.fleet.clone(), kind).to_string()
    }

    /// Largest payload that fits one packet of `chunk_bytes` on `topic` (as the edge client
    /// reserves the largest remaining-length varint).
    fn budget(&self, topic: &str) -> usize {
        let framing = publish_wire_size(
            topic.len(),
            0,
            fedpeft_protocol::QoS::AtLeastOnce,
            MqttVersion::V311,
        )
        .unwrap_or(0);
        self.chunk_bytes.saturating_sub(framing + 3)
    }

    /// The update client `index` sends for `round` (its envelope, before chunking), labelled
    /// `label_round` (the round it claims; differs only for wrong-round input), and what it is
    /// made of.
    pub fn update(
        &self,
        index: u64,
        round: u32,
        label_round: u32,
        dtype: DType,
        extra: Option<Tensor>,
    ) -> Option<(Vec<u8>, VariantKey, u64)> {
        let variants = self.variants(dtype)?;
        let (k, e) = pick(self.seed, index, round, variants.sets.len());
        let mut tensors = variants.tensors(k, e);
        tensors.extend(extra);
        let examples = num_examples(self.seed, index);
        let u = ClientUpdate {
            client: ClientId::new(&self.client_id(index)).ok()?,
            round: label_round,
            sequence: label_round,
            num_examples: examples,
            metrics: TrainMetrics {
                loss: 0.5,
                accuracy: 0.8,
                steps: 16,
                elapsed_ms: 1000,
                epsilon: None,
            },
            tensors,
        };
        let bytes = Envelope::new(self.run_id, label_round, u).encode().ok()?;
        Some((bytes, (dtype_code(dtype), k, e), examples))
    }

    /// `payload` as the packets to publish on `topic`: itself, or its chunks.
    fn packets(&self, topic: &str, payload: Vec<u8>, round: u32, message_id: u32) -> Vec<Bytes> {
        let budget = self.budget(topic);
        if payload.len() <= budget {
            return vec![Bytes::from(payload)];
        }
        match fedpeft_protocol::chunk::split(&payload, budget, self.run_id, round, message_id) {
            Ok(parts) => parts.into_iter().map(Bytes::from).collect(),
            Err(_) => vec![Bytes::from(payload)],
        }
    }

    /// Message ids: one per (round, purpose), so a replay can rebuild another client's chunks.
    fn message_id(round: u32, purpose: u32) -> u32 {
        round.wrapping_mul(4).wrapping_add(purpose)
    }

    /// The bad input of `kind` client `index` sends in `round`, as packets on its own topic.
    pub fn bad_packets(
        &self,
        kind: BadKind,
        index: u64,
        round: u32,
        dtype: DType,
        topic: &str,
    ) -> Vec<Bytes> {
        match kind {
            BadKind::Garbage => {
                let mut out = vec![1u8];
                leb128(&mut out, self.run_id);
                leb128(&mut out, u64::from(round));
                out.push(4);
                let mut rng = fedpeft_protocol::SplitMix64::new(
                    self.seed ^ index.rotate_left(17) ^ u64::from(round),
                );
                out.extend((0..512).map(|_| rng.next_u64() as u8));
                // A checksum that cannot match.
                let crc = fedpeft_protocol::crc32(&out) ^ 0xdead_beef;
                out.extend_from_slice(&crc.to_le_bytes());
                vec![Bytes::from(out)]
            }
            BadKind::Replay => {
                // The next honest client's update of this round, byte for byte.
                let other = (1..self.clients)
                    .map(|d| self.first_index + (index - self.first_index + d) % self.clients)
                    .find(|&j| self.bad_kind(j).is_none())
                    .unwrap_or(index);
                let Some((bytes, ..)) = self.update(other, round, round, dtype, None) else {
                    return Vec::new();
                };
                self.packets(topic, bytes, round, Self::message_id(round, 0))
            }
            BadKind::WrongRound => {
                let Some((bytes, ..)) = self.update(index, round + 1, round + 1, dtype, None)
                else {
                    return Vec::new();
                };
                self.packets(topic, bytes, round + 1, Self::message_id(round, 1))
            }
            BadKind::Oversized => {
                let Some(bytes) = self.oversized(index, round, dtype) else {
                    return Vec::new();
                };
                // One packet when the broker takes it (the aggregator then sees one oversized
                // update), else chunks.
                let framing = publish_wire_size(
                    topic.len(),
                    bytes.len(),
                    fedpeft_protocol::QoS::AtLeastOnce,
                    MqttVersion::V311,
                )
                .unwrap_or(usize::MAX);
                if framing <= self.max_packet_bytes {
                    vec![Bytes::from(bytes)]
                } else {
                    self.packets(topic, bytes, round, Self::message_id(round, 2))
                }
            }
        }
    }

    /// An update of exactly `max_update_bytes` (a zero int8 `pad` tensor makes up the size):
    /// within the reassembly limit, above `max_update_bytes` on the wire.
    fn oversized(&self, index: u64, round: u32, dtype: DType) -> Option<Vec<u8>> {
        let target = self.max_update_bytes;
        let mut n = target.saturating_sub(self.update(index, round, round, dtype, None)?.0.len());
        let mut best = None;
        for _ in 0..8 {
            let pad = Tensor::dense(
                "pad",
                &[u32::try_from(n.max(1)).ok()?],
                Values::I8 {
                    scale: 0.0,
                    values: vec![0; n.max(1)],
                },
            )
            .ok()?;
            let (bytes, ..) = self.update(index, round, round, dtype, Some(pad))?;
            if bytes.len() == target {
                return Some(bytes);
            }
            if bytes.len() < target {
                n += target - bytes.len();
                best = Some(bytes);
            } else {
                n = n.saturating_sub(bytes.len() - target);
            }
        }
        best
    }
}

fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Everything a session task shares with the rest of the swarm.
#[derive(Debug)]
pub struct Ctx {
    pub settings: Settings,
    pub shared: Shared,
    /// Becomes true when the swarm stops (signal, timeout): every session says goodbye.
    pub stop: watch::Receiver<bool>,
}

/// One client's fixed facts.
struct Me {
    index: u64,
    id: String,
    update_topic: String,
    status_topic: String,
    round_topic: String,
    global_topic: String,
    global_prefix: String,
    connect: Bytes,
    online: Bytes,
    offline: Bytes,
    join: Bytes,
    subscriptions: Vec<String>,
    examples: u64,
    bad: Option<BadKind>,
}

impl Me {
    fn new(s: &Settings, index: u64) -> Option<Me> {
        let id = s.client_id(index);
        let cid = ClientId::new(&id).ok()?;
        let status = |state| {
            Envelope::new(
                s.run_id,
                0,
                Status {
                    client: cid.clone(),
                    state,
                },
            )
            .encode()
            .ok()
            .map(Bytes::from)
        };
        let offline = status(ClientState::Offline)?;
        let examples = num_examples(s.seed, index);
        let join = Join {
            client: cid.clone(),
            capabilities: Capabilities {
                backbone_id: heapless::String::try_from(s.join.backbone_id.as_str())
                    .unwrap_or_default(),
                backbone_sha256: s.join.backbone_sha256,
                peft: s.join.peft,
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32, DType::F16, DType::I8])
                    .unwrap_or_default(),
                max_packet_size: u32::try_from(s.max_packet_bytes).unwrap_or(u32::MAX),
            },
            num_examples: examples,
        };
        let status_topic = s.topic(TopicKind::Status(cid.clone()));
        let global_topic = s.topic(TopicKind::Global);
        Some(Me {
            index,
            update_topic: s.topic(TopicKind::Update(cid.clone())),
            round_topic: s.topic(TopicKind::Round),
            global_prefix: format!("{global_topic}/"),
            connect: mqtt::connect(&id, s.keep_alive, s.clean_session, &status_topic, &offline),
            online: status(ClientState::Online)?,
            offline,
            join: Bytes::from(Envelope::new(s.run_id, 0, join).encode().ok()?),
            subscriptions: vec![
                fedpeft_protocol::topic::filter::global(&s.fleet).to_string(),
                s.topic(TopicKind::Round),
                s.topic(TopicKind::SecAgg),
                s.topic(TopicKind::Inbox(cid)),
            ],
            status_topic,
            global_topic,
            examples,
            bad: s.bad_kind(index),
            id,
        })
    }
}

/// An honest update waiting for its PUBACKs.
#[derive(Debug, Clone)]
struct Pending {
    round: u32,
    key: VariantKey,
    pkids: Vec<u16>,
}

/// What a session remembers across reconnections.
#[derive(Debug, Default)]
struct State {
    announce: Option<Arc<super::shared::Announce>>,
    adapter_round: Option<u32>,
    /// The chunked global adapter being received: its claim and the indices seen.
    chunks: Option<(Claim, Vec<u64>, u32)>,
    last_started: Option<u32>,
    send_at: Option<(u32, Instant)>,
    pending: Option<Pending>,
    next_pkid: u16,
    ever_connected: bool,
    finished: bool,
    /// Rounds whose announcement / global adapter this session counted.
    seen_announce: Option<u32>,
    seen_global: Option<u32>,
    /// Consecutive connections broken by an incoming packet above the limit.
    oversized_strikes: u32,
}

impl State {
    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1);
        if self.next_pkid == 0 {
            self.next_pkid = 1;
        }
        self.next_pkid
    }
}

/// How a connection ended.
enum Ended {
    /// The run is over for this client (run done, stop, or it gave up).
    Done,
    Lost(String),
}

/// Runs client `index` until the run is done or the swarm stops. Its first connection is
/// attempted at `start`.
pub async fn run(ctx: Arc<Ctx>, index: u64, start: Instant) {
    let s = &ctx.settings;
    let Some(me) = Me::new(s, index) else {
        ctx.shared
            .error("client_id", || format!("cannot build client {index}"));
        Counters::bump(&ctx.shared.counters.finished);
        return;
    };
    let mut stop = ctx.stop.clone();
    tokio::select! {
        _ = tokio::time::sleep_until(start) => {}
        _ = stop.wait_for(|s| *s) => {
            Counters::bump(&ctx.shared.counters.finished);
            return;
        }
    }
    let mut st = State::default();
    let mut attempt: u32 = 0;
    let bind = (!s.binds.is_empty()).then(|| s.binds[(index as usize) % s.binds.len()]);
    loop {
        if *ctx.stop.borrow() {
            break;
        }
        match mqtt::dial(s.broker, bind, Duration::from_secs(10)).await {
            Ok(stream) => match session(&ctx, &me, &mut st, stream).await {
                Ended::Done => break,
                Ended::Lost(reason) => {
                    Counters::bump(&ctx.shared.counters.disconnects);
                    ctx.shared
                        .error("disconnect", || format!("{}: {reason}", me.id));
                }
            },
            Err(e) => {
                Counters::bump(&ctx.shared.counters.connect_failures);
                ctx.shared.error("connect", || format!("{}: {e}", me.id));
            }
        }
        if st.oversized_strikes >= 5 {
            Counters::bump(&ctx.shared.counters.gave_up);
            break;
        }
        // The run is over (other sessions saw "run done"): nothing to come back for, and the
        // broker may be gone with the aggregator.
        if Counters::get(&ctx.shared.counters.run_done) > 0 {
            break;
        }
        attempt = attempt.saturating_add(1);
        let backoff = Duration::from_millis(
            (250u64 << attempt.min(5)).min(5_000)
                + (keyed_unit(s.seed, 0x5_ba0c, index, u64::from(attempt)) * 1000.0) as u64,
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    Counters::bump(&ctx.shared.counters.finished);
}

/// One connection: from CONNECT to its end.
async fn session(ctx: &Ctx, me: &Me, st: &mut State, stream: tokio::net::TcpStream) -> Ended {
    let s = &ctx.settings;
    let (mut reader, writer) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(mqtt::writer(writer, rx, s.keep_alive));
    let _ = tx.send(Out::Frame(me.connect.clone()));
    let mut conn = Conn {
        ctx,
        me,
        tx,
        connected: false,
    };
    let mut stop = ctx.stop.clone();
    let mut buf = BytesMut::with_capacity(2048);
    let connack_by = Instant::now() + Duration::from_secs(30);
    let ended = loop {
        // Every complete packet in the buffer.
        let flow = loop {
            match Packet::read(&mut buf, s.max_packet_bytes) {
                Ok(packet) => {
                    if let Some(end) = conn.on_packet(st, packet) {
                        break Some(end);
                    }
                }
                Err(MqttError::InsufficientBytes(n)) => {
                    buf.reserve(n);
                    break None;
                }
                Err(MqttError::PayloadSizeLimitExceeded(n)) => {
                    st.oversized_strikes += 1;
                    Counters::bump(&ctx.shared.counters.oversized_incoming);
                    ctx.shared.error("oversized_incoming", || {
                        format!(
                            "{}: a {n}-byte packet is above --max-packet-bytes {}",
                            me.id, s.max_packet_bytes
                        )
                    });
                    break Some(Ended::Lost(format!("incoming packet of {n} bytes")));
                }
                Err(e) => break Some(Ended::Lost(format!("MQTT: {e}"))),
            }
        };
        if let Some(end) = flow {
            break end;
        }
        if st.finished {
            conn.goodbye(st);
            break Ended::Done;
        }
        // Keep idle sessions small: drop the buffer a large packet grew.
        if buf.is_empty() && buf.capacity() > 64 << 10 {
            buf = BytesMut::with_capacity(2048);
        }
        let send_at = st.send_at.map(|(_, t)| t);
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => break Ended::Lost("the broker closed the connection".into()),
                Ok(_) => {}
                Err(e) => break Ended::Lost(e.to_string()),
            },
            _ = tokio::time::sleep_until(send_at.unwrap_or(connack_by)), if send_at.is_some() => {
                conn.send_update(st);
            }
            _ = tokio::time::sleep_until(connack_by), if !conn.connected => {
                break Ended::Lost("no CONNACK within 30 s".into());
            }
            _ = stop.wait_for(|s| *s) => {
                conn.goodbye(st);
                break Ended::Done;
            }
        }
    };
    if conn.connected {
        ctx.shared
            .counters
            .connected_now
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
    match &ended {
        Ended::Done => {
            drop(conn);
            let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
        }
        Ended::Lost(_) => writer.abort(),
    }
    ended
}

/// A live connection's sending side.
struct Conn<'a> {
    ctx: &'a Ctx,
    me: &'a Me,
    tx: mpsc::UnboundedSender<Out>,
    connected: bool,
}

impl Conn<'_> {
    fn frame(&self, frame: Bytes) {
        let _ = self.tx.send(Out::Frame(frame));
    }

    fn publish(&self, st: &mut State, topic: &str, payload: Bytes, retain: bool) -> u16 {
        let pkid = st.pkid();
        self.frame(mqtt::publish(topic, payload, retain, pkid));
        pkid
    }

    /// Status offline (a clean DISCONNECT suppresses the last will), then DISCONNECT.
    fn goodbye(&mut self, st: &mut State) {
        if self.connected {
            self.publish(st, &self.me.status_topic, self.me.offline.clone(), true);
        }
        let _ = self.tx.send(Out::Disconnect);
    }

    fn on_packet(&mut self, st: &mut State, packet: Packet) -> Option<Ended> {
        let shared = &self.ctx.shared;
        match packet {
            Packet::ConnAck(ack) => {
                if ack.code != ConnectReturnCode::Success {
                    Counters::bump(&shared.counters.refused);
                    return Some(Ended::Lost(format!("CONNACK {:?}", ack.code)));
                }
                self.connected = true;
                st.oversized_strikes = 0;
                Counters::bump(&shared.counters.connected_now);
                if !std::mem::replace(&mut st.ever_connected, true) {
                    Counters::bump(&shared.counters.ever_connected);
                }
                let mut sub = Subscribe::new_many(
                    self.me
                        .subscriptions
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
                );
                sub.pkid = st.pkid();
                self.frame(mqtt::frame(&Packet::Subscribe(sub)));
                self.publish(st, &self.me.status_topic, self.me.online.clone(), true);
                self.publish(
                    st,
                    &self.ctx.settings.topic(TopicKind::Join),
                    self.me.join.clone(),
                    false,
                );
                Counters::bump(&shared.counters.joins_sent);
                // An update the broker never acknowledged goes again while its round is open.
                if let Some(p) = st.pending.clone()
                    && st.announce.as_ref().is_some_and(|a| a.round == p.round)
                {
                    Counters::bump(&shared.counters.updates_resent);
                    st.pending = None;
                    self.send_honest(st, p.round);
                }
                None
            }
            Packet::Publish(p) => {
                if p.qos != QoS::AtMostOnce {
                    self.frame(mqtt::puback(p.pkid));
                }
                if p.payload.is_empty() {
                    return None; // a cleared retained topic
                }
                let source = if p.topic == self.me.round_topic {
                    Source::Round
                } else if p.topic == self.me.global_topic {
                    Source::Global
                } else if p.topic.starts_with(&self.me.global_prefix) {
                    Source::GlobalChunk
                } else {
                    return None;
                };
                match shared.decode(source, &p.payload) {
                    Incoming::Announce(a) => self.on_announce(st, a),
                    Incoming::Global(g) => self.on_adapter(st, g.round),
                    Incoming::Chunk { claim, index } => self.on_chunk(st, claim, index),
                    Incoming::Foreign => {}
                    Incoming::Undecodable(e) => {
                        Counters::bump(&shared.counters.decode_errors);
                        shared.error("decode", || format!("{}: {}: {e}", self.me.id, p.topic));
                    }
                }
                None
            }
            Packet::PubAck(ack) => {
                if let Some(p) = &mut st.pending {
                    p.pkids.retain(|&id| id != ack.pkid);
                    if p.pkids.is_empty() {
                        shared.acknowledged(p.round, p.key, self.me.examples);
                        st.pending = None;
                    }
                }
                None
            }
            _ => None,
        }
    }

    fn on_announce(&mut self, st: &mut State, a: Arc<super::shared::Announce>) {
        if a.run_done {
            if !st.finished {
                Counters::bump(&self.ctx.shared.counters.run_done);
            }
            st.finished = true;
            return;
        }
        if let Some(current) = &st.announce
            && a.round < current.round
        {
            return; // stale
        }
        if st.seen_announce != Some(a.round) {
            st.seen_announce = Some(a.round);
            self.ctx.shared.saw_announce(&a);
        }
        st.announce = Some(a);
        self.maybe_train(st);
    }

    fn on_adapter(&mut self, st: &mut State, round: u32) {
        if st.adapter_round.is_some_and(|held| round < held) {
            return; // stale
        }
        if st.seen_global != Some(round) {
            st.seen_global = Some(round);
            self.ctx.shared.saw_global(round);
        }
        st.adapter_round = Some(round);
        self.maybe_train(st);
    }

    fn on_chunk(&mut self, st: &mut State, claim: Claim, index: u32) {
        if claim.count == 0 || index >= claim.count {
            return;
        }
        if st.chunks.as_ref().is_none_or(|(c, ..)| *c != claim) {
            st.chunks = Some((claim, vec![0; (claim.count as usize).div_ceil(64)], 0));
        }
        let Some((_, seen, got)) = &mut st.chunks else {
            return;
        };
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if seen[word] & bit == 0 {
            seen[word] |= bit;
            *got += 1;
        }
        if *got == claim.count {
            st.chunks = None;
            if let Some(g) = self.ctx.shared.completed(&claim) {
                self.on_adapter(st, g.round);
            }
        }
    }

    fn maybe_train(&mut self, st: &mut State) {
        let s = &self.ctx.settings;
        let Some(a) = &st.announce else { return };
        if st.send_at.is_some() || st.last_started.is_some_and(|r| r >= a.round) {
            return;
        }
        if !a.samples(&self.me.id) || st.adapter_round.is_none_or(|r| r >= a.round) {
            return;
        }
        st.last_started = Some(a.round);
        let delay = (s.train_ms as f64
            * keyed_unit(s.seed, TRAIN_PURPOSE, self.me.index, u64::from(a.round)))
            as u64;
        st.send_at = Some((a.round, Instant::now() + Duration::from_millis(delay)));
    }

    /// Training is over: the bad input (a bad client's), then the honest update.
    fn send_update(&mut self, st: &mut State) {
        let Some((round, _)) = st.send_at.take() else {
            return;
        };
        if st.announce.as_ref().is_none_or(|a| a.round != round) {
            return; // the round moved on while "training"
        }
        if let Some(kind) = self.me.bad {
            let dtype = self.dtype(st);
            let packets = self.ctx.settings.bad_packets(
                kind,
                self.me.index,
                round,
                dtype,
                &self.me.update_topic,
            );
            if !packets.is_empty() {
                for p in packets {
                    self.publish(st, &self.me.update_topic, p, false);
                }
                self.ctx.shared.sent_bad(round, kind);
            }
        }
        self.send_honest(st, round);
    }

    fn dtype(&self, st: &State) -> DType {
        let s = &self.ctx.settings;
        let announced = st.announce.as_ref().map_or(DType::F32, |a| a.update_dtype);
        let d = s.dtype.unwrap_or(announced);
        if s.variants(d).is_some() {
            d
        } else {
            DType::F32
        }
    }

    fn send_honest(&mut self, st: &mut State, round: u32) {
        let s = &self.ctx.settings;
        let dtype = self.dtype(st);
        let Some((bytes, key, _)) = s.update(self.me.index, round, round, dtype, None) else {
            self.ctx.shared.error("encode", || {
                format!("{}: update of round {round}", self.me.id)
            });
            return;
        };
        let packets = s.packets(
            &self.me.update_topic,
            bytes,
            round,
            Settings::message_id(round, 0),
        );
        let pkids = packets
            .into_iter()
            .map(|p| self.publish(st, &self.me.update_topic, p, false))
            .collect();
        st.pending = Some(Pending { round, key, pkids });
        self.ctx.shared.sent(round);
    }
}

#[cfg(test)]
mod tests {
    use super::super::template::{JoinFacts, Template, TemplateTensor};
    use super::*;
    use fedpeft_protocol::{Message, PeftMethod};

    fn settings(bad_fraction: f64, max_update_bytes: usize) -> Settings {
        let t = Template {
            origin: "test".into(),
            tensors: vec![TemplateTensor {
                name: "w".into(),
                shape: vec![100, 30],
                values: (0..3000).map(|i| (i as f32).sin() * 1e-3).collect(),
            }],
            join: JoinFacts {
                backbone_id: "b".into(),
                backbone_sha256: [1; 32],
                peft: PeftMethod::Lora {
                    rank: 8,
                    alpha: 16.0,
                },
            },
        };
        Settings {
            fleet: FleetName::new("f").unwrap(),
            run_id: 9,
            broker: "127.0.0.1:1".parse().unwrap(),
            binds: vec![],
            prefix: "sw".into(),
            width: 5,
            first_index: 0,
            clients: 100,
            keep_alive: Duration::from_secs(60),
            clean_session: false,
            max_packet_bytes: 1 << 20,
            chunk_bytes: 4096,
            train_ms: 0,
            dtype: None,
            seed: 3,
            bad_fraction,
            max_update_bytes,
            variants: vec![
                Variants::build(&t, DType::F32, 4, 0.1, 3).unwrap(),
                Variants::build(&t, DType::I8, 4, 0.1, 3).unwrap(),
            ],
            join: t.join.clone(),
        }
    }

    #[test]
    fn about_the_bad_fraction_of_clients_is_bad_with_every_kind() {
        let s = settings(0.1, 1 << 20);
        let bad: Vec<BadKind> = (0..2000).filter_map(|i| s.bad_kind(i)).collect();
        assert!((150..250).contains(&bad.len()), "{}", bad.len());
        for k in BadKind::ALL {
            assert!(bad.contains(&k));
        }
        assert!((0..100).all(|i| settings(0.0, 1).bad_kind(i).is_none()));
    }

    #[test]
    fn bad_inputs_decode_as_what_they_claim() {
        let s = settings(0.5, 20_000);
        let topic = "fedpeft/v1/f/update/sw-00003";
        let whole = |packets: Vec<Bytes>| -> Vec<u8> {
            let mut r = fedpeft_protocol::Reassembler::new(Default::default());
            let mut out = None;
            for p in &packets {
                match Envelope::decode(p).unwrap().message {
                    Message::Chunk(c) => out = r.push(0u8, c, 0).unwrap(),
                    _ => out = Some(p.to_vec()),
                }
            }
            out.unwrap()
        };
        let garbage = s.bad_packets(BadKind::Garbage, 3, 2, DType::F32, topic);
        assert!(matches!(
            Envelope::decode(&garbage[0]),
            Err(fedpeft_protocol::DecodeError::CrcMismatch { .. })
        ));
        let replay = whole(s.bad_packets(BadKind::Replay, 3, 2, DType::F32, topic));
        let Message::ClientUpdate(u) = Envelope::decode(&replay).unwrap().message else {
            panic!()
        };
        assert_ne!(u.client.as_str(), "sw-00003");
        assert_eq!(u.round, 2);
        let wrong = whole(s.bad_packets(BadKind::WrongRound, 3, 2, DType::I8, topic));
        let Message::ClientUpdate(u) = Envelope::decode(&wrong).unwrap().message else {
            panic!()
        };
        assert_eq!((u.client.as_str(), u.round), ("sw-00003", 3));
        let big = s.bad_packets(BadKind::Oversized, 3, 2, DType::F32, topic);
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].len(), 20_000);
        let honest = s.update(3, 2, 2, DType::F32, None).unwrap().0;
        assert!(honest.len() < 20_000);
        // Chunked under the budget, and reassembled to the same bytes.
        let packets = s.packets(topic, honest.clone(), 2, 8);
        assert!(packets.len() > 1 && packets.iter().all(|p| p.len() < 4096));
        assert_eq!(whole(packets), honest);
    }
}
