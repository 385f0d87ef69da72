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
use serde::Serialize;

use crate::links::{PRESETS, preset};
use crate::runner::{Binaries, run};
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
        // Every combination of the grid, keys in alphabetical order (the first varies slowest).
        let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        for (key, values) in &grid {
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
        if grid.is_empty() {
            combos.clear();
        }
        let mut runs: Vec<(String, Vec<(String, toml::Value)>)> = combos
            .into_iter()
            .map(|c| {
                let label = c
                    .iter()
                    .map(|(k, v)| short(k, v))
                    .collect::<Vec<_>>()
                    .join("-");
                (label, c)
            })
            .collect();
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

/// Round time on one link preset, computed from a client's bytes per round.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ComputedRoundTime {
    pub preset: String,
    /// Upload of the update + download of the global + both ways' latency, seconds.
    pub comm_secs: f64,
}

/// One trial's line of the results table.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    pub trial: String,
    pub method: String,
    pub dataset: String,
    /// `iid`, `dirichlet` or `natural`.
    #[serde(default)]
    pub partition: String,
    pub alpha: f64,
    pub clients: usize,
    pub fraction: f64,
    pub rounds: u32,
    pub epochs: Option<u16>,
    pub learning_rate: Option<f64>,
    pub update_dtype: String,
    /// Encoding of the published global adapter.
    pub global_dtype: String,
    pub dp_clip_norm: Option<f64>,
    pub dp_noise_multiplier: Option<f64>,
    /// DP-SGD: the median and largest whole-run ε (at δ = 1e-5) over the clients, as their own
    /// accountants stated it to the aggregator (report field `local_dp`).
    #[serde(default)]
    pub dp_epsilon_median: Option<f64>,
    #[serde(default)]
    pub dp_epsilon_max: Option<f64>,
    /// Probability that a sampled client vanished mid-round, and the straggling clients.
    pub dropout: f64,
    pub stragglers: usize,
    /// Sampled client-rounds that ended in a dropout, and that missed the deadline.
    pub dropped_client_rounds: u64,
    pub late_client_rounds: u64,
    pub final_accuracy: Option<f64>,
    pub best_accuracy: Option<f64>,
    pub trainable_params: u64,
    pub backbone_params: u64,
    /// Client-rounds with an accepted update.
    pub client_rounds: u64,
    /// Upload per accepted update; download per joined client and round (every joined client
    /// receives each round's global).
    pub up_bytes_per_client_round: f64,
    pub down_bytes_per_client_round: f64,
    pub total_bytes: u64,
    pub full_model_fedavg_bytes: u64,
    /// Full-model FedAvg bytes per sampled client-round over this trial's (up + down) bytes per
    /// client-round: how many times less a participating client sends and receives.
    pub times_less_than_full_model: Option<f64>,
    pub mean_round_ms: f64,
    /// Computed, not measured: see [`ComputedRoundTime`].
    pub computed_round_comm: Vec<ComputedRoundTime>,
    /// Evaluation accuracy after each round (round 0: the initial model), and cumulative bytes.
    pub accuracy_by_round: Vec<Option<f64>>,
    pub cumulative_bytes_by_round: Vec<u64>,
}

