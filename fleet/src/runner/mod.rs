//! Runs a [`Trial`]: the aggregator (with its embedded broker, or against an external one) and
//! one `edge-client` process per client, each with its own shard of the data set. Every process
//! is owned by a `Child` guard that kills it if the runner stops early; every process writes
//! its log to `<out>/logs/`, and the aggregator's progress lines are echoed to the terminal.
//!
//! A run is a `TrialRun`, one method per step: start the aggregator and wait until it is
//! ready, make the links, start the clients, wait for the end (or an interrupt, or the
//! deadline), then record the results and tear everything down.
//!
//! - `config`: the aggregator's config file for the trial.
//! - `keys`: a signed trial's keys.
//! - `client`: an edge client's command line.
//! - `child`: the executables, the process guard, waiting for a line of a log, and the
//!   interrupt flag.
//! - `shaping`: the run's emulated links (relays, namespaces) and what they measured.
//! - `results`: the fleet's sections of `report.json`, and the plots.

mod child;
mod client;
mod config;
mod keys;
pub mod progress;
mod results;
mod shaping;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use self::child::{Child, NotSeen, interrupted, log_tail};
use self::shaping::Shaping;
pub use child::{Binaries, INTERRUPTED};
pub use client::{client_command, client_command_in};
pub use config::aggregator_config;
pub use keys::make_keys;

use crate::link_report::LinkReport;
use crate::trial::{Broker, Trial};

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

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("binding an ephemeral loopback port")?
        .port())
}

/// Runs `trial` to the end (or `deadline`), writing everything under `out_dir`.
pub fn run(
    trial: &Trial,
    bins: &Binaries,
    out_dir: &Path,
    deadline: Duration,
) -> anyhow::Result<Outcome> {
    let mut run = TrialRun::start(trial, bins, out_dir, deadline)?;
    run.start_links()?;
    run.start_clients()?;
    let bar = progress::current().rounds(&trial.name, trial.rounds);
    let aggregator_status = run.wait_for_end(bar.as_ref());
    if let Some(b) = &bar {
        b.finish();
    }
    run.finish(aggregator_status?)
}

/// How long the aggregator may take to be ready (its held-out activations may be computed
/// first), and the graces for stopping processes.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const AGGREGATOR_GRACE: Duration = Duration::from_secs(10);
const CLIENT_GRACE: Duration = Duration::from_secs(5);
/// Once the aggregator has announced the end, clients exit by themselves: this long at most.
const CLIENT_EXIT_GRACE: Duration = Duration::from_secs(20);
/// Clients exit as soon as the end is announced, the aggregator a moment later (it lets its
/// last publishes go out, then writes its report): every client gone fails the trial only when
/// the aggregator still runs this long after.
const ALL_GONE_GRACE: Duration = Duration::from_secs(10);

/// A trial while it runs. Fields drop in order on every way out: the clients (killed if still
/// running), then the links (relays, then the namespaces the clients ran in), then the
/// aggregator.
struct TrialRun<'a> {
    trial: &'a Trial,
    bins: &'a Binaries,
    out_dir: &'a Path,
    started: Instant,
    deadline: Duration,
    /// Where the clients find the broker, without links.
    broker_url: String,
    /// The aggregator's public key (hex) in a signed trial.
    aggregator_key: Option<String>,
    clients: Vec<Child>,
    /// When every client was first seen gone.
    all_gone_since: Option<Instant>,
    links: Option<Shaping>,
    aggregator: Child,
}

