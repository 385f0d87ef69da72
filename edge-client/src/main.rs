//! `edge-client`: joins a fleet, trains its PEFT tail on local data each round it is sampled
//! in, publishes the update, and exits 0 when the run is done or on SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use fedpeft_edge::client::{self, ClientSettings};
use fedpeft_edge::config::{Cli, EdgeConfig};
use fedpeft_edge::{serve, setup};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(fedpeft_edge::config::Command::Keygen { out }) = &cli.command {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
        let key = fedpeft_protocol::SigningKey::from_bytes(&seed);
        fedpeft_protocol::sign::write_signing_key(out, &key)?;
        eprintln!("secret key written to {}", out.display());
        println!(
            "{}",
            fedpeft_protocol::sign::public_key_hex(&key.verifying_key())
        );
        return Ok(());
    }
    init_logging()?;
    if let Some(fedpeft_edge::config::Command::Predict(args)) = &cli.command {
        let stdout = std::io::stdout();
        return fedpeft_edge::predict::run(&cli, args, &mut stdout.lock());
    }
    if let Some(fedpeft_edge::config::Command::Serve(args)) = &cli.command {
        return fedpeft_edge::serve::run(&cli, args);
    }
    if let Some(fedpeft_edge::config::Command::Export(args)) = &cli.command {
        for f in fedpeft_edge::export::run(args)? {
            println!("{}", f.display());
        }
        return Ok(());
    }
    run_client(&cli)
}

/// Logs to stderr, filtered by RUST_LOG (default info).
fn init_logging() -> anyhow::Result<()> {
    // RUST_LOG as `level` or `target=level,...` directives (e.g. `info,fedpeft_edge=debug`).
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec
            .parse::<tracing_subscriber::filter::Targets>()
            .with_context(|| {
                format!("RUST_LOG `{spec}`: expected `level` or `target=level,...`")
            })?,
        _ => tracing_subscriber::filter::Targets::new()
            .with_default(tracing_subscriber::filter::LevelFilter::INFO),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    Ok(())
}

/// The client: joins the fleet and trains until the run is done.
fn run_client(cli: &Cli) -> anyhow::Result<()> {
    let cfg = EdgeConfig::from_cli(cli).context("invalid configuration")?;
    tracing::info!(client = %cfg.client_id, fleet = %cfg.fleet, broker = %cfg.brokers, "starting");

    // Trunk activations are computed (or loaded from the cache) before connecting, so a joined
    // client is ready to train at once.
    let local = setup::build_trainer(&cfg).context("preparing local training")?;
    let mut settings = ClientSettings::from_config(&cfg, local.capabilities)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if let Some(addr) = cfg.serve {
        let engine = serving_engine(&cfg, local.classes)?;
        let listener = runtime.block_on(serve::bind(addr, false))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving predictions: POST /predict, GET /model, GET /healthz");
        let limits = serve::limits(8192, 64, None)?;
        runtime.spawn(serve::serve(
            listener,
            engine.clone(),
            limits,
            std::future::pending(),
        ));
        settings.serve = Some(engine);
    }
    let summary = runtime.block_on(client::run(
        settings,
        local.trainer,
        client::termination_signal(),
    ))?;

    let up = summary.bytes.total.up;
    let down = summary.bytes.total.down;
    tracing::info!(
        exit = summary.exit,
        rounds_trained = summary.rounds_trained,
        rounds_not_sampled = summary.rounds_not_sampled,
        up_bytes = up.bytes,
        up_packets = up.packets,
        down_bytes = down.bytes,
        down_packets = down.packets,
        connects = summary.connects,
        rejected_messages = summary.rejected_messages,
        "edge client finished"
    );
    if let Some(path) = &cfg.summary_json {
        let json = serde_json::to_vec_pretty(&summary)?;
        std::fs::write(path, json)
            .with_context(|| format!("writing summary {}", path.display()))?;
    }
    // A training thread may still be busy with a round that no longer matters: don't wait.
    runtime.shutdown_background();
    Ok(())
}

/// `--serve`: the model the fleet trains, on a trunk of its own, waiting for the fleet's first
/// global adapter.
fn serving_engine(cfg: &EdgeConfig, classes: Vec<String>) -> anyhow::Result<serve::Engine> {
    let spec = fedpeft_edge::model::spec_from_config(cfg, classes);
    let model = fedpeft_edge::model::Model::build(
        &spec,
        &cfg.model_dir,
        &fedpeft_edge::model::ModelOptions {
            model_dir: Some(cfg.model_dir.clone()),
            runtime: Some(fedpeft_edge::config::runtime(cfg.runtime)),
            threads: cfg.threads,
        },
    )
    .context("opening the model to serve")?;
    Ok(serve::Engine::start(model, None, 16, 64)?)
}