impl Row {
    /// How the data was split among the clients: `Dirichlet α 0.5`, `iid`, `natural` (a row
    /// from before the partition was recorded: `α 0.5`).
    pub fn split(&self) -> String {
        match self.partition.as_str() {
            "dirichlet" => format!("Dirichlet α {}", self.alpha),
            "" => format!("α {}", self.alpha),
            p => p.to_string(),
        }
    }
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Reads a finished trial's `report.json` into a row.
pub fn row(trial: &Trial, report: &serde_json::Value) -> Row {
    let rounds = report["rounds"].as_array().cloned().unwrap_or_default();
    let mut acc = Vec::new();
    let mut cum = Vec::new();
    let mut total = 0u64;
    let mut client_rounds = 0u64;
    let mut sampled_client_rounds = 0u64;
    let mut ms = Vec::new();
    for r in &rounds {
        acc.push(r["eval_accuracy"].as_f64());
        total += u(&r["traffic"]["up_bytes"]) + u(&r["traffic"]["down_bytes"]);
        cum.push(total);
        if u(&r["round"]) > 0 {
            client_rounds += u(&r["clients_ok"]);
            sampled_client_rounds += r["sampled"].as_array().map_or(0, |s| s.len() as u64);
            ms.push(r["duration_ms"].as_f64().unwrap_or(0.0));
        }
    }
    let totals = &report["totals"];
    let up = u(&totals["up_bytes"]);
    let down = u(&totals["down_bytes"]);
    let full = u(&totals["full_model_fedavg_bytes"]);
    let per = |b: u64| {
        if client_rounds == 0 {
            0.0
        } else {
            b as f64 / client_rounds as f64
        }
    };
    // Every joined client receives each round's global model, sampled or not: the download is
    // counted per client and round, the upload per accepted update.
    let done_rounds = ms.len() as u64;
    let down_per = if done_rounds == 0 {
        0.0
    } else {
        down as f64 / (done_rounds * trial.clients as u64) as f64
    };
    let up_per = per(up);
    let computed_round_comm = PRESETS
        .iter()
        .filter_map(|&name| {
            let p = preset(name)?;
            Some(ComputedRoundTime {
                preset: name.to_string(),
                comm_secs: up_per / p.up_bytes_per_sec()
                    + down_per / p.down_bytes_per_sec()
                    + 2.0 * p.latency_ms / 1000.0,
            })
        })
        .collect();
    let participation = crate::rounds::from_report(report);
    Row {
        dropout: trial.dropout,
        stragglers: trial.stragglers.len(),
        dropped_client_rounds: participation.iter().map(|p| p.dropped as u64).sum(),
        late_client_rounds: participation.iter().map(|p| p.late as u64).sum(),
        trial: trial.name.clone(),
        method: trial.model.peft.clone(),
        dataset: trial.data.dataset.clone(),
        partition: trial.data.partition.clone(),
        alpha: trial.data.alpha,
        clients: trial.clients,
        fraction: trial.fraction,
        rounds: trial.rounds,
        epochs: trial.local.epochs,
        learning_rate: trial.local.learning_rate,
        update_dtype: trial
            .local
            .update_dtype
            .clone()
            .unwrap_or_else(|| "f32".into()),
        global_dtype: trial.global_dtype.clone(),
        dp_clip_norm: trial.local.dp_clip_norm,
        dp_noise_multiplier: trial.local.dp_noise_multiplier,
        dp_epsilon_median: report["local_dp"]["median"].as_f64(),
        dp_epsilon_max: report["local_dp"]["max"].as_f64(),
        final_accuracy: acc.last().copied().flatten(),
        best_accuracy: acc.iter().flatten().copied().reduce(f64::max),
        trainable_params: u(&report["trainable_params"]),
        backbone_params: u(&report["backbone_params"]),
        client_rounds,
        up_bytes_per_client_round: up_per,
        down_bytes_per_client_round: down_per,
        total_bytes: up + down,
        full_model_fedavg_bytes: full,
        // The aggregator counts full-model FedAvg for every sampled client (a dropped client
        // would have downloaded the model too): per sampled client-round, against what one
        // client moves in a round here.
        times_less_than_full_model: (up_per + down_per > 0.0 && sampled_client_rounds > 0)
            .then(|| full as f64 / sampled_client_rounds as f64 / (up_per + down_per)),
        mean_round_ms: if ms.is_empty() {
            0.0
        } else {
            ms.iter().sum::<f64>() / ms.len() as f64
        },
        computed_round_comm,
        accuracy_by_round: acc,
        cumulative_bytes_by_round: cum,
    }
}

/// The CSV form of the table (one line per trial; per-round series only in the JSON).
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from(
        "trial,method,dataset,alpha,clients,fraction,rounds,epochs,learning_rate,update_dtype,\
         global_dtype,dp_clip_norm,dp_noise_multiplier,dp_epsilon_median,dp_epsilon_max,dropout,stragglers,dropped_client_rounds,\
         late_client_rounds,final_accuracy,best_accuracy,trainable_params,\
         up_bytes_per_client_round,down_bytes_per_client_round,total_bytes,\
         full_model_fedavg_bytes,times_less_than_full_model,mean_round_ms",
    );
    for p in PRESETS {
        out.push_str(&format!(",computed_comm_secs_{p}"));
    }
    out.push('\n');
    let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{},{},{},{:.0}",
            r.trial,
            r.method,
            r.dataset,
            r.alpha,
            r.clients,
            r.fraction,
            r.rounds,
            r.epochs.map(|e| e.to_string()).unwrap_or_default(),
            o(r.learning_rate),
            r.update_dtype,
            r.global_dtype,
            o(r.dp_clip_norm),
            o(r.dp_noise_multiplier),
            o(r.dp_epsilon_median),
            o(r.dp_epsilon_max),
            r.dropout,
            r.stragglers,
            r.dropped_client_rounds,
            r.late_client_rounds,
            o(r.final_accuracy),
            o(r.best_accuracy),
            r.trainable_params,
            r.up_bytes_per_client_round,
            r.down_bytes_per_client_round,
            r.total_bytes,
            r.full_model_fedavg_bytes,
            o(r.times_less_than_full_model
                .map(|x| (x * 10.0).round() / 10.0)),
            r.mean_round_ms,
        ));
        for c in &r.computed_round_comm {
            out.push_str(&format!(",{:.3}", c.comm_secs));
        }
        out.push('\n');
    }
    out
}

