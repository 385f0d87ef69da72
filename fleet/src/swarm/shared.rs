//! What the sessions share: one decoding of each distinct payload the aggregator publishes, the
//! per-round bookkeeping and the counters.
//!
//! Every session receives every retained announcement and global adapter over its own socket
//! (the broker's fan-out is part of what is measured), but ten thousand sessions need not decode
//! the same 100 KB ten thousand times: a payload is decoded once, and a session that receives
//! the same bytes again (compared in full) gets the shared result. The chunks of a chunked
//! global adapter are put together once in the same way; each session still tracks which of
//! them it has received.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use fedpeft_protocol::{
    DType, Envelope, Message, Reassembler, ReassemblyLimits, RoundAnnounce, Sampling,
};

use super::template::{Contributions, Named};

/// A round announcement, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Announce {
    pub run_id: u64,
    pub round: u32,
    pub run_done: bool,
    /// The sampled client ids, sorted.
    pub sampled: Vec<String>,
    /// How many of them are this swarm's clients.
    pub sampled_here: usize,
    pub update_dtype: DType,
    pub deadline_unix_ms: u64,
}

impl Announce {
    pub fn samples(&self, id: &str) -> bool {
        self.sampled
            .binary_search_by(|s| s.as_str().cmp(id))
            .is_ok()
    }
}

/// A global adapter, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    pub run_id: u64,
    pub round: u32,
    pub tensors: Named,
    pub dtype: DType,
}

/// A chunked payload's claim (what the chunks agree on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Claim {
    pub message_id: u32,
    pub count: u32,
    pub total_len: u32,
    pub crc32: u32,
}

/// Which topic a payload came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Round,
    Global,
    GlobalChunk,
}

/// A payload, as a session needs it.
#[derive(Debug, Clone)]
pub enum Incoming {
    Announce(Arc<Announce>),
    Global(Arc<Global>),
    Chunk {
        claim: Claim,
        index: u32,
    },
    /// Another run's message (a retained leftover on a shared broker), or a kind that topic
    /// does not carry: ignored, as an edge client ignores it.
    Foreign,
    Undecodable(String),
}

struct Cache {
    by_crc: HashMap<u32, Vec<(Bytes, Incoming)>>,
    reassembler: Reassembler<u8>,
    completed: HashMap<Claim, Arc<Global>>,
    globals: BTreeMap<u32, Arc<Global>>,
}

/// Monotonic counters over the whole run.
#[derive(Debug, Default)]
pub struct Counters {
    pub connected_now: AtomicU64,
    pub ever_connected: AtomicU64,
    pub connect_failures: AtomicU64,
    pub disconnects: AtomicU64,
    /// Connections refused by the broker in CONNACK.
    pub refused: AtomicU64,
    /// Incoming packets above `--max-packet-bytes` (the connection breaks, as rumqttc's does).
    pub oversized_incoming: AtomicU64,
    pub decode_errors: AtomicU64,
    pub joins_sent: AtomicU64,
    pub updates_resent: AtomicU64,
    /// Sessions that finished (run done, or gave up).
    pub finished: AtomicU64,
    pub gave_up: AtomicU64,
    /// Sessions that received the "run done" announcement.
    pub run_done: AtomicU64,
}

impl Counters {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// The kinds of bad input a bad client sends before its honest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadKind {
    /// Random bytes behind a valid header: the aggregator's `bad_checksum`.
    Garbage,
    /// Another client's update of this round, byte for byte, on this client's topic:
    /// `client_mismatch`.
    Replay,
    /// An update exactly `max_update_bytes` long (with framing, more on the wire): `oversized`.
    Oversized,
    /// This client's update, for the next round: `future_round`.
    WrongRound,
}

impl BadKind {
    pub const ALL: [BadKind; 4] = [
        BadKind::Garbage,
        BadKind::Replay,
        BadKind::Oversized,
        BadKind::WrongRound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BadKind::Garbage => "garbage",
            BadKind::Replay => "replay",
            BadKind::Oversized => "oversized",
            BadKind::WrongRound => "wrong_round",
        }
    }

    /// The refusal reason the aggregator counts it under (`report.json`).
    pub fn reason(self) -> &'static str {
        match self {
            BadKind::Garbage => "bad_checksum",
            BadKind::Replay => "client_mismatch",
            BadKind::Oversized => "oversized",
            BadKind::WrongRound => "future_round",
        }
    }
}

