//! Splitting payloads that exceed a broker's packet limit into [`Chunk`] messages, and putting
//! them back together with bounded memory.
//!
//! Every chunk but the last carries exactly `ceil(total_len / count)` bytes and the last the
//! rest, so a receiver knows where chunk `i` goes and how long it must be from the first chunk it
//! sees, in any arrival order. The reassembled bytes are normally an encoded
//! [`crate::Envelope`] and are checked against the chunks' CRC-32 before being handed
//! out.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::checksum::crc32c;
use crate::envelope::{EncodeError, Envelope};
use crate::message::Chunk;

/// Upper bound on an encoded chunk envelope's size minus its data: header (version 1, run id
/// 10, round 5, kind 1), chunk fields (5 varints of at most 5 bytes), data length (5), CRC (4).
pub const CHUNK_OVERHEAD_MAX: usize = 1 + 10 + 5 + 1 + 5 * 5 + 5 + 4;

/// Why a payload could not be split.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitError {
    /// `max_packet` leaves no room for data after the chunk overhead.
    PacketTooSmall {
        /// The limit given.
        max_packet: usize,
        /// Smallest usable limit.
        min: usize,
    },
    /// The payload is longer than a chunk header can describe (u32).
    PayloadTooLarge {
        /// Its length.
        len: usize,
    },
    /// Encoding a chunk failed.
    Encode(EncodeError),
}

impl fmt::Display for SplitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitError::PacketTooSmall { max_packet, min } => write!(
                f,
                "max packet size {max_packet} is too small for chunking (need at least {min})"
            ),
            SplitError::PayloadTooLarge { len } => {
                write!(
                    f,
                    "payload of {len} bytes exceeds the 4 GiB a chunk header can describe"
                )
            }
            SplitError::Encode(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for SplitError {}

/// Returns the packets to publish for `payload` (an encoded envelope): `payload` itself when it
/// fits in `max_packet` bytes, otherwise chunk envelopes of at most `max_packet` bytes each,
/// tagged with `message_id` (unique among the sender's in-flight payloads).
pub fn split(
    payload: &[u8],
    max_packet: usize,
    run_id: u64,
    round: u32,
    message_id: u32,
) -> Result<Vec<Vec<u8>>, SplitError> {
    if payload.len() <= max_packet {
        return Ok(vec![payload.to_vec()]);
    }
    let capacity = max_packet.saturating_sub(CHUNK_OVERHEAD_MAX);
    if capacity == 0 {
        return Err(SplitError::PacketTooSmall {
            max_packet,
            min: CHUNK_OVERHEAD_MAX + 1,
        });
    }
    let total_len = u32::try_from(payload.len())
        .map_err(|_| SplitError::PayloadTooLarge { len: payload.len() })?;
    let count = payload.len().div_ceil(capacity);
    let size = payload.len().div_ceil(count);
    let crc = crc32c(payload);
    payload
        .chunks(size)
        .enumerate()
        .map(|(index, data)| {
            let chunk = Chunk {
                message_id,
                index: index as u32,
                count: count as u32,
                total_len,
                crc32: crc,
                data: data.to_vec(),
            };
            Envelope::new(run_id, round, chunk)
                .encode()
                .map_err(SplitError::Encode)
        })
        .collect()
}

/// Memory and time bounds for a [`Reassembler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Most payloads being reassembled at once.
    pub max_in_flight: usize,
    /// Most bytes reserved across all of them (each reserves its `total_len` up front).
    pub max_total_bytes: usize,
    /// Largest single reassembled payload.
    pub max_message_bytes: usize,
    /// A payload whose first chunk is older than this is dropped as incomplete.
    pub timeout_ms: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            max_total_bytes: 64 << 20,
            max_message_bytes: 16 << 20,
            timeout_ms: 60_000,
        }
    }
}

