//! Forged, truncated, replayed and copied messages among an honest fleet's updates, fed through
//! the real decoding path (`Inbox::on_publish` → `RoundMachine::on_event`), as issue 19 lists
//! them.
//!
//! The property: a refused message changes no client's state, nor anybody else's. Each attacker
//! message leaves the machine as it was but for the rejection counters, and is counted when the
//! inbox refuses it; every honest message is taken (a chunk held, an update accepted) in the
//! round it was sent for; and every round's accepted clients and new global adapter are, bit for
//! bit, those of the same run without the attacker.
//!
//! What the attacker here does not do, and why:
//! - flood. It sends at most [`MAX_FORGED_PER_ROUND`] messages a round, so the stray payloads
//!   its chunks start (at most 36 over a run, none above 512 bytes) stay below the inbox's
//!   reassembly limits: 64 payloads in flight, 4 × `max_update_bytes` (64 KiB) reserved. Past those limits
//!   new chunked updates are refused until the strays expire: a denial of service that only the
//!   broker's ACL prevents.
//! - nothing else is held back: copies and alterations of chunks whose claim (message id,
//!   count, total length, CRC-32C) is that of a real payload's slot still to come are sent
//!   too, before the real chunk. The reassembler keeps a differing copy of a filled slot as an
//!   alternate and tries the payload with them when it fails its digest (the tests at the
//!   end show the three ways such a chunk comes about).
//! - replay a message before the aggregator received the original: a bit-identical copy that
//!   arrives first *is* the original, as far as anyone can tell.
//! - send an update of its own making: on an unsigned fleet nothing tells it from the client's.

use std::collections::{BTreeMap, BTreeSet};

use fedpeft_aggregator::adapter::Adapter;
use fedpeft_aggregator::keys::Enrolment;
use fedpeft_aggregator::outbox::Outgoing;
use fedpeft_aggregator::round::{
    Action, Event, MachineState, Phase, QuorumFailure, RejectReason, RoundMachine, RoundStatus,
    Rules, RunSettings,
};
use fedpeft_aggregator::strategy::{self, StrategyKind};
use fedpeft_aggregator::wire::Inbox;
use fedpeft_peft::NamedTensor;
use fedpeft_protocol::{
    Capabilities, Chunk, ClientId, ClientUpdate, Codec, DType, Envelope, FleetName, Join,
    LocalConfig, Message, Optimizer, PeftMethod, Sampling, SigningKey, SplitMix64, TrainMetrics,
};
use proptest::prelude::*;
use proptest::sample::Index;

const RUN: u64 = 19;
const FLEET: &str = "forgery";
const ROUNDS: u32 = 3;
const T0: u64 = 1_700_000_000_000;
/// Only replies close rounds: no deadline passes during a test.
const ROUND_TIMEOUT_MS: u64 = 1_000_000_000;
const MAX_UPDATE_BYTES: u64 = 16_384;
/// Values of the adapter's `w` tensor.
const W_LEN: usize = 32;
/// See the module comment: above this, forged chunks would reach the reassembly limits.
const MAX_FORGED_PER_ROUND: usize = 12;

/// The fleet: name, training examples, and the payload budget above which its updates are
/// chunked. c0 and c1 share a packet limit, as clients of one fleet do, so their chunks carry
/// the same claims; c2 cuts its updates in fewer pieces; c3 sends them whole.
const CLIENTS: [(&str, u64, usize); 4] = [
    ("c0", 10, 100),
    ("c1", 20, 100),
    ("c2", 30, 160),
    ("c3", 40, usize::MAX),
];

fn fleet_name() -> FleetName {
    FleetName::new(FLEET).unwrap()
}

fn client_id(c: usize) -> ClientId {
    ClientId::new(CLIENTS[c].0).unwrap()
}

fn update_topic(c: usize) -> String {
    format!("fedpeft/v1/{FLEET}/update/{}", CLIENTS[c].0)
}

fn join_topic() -> String {
    format!("fedpeft/v1/{FLEET}/join")
}