/// One round as the swarm saw it. Times are ms since the swarm started.
#[derive(Debug, Clone, Default)]
pub struct RoundStats {
    pub sampled: usize,
    pub sampled_here: usize,
    pub announce_first_ms: Option<f64>,
    pub announce_last_ms: Option<f64>,
    pub announce_seen: usize,
    /// Honest updates queued on their session's socket, and fully acknowledged (every chunk's
    /// PUBACK) by the broker.
    pub sent: usize,
    pub acknowledged: usize,
    pub first_sent_ms: Option<f64>,
    pub last_acked_ms: Option<f64>,
    pub bad: BTreeMap<BadKind, usize>,
    /// What the acknowledged honest updates were made of.
    pub contributions: Contributions,
    pub global_first_ms: Option<f64>,
    pub global_last_ms: Option<f64>,
    pub global_seen: usize,
}

fn min_opt(slot: &mut Option<f64>, t: f64) {
    *slot = Some(slot.map_or(t, |x| x.min(t)));
}

fn max_opt(slot: &mut Option<f64>, t: f64) {
    *slot = Some(slot.map_or(t, |x| x.max(t)));
}

/// Everything the sessions share.
pub struct Shared {
    start: Instant,
    run_id: u64,
    prefix: String,
    first: u64,
    clients: u64,
    cache: Mutex<Cache>,
    rounds: Mutex<BTreeMap<u32, RoundStats>>,
    pub counters: Counters,
    /// The first error of each kind, for the report.
    pub first_errors: Mutex<BTreeMap<&'static str, String>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("run_id", &self.run_id)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// For the clients `{prefix}-{first..first+clients}` of run `run_id`.
    pub fn new(run_id: u64, prefix: &str, first: u64, clients: u64) -> Shared {
        Shared {
            start: Instant::now(),
            run_id,
            prefix: format!("{prefix}-"),
            first,
            clients,
            cache: Mutex::new(Cache {
                by_crc: HashMap::new(),
                reassembler: Reassembler::new(ReassemblyLimits {
                    max_in_flight: 16,
                    ..ReassemblyLimits::default()
                }),
                completed: HashMap::new(),
                globals: BTreeMap::new(),
            }),
            rounds: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            first_errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Milliseconds since the swarm started.
    pub fn now_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }

    pub fn started(&self) -> Instant {
        self.start
    }

    /// Keeps the first error of `kind`.
    pub fn error(&self, kind: &'static str, message: impl FnOnce() -> String) {
        if let Ok(mut e) = self.first_errors.lock() {
            e.entry(kind).or_insert_with(message);
        }
    }

    fn is_ours(&self, id: &str) -> bool {
        id.strip_prefix(&self.prefix)
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= self.first && n < self.first + self.clients)
    }

    /// The payload, decoded once for every session that receives the same bytes.
    pub fn decode(&self, source: Source, payload: &[u8]) -> Incoming {
        let Some(tail) = payload.len().checked_sub(4).map(|n| &payload[n..]) else {
            return Incoming::Undecodable(format!("{} bytes", payload.len()));
        };
        let key = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        if let Ok(cache) = self.cache.lock()
            && let Some(hit) = cache
                .by_crc
                .get(&key)
                .and_then(|v| v.iter().find(|(b, _)| b[..] == *payload))
        {
            return hit.1.clone();
        }
        let decoded = self.decode_fresh(source, payload);
        let Ok(mut cache) = self.cache.lock() else {
            return decoded;
        };
        if let Some(hit) = cache
            .by_crc
            .get(&key)
            .and_then(|v| v.iter().find(|(b, _)| b[..] == *payload))
        {
            // Another session decoded the same bytes meanwhile.
            return hit.1.clone();
        }
        match &decoded {
            Incoming::Global(g) => {
                cache.globals.entry(g.round).or_insert_with(|| g.clone());
            }
            Incoming::Chunk { claim, .. } => {
                // The first copy of each chunk goes into the one shared reassembly.
                if let Ok(Envelope {
                    message: Message::Chunk(chunk),
                    ..
                }) = Envelope::decode(payload)
                {
                    let claim = *claim;
                    match cache.reassembler.push(0, chunk, 0) {
                        Ok(Some(whole)) => match self.decode_fresh(Source::Global, &whole) {
                            Incoming::Global(g) => {
                                cache.globals.entry(g.round).or_insert_with(|| g.clone());
                                cache.completed.insert(claim, g);
                            }
                            other => self.error("chunked_global", || format!("{other:?}")),
                        },
                        Ok(None) => {}
                        Err(e) => self.error("chunked_global", || e.to_string()),
                    }
                }
            }
            _ => {}
        }
        cache
            .by_crc
            .entry(key)
            .or_default()
            .push((Bytes::copy_from_slice(payload), decoded.clone()));
        decoded
    }

