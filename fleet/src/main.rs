//! `fedpeft-fleet run TRIAL.toml`: runs a federated trial end to end on this machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use fedpeft_fleet::links::Mechanism;
use fedpeft_fleet::runner::INTERRUPTED;
use fedpeft_fleet::{Binaries, Trial, run};

/// On SIGINT / SIGTERM the run loop stops and unwinds, so every guard (child processes,
/// relays, network namespaces) is dropped; a second signal still stops the run loop only.
fn install_signal_handler() {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut int), Ok(mut term)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    eprintln!("fleet: interrupted; stopping the processes and removing the links");
                    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
        });
}

/// Before a trial or sweep named `name` runs: the signal handler installed, the results folder
/// (`--out`, else `runs/<name>`), and the aggregator and edge-client binaries beside this one.
fn prepare(out: Option<PathBuf>, name: &str) -> anyhow::Result<(PathBuf, Binaries)> {
    install_signal_handler();
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(name));
    let exe = std::env::current_exe().context("locating fedpeft-fleet")?;
    Ok((out, Binaries::beside(&exe)?))
}

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
        /// Link emulation: kernel (namespaces + tc; root), userspace (token-bucket relays),
        /// auto (kernel when root and available), none. Default: the trial's `links.mechanism`.
        #[arg(long, value_parser = ["kernel", "userspace", "auto", "none"])]
        links: Option<String>,
    },
    /// Run every trial of a sweep file one after another (resuming finished ones) and write the
    /// results table (`results.json`, `results.csv`, `results.md`) beside them.
    Sweep {
        /// The sweep file (see `sweeps/small.toml`).
        sweep: PathBuf,
        /// Results folder. Default `runs/<sweep name>`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Give up on a trial (and the sweep) after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
    },
    /// Draw the plots (SVG and PNG) of an existing results folder again: a sweep's
    /// (results.json) or a trial's (report.json).
    Plot {
        /// The results folder.
        dir: PathBuf,
    },
    /// Load generator: N virtual clients in this process, each a real MQTT session speaking
    /// the protocol to a running aggregator (see the book's "Load testing with a swarm").
    Swarm(Box<fedpeft_fleet::swarm::SwarmArgs>),
}

fn main() -> anyhow::Result<()> {
    fedpeft_fleet::runner::progress::install(
        fedpeft_fleet::runner::progress::Progress::for_terminal(),
    );
    let (trial, out, timeout_secs, links) = match Cli::parse().command {
        Cmd::Run {
            trial,
            out,
            timeout_secs,
            links,
        } => (trial, out, timeout_secs, links),
        Cmd::Sweep {
            sweep,
            out,
            timeout_secs,
        } => return sweep_main(&sweep, out, timeout_secs),
        Cmd::Swarm(args) => {
            if !fedpeft_fleet::swarm::main(*args)? {
                bail!("swarm: a check failed or the run did not finish (see its report)");
            }
            return Ok(());
        }
        Cmd::Plot { dir } => {
            let files = fedpeft_fleet::plot::plot_dir(&dir)?;
            for f in files {
                println!("{}", f.display());
            }
            return Ok(());
        }
    };
    let mut trial = Trial::load(&trial)?;
    if let Some(m) = links {
        trial.set_mechanism(Mechanism::parse(&m).context("--links")?)?;
    }
    trial.preflight()?;
    let (out, bins) = prepare(out, &trial.name)?;
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

fn sweep_main(
    path: &std::path::Path,
    out: Option<PathBuf>,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let sweep = fedpeft_fleet::sweep::Sweep::load(path)?;
    let (out, bins) = prepare(out, &sweep.name)?;
    println!(
        "sweep `{}`: {} trials, results in {}",
        sweep.name,
        sweep.trials.len(),
        out.display()
    );
    let start = std::time::Instant::now();
    let table =
        fedpeft_fleet::sweep::run_sweep(&sweep, &bins, &out, Duration::from_secs(timeout_secs))?;
    println!(
        "sweep: finished in {:.1} s; table: {} (and results.csv, results.md)",
        start.elapsed().as_secs_f64(),
        table.display()
    );
    Ok(())
}
