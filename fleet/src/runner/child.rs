//! The run's child processes: where their executables are; each one spawned with its output in
//! a log (and, for the aggregator, echoed to the terminal), waited on for a line of that log,
//! stopped with SIGTERM then SIGKILL, and killed when its guard is dropped; and the flag an
//! interrupt sets to stop them all.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Set by the runner's SIGINT/SIGTERM handler: the run stops, and every guard (processes,
/// relays, namespaces) is dropped on the way out.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(super) fn interrupted() -> bool {
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

/// A child process killed when dropped (unless it already exited).
#[derive(Debug)]
pub(super) struct Child {
    pub(super) name: String,
    inner: Option<std::process::Child>,
}

impl Child {
    pub(super) fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        echo: bool,
    ) -> anyhow::Result<Child> {
        let log_file =
            File::create(log).with_context(|| format!("creating log {}", log.display()))?;
        cmd.stdin(Stdio::null());
        let child = if echo {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {name} ({cmd:?})"))?;
            let out = child.stdout.take().context("piped stdout")?;
            let err = child.stderr.take().context("piped stderr")?;
            // Both streams go to one log through one lock, a whole line per write: lines
            // from the two threads never run into each other.
            let log_file = std::sync::Arc::new(std::sync::Mutex::new(log_file));
            let log_err = log_file.clone();
            let write_line = |log: &std::sync::Mutex<File>, line: &str| {
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(format!("{line}\n").as_bytes());
                }
            };
            thread::spawn(move || {
                let progress = super::progress::current();
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    progress.println(&line);
                    write_line(&log_file, &line);
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
                    write_line(&log_err, &line);
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

    pub(super) fn try_wait(&mut self) -> Option<ExitStatus> {
        self.inner
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM (clean shutdown), then SIGKILL after `grace`.
    pub(super) fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
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

    /// Waits until a line of its log `log` is `seen`, polling every `poll`; what ended the
    /// wait otherwise.
    pub(super) fn wait_for_log(
        &mut self,
        log: &Path,
        seen: impl Fn(&str) -> bool,
        timeout: Duration,
        poll: Duration,
    ) -> Result<(), NotSeen> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.lines().any(&seen) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                return Err(NotSeen::Exited(status));
            }
            if interrupted() {
                return Err(NotSeen::Interrupted);
            }
            thread::sleep(poll);
        }
        Err(NotSeen::TimedOut)
    }
}

/// Why a line awaited in a process's log never came.
#[derive(Debug)]
pub(super) enum NotSeen {
    /// The process exited first.
    Exited(ExitStatus),
    /// The run was interrupted (SIGINT / SIGTERM).
    Interrupted,
    TimedOut,
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

/// What a failed process said: from its `Error:` line up to any backtrace, or else the last
/// `n` lines of its log (empty when the log cannot be read).
pub(super) fn log_tail(path: &Path, n: usize) -> String {
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
