//! Runs a [`Trial`]: the aggregator (with its embedded broker, or against an external one) and
//! one `edge-client` process per client, each with its own shard of the data set. Every process
//! is owned by a [`Child`] guard that kills it if the runner stops early; every process writes
//! its log to `<out>/logs/`, and the aggregator's progress lines are echoed to the terminal.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedpeft_config::aggregator::{AggregatorFile, LocalTable, ModelTable, OutputTable};
use fedpeft_config::report::Report;
use fedpeft_config::{BrokerTable, SecurityTable};

use crate::link_report::{self, KernelCounters, LinkReport};
use crate::links::Mechanism;
use crate::netns::KernelLinks;
use crate::relay::{Relay, RelaySpec};
use crate::report::TrialReport;
use crate::rounds::Participation;
use crate::shaper::DirectionSpec;
use crate::summary::{self, Row};
use crate::trial::{Broker, LocalSpec, Trial};

/// Set by the runner's SIGINT/SIGTERM handler: the run stops, and every guard (processes,
/// relays, namespaces) is dropped on the way out.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the runner finds the `aggregator` and `edge-client` executables.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub aggregator: PathBuf,
    pub edge_client: PathBuf,
}

impl Binaries {
    /// The executables next to `exe` (cargo puts all of a profile's binaries in one folder).
    pub fn beside(exe: &Path) -> anyhow::Result<Binaries> {
        let dir = exe
            .parent()
            .with_context(|| format!("{} has no parent folder", exe.display()))?;
        let found = Binaries {
            aggregator: dir.join("aggregator"),
            edge_client: dir.join("edge-client"),
        };
        for path in [&found.aggregator, &found.edge_client] {
            if !path.is_file() {
                bail!(
                    "{} not found: build it first (`cargo build --release --bins`)",
                    path.display()
                );
            }
        }
        Ok(found)
    }
}

/// How a finished trial went.
#[derive(Debug)]
pub struct Outcome {
    pub out_dir: PathBuf,
    pub report: PathBuf,
    pub aggregator_status: ExitStatus,
    /// Exit status of each client, `None` where it had to be killed.
    pub client_status: Vec<Option<ExitStatus>>,
    pub elapsed: Duration,
    /// Link measurements when the trial emulated links.
    pub links: Option<LinkReport>,
}

/// A child process killed when dropped (unless it already exited).
#[derive(Debug)]
struct Child {
    name: String,
    inner: Option<std::process::Child>,
}

impl Child {
    fn spawn(name: &str, mut cmd: Command, log: &Path, echo: bool) -> anyhow::Result<Child> {
        let mut log_file =
            File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        cmd.stdin(Stdio::null());
        let child = if echo {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {name} ({cmd:?})"))?;
            let out = child.stdout.take().context("piped stdout")?;
            let err = child.stderr.take().context("piped stderr")?;
            let mut log_err = log_file.try_clone().context("log handle")?;
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("{line}");
                    let _ = writeln!(log_file, "{line}");
                }
            });
            thread::spawn(move || {
                // The log keeps every line; the terminal gets warnings, errors and the process's
                // last words (an `Error:` report), not the INFO stream.
                let mut reporting = false;
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    reporting |= line.starts_with("Error:");
                    if reporting || line.contains(" WARN ") || line.contains(" ERROR ") {
                        eprintln!("{line}");
                    }
                    let _ = writeln!(log_err, "{line}");
                }
            });
            child
        } else {
            let err = log_file.try_clone().context("log handle")?;
            cmd.stdout(Stdio::from(log_file)).stderr(Stdio::from(err));
            cmd.spawn()
                .with_context(|| format!("starting {name} ({cmd:?})"))?
        };
        Ok(Child {
            name: name.to_string(),
            inner: Some(child),
        })
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.inner
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM (clean shutdown), then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.inner.as_mut()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("fleet: {} did not stop within {grace:?}; killed", self.name);
        None
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(mut child) = self.inner.take()
            && let Ok(None) = child.try_wait()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The socket address of an `mqtt://host:port` URL.
