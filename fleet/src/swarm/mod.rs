//! `fedpeft-fleet swarm`: a load generator. N virtual clients in one process, each a real MQTT
//! session that speaks the real protocol (last will, Join, Status, reacting to the real round
//! announcements and global adapters, chunked QoS 1 updates), against a real aggregator and a
//! real broker.
//!
//! The updates are a real client's update (the template) with per-client noise, in the
//! dtype the round announces (or a forced one), so they have a real method's size and layout;
//! each is built so that the FedAvg the aggregator must publish is known exactly, and the swarm
//! compares every published global adapter with it. A fraction of the clients also sends bad
//! input (garbage, a replay of another client's update, an oversized update, an update for the
//! wrong round) before its honest update; the report says what should have been refused and,
//! given the aggregator's `report.json`, whether exactly that was.
//!
//! # Map
//! - [`template`]: the template, its noisy variants (encoded once per dtype), which one each
//!   client sends, and the exact expected FedAvg.
//! - [`mqtt`]: MQTT 3.1.1 at the socket level (rumqttc's packet codec on tokio sockets bound
//!   to a chosen source address), one writer task per session.
//! - [`shared`]: one decoding of each distinct payload for all sessions, per-round bookkeeping,
//!   counters, the kinds of bad input.
//! - [`client`]: one virtual client's behaviour.
//! - [`report`]: the JSON report, the global-adapter check, `/proc` sampling of the watched
//!   processes (aggregator, broker, the swarm itself).
//! - [`bench`]: the benchmark's summary table and plots (`--summarize`).

pub mod bench;
pub mod client;
pub mod mqtt;
pub mod report;
pub mod shared;
pub mod template;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use fedpeft_protocol::{ClientId, DType, FleetName};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

use client::{Ctx, Settings};
use report::{RoundInput, Watch};
use shared::{Counters, Shared};
use template::Variants;

