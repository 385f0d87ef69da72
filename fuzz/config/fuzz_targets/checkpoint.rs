//! Arbitrary bytes as an aggregator checkpoint, as given and behind a valid header (magic,
//! version, SHA-256 of the rest) so the state decoder is reached; whatever decodes must
//! encode to the same bytes.
#![no_main]

use std::path::Path;

use fedpeft_aggregator::checkpoint::{from_bytes, to_bytes};
use libfuzzer_sys::fuzz_target;

fn exercise(bytes: &[u8]) {
    let path = Path::new("fuzz.ckpt");
    if let Ok(state) = from_bytes(bytes, path) {
        let again = to_bytes(&state, path).expect("a decoded state encodes");
        let back = from_bytes(&again, path).expect("an encoded state decodes");
        assert_eq!(to_bytes(&back, path).unwrap(), again);
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    exercise(&fedpeft_aggregator::checkpoint::with_header(data));
});
