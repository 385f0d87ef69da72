//! Arbitrary text as the edge client's TOML config, merged with empty flags and validated.
#![no_main]

use std::path::Path;

use clap::Parser;
use fedpeft_edge::config::{Cli, EdgeConfig, FileConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cli = Cli::try_parse_from(["edge-client"]).expect("no flags parse");
    if let Ok(file) = FileConfig::parse(text, Path::new("fuzz.toml")) {
        let _ = EdgeConfig::resolve(file, &cli);
    }
});