/// A chunk (or a payload) the reassembler refused. Every variant names the `message_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReassemblyError {
    /// `count` is 0, `index >= count`, `total_len` is 0, or `count > total_len`.
    Malformed {
        /// Payload id.
        message_id: u32,
        /// Chunk index.
        index: u32,
        /// Chunk count.
        count: u32,
        /// Claimed total length.
        total_len: u32,
    },
    /// The payload would exceed `max_message_bytes`.
    Oversized {
        /// Payload id.
        message_id: u32,
        /// Claimed total length.
        total_len: u32,
        /// The limit.
        max: usize,
    },
    /// The chunk's data length is not what its index implies.
    WrongLength {
        /// Payload id.
        message_id: u32,
        /// Chunk index.
        index: u32,
        /// Length implied.
        expected: usize,
        /// Length carried.
        found: usize,
    },
    /// This chunk was already received (e.g. a QoS 1 redelivery); it is ignored.
    Duplicate {
        /// Payload id.
        message_id: u32,
        /// Chunk index.
        index: u32,
    },
    /// Starting another payload would exceed `max_in_flight`.
    TooManyInFlight {
        /// Payload id refused.
        message_id: u32,
        /// The limit.
        max: usize,
    },
    /// Starting this payload would exceed `max_total_bytes`.
    OverBudget {
        /// Payload id refused.
        message_id: u32,
        /// Bytes it needs.
        needed: usize,
        /// Bytes still free.
        available: usize,
    },
    /// All chunks arrived but their bytes do not match the CRC; the payload is dropped.
    CrcMismatch {
        /// Payload id.
        message_id: u32,
        /// CRC computed.
        computed: u32,
        /// CRC carried.
        carried: u32,
    },
    /// The timeout passed before all chunks arrived; the payload is dropped.
    Incomplete {
        /// Payload id.
        message_id: u32,
        /// Chunks received.
        received: u32,
        /// Chunks expected.
        count: u32,
    },
}

impl fmt::Display for ReassemblyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ReassemblyError::*;
        match self {
            Malformed {
                message_id,
                index,
                count,
                total_len,
            } => write!(
                f,
                "chunk {index}/{count} of message {message_id} is malformed (total length {total_len})"
            ),
            Oversized {
                message_id,
                total_len,
                max,
            } => write!(
                f,
                "message {message_id} would be {total_len} bytes, more than the {max} allowed"
            ),
            WrongLength {
                message_id,
                index,
                expected,
                found,
            } => write!(
                f,
                "chunk {index} of message {message_id} carries {found} bytes, expected {expected}"
            ),
            Duplicate { message_id, index } => {
                write!(
                    f,
                    "chunk {index} of message {message_id} was already received"
                )
            }
            TooManyInFlight { message_id, max } => write!(
                f,
                "cannot start message {message_id}: {max} messages are already being reassembled"
            ),
            OverBudget {
                message_id,
                needed,
                available,
            } => write!(
                f,
                "cannot start message {message_id}: needs {needed} bytes, {available} left in the reassembly budget"
            ),
            CrcMismatch {
                message_id,
                computed,
                carried,
            } => write!(
                f,
                "message {message_id} reassembled with CRC {computed:#010x}, chunks carry {carried:#010x}"
            ),
            Incomplete {
                message_id,
                received,
                count,
            } => write!(
                f,
                "message {message_id} timed out with {received} of {count} chunks"
            ),
        }
    }
}

impl core::error::Error for ReassemblyError {}

#[derive(Debug)]
struct Partial {
    count: u32,
    total_len: u32,
    crc32: u32,
    chunk_size: usize,
    buf: Vec<u8>,
    received: Vec<u64>,
    received_count: u32,
    started_ms: u64,
    /// Chunks that arrived for a filled slot with other bytes, at most [`MAX_ALTERNATES`]: a
    /// forged or corrupted copy may have come first, so the payload is also tried with these.
    alternates: Vec<(u32, Vec<u8>)>,
}

/// Copies with other bytes kept per payload: a payload fails its digest only when every way
/// of putting it together with them fails (at most 2^4 tries).
const MAX_ALTERNATES: usize = 4;