fn broker_addr(url: &str) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("mqtt://")
        .with_context(|| format!("broker URL {url} is not mqtt://host:port"))?;
    let with_port = if rest.contains(':') {
        rest.to_string()
    } else {
        format!("{rest}:1883")
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving broker {url}"))?
        .next()
        .with_context(|| format!("broker {url} resolves to no address"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("binding an ephemeral loopback port")?
        .port())
}

/// Waits until the aggregator says it is ready (`aggregator ready: ...`: its broker listens and
/// it has subscribed, so no client's join can go unheard); fails at once, with the aggregator's
/// error, if it exits first.
fn wait_for_ready(aggregator: &mut Child, timeout: Duration, out_dir: &Path) -> anyhow::Result<()> {
    let log = out_dir.join("logs/aggregator.log");
    let start = Instant::now();
    while start.elapsed() < timeout {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("aggregator ready:")) {
            return Ok(());
        }
        if interrupted() {
            bail!("interrupted");
        }
        if let Some(status) = aggregator.try_wait() {
            // Give the log-echo thread a moment to flush the last lines.
            thread::sleep(Duration::from_millis(200));
            bail!(
                "the aggregator exited ({status}) before it was ready:\n{}\n(whole log: {})",
                log_tail(&log, 8),
                log.display()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "the aggregator was not ready within {} s; see {}",
        timeout.as_secs(),
        log.display()
    )
}

/// What a failed process said: from its `Error:` line up to any backtrace, or else the last
/// `n` lines of its log (empty when the log cannot be read).
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if let Some(at) = lines.iter().position(|l| l.starts_with("Error:")) {
        return lines[at..]
            .iter()
            .take_while(|l| !l.starts_with("Stack backtrace:"))
            .take(n)
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Where a signed trial's keys live: `<out>/keys/{aggregator.key, <client>.key, enrolled.toml}`.
fn keys_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("keys")
}

/// A new Ed25519 key from the operating system's randomness.
fn new_key() -> anyhow::Result<fedpeft_protocol::SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness for a key: {e}"))?;
    Ok(fedpeft_protocol::SigningKey::from_bytes(&seed))
}

/// A signed trial's keys, made fresh for each run: the aggregator's and every client's secret
/// key (owner-only files) and the enrolment file mapping each client id to its public key.
/// Returns the aggregator's public key (hex), which every client is given.
pub fn make_keys(trial: &Trial, out_dir: &Path) -> anyhow::Result<String> {
    use fedpeft_protocol::sign::{public_key_hex, write_signing_key};
    let dir = keys_dir(out_dir);
    // Secret key files are never overwritten: a rerun into the same folder starts afresh.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let aggregator = new_key()?;
    write_signing_key(&dir.join("aggregator.key"), &aggregator)?;
    let mut enrolled = String::from("[clients]\n");
    for index in 0..trial.clients {
        let id = trial.client_id(index);
        let key = new_key()?;
        write_signing_key(&dir.join(format!("{id}.key")), &key)?;
        enrolled.push_str(&format!(
            "{id} = \"{}\"\n",
            public_key_hex(&key.verifying_key())
        ));
    }
    let path = dir.join("enrolled.toml");
    std::fs::write(&path, enrolled).with_context(|| format!("writing {}", path.display()))?;
    Ok(public_key_hex(&aggregator.verifying_key()))
}

/// The aggregator's config file for this trial; written with [`AggregatorFile::to_toml`].
pub fn aggregator_config(trial: &Trial, out_dir: &Path, port: Option<u16>) -> AggregatorFile {
    let broker = match &trial.broker {
        Broker::External { url } => BrokerTable {
            url: Some(url.clone()),
            ..BrokerTable::default()
        },
        Broker::Embedded => BrokerTable {
            url: Some("embedded".into()),
            port: Some(port.unwrap_or(0)),
            ..BrokerTable::default()
        },
    };
    let security = if trial.signed {
        let keys = keys_dir(out_dir);
        SecurityTable {
            signing_key: Some(keys.join("aggregator.key")),
            enrolled_keys: Some(keys.join("enrolled.toml")),
            ..SecurityTable::default()
        }
    } else {
        SecurityTable::default()
    };
    AggregatorFile {
        fleet: Some(trial.name.clone()),
        run_id: Some(trial.seed),
        rounds: Some(trial.rounds),
        seed: Some(trial.seed),
        min_clients: Some(trial.min_clients),
        start_clients: Some(trial.start_clients),
        fraction: Some(trial.fraction),
        quorum: Some(trial.quorum),
        round_timeout_secs: Some(trial.round_timeout_secs),
        global_dtype: Some(trial.global_dtype.clone()),
        strategy: trial.strategy.clone(),
        local: local_table(&trial.local),
        broker: BrokerTable {
            max_packet_bytes: Some(trial.max_packet_bytes),
            ..broker
        },
        model: model_table(trial),
        security,
        output: OutputTable {
            dir: Some(out_dir.to_path_buf()),
            resume: Some(false),
        },
        ..AggregatorFile::default()
    }
}

/// The trial's `[local]` as the aggregator's (which holds `f32`s).
fn local_table(local: &LocalSpec) -> LocalTable {
    let f = |v: Option<f64>| v.map(as_f32);
    LocalTable {
        epochs: local.epochs,
        batch_size: local.batch_size,
        learning_rate: f(local.learning_rate),
        optimizer: local.optimizer.clone(),
        momentum: f(local.momentum),
        weight_decay: f(local.weight_decay),
        fedprox_mu: f(local.fedprox_mu),
        update_dtype: local.update_dtype.clone(),
        top_k_fraction: f(local.top_k_fraction),
        dp_clip_norm: f(local.dp_clip_norm),
        dp_noise_multiplier: f(local.dp_noise_multiplier),
    }
}

/// The aggregator's `[model]`: the trial's model and the held-out data set.
fn model_table(trial: &Trial) -> ModelTable {
    let m = &trial.model;
    ModelTable {
        backbone: Some(m.backbone.clone()),
        peft: Some(m.peft.clone()),
        lora_rank: m.lora_rank,
        lora_alpha: m.lora_alpha.map(as_f32),
        bottleneck: m.bottleneck,
        prompt_tokens: m.prompt_tokens,
        max_seq_len: m.max_seq_len,
        image_size: Some(m.image_size),
        dataset: Some(trial.data.dataset.clone()),
        eval_examples: Some(m.eval_examples),
        cache_dir: Some(trial.cache_dir.clone()),
        ..ModelTable::default()
    }
}

/// The `f32` the aggregator reads from the number as the trial file wrote it: the shortest text
/// of the `f64`, parsed as `f32` (rounding the `f64` instead could land one ulp away).
fn as_f32(v: f64) -> f32 {
    v.to_string().parse().unwrap_or(v as f32)
}

/// The command line of edge client `index`. `aggregator_key`: the aggregator's public key
/// (hex) in a signed trial, from [`make_keys`].
pub fn client_command(
    trial: &Trial,
    bins: &Binaries,
    index: usize,
    broker_url: &str,
    out_dir: &Path,
    aggregator_key: Option<&str>,
) -> Command {
    client_command_in(
        trial,
        bins,
        index,
        broker_url,
        out_dir,
        None,
        aggregator_key,
    )
}

/// The command line of edge client `index`, run inside network namespace `netns` if given
/// (`ip netns exec NS edge-client ...`: `ip` execs the client, so its pid is the client's).
pub fn client_command_in(
    trial: &Trial,
    bins: &Binaries,
    index: usize,
    broker_url: &str,
    out_dir: &Path,
    netns: Option<&str>,
    aggregator_key: Option<&str>,
) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bins.edge_client);
            c
        }
        None => Command::new(&bins.edge_client),
    };
    let id = trial.client_id(index);
    if let Some(plan) = &trial.links {
        // On a slow link a 64 KiB packet each way can take longer than MQTT's default 30 s
        // keep-alive: give the client room (the keep-alive lives in its config file only).
        let l = &plan.clients[index].link;
        let packet = trial.max_packet_bytes as f64;
        let secs = 2.0 * (packet / l.up_bytes_per_sec() + packet / l.down_bytes_per_sec())
            + 4.0 * (l.latency_ms + l.jitter_ms) / 1000.0;
        let keep_alive = (secs.ceil() as u64).clamp(30, 3600);
        let path = out_dir.join("clients").join(format!("{id}.toml"));
        if std::fs::write(&path, format!("[broker]\nkeep_alive_secs = {keep_alive}\n")).is_ok() {
            cmd.arg("--config").arg(path);
        }
    }
    cmd.arg("--broker")
        .arg(broker_url)
        .arg("--fleet")
        .arg(&trial.name)
        .arg("--client-id")
        .arg(&id)
        .arg("--run-id")
        .arg(trial.seed.to_string())
        .arg("--model-dir")
        .arg(&trial.model.backbone)
        .arg("--runtime")
        .arg(&trial.model.runtime)
        .arg("--peft")
        .arg(&trial.model.peft)
        .arg("--image-size")
        .arg(trial.model.image_size.to_string())
        .arg("--dataset")
        .arg(&trial.data.dataset)
        .arg("--partition")
        .arg(&trial.data.partition)
        .arg("--alpha")
        .arg(trial.data.alpha.to_string())
        .arg("--num-clients")
        .arg(trial.clients.to_string())
        .arg("--client-index")
        .arg(index.to_string())
        .arg("--seed")
        .arg(trial.seed.to_string())
        .arg("--max-packet-bytes")
        .arg(trial.max_packet_bytes.to_string())
        .arg("--cache-dir")
        .arg(&trial.cache_dir)
        .arg("--summary-json")
        .arg(out_dir.join("clients").join(format!("{id}.json")));
    if let Some(root) = &trial.data.root {
        cmd.arg("--data-root").arg(root);
    }
    if let Some(max) = trial.data.max_examples {
        cmd.arg("--max-examples").arg(max.to_string());
    }
    // The method's hyper-parameters, as the aggregator got them (its adapter layout must be
    // the clients').
    if let Some(rank) = trial.model.lora_rank {
        cmd.arg("--lora-rank").arg(rank.to_string());
    }
    if let Some(alpha) = trial.model.lora_alpha {
        cmd.arg("--lora-alpha").arg(alpha.to_string());
    }
    if let Some(b) = trial.model.bottleneck {
        cmd.arg("--bottleneck").arg(b.to_string());
    }
    if let Some(p) = trial.model.prompt_tokens {
        cmd.arg("--prompt-tokens").arg(p.to_string());
    }
    if let Some(n) = trial.model.max_seq_len {
        cmd.arg("--max-seq-len").arg(n.to_string());
    }
    if trial.shared_cache {
        cmd.arg("--cache-shared");
    }
    if trial.dropout > 0.0 {
        cmd.arg("--dropout")
            .arg(trial.dropout.to_string())
            .arg("--dropout-offline-secs")
            .arg(trial.dropout_offline_secs.to_string());
    }
    if trial.stragglers.contains(&index) {
        cmd.arg("--straggle-secs")
            .arg(trial.straggle_secs.to_string());
    }
    if trial.signed {
        cmd.arg("--signing-key")
            .arg(keys_dir(out_dir).join(format!("{id}.key")));
        if let Some(key) = aggregator_key {
            cmd.arg("--aggregator-key").arg(key);
        }
    }
    // One compute thread per client: N clients share the machine's cores.
    cmd.env("RAYON_NUM_THREADS", "1");
    cmd
}

