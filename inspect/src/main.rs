//! `fedpeft-decode [FILE] [--topic T] [--summary]`: print a fedpeft payload as JSON.
//!
//! ```sh
//! mosquitto_sub -N -C 1 -t fedpeft/v1/lab/update/pi-01 | fedpeft-decode --topic fedpeft/v1/lab/update/pi-01 --summary
//! ```

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use fedpeft_inspect::{Detail, payload_to_json};

/// Decode one fedpeft MQTT payload (raw bytes) and print it as JSON.
#[derive(Debug, Parser)]
#[command(name = "fedpeft-decode", version)]
struct Args {
    /// File holding the payload; standard input when absent or `-`.
    file: Option<PathBuf>,
    /// The MQTT topic the payload came from: reported, and checked against the payload.
    #[arg(long)]
    topic: Option<String>,
    /// Print tensor statistics instead of every value.
    #[arg(long)]
    summary: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (bytes, source) = match &args.file {
        Some(p) if p.as_os_str() != "-" => (
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading standard input")?;
            (buf, "standard input".to_string())
        }
    };
    let detail = if args.summary {
        Detail::Summary
    } else {
        Detail::Full
    };
    let json = payload_to_json(&bytes, args.topic.as_deref(), detail)
        .with_context(|| format!("{source} ({} bytes) is not a fedpeft payload", bytes.len()))?;
    let text = serde_json::to_string_pretty(&json)?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        // `fedpeft-decode … | head` closing the pipe early is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing standard output"),
    }
}