fn rules() -> Rules {
    Rules {
        run: RunSettings {
            run_id: RUN,
            fleet: fleet_name(),
            rounds: ROUNDS,
            min_clients: CLIENTS.len(),
            start_clients: CLIENTS.len(),
            fraction: 1.0,
            quorum: CLIENTS.len(),
            round_timeout_ms: ROUND_TIMEOUT_MS,
            on_quorum_failure: QuorumFailure::Skip,
            seed: 42,
            local: LocalConfig {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.1,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                fedprox_mu: 0.0,
                dp_sgd: None,
                update_dtype: DType::F32,
                top_k_fraction: None,
                seed: 0,
            },
            max_update_bytes: MAX_UPDATE_BYTES,
            max_update_norm: None,
            adaptive_norm_multiple: None,
            global_dtype: DType::F32,
            secure: None,
            site: None,
            buffered: None,
        },
        dp_sample_rate: None,
        backbone_params: 1000,
        checkpoint_every_update: false,
        backbone_id: Some("bb".into()),
        backbone_sha256: None,
        peft: Some(PeftMethod::Head),
    }
}

fn initial() -> Adapter {
    Adapter::new(vec![
        NamedTensor::new("w", vec![W_LEN], vec![0.25; W_LEN]).unwrap(),
        NamedTensor::new("b", vec![1], vec![-0.5]).unwrap(),
    ])
}

/// One message an honest client publishes.
#[derive(Debug, Clone)]
struct Honest {
    client: usize,
    round: u32,
    payload: Vec<u8>,
    /// The chunk it carries, when its update was split.
    chunk: Option<Chunk>,
    /// Delivering it completes the client's update.
    completes: bool,
}

/// An honest fleet: its keys when it signs, and every message it publishes, per round in
/// delivery order.
struct Fleet {
    keys: Option<Vec<SigningKey>>,
    /// Index 0 is round 1.
    rounds: Vec<Vec<Honest>>,
}