impl Partial {
    /// The payload put together with the first chunk of each slot, then with each subset of the
    /// alternates in its slots instead: the first one whose CRC-32C is the claimed one.
    fn assemble(self, message_id: u32) -> Result<Vec<u8>, ReassemblyError> {
        let first = verify(message_id, self.crc32, self.buf.clone());
        if first.is_ok() {
            return first;
        }
        let alts = &self.alternates;
        for subset in 1u32..(1 << alts.len()) {
            let chosen: Vec<&(u32, Vec<u8>)> = (0..alts.len())
                .filter(|i| subset & (1 << i) != 0)
                .map(|i| &alts[i])
                .collect();
            let one_per_slot = chosen
                .iter()
                .enumerate()
                .all(|(i, a)| chosen[..i].iter().all(|b| b.0 != a.0));
            if !one_per_slot {
                continue;
            }
            let mut buf = self.buf.clone();
            for (index, data) in chosen {
                let offset = self.chunk_size * *index as usize;
                buf[offset..offset + data.len()].copy_from_slice(data);
            }
            if crc32c(&buf) == self.crc32 {
                return Ok(buf);
            }
        }
        first
    }

    fn held_bytes(&self) -> usize {
        self.alternates.iter().map(|(_, d)| d.len()).sum()
    }
}

/// Length chunk `index` must have, or `None` when `count` and `total_len` cannot come from
/// [`split`] (the last chunk would be empty or negative: then earlier chunks would also run past
/// the end of the buffer).
fn expected_len(total_len: u32, count: u32, index: u32) -> Option<usize> {
    let total = total_len as usize;
    let size = total.div_ceil(count as usize);
    let last = total
        .checked_sub(size.checked_mul(count as usize - 1)?)
        .filter(|&n| n > 0)?;
    Some(if index + 1 < count { size } else { last })
}

/// What a chunk's header says about the whole payload it belongs to. Chunks are put together
/// only when they agree on all of it: a chunk that disagrees (a forged, corrupted or copied
/// one that reuses a message id) starts a payload of its own instead of spoiling the real
/// one, which still completes; the stray payload never completes, or fails its CRC, or
/// expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Claim {
    message_id: u32,
    count: u32,
    total_len: u32,
    crc32: u32,
}

/// Reassembles chunked payloads from many senders with bounded memory. `K` identifies the
/// sender (e.g. the topic or client id), so equal message ids from different senders do not
/// mix. Time is supplied by the caller (`now_ms`, any monotonic milliseconds): there is no
/// clock in `no_std`.
#[derive(Debug)]
pub struct Reassembler<K: Ord> {
    limits: ReassemblyLimits,
    partial: BTreeMap<(K, Claim), Partial>,
    reserved: usize,
}