fn finished_report(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("report.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    (v["finished"] == serde_json::Value::Bool(true)).then_some(v)
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
    for (i, (name, text)) in sweep.trials.iter().enumerate() {
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

/// `n` with a space between groups of three digits, rounded to a whole number.
fn grouped(n: f64) -> String {
    let digits = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    if n < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// `x` to three significant digits (whole numbers from 100 up).
fn three_significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let decimals = (2 - x.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{x:.decimals$}")
}

/// The table as markdown (`results.md`), one line per trial: what the README shows.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = format!(
        "| trial | method | data, split | local training | accuracy after last round (best) \
         | trainable | up B / update | down B / client-round | total MB \
         | × less than full-model FedAvg | measured s / round | computed comm s: {} |\n\
         | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
        PRESETS.join(" / ")
    );
    let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{:.2} %", 100.0 * v));
    for r in rows {
        let mut training = Vec::new();
        if let Some(e) = r.epochs {
            training.push(format!("{e} epoch{}", if e == 1 { "" } else { "s" }));
        }
        if let Some(lr) = r.learning_rate {
            training.push(format!("lr {lr}"));
        }
        training.push(format!("{} updates", r.update_dtype));
        if let Some(z) = r.dp_noise_multiplier {
            let eps = match (r.dp_epsilon_median, r.dp_epsilon_max) {
                (Some(m), Some(x)) => format!(", ε {m:.3} / {x:.3} (median / largest)"),
                _ => String::new(),
            };
            training.push(format!(
                "DP-SGD clip {} z {z}{eps}",
                r.dp_clip_norm.unwrap_or(f64::NAN)
            ));
        }
        if r.dropout > 0.0 {
            training.push(format!(
                "{:.0} % dropout ({} client-rounds dropped)",
                100.0 * r.dropout,
                r.dropped_client_rounds
            ));
        }
        if r.stragglers > 0 {
            training.push(format!(
                "{} stragglers ({} client-rounds late)",
                r.stragglers, r.late_client_rounds
            ));
        }
        let comm: Vec<String> = r
            .computed_round_comm
            .iter()
            .map(|c| three_significant(c.comm_secs))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {}, {} | {} | {} ({}) | {} | {} | {} | {:.1} | {} | {:.1} | {} |\n",
            r.trial,
            r.method,
            r.dataset,
            r.split(),
            training.join("; "),
            pct(r.final_accuracy),
            pct(r.best_accuracy),
            grouped(r.trainable_params as f64),
            grouped(r.up_bytes_per_client_round),
            grouped(r.down_bytes_per_client_round),
            r.total_bytes as f64 / 1e6,
            r.times_less_than_full_model
                .map_or_else(|| "-".into(), grouped),
            r.mean_round_ms / 1000.0,
            comm.join(" / ")
        ));
    }
    out
}

