//! Arbitrary bytes into the envelope decoder (every message kind), twice: as given, and with a
//! valid version byte and CRC appended so the body decoders are reached instead of stopping at
//! the checksum.
#![no_main]

use fedpeft_protocol::{Envelope, crc32, peek_header};
use libfuzzer_sys::fuzz_target;

fn exercise(bytes: &[u8]) {
    let _ = peek_header(bytes);
    if let Ok(env) = Envelope::decode(bytes) {
        let _ = env.message.validate();
        for t in env.message.tensors() {
            let _ = t.to_f32();
        }
        // Whatever decodes must encode again and decode to the same kind.
        let again = env.encode().expect("a decoded envelope re-encodes");
        let back = Envelope::decode(&again).expect("a re-encoded envelope decodes");
        assert_eq!(back.kind(), env.kind());
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    let mut signed = Vec::with_capacity(data.len() + 5);
    signed.push(1);
    signed.extend_from_slice(data);
    let crc = crc32(&signed);
    signed.extend_from_slice(&crc.to_le_bytes());
    exercise(&signed);
});