impl<K: Ord + Clone> Reassembler<K> {
    /// An empty reassembler.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            partial: BTreeMap::new(),
            reserved: 0,
        }
    }

    /// Its limits.
    pub fn limits(&self) -> ReassemblyLimits {
        self.limits
    }

    /// Payloads currently being reassembled.
    pub fn in_flight(&self) -> usize {
        self.partial.len()
    }

    /// Bytes currently reserved.
    pub fn reserved_bytes(&self) -> usize {
        self.reserved
    }

    /// Takes one chunk from `source`. Returns the whole payload when this chunk completes it.
    /// A rejected chunk leaves the other chunks of its payload in place, except a CRC mismatch,
    /// which drops the payload.
    pub fn push(
        &mut self,
        source: K,
        chunk: Chunk,
        now_ms: u64,
    ) -> Result<Option<Vec<u8>>, ReassemblyError> {
        let Chunk {
            message_id,
            index,
            count,
            total_len,
            crc32: carried,
            data,
        } = chunk;
        if count == 0 || index >= count || total_len == 0 || count > total_len {
            return Err(ReassemblyError::Malformed {
                message_id,
                index,
                count,
                total_len,
            });
        }
        if total_len as usize > self.limits.max_message_bytes {
            return Err(ReassemblyError::Oversized {
                message_id,
                total_len,
                max: self.limits.max_message_bytes,
            });
        }
        let expected = expected_len(total_len, count, index).ok_or(ReassemblyError::Malformed {
            message_id,
            index,
            count,
            total_len,
        })?;

        let claim = Claim {
            message_id,
            count,
            total_len,
            crc32: carried,
        };
        let key = (source, claim);
        if data.len() != expected {
            return Err(ReassemblyError::WrongLength {
                message_id,
                index,
                expected,
                found: data.len(),
            });
        }

        if count == 1 {
            // Nothing to hold: check and hand it straight back.
            return verify(message_id, carried, data).map(Some);
        }

        if !self.partial.contains_key(&key) {
            if self.partial.len() >= self.limits.max_in_flight {
                return Err(ReassemblyError::TooManyInFlight {
                    message_id,
                    max: self.limits.max_in_flight,
                });
            }
            let needed = total_len as usize;
            let available = self.limits.max_total_bytes.saturating_sub(self.reserved);
            if needed > available {
                return Err(ReassemblyError::OverBudget {
                    message_id,
                    needed,
                    available,
                });
            }
            self.reserved += needed;
            self.partial.insert(
                key.clone(),
                Partial {
                    count,
                    total_len,
                    crc32: carried,
                    chunk_size: (total_len as usize).div_ceil(count as usize),
                    buf: vec![0; needed],
                    received: vec![0; (count as usize).div_ceil(64)],
                    received_count: 0,
                    started_ms: now_ms,
                    alternates: Vec::new(),
                },
            );
        }
        let Some(p) = self.partial.get_mut(&key) else {
            return Ok(None);
        };
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if p.received[word] & bit != 0 {
            let offset = p.chunk_size * index as usize;
            let same = p.buf[offset..offset + data.len()] == data[..]
                || p.alternates.iter().any(|(i, d)| *i == index && *d == data);
            let room = self.limits.max_total_bytes.saturating_sub(self.reserved) >= data.len();
            if same || p.alternates.len() >= MAX_ALTERNATES || !room {
                // A redelivery (QoS 1), or no room for another candidate.
                return Err(ReassemblyError::Duplicate { message_id, index });
            }
            self.reserved += data.len();
            p.alternates.push((index, data));
            return Ok(None);
        }
        p.received[word] |= bit;
        p.received_count += 1;
        let offset = p.chunk_size * index as usize;
        p.buf[offset..offset + data.len()].copy_from_slice(&data);
        if p.received_count < p.count {
            return Ok(None);
        }
        let Some(done) = self.partial.remove(&key) else {
            return Ok(None);
        };
        self.reserved -= done.total_len as usize + done.held_bytes();
        done.assemble(message_id).map(Some)
    }

    /// Drops every payload whose first chunk arrived `timeout_ms` or more before `now_ms`,
    /// returning an [`ReassemblyError::Incomplete`] for each (with its source).
    pub fn expire(&mut self, now_ms: u64) -> Vec<(K, ReassemblyError)> {
        let timeout = self.limits.timeout_ms;
        let stale: Vec<(K, Claim)> = self
            .partial
            .iter()
            .filter(|(_, p)| now_ms.saturating_sub(p.started_ms) >= timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::with_capacity(stale.len());
        for key in stale {
            if let Some(p) = self.partial.remove(&key) {
                self.reserved -= p.total_len as usize + p.held_bytes();
                let err = ReassemblyError::Incomplete {
                    message_id: key.1.message_id,
                    received: p.received_count,
                    count: p.count,
                };
                out.push((key.0, err));
            }
        }
        out
    }
}

fn verify(message_id: u32, carried: u32, data: Vec<u8>) -> Result<Vec<u8>, ReassemblyError> {
    let computed = crc32c(&data);
    if computed != carried {
        return Err(ReassemblyError::CrcMismatch {
            message_id,
            computed,
            carried,
        });
    }
    Ok(data)
}
