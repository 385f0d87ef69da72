//! Serving predictions over HTTP: `edge-client serve` on its own (a run's kept global adapter,
//! and with `--watch` each newer one the aggregator keeps), and `edge-client --serve ADDR`
//! beside training in a fleet (each newer global adapter the client receives from the broker).
//!
//! - [`engine`]: the inference worker (batching, back-pressure, atomic adapter swaps);
//! - [`http`]: the routes and their limits (`POST /predict`, `GET /model`, `GET /healthz`).
//!
//! The server binds to loopback unless told otherwise; bound elsewhere it says so in its log,
//! and `--token-file` makes every request carry `Authorization: Bearer <token>`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

pub mod engine;
pub mod http;

pub use engine::{Answer, Engine, EngineError, ModelInfo, Payload, Status};
pub use http::HttpLimits;

use crate::config::cli::ServeArgs;
use crate::config::runtime;
use crate::model::{KeptAdapter, Model, ModelOptions, RoundChoice};
use crate::types::GlobalAdapter;

/// Where the served adapters come from.
enum Source {
    /// A run's kept adapters: the engine, the run and the round loaded (none yet).
    Kept(Engine, u64, Option<u32>),
    /// The fleet's global adapters on the broker.
    Broker(Engine, Box<crate::config::EdgeConfig>),
}

/// Binds `addr`, warning when it is not a loopback address.
pub async fn bind(addr: std::net::SocketAddr, token: bool) -> anyhow::Result<TcpListener> {
    fedpeft_http::bind(addr, token, "serving predictions").await
}

/// Answers requests on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let app = Arc::new(http::App { engine, limits });
    let handler: fedpeft_http::Handler =
        Arc::new(move |req| Box::pin(http::handle(app.clone(), req)));
    fedpeft_http::serve(listener, handler, shutdown).await;
}

/// The limits `args` set, with the token read from its file.
pub fn limits(
    max_body_kb: usize,
    max_inputs: usize,
    token_file: Option<&Path>,
) -> anyhow::Result<HttpLimits> {
    let token = token_file.map(fedpeft_http::read_token).transpose()?;
    Ok(HttpLimits {
        max_body_bytes: max_body_kb.saturating_mul(1024),
        max_inputs: max_inputs.max(1),
        token,
    })
}

/// The global adapter as the engine takes it.
fn shared(adapter: &KeptAdapter, run_id: u64) -> Arc<GlobalAdapter> {
    Arc::new(GlobalAdapter {
        run_id,
        round: adapter.round,
        tensors: adapter.tensors.clone(),
    })
}