    /// The global adapter a complete set of chunks with `claim` makes, once put together.
    pub fn completed(&self, claim: &Claim) -> Option<Arc<Global>> {
        self.cache.lock().ok()?.completed.get(claim).cloned()
    }

    /// Every global adapter received, by round.
    pub fn globals(&self) -> BTreeMap<u32, Arc<Global>> {
        self.cache
            .lock()
            .map(|c| c.globals.clone())
            .unwrap_or_default()
    }

    fn decode_fresh(&self, source: Source, payload: &[u8]) -> Incoming {
        let env = match Envelope::decode(payload) {
            Ok(env) => env,
            Err(e) => return Incoming::Undecodable(e.to_string()),
        };
        if env.run_id != self.run_id {
            return Incoming::Foreign;
        }
        match (source, env.message) {
            (Source::Round, Message::RoundAnnounce(a)) => {
                Incoming::Announce(Arc::new(self.announce(a)))
            }
            (Source::Global, Message::GlobalAdapter(g)) => {
                let dtype = g.tensors.first().map_or(DType::F32, |t| t.dtype());
                Incoming::Global(Arc::new(Global {
                    run_id: env.run_id,
                    round: g.round,
                    tensors: g
                        .tensors
                        .iter()
                        .map(|t| (t.name().to_string(), t.to_f32()))
                        .collect(),
                    dtype,
                }))
            }
            (Source::GlobalChunk, Message::Chunk(c)) => Incoming::Chunk {
                claim: Claim {
                    message_id: c.message_id,
                    count: c.count,
                    total_len: c.total_len,
                    crc32: c.crc32,
                },
                index: c.index,
            },
            _ => Incoming::Foreign,
        }
    }

    fn announce(&self, a: RoundAnnounce) -> Announce {
        let run_done = a.is_run_done();
        let mut sampled: Vec<String> = match a.sampling {
            Sampling::Clients(ids) => ids.iter().map(|c| c.as_str().to_string()).collect(),
            // The aggregator always names the clients; the other forms are not used.
            Sampling::All | Sampling::Rate(_) => Vec::new(),
        };
        sampled.sort_unstable();
        let sampled_here = sampled.iter().filter(|s| self.is_ours(s)).count();
        Announce {
            run_id: self.run_id,
            round: a.round,
            run_done,
            sampled,
            sampled_here,
            update_dtype: a.config.update_dtype,
            deadline_unix_ms: a.deadline_unix_ms,
        }
    }

    fn round<T>(&self, round: u32, f: impl FnOnce(&mut RoundStats) -> T) -> Option<T> {
        let mut rounds = self.rounds.lock().ok()?;
        Some(f(rounds.entry(round).or_default()))
    }

    /// A session received announcement `a`.
    pub fn saw_announce(&self, a: &Announce) {
        let t = self.now_ms();
        self.round(a.round, |r| {
            r.sampled = a.sampled.len();
            r.sampled_here = a.sampled_here;
            r.announce_seen += 1;
            min_opt(&mut r.announce_first_ms, t);
            max_opt(&mut r.announce_last_ms, t);
        });
    }