/// `fedpeft-fleet swarm`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct SwarmArgs {
    /// The broker: `mqtt://host[:port]` (the aggregator's embedded broker, or Mosquitto).
    #[arg(long, required_unless_present_any = ["print_layout", "summarize"])]
    pub broker: Option<String>,
    /// Source addresses to connect from, round-robin, e.g. `127.0.0.2,127.0.0.3`: each adds
    /// the kernel's ephemeral port range (about 28 000 ports) towards one broker address.
    #[arg(long, value_delimiter = ',', value_name = "ADDR,...")]
    pub bind: Vec<IpAddr>,
    /// The fleet (topic namespace), as the aggregator's `fleet`.
    #[arg(long, required_unless_present_any = ["print_layout", "summarize"])]
    pub fleet: Option<String>,
    /// The run, as the aggregator's `run_id`.
    #[arg(long, required_unless_present_any = ["print_layout", "summarize"])]
    pub run_id: Option<u64>,
    /// Virtual clients.
    #[arg(long, required_unless_present_any = ["print_layout", "summarize"])]
    pub clients: Option<u64>,
    /// Client ids are `{prefix}-{index}`, the index zero-padded to 5 digits (more for more
    /// clients).
    #[arg(long, default_value = "swarm")]
    pub client_prefix: String,
    /// Index of the first client (several swarm processes take disjoint ranges).
    #[arg(long, default_value_t = 0)]
    pub first_index: u64,
    /// The real update the virtual ones derive from: a run's output folder (or its `globals/`
    /// folder), whose first two global adapters differ by one round's update, or an update
    /// envelope file (e.g. captured with `mosquitto_sub -N -C 1`).
    #[arg(long, required_unless_present = "summarize")]
    pub template: Option<PathBuf>,
    /// Encoding of the updates: the one the announcement asks for, or a forced one.
    #[arg(long, default_value = "announced", value_parser = ["announced", "f32", "int8"])]
    pub dtype: String,
    /// Per-client noise: each variant adds this times each tensor's RMS, uniform in [−1, 1).
    #[arg(long, default_value_t = 0.1)]
    pub noise: f32,
    /// Distinct noisy variants of the template (each client also scales its variant by 1/2, 1
    /// or 2, and weighs it by its own example count).
    #[arg(long, default_value_t = 16)]
    pub variants: usize,
    /// Seed of the variants, of which variant, scale and example count each client takes, of
    /// who is bad and of the training delays.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of clients that send bad input (before their honest update).
    #[arg(long, default_value_t = 0.0)]
    pub bad_fraction: f64,
    /// The aggregator's `max_update_bytes`: oversized bad updates are exactly this long.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_update_bytes: usize,
    /// New connections per second (so the broker is not flooded).
    #[arg(long, default_value_t = 500.0)]
    pub connect_rate: f64,
    /// Largest MQTT packet a session accepts (a larger one breaks its connection, as in
    /// rumqttc) and sends.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_packet_bytes: usize,
    /// Update payloads above this packet size are chunked (default: --max-packet-bytes; an
    /// edge client uses one value for both).
    #[arg(long)]
    pub chunk_bytes: Option<usize>,
    /// Local "training" time: each sampled client sends after a delay uniform in [0, this)
    /// ms, drawn per client and round. 0: every update at once, the hardest burst.
    #[arg(long, default_value_t = 0)]
    pub train_ms: u64,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 120)]
    pub keep_alive_secs: u64,
    /// Clean sessions (the edge client's are persistent).
    #[arg(long)]
    pub clean_session: bool,
    /// Write the JSON report here (and each round's expected global adapter beside it, in
    /// `<report>.expected/`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The aggregator's `report.json`: each round's refusals are compared with what the swarm
    /// sent, and its round times copied into the report.
    #[arg(long)]
    pub aggregator_report: Option<PathBuf>,
    /// Sample the CPU and memory of a process every 100 ms (repeatable), e.g.
    /// `--watch aggregator=1234 --watch mosquitto=1235`.
    #[arg(long = "watch", value_name = "NAME=PID")]
    pub watch: Vec<String>,
    /// Worker threads of the swarm (1 leaves the other cores to the aggregator and broker).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Give up (say goodbye and write the report) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// Print the aggregator's `[model]` table for the template's layout and exit.
    #[arg(long)]
    pub print_layout: bool,
    /// Summarize a benchmark folder (`scripts/swarm/bench.sh`'s): `results.md`, `.csv`,
    /// `.json` and the plots, from every `*/bench.json` and `*/swarm.json` in it; then exit.
    #[arg(long, value_name = "DIR", conflicts_with = "print_layout")]
    pub summarize: Option<PathBuf>,
}

/// The soft limit on open files of this process (`/proc/self/limits`).
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.split_whitespace().nth(3)?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Checked options.
struct Checked {
    fleet: FleetName,
    run_id: u64,
    clients: u64,
    width: usize,
    watch: Vec<(String, String)>,
    dtypes: Vec<DType>,
    forced: Option<DType>,
    chunk_bytes: usize,
}

