//! `aggregator`: runs a fedpeft federation's rounds beside an MQTT broker (embedded rumqttd by
//! default; its own log is off unless RUST_LOG enables `rumqttd`). See the book (docs/src/guide/aggregator.md, reference/aggregator-config.md) for the config file.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fedpeft_aggregator::config::{self, AggregatorFile};
use fedpeft_aggregator::host::{LayoutHost, ModelHost};
use fedpeft_aggregator::model::{BackboneHost, BackboneHostConfig, DEFAULT_FROZEN_BUDGET};
use fedpeft_aggregator::shell;

/// Command-line flags; each overrides the config file's field of the same name.
#[derive(Debug, Parser)]
#[command(
    name = "aggregator",
    version,
    about = "fedpeft aggregator: federated rounds over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file (every field optional; unknown keys are errors).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Rounds to run.
    #[arg(long)]
    rounds: Option<u32>,
    /// Clients needed to start a round (and the fewest sampled).
    #[arg(long)]
    min_clients: Option<usize>,
    /// Clients needed before round 1 only (default: min_clients).
    #[arg(long)]
    start_clients: Option<usize>,
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
    /// "embedded", mqtt://host:port or mqtts://host:port (TLS), or the nodes of a cluster as a
    /// comma-separated list of URLs (tried in turn when a connection fails).
    #[arg(long)]
    broker: Option<String>,
    /// mqtts: PEM file of the CA the broker's certificate chains to.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// mqtts: PEM client certificate (with --client-key), for brokers that ask for one.
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// mqtts: PEM private key of --client-cert.
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// MQTT username.
    #[arg(long)]
    username: Option<String>,
    /// File whose first line is the MQTT password (a password is never a flag).
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Sign global adapters and announcements with this key (`aggregator keygen`).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Enrolment file (client id -> public key): joins, statuses and updates must be signed.
    #[arg(long)]
    enrolled_keys: Option<PathBuf>,
    /// Embedded broker port (0 = a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Output directory (report.json, report.csv, aggregator.ckpt).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Start fresh even if a checkpoint exists in the output directory.
    #[arg(long)]
    no_resume: bool,
    /// Once subscribed (clients may join), write `{"broker", "fleet", "run_id", "pid"}` as
    /// JSON to this file (atomically: written beside it, then renamed). For supervisors and
    /// scripts, instead of watching the log.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate an Ed25519 key pair: writes the secret key to a new owner-only file and prints
    /// the public key (give it to the clients as their `aggregator_key`).
    Keygen {
        /// Secret key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
}

impl Cli {
    fn apply(self, raw: &mut AggregatorFile) {
        macro_rules! set {
            ($($field:ident),*) => {$( if let Some(v) = self.$field { raw.$field = Some(v); } )*};
        }
        set!(
            rounds,
            min_clients,
            start_clients,
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
        macro_rules! set_in {
            ($table:ident: $($field:ident),*) => {$( if let Some(v) = self.$field { raw.$table.$field = Some(v); } )*};
        }
        set_in!(broker: ca_file, client_cert, client_key, username, password_file);
        set_in!(security: signing_key, enrolled_keys);
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
    if let Some(Command::Keygen { out }) = &cli.command {
        let public = fedpeft_aggregator::keys::keygen(out)?;
        eprintln!("secret key written to {}", out.display());
        println!("{}", fedpeft_protocol::sign::public_key_hex(&public));
        return Ok(());
    }
    let mut raw = match &cli.config {
        Some(path) => AggregatorFile::read(path)?,
        None => AggregatorFile::default(),
    };
    let ready_file = cli.ready_file.clone();
    cli.apply(&mut raw);
    let config = config::validate(raw).context("invalid configuration")?;
    let host: Box<dyn ModelHost> = match &config.model.backbone {
        Some(dir) => Box::new(
            BackboneHost::open(&BackboneHostConfig {
                dir: dir.clone(),
                peft: config.model.peft,
                seed: config.run.seed,
                eval_examples: config.model.eval_examples,
                eval: config.model.eval.clone(),
                image_size: config.model.image_size,
                max_seq_len: config.model.max_seq_len,
                threads: config.model.threads,
                cache_dir: config.model.cache_dir.clone(),
                frozen_budget: DEFAULT_FROZEN_BUDGET,
                initial_adapter: config.model.initial_adapter.clone(),
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
    let ready = ready_file.map(|path| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let scheme = if config.broker.tls.is_some() {
            "mqtts"
        } else {
            "mqtt"
        };
        let (fleet, run_id) = (config.run.fleet.to_string(), config.run.run_id);
        runtime.spawn(async move {
            let Ok(addr) = rx.await else { return };
            let text = serde_json::json!({
                "broker": format!("{scheme}://{addr}"),
                "fleet": fleet,
                "run_id": run_id,
                "pid": std::process::id(),
            });
            if let Err(e) =
                fedpeft_aggregator::checkpoint::write_atomic(&path, text.to_string().as_bytes())
            {
                tracing::error!(path = %path.display(), error = %e, "cannot write the ready file");
            }
        });
        tx
    });
    let outcome = runtime.block_on(shell::run(config, host, shutdown_signal(), ready))?;
    println!("{}", fedpeft_aggregator::report::summary(&outcome.report));
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