    /// A session received the global adapter of `round`.
    pub fn saw_global(&self, round: u32) {
        let t = self.now_ms();
        self.round(round, |r| {
            r.global_seen += 1;
            min_opt(&mut r.global_first_ms, t);
            max_opt(&mut r.global_last_ms, t);
        });
    }

    /// A session queued its honest update of `round`.
    pub fn sent(&self, round: u32) {
        let t = self.now_ms();
        self.round(round, |r| {
            r.sent += 1;
            min_opt(&mut r.first_sent_ms, t);
        });
    }

    /// The broker acknowledged every packet of an honest update: it counts in the expected
    /// aggregate with weight `examples`.
    pub fn acknowledged(&self, round: u32, key: super::template::VariantKey, examples: u64) {
        let t = self.now_ms();
        self.round(round, |r| {
            r.acknowledged += 1;
            *r.contributions.entry(key).or_default() += examples;
            max_opt(&mut r.last_acked_ms, t);
        });
    }

    /// A bad client sent bad input of `kind` in `round`.
    pub fn sent_bad(&self, round: u32, kind: BadKind) {
        self.round(round, |r| *r.bad.entry(kind).or_default() += 1);
    }

    /// A copy of every round's stats.
    pub fn rounds(&self) -> BTreeMap<u32, RoundStats> {
        self.rounds.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use fedpeft_protocol::{ClientId, GlobalAdapter, LocalConfig, Optimizer, Tensor, Values};

    use super::*;

    fn announce(run: u64, round: u32, ids: &[&str]) -> Vec<u8> {
        let a = RoundAnnounce {
            round,
            deadline_unix_ms: 5,
            sampling: Sampling::Clients(ids.iter().map(|i| ClientId::new(i).unwrap()).collect()),
            config: LocalConfig {
                epochs: 1,
                batch_size: 8,
                learning_rate: 0.1,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                fedprox_mu: 0.0,
                dp_sgd: None,
                update_dtype: DType::I8,
                top_k_fraction: None,
                seed: 1,
            },
        };
        Envelope::new(run, round, a).encode().unwrap()
    }

    #[test]
    fn an_announcement_is_decoded_once_and_counts_this_swarms_clients() {
        let s = Shared::new(7, "sw", 10, 5);
        let bytes = announce(7, 3, &["sw-00012", "other-1", "sw-00009", "sw-00010"]);
        let Incoming::Announce(a) = s.decode(Source::Round, &bytes) else {
            panic!()
        };
        assert_eq!(a.sampled_here, 2);
        assert!(a.samples("sw-00012") && !a.samples("sw-00011"));
        assert_eq!(a.update_dtype, DType::I8);
        let Incoming::Announce(b) = s.decode(Source::Round, &bytes) else {
            panic!()
        };
        assert!(Arc::ptr_eq(&a, &b), "the second copy is the cached one");
        assert!(matches!(
            s.decode(Source::Round, &announce(8, 3, &[])),
            Incoming::Foreign
        ));
        assert!(matches!(
            s.decode(Source::Round, b"xy"),
            Incoming::Undecodable(_)
        ));
    }

    #[test]
    fn a_chunked_global_is_put_together_once() {
        let s = Shared::new(7, "sw", 0, 1);
        let t = Tensor::dense("w", &[3000], Values::F32(vec![0.5; 3000])).unwrap();
        let g = GlobalAdapter {
            round: 2,
            tensors: vec![t],
        };
        let whole = Envelope::new(7, 2, g).encode().unwrap();
        let parts = fedpeft_protocol::chunk::split(&whole, 5000, 7, 2, 4).unwrap();
        assert!(parts.len() > 1);
        let mut claim = None;
        for p in parts.iter().chain(parts.iter()) {
            let Incoming::Chunk { claim: c, .. } = s.decode(Source::GlobalChunk, p) else {
                panic!()
            };
            claim = Some(c);
        }
        let g = s.completed(&claim.unwrap()).unwrap();
        assert_eq!(g.round, 2);
        assert_eq!(g.tensors[0].1, vec![0.5; 3000]);
        assert_eq!(s.globals().len(), 1);
    }
}
