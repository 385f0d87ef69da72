//! Arbitrary text as a fleet trial file and as a sweep file: parse and validate, never panic.
#![no_main]

use std::path::Path;

use fedpeft_fleet::sweep::Sweep;
use fedpeft_fleet::trial::Trial;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Trial::parse(text, Path::new("fuzz.toml"));
    let _ = Sweep::parse(text);
});
