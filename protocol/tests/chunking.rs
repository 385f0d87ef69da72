//! Chunking and reassembly: round trips, and one test per rejection.

use fedpeft_protocol::chunk::{CHUNK_OVERHEAD_MAX, split};
use fedpeft_protocol::*;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn chunks_of(p: &[u8], max_packet: usize, message_id: u32) -> Vec<Chunk> {
    split(p, max_packet, 1, 2, message_id)
        .unwrap()
        .iter()
        .map(|bytes| {
            assert!(
                bytes.len() <= max_packet,
                "chunk of {} bytes > {max_packet}",
                bytes.len()
            );
            match Envelope::decode(bytes).unwrap().message {
                Message::Chunk(c) => c,
                other => panic!("expected a chunk, got {:?}", other.kind()),
            }
        })
        .collect()
}

fn limits() -> ReassemblyLimits {
    ReassemblyLimits {
        max_in_flight: 2,
        max_total_bytes: 10_000,
        max_message_bytes: 6_000,
        timeout_ms: 1_000,
    }
}

#[test]
fn small_payloads_are_sent_as_they_are() {
    let p = payload(100);
    assert_eq!(split(&p, 100, 0, 0, 0).unwrap(), vec![p]);
}

#[test]
fn chunks_fit_the_packet_limit_and_reassemble_in_any_order() {
    for (len, max_packet) in [(5_000, 1_000), (1_001, 1_000), (4_999, 60), (3_000, 2_999)] {
        let p = payload(len);
        let mut chunks = chunks_of(&p, max_packet, 9);
        assert!(chunks.len() > 1);
        chunks.reverse();
        let mid = chunks.len() / 2;
        chunks.swap(0, mid);
        let mut r = Reassembler::new(ReassemblyLimits {
            max_message_bytes: 10_000,
            ..limits()
        });
        let n = chunks.len();
        for (i, c) in chunks.into_iter().enumerate() {
            let out = r.push("pi-01", c, 0).unwrap();
            assert_eq!(out.is_some(), i + 1 == n);
            if let Some(out) = out {
                assert_eq!(out, p, "len {len} max {max_packet}");
            }
        }
        assert_eq!((r.in_flight(), r.reserved_bytes()), (0, 0));
    }
}

#[test]
fn a_chunked_envelope_decodes_after_reassembly() {
    let big = GlobalAdapter {
        round: 0,
        tensors: vec![Tensor::dense("w", &[2_000], Values::F32(vec![0.5; 2_000])).unwrap()],
    };
    let bytes = Envelope::new(1, 0, big.clone()).encode().unwrap();
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut done = None;
    for c in chunks_of(&bytes, 1_024, 1) {
        done = r.push(0u8, c, 0).unwrap().or(done);
    }
    assert_eq!(
        Envelope::decode(&done.unwrap()).unwrap().message,
        Message::GlobalAdapter(big)
    );
}

#[test]
fn a_packet_limit_below_the_overhead_is_refused() {
    assert_eq!(
        split(&payload(500), CHUNK_OVERHEAD_MAX, 0, 0, 0),
        Err(SplitError::PacketTooSmall {
            max_packet: CHUNK_OVERHEAD_MAX,
            min: CHUNK_OVERHEAD_MAX + 1
        })
    );
}

#[test]
fn duplicate_chunks_are_rejected_and_do_not_disturb_reassembly() {
    let p = payload(3_000);
    let chunks = chunks_of(&p, 1_000, 4);
    let mut r = Reassembler::new(limits());
    r.push("a", chunks[0].clone(), 0).unwrap();
    assert_eq!(
        r.push("a", chunks[0].clone(), 1),
        Err(ReassemblyError::Duplicate {
            message_id: 4,
            index: 0
        })
    );
    let mut out = None;
    for c in &chunks[1..] {
        out = r.push("a", c.clone(), 2).unwrap();
    }
    assert_eq!(out.unwrap(), p);
}

#[test]
fn chunks_disagreeing_with_the_first_never_spoil_the_payload_they_copy() {
    let p = payload(3_000);
    let chunks = chunks_of(&p, 1_000, 4);
    // Altered copies of a chunk (another CRC) arrive first, then the real payload: each copy
    // is a payload of its own, and the real one still completes.
    let mut limits = limits();
    limits.max_in_flight = 4;
    let mut r = Reassembler::new(limits);
    for flip in [1, 2] {
        let mut c = chunks[1].clone();
        c.crc32 ^= flip;
        assert_eq!(r.push("a", c, 0), Ok(None));
    }
    let mut out = None;
    for c in &chunks {
        out = r.push("a", c.clone(), 1).unwrap();
    }
    assert_eq!(out.unwrap(), p);
    // The strays are dropped when they expire, and release their memory.
    assert_eq!(r.expire(limits.timeout_ms + 1).len(), 2);
    assert_eq!((r.in_flight(), r.reserved_bytes()), (0, 0));
}

