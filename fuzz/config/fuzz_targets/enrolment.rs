//! Arbitrary text as the aggregator's enrolment file (client id and Ed25519 public key per
//! line).
#![no_main]

use std::path::Path;

use fedpeft_aggregator::keys::Enrolment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Enrolment::parse(text, Path::new("fuzz.keys"));
});
