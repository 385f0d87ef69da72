//! Arbitrary chunk sequences (from several sources, with a moving clock) into the reassembler;
//! memory bounds must hold after every step.
#![no_main]

use fedpeft_protocol::{Chunk, ReassemblyLimits, Reassembler};
use libfuzzer_sys::fuzz_target;

const LIMITS: ReassemblyLimits =
    ReassemblyLimits { max_in_flight: 4, max_total_bytes: 256, max_message_bytes: 128, timeout_ms: 500 };

fuzz_target!(|data: &[u8]| {
    let mut r = Reassembler::new(LIMITS);
    let mut now = 0u64;
    let mut rest = data;
    // Each step: source (1), message id (1), index (1), count (1), total_len (1), crc (4),
    // time step (1), data length (1), data.
    while rest.len() >= 11 {
        let (h, tail) = rest.split_at(11);
        let len = usize::from(h[10]).min(tail.len());
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        now += u64::from(h[9]) * 4;
        let chunk = Chunk {
            message_id: u32::from(h[1] % 4),
            index: u32::from(h[2] % 8),
            count: u32::from(h[3] % 8),
            total_len: u32::from(h[4]),
            crc32: u32::from_le_bytes([h[5], h[6], h[7], h[8]]),
            data: bytes.to_vec(),
        };
        let total = chunk.total_len as usize;
        if let Ok(Some(out)) = r.push(h[0] % 3, chunk, now) {
            assert_eq!(out.len(), total);
        }
        assert!(r.reserved_bytes() <= LIMITS.max_total_bytes);
        assert!(r.in_flight() <= LIMITS.max_in_flight);
        let _ = r.expire(now);
    }
});