/// `edge-client serve`: serves a kept global adapter until SIGTERM / Ctrl-C; with `--watch`,
/// swaps in each newer one the run keeps. Prints the address it listens on to stdout.
pub fn run(cli: &crate::config::Cli, args: &ServeArgs) -> anyhow::Result<()> {
    let limits = limits(
        args.max_body_kb,
        args.max_inputs,
        args.token_file.as_deref(),
    )?;
    let mut opts = ModelOptions {
        model_dir: args.source.model_dir.clone(),
        runtime: Some(runtime(args.runtime)),
        threads: args.threads,
    };
    let source = if args.source.from_broker {
        // The broker's retained global and each newer one, as they are published.
        let (cfg, model) = crate::model::broker_model(cli, &mut opts)?;
        tracing::info!(
            backbone = %model.backbone.manifest.id,
            broker = %cfg.brokers,
            fleet = %cfg.fleet,
            "model ready; waiting for the fleet's global adapter"
        );
        let engine = Engine::start(model, None, args.batch, args.queue)?;
        Source::Broker(engine, Box::new(cfg))
    } else {
        let path = args
            .source
            .adapter
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--adapter or --from-broker"))?;
        // With --watch, a run that has kept no adapter yet is fine: requests get 503 until
        // its first one appears.
        let (index_path, index) = crate::model::read_index(&path)?;
        let kept = index.last.is_some() || path.is_file();
        if kept || !args.watch {
            let adapter = crate::model::load(&args.source)?;
            let model = Model::open(&adapter, &opts)?;
            tracing::info!(
                adapter = %adapter.file.display(),
                round = adapter.round,
                backbone = %model.backbone.manifest.id,
                method = %adapter.index.model.peft,
                "model ready"
            );
            let engine = Engine::start(
                model,
                Some(adapter.file.display().to_string()),
                args.batch,
                args.queue,
            )?;
            Source::Kept(engine, adapter.index.run_id, Some(adapter.round))
        } else {
            let model = Model::build(&index.model, &index_path, &opts)?;
            tracing::info!(
                backbone = %model.backbone.manifest.id,
                method = %index.model.peft,
                "model ready; waiting for the run's first global adapter"
            );
            let engine = Engine::start(model, None, args.batch, args.queue)?;
            Source::Kept(engine, index.run_id, None)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.http_threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let listener = bind(args.listen, limits.token.is_some()).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving: POST /predict, GET /model, GET /healthz");
        println!("http://{addr}");
        let engine = match source {
            Source::Kept(engine, run_id, round) => {
                if args.watch {
                    tokio::spawn(watch(args.clone(), engine.clone(), run_id, round));
                }
                engine
            }
            Source::Broker(engine, cfg) => {
                let mut observer = crate::observe::Observer::new(&cfg)?;
                let e = engine.clone();
                tokio::spawn(async move {
                    loop {
                        match observer.next().await {
                            Ok(a) => {
                                let origin = observer.origin(a.round);
                                e.swap(a, origin);
                            }
                            Err(err) => {
                                tracing::error!(error = %err, "following the broker");
                                return;
                            }
                        }
                    }
                });
                engine
            }
        };
        serve(
            listener,
            engine,
            limits,
            crate::client::termination_signal(),
        )
        .await;
        tracing::info!("stopped serving");
        anyhow::Ok(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// `--watch`: every `--watch-ms`, reads the run's index and hands the newest kept adapter to
/// the engine when it is newer than the one offered last (or of a new run). A file that
/// cannot be read or checked is logged and skipped, and the engine keeps what it serves.
async fn watch(args: ServeArgs, engine: Engine, mut run_id: u64, mut round: Option<u32>) {
    let Some(adapter_path) = args.source.adapter.clone() else {
        return;
    };
    let key = args
        .source
        .aggregator_key
        .as_deref()
        .and_then(|k| fedpeft_protocol::sign::parse_public_key(k).ok());
    let mut tick = tokio::time::interval(Duration::from_millis(args.watch_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The newest adapter file refused, as (run, round, modification time): it is read again
    // only once it changes.
    let mut refused: Option<(u64, u32, Option<std::time::SystemTime>)> = None;
    loop {
        tick.tick().await;
        let path = adapter_path.clone();
        let found =
            tokio::task::spawn_blocking(move || crate::model::locate(&path, RoundChoice::Last))
                .await;
        let Ok(Ok((file, index))) = found else {
            continue;
        };
        let newest = (index.run_id, index.last.unwrap_or(0));
        if index.last.is_none() {
            continue;
        }
        let newer = newest.0 != run_id || round.is_none_or(|r| newest.1 > r);
        let stamp = (
            newest.0,
            newest.1,
            std::fs::metadata(&file).and_then(|m| m.modified()).ok(),
        );
        if !newer || refused == Some(stamp) {
            continue;
        }
        let read = tokio::task::spawn_blocking(move || {
            crate::model::read_adapter(&file, index, key.as_ref())
        })
        .await;
        match read {
            Ok(Ok(a)) => {
                engine.swap(shared(&a, newest.0), a.file.display().to_string());
                (run_id, round) = (newest.0, Some(newest.1.max(a.round)));
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "newer global adapter refused; serving the previous one");
                engine.refused(e.to_string());
                refused = Some(stamp);
            }
            Err(e) => tracing::error!(error = %e, "reading the newer global adapter"),
        }
    }
}
