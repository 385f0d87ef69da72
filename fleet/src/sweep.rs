//! A sweep: many trials from one file, run one after another, and one results table.
//!
//! ```toml
//! name = "fedpeft-small"        # results in runs/<name>/ (one folder per trial, and the table)
//!
//! [base]                        # a trial file without `name`: what every trial shares
//! rounds = 3
//! clients = 16
//! fraction = 0.125
//! shared_cache = true           # one trunk pass over the data set for the whole sweep
//! [base.model]
//! backbone = "models/build/efficientnet-lite0"
//! [base.data]
//! dataset = "fashion-mnist"
//! [base.local]
//! epochs = 5
//!
//! [grid]                        # every combination of these (dotted trial fields)
//! "model.peft" = ["head", "lora"]
//! "data.alpha" = [0.1, 0.5]
//!
//! [[extra]]                     # single trials after the grid: base + these fields
//! label = "lora-dp1"
//! "model.peft" = "lora"
//! "local.dp_clip_norm" = 1.0
//! "local.dp_noise_multiplier" = 1.0
//! ```
//!
//! Each trial is named `<sweep>-<label>` (the grid's label joins its values, keys in
//! alphabetical order, e.g. `a0.5-lora`) and runs into `<out>/<trial>/`; a trial whose `report.json` says it finished is
//! not run again, so a stopped sweep resumes. The table (`results.json`, `results.csv`, and
//! `results.md` for people) has per
//! trial: method, α, DP settings, final and best accuracy, trainable parameters, bytes per
//! sampled client per round, total bytes, the ratio to full-model FedAvg, the measured mean
//! round time, and per link preset a round time *computed* from the bytes and the preset's
//! rates and latency (not measured).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use fedpeft_config::report::Report;

use crate::report::TrialReport;
use crate::runner::{Binaries, run};
use crate::summary::row;
use crate::table::write_table;
use crate::trial::Trial;

/// A parsed sweep file.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub name: String,
    /// `(label, trial TOML text)` in run order.
    pub trials: Vec<(String, String)>,
}

fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> anyhow::Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().context("empty key")?;
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .with_context(|| format!("`{key}`: `{p}` is not a table"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

fn short(key: &str, value: &toml::Value) -> String {
    let v = match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match key {
        "model.peft" => v,
        "data.alpha" => format!("a{v}"),
        _ => format!("{}{v}", key.rsplit('.').next().unwrap_or(key)),
    }
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_') {
            c
        } else {
            '_'
        }
    })
    .collect()
}

/// A trial of the sweep before it is named: its label and the fields it sets over `[base]`.
type Run = (String, Vec<(String, toml::Value)>);

/// Every combination of the grid, keys in alphabetical order (the first varies slowest),
/// labelled by its values; none for an empty grid.
fn grid_runs(grid: &toml::Table) -> anyhow::Result<Vec<Run>> {
    if grid.is_empty() {
        return Ok(Vec::new());
    }
    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
    for (key, values) in grid {
        let values = values
            .as_array()
            .filter(|a| !a.is_empty())
            .with_context(|| format!("grid `{key}` must be a non-empty array"))?;
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    Ok(combos
        .into_iter()
        .map(|c| {
            let label = c
                .iter()
                .map(|(k, v)| short(k, v))
                .collect::<Vec<_>>()
                .join("-");
            (label, c)
        })
        .collect())
}

/// The `[[extra]]` trials, each labelled by its `label`.
fn extra_runs(extra: Vec<toml::Value>) -> anyhow::Result<Vec<Run>> {
    let mut runs = Vec::with_capacity(extra.len());
    for (i, e) in extra.into_iter().enumerate() {
        let mut t = match e {
            toml::Value::Table(t) => t,
            _ => bail!("extra[{i}] must be a table"),
        };
        let label = match t.remove("label") {
            Some(toml::Value::String(s)) => s,
            _ => bail!("extra[{i}] needs a `label`"),
        };
        runs.push((label, t.into_iter().collect()));
    }
    Ok(runs)
}

impl Sweep {
    pub fn load(path: &Path) -> anyhow::Result<Sweep> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sweep file {}", path.display()))?;
        Sweep::parse(&text).with_context(|| format!("sweep file {}", path.display()))
    }

    /// Expands the sweep into trials; each is checked as a trial file here, before any runs.
    pub fn parse(text: &str) -> anyhow::Result<Sweep> {
        let mut doc: toml::Table = toml::from_str(text)?;
        let name = match doc.remove("name") {
            Some(toml::Value::String(s)) if !s.is_empty() => s,
            _ => bail!("`name` (a string) is required"),
        };
        let base = match doc.remove("base") {
            Some(toml::Value::Table(t)) => t,
            _ => bail!("`[base]` (the trials' shared fields) is required"),
        };
        let grid = match doc.remove("grid") {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(_) => bail!("`grid` must be a table of field = [values]"),
        };
        let extra = match doc.remove("extra") {
            None => Vec::new(),
            Some(toml::Value::Array(a)) => a,
            Some(_) => bail!("`extra` must be an array of tables ([[extra]])"),
        };
        if let Some(k) = doc.keys().next() {
            bail!("unknown field `{k}` (expected name, base, grid, extra)");
        }
        let mut runs = grid_runs(&grid)?;
        runs.extend(extra_runs(extra)?);
        if runs.is_empty() {
            bail!("no trials: give a [grid] or [[extra]]");
        }
        let mut trials = Vec::with_capacity(runs.len());
        for (label, fields) in runs {
            let trial_name = format!("{name}-{label}");
            if trials.iter().any(|(n, _)| *n == trial_name) {
                bail!("two trials named {trial_name}");
            }
            let mut t = base.clone();
            t.insert("name".into(), toml::Value::String(trial_name.clone()));
            for (k, v) in fields {
                set_dotted(&mut t, &k, v)?;
            }
            let text = toml::to_string(&t)?;
            Trial::parse(&text, Path::new(&trial_name))?;
            trials.push((trial_name, text));
        }
        Ok(Sweep { name, trials })
    }
}