impl Fleet {
    fn new(signed: bool) -> Fleet {
        let keys = signed.then(|| {
            (0..CLIENTS.len())
                .map(|c| SigningKey::from_bytes(&[c as u8 + 1; 32]))
                .collect::<Vec<_>>()
        });
        // Like real clients, each numbers its chunked payloads from 0: c0, c1 and c2 use the
        // same message ids, and their chunks are in flight together.
        let mut next_message_id = [0u32; CLIENTS.len()];
        let rounds = (1..=ROUNDS)
            .map(|round| {
                let sent: Vec<Vec<Honest>> = (0..CLIENTS.len())
                    .map(|c| {
                        let payload = update_payload(c, round, keys.as_ref().map(|k| &k[c]));
                        packets(c, round, payload, &mut next_message_id[c])
                    })
                    .collect();
                // Round robin over the clients, each client's messages in order.
                let longest = sent.iter().map(Vec::len).max().unwrap_or(0);
                (0..longest)
                    .flat_map(|i| sent.iter().filter_map(move |q| q.get(i)).cloned())
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        // c0, c1 and c2 chunk every update, in round r with message id r - 1; c3 never.
        for (r, round) in rounds.iter().enumerate() {
            for (c, (name, _, budget)) in CLIENTS.iter().enumerate() {
                let mine = round.iter().filter(|h| h.client == c);
                let ids: BTreeSet<_> = mine
                    .clone()
                    .map(|h| h.chunk.as_ref().map(|k| k.message_id))
                    .collect();
                let chunked = *budget < usize::MAX;
                assert_eq!(mine.count() > 1, chunked, "{name}");
                assert_eq!(ids, BTreeSet::from([chunked.then_some(r as u32)]), "{name}");
            }
        }
        Fleet { keys, rounds }
    }

    fn seal(&self, c: usize, envelope: Envelope) -> Vec<u8> {
        match &self.keys {
            Some(keys) => envelope.encode_signed(&fleet_name(), &keys[c]).unwrap(),
            None => envelope.encode().unwrap(),
        }
    }

    fn join_payload(&self, c: usize) -> Vec<u8> {
        let join = Join {
            client: client_id(c),
            capabilities: Capabilities {
                backbone_id: heapless::String::try_from("bb").unwrap(),
                backbone_sha256: [0; 32],
                peft: PeftMethod::Head,
                accepted_dtypes: heapless::Vec::from_slice(&[DType::F32]).unwrap(),
                max_packet_size: 8192,
            },
            num_examples: CLIENTS[c].1,
        };
        self.seal(c, Envelope::new(RUN, 0, join))
    }

    /// The honest messages of rounds `1..=round`, and of those the ones delivered before the
    /// `position`-th message of `round`.
    fn so_far(&self, round: u32, position: usize) -> (Vec<&Honest>, Vec<&Honest>) {
        let r = round as usize;
        let all: Vec<&Honest> = self.rounds[..r].iter().flatten().collect();
        let before = self.rounds[..r - 1].iter().map(Vec::len).sum::<usize>() + position;
        let delivered = all[..before].to_vec();
        (all, delivered)
    }
}

/// What client `c` publishes for `payload`: the payload itself when it fits its budget, else
/// its chunks, as `message_id` (then the next id).
fn packets(c: usize, round: u32, payload: Vec<u8>, message_id: &mut u32) -> Vec<Honest> {
    let parts = fedpeft_protocol::chunk::split(&payload, CLIENTS[c].2, RUN, round, *message_id);
    let parts = parts.unwrap();
    if parts.len() > 1 {
        *message_id += 1;
    }
    let count = parts.len();
    let chunk = |p: &[u8]| match Envelope::decode(p).unwrap().message {
        Message::Chunk(chunk) => Some(chunk),
        _ => None,
    };
    parts
        .into_iter()
        .enumerate()
        .map(|(i, payload)| Honest {
            client: c,
            round,
            chunk: chunk(&payload),
            payload,
            completes: i + 1 == count,
        })
        .collect()
}

/// Client `c`'s real update for `round`, encoded (and signed) as an edge client does.
fn update_payload(c: usize, round: u32, key: Option<&SigningKey>) -> Vec<u8> {
    let mut values = SplitMix64::new(0x19 ^ ((c as u64) << 8) ^ u64::from(round));
    let mut draw = |n: usize| (0..n).map(|_| values.next_f32() - 0.5).collect::<Vec<_>>();
    let (w, b) = (draw(W_LEN), draw(1));
    let mut rng = SplitMix64::new(1);
    let mut encode = |name: &str, v: &[f32]| {
        let shape = [v.len() as u32];
        fedpeft_protocol::Tensor::encode(name, &shape, v, Codec::dense(DType::F32), &mut rng)
            .unwrap()
    };
    let update = ClientUpdate {
        client: client_id(c),
        round,
        sequence: round,
        num_examples: CLIENTS[c].1,
        metrics: TrainMetrics {
            loss: 1.0 / round as f32,
            accuracy: 0.5,
            steps: 4,
            elapsed_ms: 100,
            epsilon: None,
        },
        tensors: vec![encode("w", &w), encode("b", &b)],
    };
    let env = Envelope::new(RUN, round, update);
    match key {
        Some(k) => env.encode_signed(&fleet_name(), k).unwrap(),
        None => env.encode().unwrap(),
    }
}

/// What a closed round produced.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    status: RoundStatus,
    accepted: BTreeSet<String>,
    /// The new global adapter's values, as bits.
    global: Vec<u32>,
}

/// A message the attacker publishes on `to`'s update topic.
#[derive(Debug, Clone)]
struct Forged {
    to: usize,
    payload: Vec<u8>,
}

/// The aggregator's inbox and machine, fed one publish at a time by a clock that advances 1 ms
/// per message.
struct Aggregator {
    inbox: Inbox,
    machine: RoundMachine,
    now: u64,
    announced: BTreeSet<u32>,
    outcomes: BTreeMap<u32, Outcome>,
}

/// The state without the rejection counters, which are all a refused message may change.
fn without_counters(s: &MachineState) -> MachineState {
    let mut s = s.clone();
    s.rejected_total.clear();
    s.rejected_by_client.clear();
    if let Phase::Collecting(open) = &mut s.phase {
        open.rejected.clear();
    }
    s
}

fn refusals(s: &MachineState) -> u64 {
    s.rejected_total.values().sum()
}

impl Aggregator {
    /// Started, with the whole fleet joined (through the inbox) and round 1 open.
    fn new(fleet: &Fleet) -> Aggregator {
        let mut inbox = Inbox::new(fleet_name(), RUN, MAX_UPDATE_BYTES, ROUND_TIMEOUT_MS);
        if let Some(keys) = &fleet.keys {
            let enrolled = keys
                .iter()
                .enumerate()
                .map(|(c, k)| (CLIENTS[c].0.to_string(), k.verifying_key()));
            inbox = inbox.with_enrolment(Enrolment::from_keys(enrolled));
        }
        let machine = RoundMachine::new(rules(), strategy::build(&StrategyKind::FedAvg), initial());
        let mut a = Aggregator {
            inbox,
            machine,
            now: T0,
            announced: BTreeSet::new(),
            outcomes: BTreeMap::new(),
        };
        let actions = a.machine.on_event(Event::Start, a.now);
        a.observe(&actions);
        for c in 0..CLIENTS.len() {
            let (event, _) = a.publish(&join_topic(), &fleet.join_payload(c));
            assert!(matches!(event, Some(Event::Joined { .. })), "{event:?}");
        }
        assert!(a.is_open(1), "{:?}", a.machine.state().phase);
        a
    }