impl<'a> TrialRun<'a> {
    /// Writes the aggregator's config (and a signed trial's keys), starts the aggregator and
    /// waits until it is ready.
    fn start(
        trial: &'a Trial,
        bins: &'a Binaries,
        out_dir: &'a Path,
        deadline: Duration,
    ) -> anyhow::Result<TrialRun<'a>> {
        let started = Instant::now();
        // The aggregator's config file names the folder (its output, a signed trial's keys).
        if out_dir.to_str().is_none() {
            bail!(
                "results folder {} is not UTF-8: the aggregator's config file cannot name it",
                out_dir.display()
            );
        }
        for sub in ["logs", "clients"] {
            std::fs::create_dir_all(out_dir.join(sub))
                .with_context(|| format!("creating {}", out_dir.join(sub).display()))?;
        }
        let (port, broker_url) = match &trial.broker {
            Broker::Embedded => {
                let port = free_port()?;
                (Some(port), format!("mqtt://127.0.0.1:{port}"))
            }
            Broker::External { url } => (None, url.clone()),
        };
        let aggregator_key = if trial.signed {
            Some(make_keys(trial, out_dir)?)
        } else {
            None
        };
        let config_path = out_dir.join("aggregator.toml");
        std::fs::write(
            &config_path,
            aggregator_config(trial, out_dir, port).to_toml(),
        )
        .with_context(|| format!("writing {}", config_path.display()))?;
        let ready_file = out_dir.join("aggregator.ready.json");
        // A ready file left by an earlier run in this folder is not this run's signal.
        let _ = std::fs::remove_file(&ready_file);
        let mut cmd = Command::new(&bins.aggregator);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--ready-file")
            .arg(&ready_file);
        let log = out_dir.join("logs/aggregator.log");
        let mut aggregator = Child::spawn("aggregator", cmd, &log, true)?;
        wait_for_ready(&mut aggregator, &ready_file, &log, trial.run_id)?;
        println!(
            "fleet: broker at {broker_url}; starting {} edge clients (logs in {})",
            trial.clients,
            out_dir.join("logs").display()
        );
        Ok(TrialRun {
            trial,
            bins,
            out_dir,
            started,
            deadline,
            broker_url,
            aggregator_key,
            clients: Vec::with_capacity(trial.clients),
            all_gone_since: None,
            links: None,
            aggregator,
        })
    }

    /// Puts an emulated link between each client and the broker, if the trial has links.
    fn start_links(&mut self) -> anyhow::Result<()> {
        if let Some(plan) = &self.trial.links {
            self.links = Some(Shaping::start(
                self.trial,
                plan,
                &self.broker_url,
                self.started,
            )?);
        }
        Ok(())
    }

    /// Starts every edge client. With a shared activation cache the first one fills the
    /// whole-data-set entry (or finds it) alone; the others start once it is there, so the trunk
    /// runs once, not once per client.
    fn start_clients(&mut self) -> anyhow::Result<()> {
        let trial = self.trial;
        for index in 0..trial.clients {
            let id = trial.client_id(index);
            let url = match &self.links {
                Some(links) => links.client_url(index),
                None => self.broker_url.clone(),
            };
            let netns = self.links.as_ref().and_then(|l| l.netns(index));
            let cmd = client_command_in(
                trial,
                self.bins,
                index,
                &url,
                self.out_dir,
                netns,
                self.aggregator_key.as_deref(),
            );
            let log = self.out_dir.join("logs").join(format!("{id}.log"));
            self.clients.push(Child::spawn(&id, cmd, &log, false)?);
            if index == 0 && trial.shared_cache && trial.clients > 1 {
                let waited = Instant::now();
                let left = self.deadline.saturating_sub(self.started.elapsed());
                wait_for_activations(&mut self.clients[0], &log, left)?;
                println!(
                    "fleet: shared activations ready after {:.1} s; starting the other clients",
                    waited.elapsed().as_secs_f64()
                );
            }
        }
        Ok(())
    }

    /// Waits for the aggregator to exit, which is the end of the run; stops every process and
    /// fails on an interrupt or at the deadline.
    fn wait_for_end(&mut self, bar: Option<&progress::RoundsBar>) -> anyhow::Result<ExitStatus> {
        let logs = self.out_dir.join("logs");
        let mut polled = Instant::now();
        loop {
            if let Some(b) = bar
                && polled.elapsed() >= Duration::from_millis(500)
            {
                polled = Instant::now();
                b.update(self.out_dir);
            }
            if let Some(status) = self.aggregator.try_wait() {
                return Ok(status);
            }
            if let Some(why) = self.dead_clients() {
                self.stop_all();
                bail!(
                    "trial `{}`: {why}; logs in {}",
                    self.trial.name,
                    logs.display()
                );
            }
            if interrupted() {
                self.stop_all();
                bail!(
                    "trial `{}` interrupted; logs in {}",
                    self.trial.name,
                    logs.display()
                );
            }
            if self.started.elapsed() > self.deadline {
                self.stop_all();
                bail!(
                    "trial `{}` did not finish within {:?}; logs in {}",
                    self.trial.name,
                    self.deadline,
                    logs.display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Why the run cannot go on for its clients, if it cannot: a client that failed (exited
    /// with an error), or every client gone while the aggregator still waits for them (for
    /// [`ALL_GONE_GRACE`]: they also leave when the end is announced, just before it exits).
    /// Clients leave with success once the aggregator announces the end, so a failed exit is
    /// never part of a run going well (a trial's dropouts disconnect, they do not exit).
    fn dead_clients(&mut self) -> Option<String> {
        let logs = self.out_dir.join("logs");
        let mut exited = 0;
        for c in &mut self.clients {
            let Some(status) = c.try_wait() else { continue };
            exited += 1;
            if !status.success() {
                let log = logs.join(format!("{}.log", c.name));
                return Some(format!(
                    "{} exited ({status}) while the run went on:\n{}",
                    c.name,
                    log_tail(&log, 8)
                ));
            }
        }
        if exited < self.clients.len() || self.clients.is_empty() {
            return None;
        }
        // A finished run whose aggregator still serves its monitor (`linger_secs`).
        if crate::sweep::finished(self.out_dir) {
            return None;
        }
        let since = *self.all_gone_since.get_or_insert_with(Instant::now);
        (since.elapsed() >= ALL_GONE_GRACE).then(|| {
            format!(
                "all {exited} clients exited, and the aggregator still runs {} s later (did \
                 they obey another run's messages?)",
                ALL_GONE_GRACE.as_secs()
            )
        })
    }

    /// Stops the aggregator, then every client.
    fn stop_all(&mut self) {
        self.aggregator.terminate(AGGREGATOR_GRACE);
        for c in &mut self.clients {
            c.terminate(CLIENT_GRACE);
        }
    }

    /// After the aggregator's end: the clients given a moment to exit, the results recorded,
    /// the links torn down.
    fn finish(mut self, aggregator_status: ExitStatus) -> anyhow::Result<Outcome> {
        let client_status = self
            .clients
            .iter_mut()
            .map(|c| c.terminate(CLIENT_EXIT_GRACE))
            .collect();
        let (trial, out_dir) = (self.trial, self.out_dir);
        let links = results::record_results(trial, out_dir, |report| {
            let plan = trial.links.as_ref()?;
            Some(self.links.as_ref()?.measure(trial, plan, report))
        })?;
        if let Some(shaping) = self.links.take() {
            shaping.teardown();
        }
        if aggregator_status.success() {
            export_model(&self.bins.edge_client, out_dir);
        }
        Ok(Outcome {
            links,
            out_dir: out_dir.to_path_buf(),
            report: crate::report::TrialReport::path(out_dir),
            aggregator_status,
            client_status,
            elapsed: self.started.elapsed(),
        })
    }
}

/// The trial's model in `<out>/model/` (`edge-client export`: the best round's tail merged,
/// and `model.onnx` where the models toolchain's Python is there to write it). A failure is
/// reported, not fatal: the trial's results stand without it.
fn export_model(edge_client: &Path, out_dir: &Path) {
    let Some(index) = std::fs::read(out_dir.join("globals/index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<fedpeft_config::report::GlobalIndex>(&b).ok())
    else {
        return;
    };
    let model = out_dir.join("model");
    let mut cmd = Command::new(edge_client);
    cmd.arg("export")
        .arg("--adapter")
        .arg(out_dir)
        .arg("--out")
        .arg(&model)
        .env("RUST_LOG", "warn");
    // ONNX where the models toolchain is (a checkout where `make models` ran).
    let onnx = index.model.backbone.is_some()
        && Path::new(".venv-models/bin/python").is_file()
        && Path::new("models/export_onnx.py").is_file();
    if onnx {
        cmd.arg("--onnx");
    }
    match cmd.output() {
        Ok(o) if o.status.success() => println!(
            "fleet: model exported to {} (the best round's tail merged{})",
            model.display(),
            if onnx { ", model.onnx" } else { "" }
        ),
        Ok(o) => eprintln!(
            "fleet: no model export: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("fleet: no model export: {e}"),
    }
}

/// Waits until the aggregator's ready file names this run (its broker listens and it has
/// subscribed, so no client's join can go unheard); fails at once, with the aggregator's
/// error, if it exits first.
fn wait_for_ready(
    aggregator: &mut Child,
    ready_file: &Path,
    log: &Path,
    run_id: u64,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < READY_TIMEOUT {
        let ready = std::fs::read(ready_file)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        if let Some(ready) = ready {
            let said = ready.get("run_id").and_then(serde_json::Value::as_u64);
            if said != Some(run_id) {
                bail!(
                    "the aggregator's ready file {} names run {said:?}, not this run ({run_id})",
                    ready_file.display()
                );
            }
            return Ok(());
        }
        if let Some(status) = aggregator.try_wait() {
            // Give the log-echo threads a moment to flush the last lines.
            thread::sleep(Duration::from_millis(200));
            bail!(
                "the aggregator exited ({status}) before it was ready:\n{}\n(whole log: {})",
                log_tail(log, 8),
                log.display()
            )
        }
        if interrupted() {
            bail!("interrupted");
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "the aggregator was not ready within {} s (no {}); see {}",
        READY_TIMEOUT.as_secs(),
        ready_file.display(),
        log.display()
    )
}

/// Waits until a client's log says its trunk activations are ready; fails if it exits first.
fn wait_for_activations(client: &mut Child, log: &Path, timeout: Duration) -> anyhow::Result<()> {
    let ready = |l: &str| l.contains("trunk activations ready");
    match client.wait_for_log(log, ready, timeout, Duration::from_millis(200)) {
        Ok(()) => Ok(()),
        Err(NotSeen::Exited(status)) => bail!(
            "{} exited ({status}) before its activations were ready; see {}",
            client.name,
            log.display()
        ),
        Err(NotSeen::Interrupted) => bail!(
            "interrupted while {} filled the shared activation cache",
            client.name
        ),
        Err(NotSeen::TimedOut) => bail!(
            "{} did not fill the shared activation cache within {timeout:?}",
            client.name
        ),
    }
}

#[cfg(test)]
mod tests;
