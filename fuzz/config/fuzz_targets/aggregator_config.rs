//! Arbitrary text as the aggregator's TOML config: parsing and validation must return a value
//! or an error, never panic.
#![no_main]

use std::path::Path;

use fedpeft_aggregator::config::RawConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = RawConfig::parse(text, Path::new("fuzz.toml")) {
        let _ = raw.validate();
    }
});