    fn is_open(&self, round: u32) -> bool {
        matches!(&self.machine.state().phase, Phase::Collecting(o) if o.round == round)
    }

    /// One publish as the shell handles it: expired chunks first, then the message.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> (Option<Event>, Vec<Action>) {
        self.now += 1;
        let mut events = self.inbox.expire(self.now);
        let event = self.inbox.on_publish(topic, payload, self.now);
        events.extend(event.clone());
        let mut actions = Vec::new();
        for e in events {
            actions.extend(self.machine.on_event(e, self.now));
            self.check_replies();
        }
        self.observe(&actions);
        (event, actions)
    }

    /// No client ever fails here (nobody goes offline and every honest update is sound), and
    /// the replies never outnumber the sample.
    fn check_replies(&self) {
        if let Phase::Collecting(o) = &self.machine.state().phase {
            assert!(
                o.accepted.len() + o.failed.len() <= o.sampled.len(),
                "{o:?}"
            );
            assert!(
                o.failed.is_empty(),
                "round {}: failed {:?}",
                o.round,
                o.failed
            );
        }
    }

    fn observe(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Publish {
                    message: Outgoing::Announce(ann),
                    ..
                } => {
                    let Sampling::Clients(sampled) = &ann.sampling else {
                        panic!("{ann:?}")
                    };
                    assert_eq!(sampled.len(), CLIENTS.len(), "everybody is sampled");
                    self.announced.insert(ann.round);
                }
                Action::RoundClosed(record) => {
                    let global = self.machine.state().global.values();
                    let outcome = Outcome {
                        status: record.status,
                        accepted: record
                            .sampled
                            .iter()
                            .filter(|c| !record.failed_clients.contains_key(*c))
                            .cloned()
                            .collect(),
                        global: global.map(f32::to_bits).collect(),
                    };
                    assert!(self.outcomes.insert(record.round, outcome).is_none());
                }
                _ => {}
            }
        }
    }

    /// An honest message, delivered once its round is announced: taken, never refused.
    fn honest(&mut self, h: &Honest) {
        assert!(
            self.announced.contains(&h.round) && self.is_open(h.round),
            "round {} is not open for {}'s message: {:?}",
            h.round,
            CLIENTS[h.client].0,
            self.machine.state().phase
        );
        let (event, _) = self.publish(&update_topic(h.client), &h.payload);
        let name = CLIENTS[h.client].0;
        if h.completes {
            let key = (name.to_string(), h.round, h.round);
            assert!(
                self.machine.state().accepted_updates.contains(&key),
                "{name}'s update for round {} was not accepted: {event:?}",
                h.round
            );
        } else {
            assert!(
                event.is_none(),
                "{name}'s chunk of round {} was refused: {event:?}",
                h.round
            );
        }
    }

    /// An attacker's message: refused (and counted) or held as a stray chunk; nothing else
    /// changes.
    fn forged(&mut self, f: &Forged) {
        let before = self.machine.state().clone();
        let (event, actions) = self.publish(&update_topic(f.to), &f.payload);
        let after = self.machine.state();
        assert!(
            actions.is_empty(),
            "a forged message on {}'s topic made the machine act: {actions:?}",
            CLIENTS[f.to].0
        );
        assert_eq!(
            without_counters(after),
            without_counters(&before),
            "a forged message on {}'s topic changed the state ({event:?})",
            CLIENTS[f.to].0
        );
        assert_eq!(
            refusals(after),
            refusals(&before) + u64::from(event.is_some()),
            "{event:?}"
        );
    }
}

/// Runs the fleet's rounds with `forged[r - 1]`'s messages slipped into round `r`: each at its
/// position among the round's honest messages (before the `p`-th; after the last when `p` is
/// the round's length, i.e. once the next round is open).
fn play(fleet: &Fleet, forged: &[Vec<(usize, Forged)>]) -> Aggregator {
    let mut a = Aggregator::new(fleet);
    for (r, honest) in fleet.rounds.iter().enumerate() {
        let mut extra: Vec<&(usize, Forged)> = forged.get(r).into_iter().flatten().collect();
        extra.sort_by_key(|(p, _)| *p);
        let mut extra = extra.into_iter().peekable();
        for p in 0..=honest.len() {
            while let Some((_, f)) = extra.next_if(|(q, _)| *q <= p) {
                a.forged(f);
            }
            if let Some(h) = honest.get(p) {
                a.honest(h);
            }
        }
    }
    assert!(a.machine.is_done(), "{:?}", a.machine.state().phase);
    a
}

