//! A per-client TCP relay between an edge client and the broker: the user-space link shaper,
//! and in every mode the runner's own accounting of what crossed the link.
//!
//! Each direction of each connection is a reader thread and a writer thread joined by a small
//! bounded queue. The reader takes at most one segment at a time, asks its
//! [`DirectionModel`] when it has been sent (the rate) and when it arrives (delay, jitter,
//! loss), and reads nothing more until it has been sent, so the client's socket feels the
//! link's back-pressure. The writer holds each piece until its arrival time, writes it, and
//! feeds it to an MQTT packet observer: bytes each way per round, and when each update (and
//! each global adapter) started and finished crossing. Times are measured where bytes leave
//! the link, i.e. after shaping: in user space after the model's delay, with kernel shaping
//! when they come out of the veth.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedpeft_protocol::{Topic, TopicKind, peek_header};

use crate::shaper::{DirectionModel, DirectionSpec, SEGMENT};

/// What one direction carried in one round.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundFlow {
    /// Every byte of this round in this direction (MQTT packets, whole).
    pub bytes: u64,
    /// Bytes of the model payload: the client's update (up) or the global adapter (down),
    /// whole MQTT PUBLISH packets.
    pub model_bytes: u64,
    /// When the model payload's first byte and last byte left the link (seconds since the
    /// trial's start).
    pub model_first_s: Option<f64>,
    pub model_last_s: Option<f64>,
    /// Segments the model dropped and resent (user-space loss).
    pub lost_segments: u64,
}

impl RoundFlow {
    /// Time from the model payload's first byte to its last, seconds.
    pub fn model_secs(&self) -> Option<f64> {
        Some(self.model_last_s? - self.model_first_s?)
    }
}

/// A client's link accounting: per round (the round each MQTT packet belongs to, read from the
/// fedpeft envelope; other packets count for the latest round seen), up and down.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkStats {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub connections: u64,
    pub up: BTreeMap<u32, RoundFlow>,
    pub down: BTreeMap<u32, RoundFlow>,
    #[serde(skip)]
    current_round: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// Splits a byte stream into MQTT packets (3.1.1 framing) and accounts each one.
#[derive(Debug)]
struct Observer {
    dir: Dir,
    buf: Vec<u8>,
    first_at: f64,
}

impl Observer {
    fn new(dir: Dir) -> Self {
        Observer {
            dir,
            buf: Vec::new(),
            first_at: 0.0,
        }
    }

    /// `bytes` left the link at `at` (seconds since the trial's start).
    fn feed(&mut self, bytes: &[u8], at: f64, lost: u32, stats: &Mutex<LinkStats>) {
        let mut stats = stats.lock().expect("link stats lock");
        match self.dir {
            Dir::Up => stats.up_bytes += bytes.len() as u64,
            Dir::Down => stats.down_bytes += bytes.len() as u64,
        }
        let round = stats.current_round;
        let flows = match self.dir {
            Dir::Up => &mut stats.up,
            Dir::Down => &mut stats.down,
        };
        flows.entry(round).or_default().lost_segments += u64::from(lost);
        let mut rest = bytes;
        loop {
            // Account every packet the buffer now holds whole.
            while let Some(len) = packet_len(&self.buf)
                && self.buf.len() >= len
            {
                let packet: Vec<u8> = self.buf.drain(..len).collect();
                self.account(&packet, at, &mut stats);
                if !self.buf.is_empty() {
                    self.first_at = at;
                }
            }
            if rest.is_empty() {
                break;
            }
            if self.buf.is_empty() {
                self.first_at = at;
            }
            // What completes the current packet; byte by byte while its header is incomplete.
            let need = packet_len(&self.buf).map_or(1, |len| len - self.buf.len());
            let take = need.min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
    }

    fn account(&self, packet: &[u8], at: f64, stats: &mut LinkStats) {
        let (round, model) = match publish_round(packet) {
            Some((TopicKind::Update(_), round)) if self.dir == Dir::Up => (round, true),
            // A global adapter is labelled with the round that produced it; clients train on
            // it in the next.
            Some((TopicKind::Global | TopicKind::GlobalChunk(_), round))
                if self.dir == Dir::Down =>
            {
                (round + 1, true)
            }
            Some((TopicKind::Round, round)) => (round, false),
            _ => (stats.current_round, false),
        };
        stats.current_round = stats.current_round.max(round);
        let flows = match self.dir {
            Dir::Up => &mut stats.up,
            Dir::Down => &mut stats.down,
        };
        let flow = flows.entry(round).or_default();
        flow.bytes += packet.len() as u64;
        if model {
            flow.model_bytes += packet.len() as u64;
            flow.model_first_s.get_or_insert(self.first_at);
            flow.model_last_s = Some(at);
        }
    }
}

/// Length of the MQTT packet at the start of `buf`, once its fixed header is complete.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + (i + 1) + len);
        }
    }
    // A malformed length: account it as one byte and resynchronise on the next.
    Some(1)
}