#[test]
fn chunks_with_the_wrong_length_or_impossible_headers_are_rejected() {
    let chunks = chunks_of(&payload(3_000), 1_000, 4);
    let mut r = Reassembler::new(limits());
    let mut c = chunks[1].clone();
    c.data.pop();
    assert!(matches!(
        r.push("a", c, 0),
        Err(ReassemblyError::WrongLength { index: 1, .. })
    ));
    for (index, count, total_len) in [(0, 0, 10), (3, 3, 10), (0, 2, 0), (0, 11, 10)] {
        let c = Chunk {
            message_id: 1,
            index,
            count,
            total_len,
            crc32: 0,
            data: vec![0],
        };
        assert!(
            matches!(r.push("a", c, 0), Err(ReassemblyError::Malformed { .. })),
            "{index} {count} {total_len}"
        );
    }
    // 4 chunks of ceil(5/4) = 2 bytes: chunk 2 would end at byte 6 of a 5-byte payload. Found
    // by the reassembly property test (it panicked on a slice index before this check).
    let c = Chunk {
        message_id: 2,
        index: 2,
        count: 4,
        total_len: 5,
        crc32: 0,
        data: vec![0, 0],
    };
    assert!(matches!(
        r.push("a", c, 0),
        Err(ReassemblyError::Malformed { .. })
    ));
    // count and total_len no splitter could produce: 4 chunks of ceil(9/4) = 3 leave nothing
    // for the last one.
    let c = Chunk {
        message_id: 1,
        index: 3,
        count: 4,
        total_len: 9,
        crc32: 0,
        data: vec![],
    };
    assert!(matches!(
        r.push("a", c, 0),
        Err(ReassemblyError::Malformed { .. })
    ));
}

#[test]
fn oversized_payloads_are_rejected_before_any_allocation() {
    let mut r = Reassembler::<&str>::new(limits());
    let c = Chunk {
        message_id: 1,
        index: 0,
        count: 2,
        total_len: u32::MAX,
        crc32: 0,
        data: vec![0; 10],
    };
    assert_eq!(
        r.push("a", c, 0),
        Err(ReassemblyError::Oversized {
            message_id: 1,
            total_len: u32::MAX,
            max: 6_000
        })
    );
    assert_eq!(r.reserved_bytes(), 0);
}

#[test]
fn memory_budget_and_in_flight_limits_are_enforced() {
    let mut r = Reassembler::new(limits());
    let a = chunks_of(&payload(5_000), 1_000, 1);
    let b = chunks_of(&payload(5_500), 1_000, 2);
    let c = chunks_of(&payload(100), 60, 3);
    r.push("a", a[0].clone(), 0).unwrap();
    assert_eq!(r.reserved_bytes(), 5_000);
    assert_eq!(
        r.push("a", b[0].clone(), 0),
        Err(ReassemblyError::OverBudget {
            message_id: 2,
            needed: 5_500,
            available: 5_000
        })
    );
    r.push("b", c[0].clone(), 0).unwrap();
    // The same message id from another source is another payload, and a third is one too many.
    assert_eq!(
        r.push("c", c[0].clone(), 0),
        Err(ReassemblyError::TooManyInFlight {
            message_id: 3,
            max: 2
        })
    );
}

#[test]
fn payloads_missing_chunks_time_out_and_free_their_memory() {
    let chunks = chunks_of(&payload(3_000), 1_000, 8);
    let mut r = Reassembler::new(limits());
    r.push("a", chunks[0].clone(), 100).unwrap();
    r.push("a", chunks[2].clone(), 500).unwrap();
    assert!(r.expire(1_099).is_empty());
    assert_eq!(
        r.expire(1_100),
        vec![(
            "a",
            ReassemblyError::Incomplete {
                message_id: 8,
                received: 2,
                count: chunks.len() as u32
            }
        )]
    );
    assert_eq!((r.in_flight(), r.reserved_bytes()), (0, 0));
}

#[test]
fn corrupted_chunk_data_fails_the_payload_crc() {
    let mut chunks = chunks_of(&payload(3_000), 1_000, 5);
    chunks[1].data[10] ^= 0xff;
    let mut r = Reassembler::new(limits());
    let mut last = Ok(None);
    for c in chunks {
        last = r.push("a", c, 0);
    }
    assert!(matches!(
        last,
        Err(ReassemblyError::CrcMismatch { message_id: 5, .. })
    ));
    assert_eq!(r.reserved_bytes(), 0);
}

#[test]
fn the_overhead_bound_holds_for_the_largest_header_values() {
    let p = payload(10_000);
    for max_packet in [CHUNK_OVERHEAD_MAX + 1, 100, 1_000, 4_096] {
        let parts = split(&p, max_packet, u64::MAX, u32::MAX, u32::MAX).unwrap();
        for bytes in &parts {
            assert!(bytes.len() <= max_packet, "{} > {max_packet}", bytes.len());
        }
        // No more chunks than the documented formula: ceil(len / (max_packet - overhead)).
        assert_eq!(
            parts.len(),
            p.len().div_ceil(max_packet - CHUNK_OVERHEAD_MAX)
        );
    }
}