/// `play`, then the rounds' outcomes must be those of the run without the attacker.
fn assert_undisturbed(fleet: &Fleet, forged: &[Vec<(usize, Forged)>]) -> Aggregator {
    let calm = play(fleet, &[]);
    assert_eq!(refusals(calm.machine.state()), 0);
    assert_eq!(calm.outcomes.len(), ROUNDS as usize);
    for o in calm.outcomes.values() {
        assert_eq!(o.status, RoundStatus::Ok);
        assert_eq!(o.accepted.len(), CLIENTS.len());
    }
    let disturbed = play(fleet, forged);
    for r in 1..=ROUNDS {
        assert_eq!(
            disturbed.outcomes.get(&r),
            calm.outcomes.get(&r),
            "round {r} differs from the undisturbed run"
        );
    }
    assert_eq!(
        disturbed.machine.state().global,
        calm.machine.state().global
    );
    disturbed
}

fn rechunk(h: &Honest, chunk: Chunk) -> Vec<u8> {
    // A chunk envelope is unsigned and its CRC covers it alone: an attacker re-encodes it.
    Envelope::new(RUN, h.round, chunk).encode().unwrap()
}

/// How an attacker alters a copy of a real chunk.
#[derive(Debug, Clone)]
enum Alteration {
    /// Keeps the claim: sent only once the slot it names arrived (see the module comment).
    FlipData {
        at: Index,
        bit: u8,
    },
    Crc(u32),
    TotalLen(i8),
    Count(i8),
    MessageId(u32),
}

/// An attacker's message, in terms of the honest messages it starts from (resolved where it is
/// sent).
#[derive(Debug, Clone)]
enum Attack {
    /// Arbitrary bytes.
    Garbage { to: Index, bytes: Vec<u8> },
    /// A strict prefix of any honest message of this round (sent or not) or an earlier one.
    Truncate {
        source: Index,
        len: Index,
        to: Index,
    },
    /// An honest message already delivered, again, on its own topic.
    Replay { source: Index },
    /// Any honest message of this round or an earlier one, on another client's topic.
    Copy { source: Index, to: Index },
    /// A real chunk, altered and re-encoded with a valid envelope CRC, on its own topic.
    Alter { source: Index, how: Alteration },
    /// A well-formed chunk envelope with made-up fields, using the message ids clients use.
    Chunk {
        to: Index,
        message_id: u32,
        index: u32,
        count: u32,
        total_len: u32,
        crc: u32,
        /// Give it the length its index implies, so that it is held as a stray.
        fits: bool,
        data: Vec<u8>,
    },
}

/// Data length of chunk `index` of a `count`-chunk payload of `total` bytes, as `split` cuts.
fn implied_len(total: u32, count: u32, index: u32) -> Option<usize> {
    if count == 0 || index >= count || total < count {
        return None;
    }
    let size = total.div_ceil(count);
    let last = total.checked_sub(size * (count - 1)).filter(|&n| n > 0)?;
    Some((if index + 1 < count { size } else { last }) as usize)
}