fn check(a: &SwarmArgs) -> anyhow::Result<Checked> {
    let fleet_name = a.fleet.as_deref().unwrap_or_default();
    let fleet =
        FleetName::new(fleet_name).map_err(|e| anyhow::anyhow!("--fleet `{fleet_name}`: {e}"))?;
    let run_id = a.run_id.unwrap_or_default();
    let clients = a.clients.unwrap_or_default();
    if !(1..=1_000_000).contains(&clients) {
        bail!("--clients {clients}: between 1 and 1000000");
    }
    let last = a
        .first_index
        .checked_add(clients - 1)
        .context("--first-index too large")?;
    let width = last.to_string().len().max(5);
    let longest = format!("{}-{last:0width$}", a.client_prefix);
    ClientId::new(&longest).map_err(|e| {
        anyhow::anyhow!(
            "--client-prefix `{}`: client id `{longest}`: {e}",
            a.client_prefix
        )
    })?;
    if !a.noise.is_finite() || a.noise < 0.0 {
        bail!("--noise {}: a finite number ≥ 0", a.noise);
    }
    if !(1..=1024).contains(&a.variants) {
        bail!("--variants {}: between 1 and 1024", a.variants);
    }
    if !(0.0..=1.0).contains(&a.bad_fraction) {
        bail!("--bad-fraction {}: between 0 and 1", a.bad_fraction);
    }
    if !(a.connect_rate.is_finite() && a.connect_rate > 0.0) {
        bail!(
            "--connect-rate {}: a positive number of connections per second",
            a.connect_rate
        );
    }
    if !(1024..=256 << 20).contains(&a.max_packet_bytes) {
        bail!(
            "--max-packet-bytes {}: between 1024 and 268435456",
            a.max_packet_bytes
        );
    }
    let chunk_bytes = a.chunk_bytes.unwrap_or(a.max_packet_bytes);
    if chunk_bytes < 256 || chunk_bytes > a.max_packet_bytes {
        bail!(
            "--chunk-bytes {chunk_bytes}: between 256 and --max-packet-bytes ({})",
            a.max_packet_bytes
        );
    }
    if !(1..=64).contains(&a.threads) {
        bail!("--threads {}: between 1 and 64", a.threads);
    }
    if a.keep_alive_secs < 5 || a.keep_alive_secs > u64::from(u16::MAX) {
        bail!(
            "--keep-alive-secs {}: between 5 and 65535",
            a.keep_alive_secs
        );
    }
    if a.bad_fraction > 0.0 && a.max_update_bytes > 8 << 20 {
        bail!(
            "--bad-fraction needs the aggregator's max_update_bytes in --max-update-bytes (the \
             oversized bad updates are that long); {} is too large to send from thousands of \
             clients: give the aggregator a max_update_bytes of at most 8 MiB",
            a.max_update_bytes
        );
    }
    let mut watch = Vec::new();
    for w in &a.watch {
        let Some((name, pid)) = w.split_once('=') else {
            bail!("--watch {w}: expected NAME=PID");
        };
        if name.is_empty() || pid.parse::<u32>().is_err() {
            bail!("--watch {w}: expected NAME=PID with a numeric PID");
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("--watch {w}: no process {pid}");
        }
        watch.push((name.to_string(), pid.to_string()));
    }
    let (dtypes, forced) = match a.dtype.as_str() {
        "f32" => (vec![DType::F32], Some(DType::F32)),
        "int8" => (vec![DType::I8], Some(DType::I8)),
        _ => (vec![DType::F32, DType::I8], None),
    };
    // One socket per session, plus this process's own files.
    let needed = clients + 64;
    if let Some(limit) = open_files_limit()
        && limit < needed
    {
        bail!(
            "{clients} sessions need {needed} open files, and this shell allows {limit} \
             (`ulimit -n`): raise it first, e.g. `ulimit -n {}` (up to the hard limit, \
             `ulimit -Hn`; beyond it: `LimitNOFILE=` in a systemd unit or \
             /etc/security/limits.conf). The broker needs as many.",
            needed.next_power_of_two()
        );
    }
    Ok(Checked {
        fleet,
        run_id,
        clients,
        width,
        watch,
        dtypes,
        forced,
        chunk_bytes,
    })
}

