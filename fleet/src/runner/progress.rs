//! Progress on the command line: a bar for the rounds of a trial (and the trials of a sweep)
//! when stderr is a terminal, nothing extra otherwise — the aggregator's round lines, echoed
//! as they come, are the plain-text progress for logs and CI.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

static CURRENT: std::sync::OnceLock<Progress> = std::sync::OnceLock::new();

/// Makes `p` the bars every trial and sweep of this process draws (the binary does this once,
/// at start); without it there are none.
pub fn install(p: Progress) {
    let _ = CURRENT.set(p);
}

/// The installed bars (none unless [`install`]ed).
pub fn current() -> Progress {
    CURRENT.get().cloned().unwrap_or_else(Progress::none)
}

/// The bars of one `fedpeft-fleet` invocation; a no-op when stderr is not a terminal.
#[derive(Debug, Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Bars on stderr when it is a terminal.
    pub fn for_terminal() -> Progress {
        Progress {
            multi: std::io::stderr()
                .is_terminal()
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// No bars.
    pub fn none() -> Progress {
        Progress { multi: None }
    }

    fn bar(&self, len: u64, template: &str) -> Option<ProgressBar> {
        let multi = self.multi.as_ref()?;
        let bar = multi.add(ProgressBar::new(len));
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.enable_steady_tick(Duration::from_millis(250));
        Some(bar)
    }

    /// A bar for a sweep's `n` trials.
    pub fn trials(&self, n: usize) -> Option<ProgressBar> {
        self.bar(
            n as u64,
            "{spinner} sweep  [{bar:30}] trial {pos}/{len} · {elapsed_precise} · {msg}",
        )
    }

    /// A bar for a trial's rounds.
    pub fn rounds(&self, name: &str, rounds: u32) -> Option<RoundsBar> {
        let bar = self.bar(
            u64::from(rounds),
            "{spinner} {prefix} [{bar:30}] round {pos}/{len} · {elapsed_precise} · {msg}",
        )?;
        bar.set_prefix(name.to_string());
        bar.set_message("starting");
        Some(RoundsBar { bar })
    }

    /// Prints `line` above the bars (or plainly without them).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => println!("{line}"),
        }
    }
}

/// A trial's rounds bar, moved on from its report.
#[derive(Debug)]
pub struct RoundsBar {
    bar: ProgressBar,
}

impl RoundsBar {
    /// Reads the trial's `report.json` (written after every round) and moves the bar.
    pub fn update(&self, out_dir: &Path) {
        let Ok(bytes) = std::fs::read(out_dir.join("report.json")) else {
            return;
        };
        let Ok(report) = serde_json::from_slice::<fedpeft_config::report::Report>(&bytes) else {
            return;
        };
        let closed = report.rounds.iter().filter(|r| r.round > 0).count() as u64;
        self.bar.set_position(closed);
        let acc = report
            .rounds
            .iter()
            .rev()
            .find_map(|r| r.eval_accuracy)
            .map_or("—".to_string(), |a| format!("{:.1} %", 100.0 * a));
        let moved = report.totals.up_bytes + report.totals.down_bytes;
        self.bar.set_message(format!(
            "held-out {acc} · {:.2} MB moved",
            moved as f64 / 1e6
        ));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