impl Attack {
    /// The message, sent before the `position`-th honest message of `round`; `None` when it has
    /// nothing to start from yet.
    fn resolve(&self, fleet: &Fleet, round: u32, position: usize) -> Option<Forged> {
        let (so_far, delivered) = fleet.so_far(round, position);
        let other = |c: usize, to: &Index| (c + 1 + to.index(CLIENTS.len() - 1)) % CLIENTS.len();
        let forged = match self {
            Attack::Garbage { to, bytes } => Forged {
                to: to.index(CLIENTS.len()),
                payload: bytes.clone(),
            },
            Attack::Truncate { source, len, to } => {
                let h = source.get(&so_far);
                Forged {
                    to: to.index(CLIENTS.len()),
                    payload: h.payload[..len.index(h.payload.len())].to_vec(),
                }
            }
            Attack::Replay { source } => {
                let h = *pick(source, &delivered)?;
                Forged {
                    to: h.client,
                    payload: h.payload.clone(),
                }
            }
            Attack::Copy { source, to } => {
                let h = source.get(&so_far);
                Forged {
                    to: other(h.client, to),
                    payload: h.payload.clone(),
                }
            }
            Attack::Alter { source, how } => {
                let pool = if matches!(how, Alteration::FlipData { .. }) {
                    &delivered
                } else {
                    &so_far
                };
                let chunks: Vec<&Honest> =
                    pool.iter().copied().filter(|h| h.chunk.is_some()).collect();
                let h = *pick(source, &chunks)?;
                let mut c = h.chunk.clone()?;
                let shift = |v: u32, d: i8| v.saturating_add_signed(i32::from(d));
                match how {
                    Alteration::FlipData { at, bit } => {
                        let i = at.index(c.data.len());
                        c.data[i] ^= 1 << (bit % 8);
                    }
                    Alteration::Crc(x) => c.crc32 ^= (*x).max(1),
                    Alteration::TotalLen(d) => c.total_len = shift(c.total_len, *d),
                    Alteration::Count(d) => c.count = shift(c.count, *d),
                    Alteration::MessageId(x) => c.message_id ^= *x,
                }
                Forged {
                    to: h.client,
                    payload: rechunk(h, c),
                }
            }
            Attack::Chunk {
                to,
                message_id,
                index,
                count,
                total_len,
                crc,
                fits,
                data,
            } => {
                let mut data = data.clone();
                if *fits && let Some(n) = implied_len(*total_len, *count, *index) {
                    data.resize(n, 0xa5);
                }
                let chunk = Chunk {
                    message_id: *message_id,
                    index: *index,
                    count: *count,
                    total_len: *total_len,
                    crc32: *crc,
                    data,
                };
                Forged {
                    to: to.index(CLIENTS.len()),
                    payload: Envelope::new(RUN, round, chunk).encode().unwrap(),
                }
            }
        };
        Some(forged)
    }
}

fn pick<'a, T>(i: &Index, from: &'a [T]) -> Option<&'a T> {
    (!from.is_empty()).then(|| i.get(from))
}

fn alteration() -> impl Strategy<Value = Alteration> {
    let nonzero = |lo: i8, hi: i8| (lo..=hi).prop_filter("a change", |d| *d != 0);
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, bit)| Alteration::FlipData { at, bit }),
        any::<u32>().prop_map(Alteration::Crc),
        nonzero(-8, 8).prop_map(Alteration::TotalLen),
        nonzero(-2, 2).prop_map(Alteration::Count),
        (1u32..4).prop_map(Alteration::MessageId),
    ]
}

fn attack() -> impl Strategy<Value = Attack> {
    prop_oneof![
        (any::<Index>(), prop::collection::vec(any::<u8>(), 0..300))
            .prop_map(|(to, bytes)| Attack::Garbage { to, bytes }),
        (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(source, len, to)| Attack::Truncate { source, len, to }),
        any::<Index>().prop_map(|source| Attack::Replay { source }),
        (any::<Index>(), any::<Index>()).prop_map(|(source, to)| Attack::Copy { source, to }),
        (any::<Index>(), alteration()).prop_map(|(source, how)| Attack::Alter { source, how }),
        (
            any::<Index>(),
            0u32..4,
            0u32..6,
            0u32..6,
            0u32..=512,
            any::<u32>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..600),
        )
            .prop_map(
                |(to, message_id, index, count, total_len, crc, fits, data)| Attack::Chunk {
                    to,
                    message_id,
                    index,
                    count,
                    total_len,
                    crc,
                    fits,
                    data,
                }
            ),
    ]
}

/// Per round, up to [`MAX_FORGED_PER_ROUND`] attacks, each at a position among the round's
/// honest messages (an index, resolved against the round's length).
fn attacks() -> impl Strategy<Value = Vec<Vec<(Index, Attack)>>> {
    let round = prop::collection::vec((any::<Index>(), attack()), 0..=MAX_FORGED_PER_ROUND);
    prop::collection::vec(round, ROUNDS as usize)
}