/// The aggregator's report in `dir` if it says the run finished.
/// Whether the trial in `dir` has a finished report.
pub(crate) fn finished(dir: &Path) -> bool {
    finished_report(dir).is_some()
}

fn finished_report(dir: &Path) -> Option<Report> {
    let report = TrialReport::read(dir).ok()?.aggregator;
    report.finished.then_some(report)
}

/// A finished trial is reused only if it ran with the settings the sweep file gives it now:
/// the `trial.toml` the runner wrote into its folder must be the trial's text.
fn same_settings(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join("trial.toml");
    let ran = std::fs::read_to_string(&path)
        .with_context(|| format!("trial {name} finished but {} is unreadable", path.display()))?;
    if ran != text {
        bail!(
            "trial {name} in {} finished with other settings than the sweep file gives it now \
             ({} differs); move that folder away to run it again, or pass another --out",
            dir.display(),
            path.display()
        );
    }
    Ok(())
}

/// Runs every trial of the sweep not already finished in `out`, then writes the table.
pub fn run_sweep(
    sweep: &Sweep,
    bins: &Binaries,
    out: &Path,
    timeout: Duration,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut rows = Vec::new();
    let bar = crate::runner::progress::current().trials(sweep.trials.len());
    for (i, (name, text)) in sweep.trials.iter().enumerate() {
        if let Some(b) = &bar {
            b.set_position(i as u64);
            b.set_message(name.clone());
        }
        let dir = out.join(name);
        let mut trial = Trial::parse(text, Path::new(name))?;
        let report = match finished_report(&dir) {
            Some(r) => {
                same_settings(&dir, name, text)?;
                println!("sweep: {name} already finished; reusing its report");
                r
            }
            None => {
                trial.preflight()?;
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("trial.toml"), text)?;
                println!(
                    "sweep: trial {}/{}: {name} ({} clients, {} rounds, {})",
                    i + 1,
                    sweep.trials.len(),
                    trial.clients,
                    trial.rounds,
                    trial.model.peft
                );
                let outcome = run(&trial, bins, &dir, timeout)?;
                if !outcome.aggregator_status.success() {
                    bail!(
                        "trial {name}: the aggregator failed ({}); see {}",
                        outcome.aggregator_status,
                        dir.join("logs/aggregator.log").display()
                    );
                }
                finished_report(&dir).with_context(|| {
                    format!("trial {name} left no finished report in {}", dir.display())
                })?
            }
        };
        rows.push(row(&trial, &report));
        write_table(out, &rows)?;
    }
    match crate::plot::plot_rows(&rows, out) {
        Ok(files) => println!("sweep: {} plots in {}", files.len(), out.display()),
        Err(e) => eprintln!("sweep: no plots: {e:#}"),
    }
    Ok(out.join("results.json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
name = "s"
[base]
rounds = 3
clients = 16
fraction = 0.125
shared_cache = true
[base.model]
backbone = "models/build/efficientnet-lite0"
[base.data]
dataset = "fashion-mnist"
[grid]
"model.peft" = ["head", "lora"]
"data.alpha" = [0.1, 0.5]
[[extra]]
label = "lora-dp"
"model.peft" = "lora"
"local.dp_clip_norm" = 1.0
"local.dp_noise_multiplier" = 1.1
"#;

    #[test]
    fn the_grid_expands_to_every_combination_then_the_extras() {
        let s = Sweep::parse(SWEEP).unwrap();
        let names: Vec<&str> = s.trials.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "s-a0.1-head",
                "s-a0.1-lora",
                "s-a0.5-head",
                "s-a0.5-lora",
                "s-lora-dp"
            ]
        );
        let t = Trial::parse(&s.trials[2].1, Path::new("x")).unwrap();
        assert_eq!(t.model.peft, "head");
        assert_eq!(t.data.alpha, 0.5);
        assert!(t.shared_cache);
        assert_eq!(t.clients, 16);
        let dp = Trial::parse(&s.trials[4].1, Path::new("x")).unwrap();
        assert_eq!(dp.local.dp_noise_multiplier, Some(1.1));
        assert_eq!(dp.local.dp_clip_norm, Some(1.0));
    }

    #[test]
    fn the_shipped_sweep_files_expand_into_valid_trials() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sweeps");
        let small = Sweep::load(&dir.join("small.toml")).unwrap();
        assert_eq!(small.trials.len(), 2);
        let full = Sweep::load(&dir.join("fedpeft.toml")).unwrap();
        // 4 methods x 2 alphas (LoRA as extras, for its own learning rate), LoRA under secure
        // aggregation, 3 DP trials, 2 with 30 % mid-round dropout and 5 methods on the text
        // backbone.
        assert_eq!(full.trials.len(), 19);
        let secure: Vec<_> = full
            .trials
            .iter()
            .filter(|(_, text)| {
                Trial::parse(text, Path::new("x"))
                    .unwrap()
                    .secure_aggregation
                    .is_some()
            })
            .map(|(name, _)| name.clone())
            .collect();
        assert_eq!(secure.len(), 1, "{secure:?}");
        for (name, text) in &full.trials {
            let t = Trial::parse(text, Path::new(name)).unwrap();
            if t.data.dataset == "fashion-mnist" {
                let lr = if t.model.peft == "lora" { 0.05 } else { 0.1 };
                assert_eq!(t.local.learning_rate, Some(lr), "{name}");
            }
        }
        let dropout: Vec<_> = full
            .trials
            .iter()
            .map(|(name, text)| Trial::parse(text, Path::new(name)).unwrap())
            .filter(|t| t.dropout > 0.0)
            .map(|t| (t.model.peft, t.dropout))
            .collect();
        assert_eq!(dropout, [("lora".into(), 0.3), ("head".into(), 0.3)]);
        let text: Vec<Trial> = full
            .trials
            .iter()
            .map(|(name, text)| Trial::parse(text, Path::new(name)).unwrap())
            .filter(|t| t.data.dataset == "spam-assassin")
            .collect();
        let methods: Vec<&str> = text.iter().map(|t| t.model.peft.as_str()).collect();
        assert_eq!(methods, ["adapter", "prompt", "lora", "bias", "head"]);
        for t in &text {
            assert_eq!(t.data.partition, "natural", "{}", t.name);
            assert!(t.model.backbone.ends_with("all-minilm-l6-v2"), "{}", t.name);
        }
        for (name, text) in &full.trials {
            let t = Trial::parse(text, Path::new(name)).unwrap();
            let rounds = if t.data.dataset == "spam-assassin" {
                3
            } else {
                30
            };
            assert_eq!(
                (t.clients, t.rounds, t.shared_cache),
                (64, rounds, true),
                "{name}"
            );
            assert_eq!(((t.fraction * 64.0).round() as usize), 8, "{name}");
            // The aggregator samples max(min_clients, fraction x joined).
            assert_eq!(t.min_clients, 8, "{name}");
        }
    }

    #[test]
    fn a_finished_trial_is_reused_only_with_the_settings_it_ran_with() {
        let dir = tempfile::tempdir().unwrap();
        let (name, text) = &Sweep::parse(SWEEP).unwrap().trials[0];
        std::fs::write(dir.path().join("trial.toml"), text).unwrap();
        same_settings(dir.path(), name, text).unwrap();
        let changed = text.replace("rounds = 3", "rounds = 4");
        assert_ne!(&changed, text);
        let e = same_settings(dir.path(), name, &changed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(name.as_str()) && e.contains("other settings") && e.contains("trial.toml"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("trial.toml")).unwrap();
        assert!(same_settings(dir.path(), name, text).is_err());
    }

    #[test]
    fn a_bad_trial_in_the_sweep_is_refused_before_anything_runs() {
        let bad = SWEEP.replace(
            "\"data.alpha\" = [0.1, 0.5]",
            "\"data.alpha\" = [0.1, -1.0]",
        );
        let e = format!("{:#}", Sweep::parse(&bad).unwrap_err());
        assert!(e.contains("data.alpha"), "{e}");
        let half_dp = SWEEP.replace("\"local.dp_noise_multiplier\" = 1.1\n", "");
        let e = format!("{:#}", Sweep::parse(&half_dp).unwrap_err());
        assert!(e.contains("dp_clip_norm"), "{e}");
    }
}