/// Waits until a client's log says its trunk activations are ready; fails if it exits first.
fn wait_for_activations(client: &mut Child, log: &Path, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("trunk activations ready") {
            return Ok(());
        }
        if let Some(status) = client.try_wait() {
            bail!(
                "{} exited ({status}) before its activations were ready; see {}",
                client.name,
                log.display()
            );
        }
        if interrupted() {
            bail!(
                "interrupted while {} filled the shared activation cache",
                client.name
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "{} did not fill the shared activation cache within {timeout:?}",
        client.name
    )
}

/// The aggregator's `report.json` with the fleet's sections added and printed: who took part in
/// each round, the results row (`summary`, with its plots) and the link measurements from
/// `links` (given the aggregator's report, for the rounds' wall times; also to `links.csv`).
fn record_results(
    trial: &Trial,
    out_dir: &Path,
    links: impl FnOnce(Option<&Report>) -> Option<LinkReport>,
) -> anyhow::Result<Option<LinkReport>> {
    let mut report = match TrialReport::read(out_dir) {
        Ok(report) => Some(report),
        Err(e) => {
            eprintln!("fleet: no participation table, summary or plots: {e:#}");
            None
        }
    };
    if let Some(report) = &mut report {
        let participation = Participation::new(trial, &report.aggregator);
        participation.print();
        report.participation = Some(participation);
        let row = summary::row(trial, &report.aggregator);
        print_and_plot(&row, out_dir);
        report.summary = Some(row);
    }
    let links = links(report.as_ref().map(|r| &r.aggregator));
    if let Some(links) = &links {
        links.write_csv(out_dir)?;
        links.print();
    }
    match (report, &links) {
        (Some(mut report), _) => {
            report.links = links.clone();
            report.write(out_dir)?;
        }
        (None, Some(links)) if !TrialReport::path(out_dir).exists() => {
            TrialReport::write_links_only(out_dir, links)?;
        }
        (None, _) => {}
    }
    Ok(links)
}

/// Prints how much less than full-model FedAvg the trial moved, and draws its plots.
fn print_and_plot(row: &Row, out_dir: &Path) {
    if let Some(x) = row.times_less_than_full_model {
        println!(
            "fleet: per participating client-round {:.0} B up + {:.0} B down: {x:.0}x less than \
             full-model FedAvg",
            row.up_bytes_per_client_round, row.down_bytes_per_client_round
        );
    }
    match crate::plot::plot_rows(std::slice::from_ref(row), out_dir) {
        Ok(files) => println!("fleet: {} plots in {}", files.len(), out_dir.display()),
        Err(e) => eprintln!("fleet: no plots: {e:#}"),
    }
}

/// Runs `trial` to the end (or `deadline`), writing everything under `out_dir`.
pub fn run(
    trial: &Trial,
    bins: &Binaries,
    out_dir: &Path,
    deadline: Duration,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    for sub in ["logs", "clients"] {
        std::fs::create_dir_all(out_dir.join(sub))
            .with_context(|| format!("creating {}", out_dir.join(sub).display()))?;
    }
    let port = match trial.broker {
        Broker::Embedded => Some(free_port()?),
        Broker::External { .. } => None,
    };
    let broker_url = match (&trial.broker, port) {
        (Broker::External { url }, _) => url.clone(),
        (Broker::Embedded, Some(port)) => format!("mqtt://127.0.0.1:{port}"),
        (Broker::Embedded, None) => unreachable!("embedded broker always has a port"),
    };
    let aggregator_key = if trial.signed {
        Some(make_keys(trial, out_dir)?)
    } else {
        None
    };
    let config_path = out_dir.join("aggregator.toml");
    let config = aggregator_config(trial, out_dir, port);
    std::fs::write(&config_path, config.to_toml())
        .with_context(|| format!("writing {}", config_path.display()))?;

    let mut aggregator_cmd = Command::new(&bins.aggregator);
    aggregator_cmd.arg("--config").arg(&config_path);
    let mut aggregator = Child::spawn(
        "aggregator",
        aggregator_cmd,
        &out_dir.join("logs/aggregator.log"),
        true,
    )?;
    wait_for_ready(&mut aggregator, Duration::from_secs(120), out_dir)?;
    println!(
        "fleet: broker at {broker_url}; starting {} edge clients (logs in {})",
        trial.clients,
        out_dir.join("logs").display()
    );
    // Links: per client a relay (user-space shaper, or the runner's tap behind a kernel-shaped
    // veth) between the client and the broker. Dropped (and namespaces torn down) on every
    // way out of this function.
    let mut kernel: Option<KernelLinks> = None;
    let mut relays: Vec<Relay> = Vec::new();
    let mut mechanism = Mechanism::None;
    if let Some(plan) = &trial.links {
        mechanism = plan.mechanism;
        let upstream = broker_addr(&broker_url)?;
        if mechanism == Mechanism::Kernel {
            kernel = Some(KernelLinks::create(&plan.clients)?);
        }
        let netem = kernel.as_ref().is_some_and(|k| k.netem);
        for (index, link) in plan.clients.iter().enumerate() {
            let p = &link.link;
            let dir = |rate: f64| DirectionSpec {
                rate: (mechanism == Mechanism::Userspace)
                    .then_some((rate, link.burst_bytes as f64)),
                latency_secs: if netem { 0.0 } else { p.latency_ms / 1000.0 },
                jitter_secs: if netem { 0.0 } else { p.jitter_ms / 1000.0 },
                loss: if netem { 0.0 } else { p.loss_percent / 100.0 },
            };
            let listen = match &kernel {
                Some(k) => (k.links[index].host_ip, 0).into(),
                None => ([127, 0, 0, 1], 0).into(),
            };
            let spec = RelaySpec {
                listen,
                upstream,
                up: dir(p.up_bytes_per_sec()),
                down: dir(p.down_bytes_per_sec()),
                seed: trial.seed ^ (index as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
            };
            relays.push(Relay::start(spec, start)?);
        }
        println!(
            "fleet: links: {} ({}), {}",
            match mechanism {
                Mechanism::Kernel => "kernel: a namespace + veth per client, rate by tbf",
                _ => "userspace: a token-bucket relay per client",
            },
            if mechanism == Mechanism::Kernel && netem {
                "delay/jitter/loss by netem"
            } else {
                "delay/jitter/loss by the relay"
            },
            link_report::profile_summary(&plan.clients)
        );
    }
    let counters_before: Vec<_> = match &kernel {
        Some(k) => (0..trial.clients).map(|i| k.counters(i)).collect(),
        None => Vec::new(),
    };
    let mut clients = Vec::with_capacity(trial.clients);
    for index in 0..trial.clients {
        let id = trial.client_id(index);
        let url = match relays.get(index) {
            Some(relay) => format!("mqtt://{}", relay.addr),
            None => broker_url.clone(),
        };
        let ns = kernel.as_ref().map(|k| k.links[index].name.as_str());
        let cmd = client_command_in(
            trial,
            bins,
            index,
            &url,
            out_dir,
            ns,
            aggregator_key.as_deref(),
        );
        let log = out_dir.join("logs").join(format!("{id}.log"));
        clients.push(Child::spawn(&id, cmd, &log, false)?);
        if index == 0 && trial.shared_cache && trial.clients > 1 {
            // The first client fills the whole-data-set entry (or finds it); the others start
            // once it is there, so the trunk runs once, not once per client.
            let waited = Instant::now();
            wait_for_activations(
                &mut clients[0],
                &log,
                deadline.saturating_sub(start.elapsed()),
            )?;
            println!(
                "fleet: shared activations ready after {:.1} s; starting the other clients",
                waited.elapsed().as_secs_f64()
            );
        }
    }

    let aggregator_status = loop {
        if let Some(status) = aggregator.try_wait() {
            break status;
        }
        if interrupted() {
            aggregator.terminate(Duration::from_secs(10));
            for c in &mut clients {
                c.terminate(Duration::from_secs(5));
            }
            bail!(
                "trial `{}` interrupted; logs in {}",
                trial.name,
                out_dir.join("logs").display()
            );
        }
        if start.elapsed() > deadline {
            aggregator.terminate(Duration::from_secs(10));
            for c in &mut clients {
                c.terminate(Duration::from_secs(5));
            }
            bail!(
                "trial `{}` did not finish within {deadline:?}; logs in {}",
                trial.name,
                out_dir.join("logs").display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    // The aggregator announced the end: clients exit by themselves; give them a moment.
    let mut client_status = Vec::with_capacity(clients.len());
    for c in &mut clients {
        client_status.push(c.terminate(Duration::from_secs(20)));
    }
    let links = record_results(trial, out_dir, |report| {
        let plan = trial.links.as_ref()?;
        let kernel_counters = kernel.as_ref().map(|k| {
            (0..trial.clients)
                .map(|i| {
                    let now = k.counters(i);
                    KernelCounters::between(counters_before[i], now, k.counters_inside(i))
                })
                .collect()
        });
        let stats = relays.iter().map(Relay::snapshot).collect();
        let netem = kernel.as_ref().is_some_and(|k| k.netem);
        Some(LinkReport::build(
            trial,
            plan,
            mechanism,
            netem,
            stats,
            kernel_counters,
            report,
        ))
    })?;
    drop(relays);
    if let Some(mut k) = kernel.take() {
        k.teardown();
    }
    Ok(Outcome {
        links,
        out_dir: out_dir.to_path_buf(),
        report: out_dir.join("report.json"),
        aggregator_status,
        client_status,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial() -> Trial {
        Trial::parse(
            r#"
            name = "t"
            rounds = 3
            clients = 4
            quorum = 3
            [model]
            backbone = "models/build/efficientnet-lite0"
            peft = "lora"
            lora_rank = 4
            [data]
            max_examples = 100
            [local]
            epochs = 2
            learning_rate = 0.01
            [strategy]
            kind = "trimmed-mean"
            trim = 0.25
            "#,
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn the_aggregator_config_carries_the_trial_settings() {
        let text = aggregator_config(&trial(), Path::new("runs/t"), Some(4321)).to_toml();
        for needle in [
            "rounds = 3",
            "quorum = 3",
            "start_clients = 4",
            "port = 4321",
            "url = \"embedded\"",
            "lora_rank = 4",
            "epochs = 2",
            "kind = \"trimmed-mean\"",
            "dir = \"runs/t\"",
            "global_dtype = \"f32\"",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in\n{text}");
        }
        assert!(
            !text.contains("batch_size"),
            "unset fields stay unset:\n{text}"
        );
    }

    /// The file written for a trial means what the runner wrote when it built the file as a
    /// TOML table (that text is kept in `testdata/`): both parse to the same [`AggregatorFile`].
    #[test]
    fn the_aggregator_config_means_what_the_table_built_one_meant() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let quickstart = Trial::load(&data.join("../../trials/quickstart.toml")).unwrap();
        let dp = Trial::load(&data.join("dp-fedadam-signed.toml")).unwrap();
        for (trial, out, port, then) in [
            (
                &quickstart,
                "runs/quickstart",
                Some(4321),
                "aggregator-quickstart.toml",
            ),
            (
                &dp,
                "runs/dp-robust",
                None,
                "aggregator-dp-fedadam-signed.toml",
            ),
        ] {
            let text = aggregator_config(trial, Path::new(out), port).to_toml();
            let now = AggregatorFile::parse(&text, Path::new("now.toml")).unwrap();
            let then = AggregatorFile::read(&data.join(then)).unwrap();
            assert_eq!(now, then, "{}: written now:\n{text}", trial.name);
        }
        // The f32 fields read as the aggregator reads the trial's text, not one ulp away.
        assert_eq!(as_f32(0.001), 0.001_f32);
        assert_eq!(dp.local.weight_decay.map(as_f32), Some(0.0001_f32));
    }

    /// The arguments `client_command` gives client `index` of `t`.
    fn client_args(t: &Trial, index: usize) -> Vec<String> {
        let bins = Binaries {
            aggregator: "agg".into(),
            edge_client: "edge".into(),
        };
        client_command(
            t,
            &bins,
            index,
            "mqtt://127.0.0.1:1",
            Path::new("o"),
            Some("ab12"),
        )
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
    }

    /// The value following `flag` in `args`.
    fn flag_value(args: &[String], flag: &str) -> String {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        args[i + 1].clone()
    }

    /// A signed trial: fresh keys for the aggregator and every client, the aggregator told to
    /// sign and to enforce the enrolment, each client given its key and the aggregator's.
    #[test]
    fn a_signed_trial_makes_keys_enrols_every_client_and_hands_each_its_key() {
        let mut t = trial();
        let unsigned = aggregator_config(&t, Path::new("o"), None).to_toml();
        assert!(!unsigned.contains("[security]"), "{unsigned}");
        assert!(
            !client_args(&t, 1)
                .iter()
                .any(|a| a.starts_with("--signing"))
        );
        t.signed = true;
        let out = tempfile::tempdir().unwrap();
        let agg_hex = make_keys(&t, out.path()).unwrap();
        let keys = out.path().join("keys");
        let agg = fedpeft_protocol::sign::read_signing_key(&keys.join("aggregator.key")).unwrap();
        assert_eq!(
            fedpeft_protocol::sign::public_key_hex(&agg.verifying_key()),
            agg_hex
        );
        let enrolled: toml::Table =
            toml::from_str(&std::fs::read_to_string(keys.join("enrolled.toml")).unwrap()).unwrap();
        let clients = enrolled["clients"].as_table().unwrap();
        assert_eq!(clients.len(), t.clients);
        for index in 0..t.clients {
            let id = t.client_id(index);
            let key =
                fedpeft_protocol::sign::read_signing_key(&keys.join(format!("{id}.key"))).unwrap();
            assert_eq!(
                clients[&id].as_str(),
                Some(fedpeft_protocol::sign::public_key_hex(&key.verifying_key()).as_str()),
                "{id}"
            );
        }
        // A second run into the same folder makes new keys instead of failing on the old.
        assert_ne!(make_keys(&t, out.path()).unwrap(), agg_hex);
        let config = aggregator_config(&t, Path::new("o"), None).to_toml();
        assert!(
            config.contains("signing_key = \"o/keys/aggregator.key\""),
            "{config}"
        );
        assert!(
            config.contains("enrolled_keys = \"o/keys/enrolled.toml\""),
            "{config}"
        );
        let args = client_args(&t, 2);
        assert_eq!(flag_value(&args, "--signing-key"), "o/keys/client-02.key");
        assert_eq!(flag_value(&args, "--aggregator-key"), "ab12");
    }

    #[test]
    fn each_client_gets_its_own_id_shard_and_files() {
        let args = client_args(&trial(), 2);
        let after = |flag: &str| flag_value(&args, flag);
        assert_eq!(after("--client-id"), "client-02");
        assert_eq!(after("--client-index"), "2");
        assert_eq!(after("--num-clients"), "4");
        assert_eq!(after("--max-examples"), "100");
        assert_eq!(after("--summary-json"), "o/clients/client-02.json");
        assert!(
            !args
                .iter()
                .any(|a| a == "--dropout" || a == "--straggle-secs")
        );
        // The method's hyper-parameters reach the clients as they reach the aggregator.
        assert_eq!(after("--lora-rank"), "4");
        assert!(!args.iter().any(|a| a == "--max-seq-len"));
    }

    #[test]
    fn dropout_goes_to_every_client_and_the_delay_to_stragglers_only() {
        let mut t = trial();
        t.dropout = 0.3;
        t.stragglers = vec![1];
        t.straggle_secs = 12.5;
        for i in 0..4 {
            let a = client_args(&t, i);
            assert_eq!(flag_value(&a, "--dropout"), "0.3");
            let straggles = a.iter().position(|x| x == "--straggle-secs");
            assert_eq!(straggles.is_some(), i == 1, "client {i}");
            if let Some(at) = straggles {
                assert_eq!(a[at + 1], "12.5");
            }
        }
    }

    #[test]
    fn a_text_trial_passes_its_data_set_and_sequence_length_to_both_sides() {
        let t = Trial::parse(
            r#"
            name = "spam"
            rounds = 2
            clients = 4
            [model]
            backbone = "models/build/all-minilm-l6-v2"
            peft = "adapter"
            bottleneck = 8
            max_seq_len = 64
            [data]
            dataset = "spam-assassin"
            partition = "natural"
            "#,
            Path::new("t.toml"),
        )
        .unwrap();
        let text = aggregator_config(&t, Path::new("o"), None).to_toml();
        for needle in [
            "dataset = \"spam-assassin\"",
            "max_seq_len = 64",
            "bottleneck = 8",
            "peft = \"adapter\"",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in\n{text}");
        }
        let args = client_args(&t, 1);
        let after = |flag: &str| flag_value(&args, flag);
        assert_eq!(after("--dataset"), "spam-assassin");
        assert_eq!(after("--partition"), "natural");
        assert_eq!(after("--max-seq-len"), "64");
        assert_eq!(after("--bottleneck"), "8");
        assert_eq!(after("--peft"), "adapter");
    }
}