/// Writes `results.json`, `results.csv` and `results.md` in `out`.
pub fn write_table(out: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "schema": "fedpeft-sweep-results/1",
        "computed_round_comm": "per link preset: up bytes / up rate + down bytes / down rate \
                                + 2 x one-way latency, per sampled client and round; computed \
                                from the measured bytes and the preset's figures, not measured",
        "trials": rows,
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out.join("results.csv"), csv(rows))?;
    std::fs::write(out.join("results.md"), markdown(rows))?;
    Ok(())
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
    fn grouped_numbers_put_a_space_between_thousands() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1000.0), "1 000");
        assert_eq!(grouped(4_652_008.0), "4 652 008");
        assert_eq!(grouped(-12_345.0), "-12 345");
        assert_eq!(three_significant(12.04), "12.0");
        assert_eq!(three_significant(0.008_184), "0.00818");
        assert_eq!(three_significant(1234.5), "1234");
    }

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
        // 4 methods x 2 alphas (LoRA as extras, for its own learning rate), 3 DP trials, 2
        // with 30 % mid-round dropout and 5 methods on the text backbone.
        assert_eq!(full.trials.len(), 18);
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

    #[test]
    fn a_row_counts_bytes_per_accepted_client_round_and_computes_link_times() {
        let trial =
            Trial::parse(&Sweep::parse(SWEEP).unwrap().trials[1].1, Path::new("x")).unwrap();
        let report = serde_json::json!({
            "finished": true, "trainable_params": 25610, "backbone_params": 4652008,
            "totals": {"up_bytes": 4000, "down_bytes": 6000, "full_model_fedavg_bytes": 10_000_000},
            "local_dp": {"clients": {"a": 3.5, "b": 4.0, "c": 9.25}, "median": 4.0, "max": 9.25},
            "rounds": [
                {"round": 0, "eval_accuracy": 0.1, "clients_ok": 0, "duration_ms": 0,
                 "traffic": {"up_bytes": 0, "down_bytes": 0}},
                {"round": 1, "eval_accuracy": 0.5, "clients_ok": 2, "duration_ms": 1000,
                 "sampled": ["a", "b", "c"], "traffic": {"up_bytes": 2000, "down_bytes": 3000}},
                {"round": 2, "eval_accuracy": 0.4, "clients_ok": 2, "duration_ms": 3000,
                 "sampled": ["a", "b"], "traffic": {"up_bytes": 2000, "down_bytes": 3000}}
            ]
        });
        let r = row(&trial, &report);
        assert_eq!(r.client_rounds, 4);
        assert_eq!(r.up_bytes_per_client_round, 1000.0);
        // 6000 B down over 2 rounds to 16 joined clients.
        assert_eq!(r.down_bytes_per_client_round, 187.5);
        assert_eq!(r.final_accuracy, Some(0.4));
        assert_eq!(r.best_accuracy, Some(0.5));
        // Full-model FedAvg per sampled client-round (5 of them: c dropped out of round 1).
        assert_eq!(r.times_less_than_full_model, Some(2_000_000.0 / 1187.5));
        assert_eq!(r.cumulative_bytes_by_round, [0, 5000, 10000]);
        assert_eq!(r.mean_round_ms, 2000.0);
        let nb = preset("nb-iot").unwrap();
        let want = 1000.0 / nb.up_bytes_per_sec()
            + 187.5 / nb.down_bytes_per_sec()
            + 2.0 * nb.latency_ms / 1000.0;
        let got = r
            .computed_round_comm
            .iter()
            .find(|c| c.preset == "nb-iot")
            .unwrap();
        assert!((got.comm_secs - want).abs() < 1e-9);
        assert_eq!(
            (r.dp_epsilon_median, r.dp_epsilon_max),
            (Some(4.0), Some(9.25))
        );
        let md = markdown(std::slice::from_ref(&r));
        let line = md.lines().nth(2).unwrap();
        assert!(
            line.starts_with("| s-a0.1-lora | lora | fashion-mnist, Dirichlet α 0.1 |"),
            "{line}"
        );
        assert!(
            line.contains("| 40.00 % (50.00 %) | 25 610 | 1 000 | 188 |"),
            "{line}"
        );
        assert_eq!(md.lines().count(), 3);
        let dp = Row {
            dp_clip_norm: Some(1.0),
            dp_noise_multiplier: Some(1.0),
            ..r.clone()
        };
        let md = markdown(&[dp]);
        assert!(
            md.contains("; DP-SGD clip 1 z 1, ε 4.000 / 9.250 (median / largest) |"),
            "{md}"
        );
        let text = csv(&[r]);
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .starts_with("s-a0.1-lora,lora,")
        );
    }
}