/// For a PUBLISH on a fedpeft topic: its kind and the round in its envelope header.
fn publish_round(packet: &[u8]) -> Option<(TopicKind, u32)> {
    if packet.first()? >> 4 != 3 {
        return None;
    }
    let qos = (packet[0] >> 1) & 3;
    let mut at = 1;
    while packet.get(at)? & 0x80 != 0 {
        at += 1;
    }
    at += 1;
    let topic_len = usize::from(u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]));
    let topic = std::str::from_utf8(packet.get(at + 2..at + 2 + topic_len)?).ok()?;
    at += 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let kind = Topic::parse(topic).ok()?.kind;
    let header = peek_header(packet.get(at..)?).ok()?;
    Some((kind, header.round))
}

/// One relay: where clients connect, where it forwards, and how it shapes each way.
#[derive(Debug, Clone)]
pub struct RelaySpec {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub up: DirectionSpec,
    pub down: DirectionSpec,
    pub seed: u64,
}

/// A running relay; stops accepting when dropped (open connections end with the process or
/// when either side closes).
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    pub stats: Arc<Mutex<LinkStats>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Binds `spec.listen` and starts accepting. `epoch` is the trial's time origin.
    pub fn start(spec: RelaySpec, epoch: Instant) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind(spec.listen)
            .with_context(|| format!("relay: binding {}", spec.listen))?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stats = Arc::new(Mutex::new(LinkStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (stats2, stop2) = (stats.clone(), stop.clone());
        thread::Builder::new()
            .name(format!("relay-{addr}"))
            .spawn(move || accept_loop(listener, spec, epoch, stats2, stop2))?;
        Ok(Relay { addr, stats, stop })
    }

    pub fn snapshot(&self) -> LinkStats {
        self.stats.lock().expect("link stats lock").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(
    listener: TcpListener,
    spec: RelaySpec,
    epoch: Instant,
    stats: Arc<Mutex<LinkStats>>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                n += 1;
                let _ = client.set_nonblocking(false);
                let upstream = match TcpStream::connect(spec.upstream) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!(
                            "fleet: relay {}: broker {}: {e}",
                            spec.listen, spec.upstream
                        );
                        continue;
                    }
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                // With kernel shaping the bytes this relay writes towards the client are
                // shaped after the write returns, and the down direction is timed at the write:
                // the smallest send buffer the kernel allows (SOCK_MIN_SNDBUF, ~4.6 KB of
                // buffer memory: one or two segments) makes a write return only once the bytes
                // before it have nearly crossed the link, so a download's measured start and
                // end are early by about one segment's time at the rate each.
                let _ = socket2::SockRef::from(&client).set_send_buffer_size(1);
                stats.lock().expect("link stats lock").connections += 1;
                let seed = spec.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                    continue;
                };
                pipe(
                    client,
                    upstream,
                    Dir::Up,
                    spec.up,
                    seed,
                    epoch,
                    stats.clone(),
                );
                pipe(u2, c2, Dir::Down, spec.down, seed ^ 1, epoch, stats.clone());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("fleet: relay {}: accept: {e}", spec.listen);
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One direction: `from` -> model -> `to`.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Dir,
    spec: DirectionSpec,
    seed: u64,
    epoch: Instant,
    stats: Arc<Mutex<LinkStats>>,
) {
    // A few segments in flight between reader and writer; the delay line itself is the
    // writer's wait.
    let (tx, rx) = sync_channel::<(f64, u32, Vec<u8>)>(256);
    let now = move || epoch.elapsed().as_secs_f64();
    let _ = thread::Builder::new()
        .name(format!("relay-read-{dir:?}"))
        .spawn(move || {
            let mut model = DirectionModel::new(spec, seed, now());
            let piece = if spec.is_pass_through() {
                64 * 1024
            } else {
                SEGMENT
            };
            let mut buf = vec![0u8; piece];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let s = model.schedule(now(), n);
                if tx
                    .send((s.delivered, s.lost_segments, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
                sleep_until(epoch, s.sent);
            }
            let _ = from.shutdown(Shutdown::Read);
        });
    let _ = thread::Builder::new()
        .name(format!("relay-write-{dir:?}"))
        .spawn(move || {
            let mut observer = Observer::new(dir);
            for (deliver, lost, bytes) in rx {
                sleep_until(epoch, deliver);
                if to.write_all(&bytes).is_err() {
                    break;
                }
                observer.feed(&bytes, now(), lost, &stats);
            }
            let _ = to.shutdown(Shutdown::Both);
        });
}

fn sleep_until(epoch: Instant, at: f64) {
    let wait = at - epoch.elapsed().as_secs_f64();
    if wait > 0.0 {
        thread::sleep(Duration::from_secs_f64(wait));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload: &[u8], qos1: bool) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos1 {
            body.extend_from_slice(&7u16.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut p = vec![if qos1 { 0x32 } else { 0x30 }];
        let mut len = body.len();
        loop {
            let mut b = (len & 0x7f) as u8;
            len >>= 7;
            if len > 0 {
                b |= 0x80;
            }
            p.push(b);
            if len == 0 {
                break;
            }
        }
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn updates_are_timed_and_counted_by_their_envelope_round_across_pieces() {
        use fedpeft_protocol::{Chunk, Envelope};
        let chunk = Envelope::new(
            9,
            3,
            Chunk {
                message_id: 1,
                index: 0,
                count: 1,
                total_len: 4,
                crc32: 0,
                data: vec![0; 5000],
            },
        )
        .encode()
        .unwrap();
        let update = publish("fedpeft/v1/f/update/c-1", &chunk, true);
        let ping = [0xC0u8, 0x00];
        let stats = Mutex::new(LinkStats::default());
        let mut obs = Observer::new(Dir::Up);
        let mut stream = ping.to_vec();
        stream.extend_from_slice(&update);
        stream.extend_from_slice(&ping);
        // Fed in odd-sized pieces at t = 1, 2, 3, ...: the update starts in the first piece.
        for (i, piece) in stream.chunks(1000).enumerate() {
            obs.feed(piece, 1.0 + i as f64, 0, &stats);
        }
        // The same stream in one piece: three packets in one read.
        let whole = Mutex::new(LinkStats::default());
        Observer::new(Dir::Up).feed(&stream, 5.0, 0, &whole);
        let whole = whole.into_inner().unwrap();
        assert_eq!(whole.up[&3].model_bytes, update.len() as u64);
        assert_eq!(whole.up[&3].bytes, update.len() as u64 + 2);
        let s = stats.into_inner().unwrap();
        assert_eq!(s.up_bytes, stream.len() as u64);
        let r3 = &s.up[&3];
        assert_eq!(r3.model_bytes, update.len() as u64);
        assert_eq!(r3.model_first_s, Some(1.0));
        assert_eq!(
            r3.model_last_s,
            Some(1.0 + ((2 + update.len() - 1) / 1000) as f64)
        );
        // The first ping came before any round was seen; the last one counts for round 3.
        assert_eq!(s.up[&0].bytes, 2);
        assert_eq!(r3.bytes, update.len() as u64 + 2);
    }
}