fn resolve_all(fleet: &Fleet, attacks: &[Vec<(Index, Attack)>]) -> Vec<Vec<(usize, Forged)>> {
    attacks
        .iter()
        .enumerate()
        .map(|(r, round)| {
            let honest = fleet.rounds[r].len();
            round
                .iter()
                .filter_map(|(at, attack)| {
                    let p = at.index(honest + 1);
                    let forged = attack.resolve(fleet, r as u32 + 1, p)?;
                    Some((p, forged))
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn forged_truncated_replayed_and_copied_messages_change_no_clients_state(
        signed in any::<bool>(),
        attacks in attacks(),
    ) {
        let fleet = Fleet::new(signed);
        let forged = resolve_all(&fleet, &attacks);
        assert_undisturbed(&fleet, &forged);
    }
}

// The rows of issue 19's table, one by one, then together.

fn honest_of(fleet: &Fleet, round: u32, client: usize) -> Vec<&Honest> {
    fleet.rounds[round as usize - 1]
        .iter()
        .filter(|h| h.client == client)
        .collect()
}

/// Position of `h` among its round's honest messages.
fn position(fleet: &Fleet, h: &Honest) -> usize {
    fleet.rounds[h.round as usize - 1]
        .iter()
        .position(|x| x.client == h.client && x.payload == h.payload)
        .unwrap()
}

/// `payload` on `to`'s topic, before the `position`-th honest message of its round.
fn at(position: usize, to: usize, payload: impl Into<Vec<u8>>) -> (usize, Forged) {
    let payload = payload.into();
    (position, Forged { to, payload })
}

fn rejected(a: &Aggregator, reason: RejectReason) -> u64 {
    a.machine
        .state()
        .rejected_total
        .get(&reason)
        .copied()
        .unwrap_or(0)
}

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

#[test]
fn a_thousand_random_bytes_on_a_clients_update_topic_change_nothing() {
    for signed in [false, true] {
        let fleet = Fleet::new(signed);
        // On c3's topic before its (whole) update, on c0's between its first and second chunk.
        let c0 = honest_of(&fleet, 1, 0);
        let forged = vec![vec![
            at(0, 3, random_bytes(1, 1000)),
            at(position(&fleet, c0[1]), 0, random_bytes(2, 1000)),
        ]];
        let a = assert_undisturbed(&fleet, &forged);
        assert_eq!(refusals(a.machine.state()), 2);
    }
}

#[test]
fn a_truncated_chunk_of_the_current_rounds_update_changes_nothing() {
    for signed in [false, true] {
        let fleet = Fleet::new(signed);
        let (c0, c1) = (honest_of(&fleet, 2, 0), honest_of(&fleet, 2, 1));
        // c0's second chunk cut short before the real one arrives; c1's last chunk cut to its
        // envelope header after its first arrived.
        let (second, last) = (&c0[1].payload, &c1[c1.len() - 1].payload);
        let forged = vec![
            vec![],
            vec![
                at(position(&fleet, c0[1]), 0, &second[..second.len() - 7]),
                at(position(&fleet, c1[1]), 1, &last[..12]),
            ],
        ];
        let a = assert_undisturbed(&fleet, &forged);
        assert_eq!(refusals(a.machine.state()), 2);
        let garbled =
            rejected(&a, RejectReason::BadChecksum) + rejected(&a, RejectReason::Malformed);
        assert_eq!(garbled, 2);
    }
}

#[test]
fn a_clients_update_on_another_clients_topic_changes_nothing() {
    for signed in [false, true] {
        let fleet = Fleet::new(signed);
        // Before anybody's own: c3's whole update on c0's topic, all of c1's chunks on c0's
        // topic (the same claims as c0's own: they complete, as c1's update, before c0's
        // begin), c2's first chunk on c0's topic (another claim) and c0's on c3's.
        let first = |c| honest_of(&fleet, 1, c)[0].payload.clone();
        let mut round = vec![at(0, 0, first(3))];
        round.extend(
            honest_of(&fleet, 1, 1)
                .iter()
                .map(|h| at(0, 0, &h.payload[..])),
        );
        round.extend([at(0, 0, first(2)), at(0, 3, first(0))]);
        let a = assert_undisturbed(&fleet, &[round]);
        let mismatch = if signed {
            RejectReason::BadSignature
        } else {
            RejectReason::ClientMismatch
        };
        assert_eq!(rejected(&a, mismatch), 2, "c3's update and c1's");
        assert_eq!(refusals(a.machine.state()), 2, "the lone chunks are strays");
    }
}

#[test]
fn random_bytes_truncations_copies_and_replays_over_three_rounds_change_nothing() {
    for signed in [false, true] {
        let fleet = Fleet::new(signed);
        let forged: Vec<Vec<(usize, Forged)>> = (1..=ROUNDS)
            .map(|round| {
                let (c0, c3) = (honest_of(&fleet, round, 0), honest_of(&fleet, round, 3));
                let mid = position(&fleet, c0[2]);
                let end = fleet.rounds[round as usize - 1].len();
                let cut = &c0[3].payload[..c0[3].payload.len() / 2];
                let mut f = vec![
                    at(0, 1, random_bytes(u64::from(round), 1000)),
                    at(mid, 0, cut),
                    at(0, 2, &c3[0].payload[..]),
                    at(mid, 1, &c0[1].payload[..]),
                    // This round's first chunk again before the payload is complete, and c3's
                    // update again once accepted (the next round is open by then).
                    at(mid, 0, &c0[0].payload[..]),
                    at(end, 3, &c3[0].payload[..]),
                ];
                // Every earlier round's messages of c0 and c1 again, in the middle of this one.
                for earlier in 1..round {
                    for c in [0, 1] {
                        let old = honest_of(&fleet, earlier, c);
                        f.extend(old.iter().map(|h| at(mid, c, &h.payload[..])));
                    }
                }
                f
            })
            .collect();
        let a = assert_undisturbed(&fleet, &forged);
        assert!(rejected(&a, RejectReason::Duplicate) >= 3);
        assert!(refusals(a.machine.state()) >= 12);
    }
}

/// Issue 19: a chunk the reassembler refuses, or holds as a stray, on a client's topic must
/// not count toward the wire size of the real payload that uses the same message id (the id is
/// easy to guess: clients number their payloads from 0). Counted, it made the client's real
/// update oversized: refused, and on a signed fleet the client counted failed.
#[test]
fn a_refused_chunk_is_not_counted_in_the_real_payload_that_shares_its_message_id() {
    for signed in [false, true] {
        let fleet = Fleet::new(signed);
        // c0's first message id, no chunks (refused as malformed): 16 KiB in all.
        let bogus = |seed| {
            let chunk = Chunk {
                message_id: 0,
                index: 0,
                count: 0,
                total_len: 0,
                crc32: 0,
                data: random_bytes(seed, MAX_UPDATE_BYTES as usize / 4),
            };
            at(0, 0, Envelope::new(RUN, 1, chunk).encode().unwrap())
        };
        let round: Vec<(usize, Forged)> = (0..4).map(bogus).collect();
        let a = assert_undisturbed(&fleet, &[round]);
        assert_eq!(rejected(&a, RejectReason::Malformed), 4);
    }
}

// A chunk with the claim of a real payload's slot that has not arrived yet: kept as an
// alternate, it spoils nothing. Chunks carry the CRC-32C of their payload (not its CRC-32,
// which is one constant for every envelope), so another client's chunk or an old chunk under
// the next message id makes another claim altogether.

/// `payload` on c0's topic, before the `before`-th honest message of round 1.
fn sent_before_the_real_chunk(fleet: &Fleet, before: usize, payload: Vec<u8>) {
    assert_undisturbed(fleet, &[vec![at(before, 0, payload)]]);
}

#[test]
fn a_chunk_with_a_flipped_byte_before_the_real_one_spoils_nothing() {
    let fleet = Fleet::new(false);
    let c0 = honest_of(&fleet, 1, 0);
    let mut chunk = c0[1].chunk.clone().unwrap();
    chunk.data[0] ^= 1;
    sent_before_the_real_chunk(&fleet, position(&fleet, c0[1]), rechunk(c0[1], chunk));
}

#[test]
fn another_clients_chunk_before_the_real_one_spoils_nothing() {
    let fleet = Fleet::new(false);
    let (c0, c1) = (honest_of(&fleet, 1, 0), honest_of(&fleet, 1, 1));
    assert_ne!(
        c0[1].chunk.as_ref().unwrap().crc32,
        c1[1].chunk.as_ref().unwrap().crc32
    );
    sent_before_the_real_chunk(&fleet, position(&fleet, c0[1]), c1[1].payload.clone());
}

#[test]
fn an_old_chunk_given_the_next_message_id_spoils_nothing() {
    let fleet = Fleet::new(false);
    let c0 = honest_of(&fleet, 1, 0);
    let mut chunk = c0[0].chunk.clone().unwrap();
    chunk.message_id += 1;
    // Sent at the end of round 1, it waits for round 2's payload.
    sent_before_the_real_chunk(&fleet, fleet.rounds[0].len(), rechunk(c0[0], chunk));
}
