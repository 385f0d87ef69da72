//! `fedpeft-fleet run TRIAL.toml`: runs a federated trial end to end on this machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fedpeft_fleet::{Binaries, Trial, run};

#[derive(Debug, Parser)]
#[command(name = "fedpeft-fleet", version, about = "fedpeft fleet trials")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one trial: the aggregator (embedded broker) and every edge client as processes.
    Run {
        /// The trial file (see `trials/quickstart.toml`).
        trial: PathBuf,
        /// Results folder. Default `runs/<trial name>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Give up (and stop every process) after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let Cmd::Run {
        trial,
        out,
        timeout_secs,
    } = Cli::parse().command;
    let trial = Trial::load(&trial)?;
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&trial.name));
    let exe = std::env::current_exe().context("locating fedpeft-fleet")?;
    let bins = Binaries::beside(&exe)?;
    println!(
        "fleet: trial `{}`: {} clients, {} rounds, {} on {}, results in {}",
        trial.name,
        trial.clients,
        trial.rounds,
        trial.model.peft,
        trial.model.backbone.display(),
        out.display()
    );
    let outcome = run(&trial, &bins, &out, Duration::from_secs(timeout_secs))?;
    let clean = outcome
        .client_status
        .iter()
        .filter(|s| s.is_some_and(|s| s.success()))
        .count();
    println!(
        "fleet: finished in {:.1} s; {clean}/{} clients exited cleanly; report: {} (and report.csv)",
        outcome.elapsed.as_secs_f64(),
        outcome.client_status.len(),
        outcome.report.display()
    );
    if !outcome.aggregator_status.success() {
        bail!(
            "the aggregator failed ({}); see {}",
            outcome.aggregator_status,
            outcome.out_dir.join("logs/aggregator.log").display()
        );
    }
    Ok(())
}
