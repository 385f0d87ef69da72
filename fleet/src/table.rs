//! The results table of a sweep, one [`Row`] per trial: `results.json` (the rows and what
//! the computed columns mean), `results.csv` (one line per trial, per-round series only in the
//! JSON) and `results.md`, the markdown the book's sweep results page shows.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::links::PRESETS;
use crate::summary::Row;

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

/// The table as markdown (`results.md`), one line per trial: what the book's sweep results page shows.
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

/// `results.json`: the rows, and what their computed columns mean.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// How `computed_round_comm` is computed ([`COMPUTED_ROUND_COMM`]).
    pub computed_round_comm: String,
    /// [`Results::SCHEMA`].
    pub schema: String,
    pub trials: Vec<Row>,
}

/// What a row's `computed_round_comm` is.
pub const COMPUTED_ROUND_COMM: &str = "per link preset: up bytes / up rate + down bytes / down \
    rate + 2 x one-way latency, per sampled client and round; computed from the measured bytes \
    and the preset's figures, not measured";

impl Results {
    /// The schema name `results.json` carries.
    pub const SCHEMA: &str = "fedpeft-sweep-results/1";

    /// `<dir>/results.json`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("results.json")
    }

    /// Reads `<dir>/results.json`; `None` if there is none.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Results>> {
        let path = Results::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        serde_json::from_str(&text)
            .map(Some)
            .with_context(|| format!("{} is not a sweep's results table", path.display()))
    }
}

/// Writes `results.json`, `results.csv` and `results.md` in `out`.
pub fn write_table(out: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let results = Results {
        computed_round_comm: COMPUTED_ROUND_COMM.into(),
        schema: Results::SCHEMA.into(),
        trials: rows.to_vec(),
    };
    std::fs::write(Results::path(out), serde_json::to_string_pretty(&results)?)?;
    std::fs::write(out.join("results.csv"), csv(rows))?;
    std::fs::write(out.join("results.md"), markdown(rows))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
