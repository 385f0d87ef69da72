//! `aggregator`: runs a fedpeft federation's rounds beside an MQTT broker (embedded rumqttd by
//! default; its own log is off unless RUST_LOG enables `rumqttd`). See README.md ("Aggregator") and `fedpeft_aggregator::config` for the config file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fedpeft_aggregator::config::RawConfig;
use fedpeft_aggregator::host::{LayoutHost, ModelHost};
use fedpeft_aggregator::model::{BackboneHost, BackboneHostConfig};
use fedpeft_aggregator::shell;

/// Command-line flags; each overrides the config file's field of the same name.
#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "fedpeft aggregator: federated rounds over MQTT"
)]
struct Cli {
    /// TOML config file (every field optional; unknown keys are errors).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Rounds to run.
    #[arg(long)]
    rounds: Option<u32>,
    /// Clients needed to start a round (and the fewest sampled).
    #[arg(long)]
    min_clients: Option<usize>,
    /// Accepted updates needed at the deadline.
    #[arg(long)]
    quorum: Option<usize>,
    /// Fraction of available clients sampled per round.
    #[arg(long)]
    fraction: Option<f64>,
    /// Round deadline, seconds after the announcement.
    #[arg(long)]
    round_timeout_secs: Option<f64>,
    /// Fleet name (topic namespace).
    #[arg(long)]
    fleet: Option<String>,
    /// Run id.
    #[arg(long)]
    run_id: Option<u64>,
    /// Sampling seed.
    #[arg(long)]
    seed: Option<u64>,
    /// "embedded" or mqtt://host:port.
    #[arg(long)]
    broker: Option<String>,
    /// Embedded broker port (0 = a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Output directory (report.json, report.csv, aggregator.ckpt).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start fresh even if a checkpoint exists in the output directory.
    #[arg(long)]
    no_resume: bool,
}

impl Cli {
    fn apply(self, raw: &mut RawConfig) {
        macro_rules! set {
            ($($field:ident),*) => {$( if let Some(v) = self.$field { raw.$field = Some(v); } )*};
        }
        set!(
            rounds,
            min_clients,
            quorum,
            fraction,
            round_timeout_secs,
            fleet,
            run_id,
            seed
        );
        if let Some(url) = self.broker {
            raw.broker.url = Some(url);
        }
        if let Some(port) = self.port {
            raw.broker.port = Some(port);
        }
        if let Some(out) = self.out {
            raw.output.dir = Some(out);
        }
        if self.no_resume {
            raw.output.resume = Some(false);
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let mut raw = match &cli.config {
        Some(path) => RawConfig::read(path)?,
        None => RawConfig::default(),
    };
    cli.apply(&mut raw);
    let config = raw.validate().context("invalid configuration")?;
    let host: Box<dyn ModelHost> = match &config.model.backbone {
        Some(dir) => Box::new(
            BackboneHost::open(&BackboneHostConfig {
                dir: dir.clone(),
                peft: config.model.peft,
                seed: config.seed,
                eval_examples: config.model.eval_examples,
                image_size: config.model.image_size,
                threads: config.model.threads,
                cache_dir: config.model.cache_dir.clone(),
            })
            .context("server-side model")?,
        ),
        None => Box::new(LayoutHost::new(&config.model, config.backbone_params)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out_dir = config.output_dir.clone();
    let outcome = runtime.block_on(shell::run(config, host, shutdown_signal(), None))?;
    println!("{}", outcome.report.summary());
    println!(
        "report: {} and {}",
        out_dir.join("report.json").display(),
        out_dir.join("report.csv").display()
    );
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