/// Runs the swarm; `Ok(true)` when the run finished and every check passed.
pub fn main(args: SwarmArgs) -> anyhow::Result<bool> {
    if let Some(dir) = &args.summarize {
        for f in bench::summarize(dir)? {
            println!("{}", f.display());
        }
        return Ok(true);
    }
    let template = template::load(
        args.template
            .as_deref()
            .unwrap_or(std::path::Path::new(".")),
    )?;
    if args.print_layout {
        print!("{}", template.model_table());
        return Ok(true);
    }
    let checked = check(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .context("starting the swarm's runtime")?;
    rt.block_on(run(args, checked, template))
}

async fn run(args: SwarmArgs, c: Checked, template: template::Template) -> anyhow::Result<bool> {
    let url = mqtt::parse_broker(args.broker.as_deref().unwrap_or_default())?;
    let broker = mqtt::resolve(&url).await?;
    mqtt::check_binds(&args.bind, broker)?;
    let variants = c
        .dtypes
        .iter()
        .map(|&d| Variants::build(&template, d, args.variants, args.noise, args.seed))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let settings = Settings {
        fleet: c.fleet.clone(),
        run_id: c.run_id,
        broker,
        binds: args.bind.clone(),
        prefix: args.client_prefix.clone(),
        width: c.width,
        first_index: args.first_index,
        clients: c.clients,
        keep_alive: Duration::from_secs(args.keep_alive_secs),
        clean_session: args.clean_session,
        max_packet_bytes: args.max_packet_bytes,
        chunk_bytes: c.chunk_bytes,
        train_ms: args.train_ms,
        dtype: c.forced,
        seed: args.seed,
        bad_fraction: args.bad_fraction,
        max_update_bytes: args.max_update_bytes,
        variants,
        join: template.join.clone(),
    };
    let mut sizes = serde_json::Map::new();
    for v in &settings.variants {
        let (bytes, ..) = settings
            .update(args.first_index, 1, 1, v.dtype, None)
            .context("encoding an update")?;
        // With the framing of its packets, an honest update must be under the limit.
        if bytes.len() + 512 >= args.max_update_bytes {
            bail!(
                "an honest {} update is {} bytes, at or above --max-update-bytes {}: the \
                 aggregator would refuse every one (raise its max_update_bytes)",
                v.dtype.as_str(),
                bytes.len(),
                args.max_update_bytes
            );
        }
        sizes.insert(v.dtype.as_str().into(), json!(bytes.len()));
    }
    let bad_clients = (0..c.clients)
        .filter(|i| settings.bad_kind(args.first_index + i).is_some())
        .count();
    let ctx = Arc::new(Ctx {
        settings,
        shared: Shared::new(c.run_id, &args.client_prefix, args.first_index, c.clients),
        stop: stop_rx.clone(),
    });
    let ticks = report::clock_ticks();
    let rss_before = report::sample("self", ticks).map(|s| s.rss_bytes);
    let watch = Arc::new(Mutex::new(Watch::default()));
    let mut procs = c.watch.clone();
    procs.push(("swarm".into(), "self".into()));
    let clock = ctx.clone();
    let monitor = tokio::spawn(Watch::run(
        watch.clone(),
        procs,
        move || clock.shared.now_ms(),
        stop_rx.clone(),
    ));
    println!(
        "swarm: {} clients ({} bad) of fleet {} run {} on {broker} at {} connections/s; template: {}",
        c.clients, bad_clients, c.fleet, c.run_id, args.connect_rate, template.origin
    );
    let t0 = Instant::now() + Duration::from_millis(20);
    let mut tasks = JoinSet::new();
    for i in 0..c.clients {
        let start = t0 + Duration::from_secs_f64(i as f64 / args.connect_rate);
        tasks.spawn(client::run(ctx.clone(), args.first_index + i, start));
    }
    let connected_rss: Arc<Mutex<Option<(f64, u64)>>> = Arc::new(Mutex::new(None));
    let progress = tokio::spawn(progress(
        ctx.clone(),
        c.clients,
        connected_rss.clone(),
        stop_rx.clone(),
    ));
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let deadline = tokio::time::sleep(Duration::from_secs(args.timeout_secs));
    tokio::pin!(deadline);
    let (mut timed_out, mut interrupted) = (false, false);
    // Once some session has seen "run done", the others get a grace period to see it too
    // (a session that was reconnecting may have missed it); then the swarm says goodbye.
    let mut over_since: Option<Instant> = None;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = check.tick() => {
                if over_since.is_none() && Counters::get(&ctx.shared.counters.run_done) > 0 {
                    over_since = Some(Instant::now());
                }
                if over_since.is_some_and(|t| t.elapsed() > Duration::from_secs(15)) && !*stop_tx.borrow() {
                    let left = tasks.len();
                    eprintln!("swarm: the run is done; {left} sessions did not hear it within 15 s: stopping them");
                    let _ = stop_tx.send(true);
                }
            }
            _ = &mut deadline, if !timed_out && !interrupted => {
                eprintln!("swarm: --timeout-secs {} reached; stopping", args.timeout_secs);
                timed_out = true;
                let _ = stop_tx.send(true);
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                eprintln!("swarm: interrupted; saying goodbye");
                interrupted = true;
                let _ = stop_tx.send(true);
            }
            _ = async { match &mut sigterm { Some(s) => { s.recv().await; } None => std::future::pending::<()>().await } }, if !interrupted => {
                eprintln!("swarm: terminated; saying goodbye");
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
        if (timed_out || interrupted) && !tasks.is_empty() {
            // Sessions say goodbye; give them a moment, then stop waiting.
            let _ = tokio::time::timeout(Duration::from_secs(15), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            tasks.abort_all();
            break;
        }
    }
    let _ = stop_tx.send(true);
    let _ = monitor.await;
    let _ = progress.await;
    let shared = &ctx.shared;
    let rounds = shared.rounds();
    let globals = shared.globals();
    // The aggregator writes each round's record as the round closes; wait a little for it.
    let last_round = globals.keys().copied().max().unwrap_or(0);
    let mut aggregator = None;
    if let Some(path) = &args.aggregator_report {
        for _ in 0..50 {
            aggregator = report::aggregator_report(path);
            let has_all = aggregator.as_ref().is_some_and(|r| {
                r["rounds"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["round"] == last_round))
            });
            if has_all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if aggregator.is_none() {
            eprintln!(
                "swarm: cannot read the aggregator's report {}",
                path.display()
            );
        }
    }
    let expected_dir = args
        .report
        .as_ref()
        .map(|p| PathBuf::from(format!("{}.expected", p.display())));
    let w = watch
        .lock()
        .map(|mut w| std::mem::take(&mut *w))
        .unwrap_or_default();
    let mut all_ok = !timed_out && !interrupted;
    let mut entries = Vec::new();
    for (&round, stats) in rounds.iter().filter(|(r, _)| **r >= 1) {
        let (entry, ok) = report::round_entry(RoundInput {
            round,
            stats,
            previous: globals.get(&(round - 1)),
            global: globals.get(&round),
            variants: &ctx.settings.variants,
            aggregator: aggregator.as_ref(),
            watch: &w,
            expected_dir: expected_dir.as_deref(),
            run_id: c.run_id,
        });
        all_ok &= ok;
        entries.push(entry);
    }
    if entries.is_empty() {
        all_ok = false;
    }
    let counters = &shared.counters;
    let connected = connected_rss.lock().ok().and_then(|g| *g);
    let per_session = match (rss_before, connected) {
        (Some(before), Some((_, after))) if after > before => {
            Some((after - before) as f64 / c.clients as f64)
        }
        _ => None,
    };
    let first_errors = shared
        .first_errors
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let report = json!({
        "swarm": {
            "clients": c.clients,
            "first_index": args.first_index,
            "fleet": c.fleet.as_str(),
            "run_id": c.run_id,
            "broker": broker.to_string(),
            "bind": args.bind.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
            "template": template.origin,
            "parameters": template.parameters(),
            "dtype": args.dtype,
            "update_bytes": sizes,
            "noise": args.noise,
            "variants": args.variants,
            "seed": args.seed,
            "bad_fraction": args.bad_fraction,
            "bad_clients": bad_clients,
            "max_update_bytes": args.max_update_bytes,
            "max_packet_bytes": args.max_packet_bytes,
            "chunk_bytes": c.chunk_bytes,
            "connect_rate": args.connect_rate,
            "train_ms": args.train_ms,
            "threads": args.threads,
        },
        "ok": all_ok,
        "timed_out": timed_out,
        "interrupted": interrupted,
        "sessions": {
            "connected_at_least_once": Counters::get(&counters.ever_connected),
            "seconds_to_connect_all": connected.map(|(t, _)| report::round3(t / 1e3)),
            "connect_failures": Counters::get(&counters.connect_failures),
            "refused_by_broker": Counters::get(&counters.refused),
            "disconnects": Counters::get(&counters.disconnects),
            "oversized_incoming": Counters::get(&counters.oversized_incoming),
            "gave_up": Counters::get(&counters.gave_up),
            "decode_errors": Counters::get(&counters.decode_errors),
            "joins_sent": Counters::get(&counters.joins_sent),
            "updates_resent": Counters::get(&counters.updates_resent),
            "heard_run_done": Counters::get(&counters.run_done),
            "first_errors": first_errors,
        },
        "memory": {
            "rss_before_sessions_bytes": rss_before,
            "rss_all_connected_bytes": connected.map(|(_, r)| r),
            "per_session_bytes": per_session.map(|b| b.round()),
        },
        "rounds": entries,
        "processes": w.totals(),
    });
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the report {}", path.display()))?;
    }
    println!(
        "swarm: {} rounds; every global adapter equals the expected FedAvg{}: {}{}",
        entries_len(&report),
        if args.aggregator_report.is_some() {
            " and every refusal was expected"
        } else {
            ""
        },
        if all_ok { "yes" } else { "NO" },
        args.report
            .as_ref()
            .map(|p| format!("; report: {}", p.display()))
            .unwrap_or_default()
    );
    Ok(all_ok)
}

fn entries_len(report: &serde_json::Value) -> usize {
    report["rounds"].as_array().map_or(0, Vec::len)
}

/// Prints the connections, then one line per round as its global adapter arrives; notes the
/// swarm's RSS once every client is connected.
async fn progress(
    ctx: Arc<Ctx>,
    clients: u64,
    connected_rss: Arc<Mutex<Option<(f64, u64)>>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let shared = &ctx.shared;
    let ticks = report::clock_ticks();
    let mut printed = 0u32;
    let mut last_connected = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut all_since: Option<Instant> = None;
    let mut last_line = Instant::now();
    loop {
        // One last pass after the stop prints the rounds that closed since the last tick.
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let connected = Counters::get(&shared.counters.ever_connected);
        if connected == clients && all_since.is_none() {
            all_since = Some(Instant::now());
        }
        // Settled for a second after the last connection: the per-session memory.
        if let Some(since) = all_since
            && since.elapsed() >= Duration::from_secs(1)
            && let Ok(mut slot) = connected_rss.lock()
            && slot.is_none()
        {
            let t = shared.now_ms() - 1000.0;
            if let Some(s) = report::sample("self", ticks) {
                *slot = Some((t, s.rss_bytes));
            }
            println!("swarm: {connected}/{clients} connected in {:.1} s", t / 1e3);
        }
        if connected != last_connected && last_line.elapsed() >= Duration::from_secs(5) {
            println!("swarm: {connected}/{clients} connected");
            last_line = Instant::now();
        }
        last_connected = connected;
        for (round, r) in shared.rounds() {
            if round <= printed || r.global_first_ms.is_none() {
                continue;
            }
            printed = round;
            let ms = r
                .global_first_ms
                .zip(r.announce_first_ms)
                .map_or(0.0, |(g, a)| g - a);
            println!(
                "swarm: round {round}: {} sampled ({} here), {} updates sent, {} acknowledged, {} bad inputs; {:.2} s announcement to global adapter, {:.0} updates/s",
                r.sampled,
                r.sampled_here,
                r.sent,
                r.acknowledged,
                r.bad.values().sum::<usize>(),
                ms / 1e3,
                if ms > 0.0 {
                    r.acknowledged as f64 / (ms / 1e3)
                } else {
                    0.0
                }
            );
        }
        if stopping {
            return;
        }
    }
}
