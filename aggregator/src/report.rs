//! The run report: JSON (schema below), CSV (one row per round) and a summary table.
//!
//! JSON schema (`schema = "fedpeft-aggregator-report/1"`):
//! ```text
//! { schema, run_id, fleet, strategy, peft, rounds_planned, trainable_params, backbone_params,
//!   finished: bool,
//!   totals: { up_bytes, down_bytes, up_messages, down_messages, aggregator_published_bytes,
//!             full_model_fedavg_bytes, ratio_to_full_model },   // ratio = (up+down)/full
//!   rejected: { reason: count },                    // whole run, reasons as in RejectReason
//!   clients: { id: { up_bytes, up_messages, down_bytes, down_messages } },
//!   rounds: [ { round, status: "initial"|"ok"|"failed", sampled: [id], clients_ok,
//!               clients_failed, failed_clients: { id: why }, rejected: { reason: count },
//!               train_loss, train_accuracy,       // example-weighted client metrics, or null
//!               eval_loss, eval_accuracy,         // server-side held-out evaluation, or null
//!               traffic: { up_bytes, up_messages, down_bytes, down_messages },
//!               full_model_fedavg_bytes, started_unix_ms, duration_ms,
//!               robust: { norm_bound, median_norm,   // L2 bound applied; median pre-bound norm
//!                         clipped, clipped_clients,  // deltas scaled down to the bound, whose
//!                         values_trimmed_per_coordinate,  // trimmed mean / median, else null
//!                         trimmed_share: { id: share },   // share of coordinates discarded
//!                         dp_noise_std, dp_epsilon, dp_delta },     // client-level DP, else null
//!               local_dp_epsilon: { id: ε } } ],  // DP-SGD on the clients: ε each one stated
//!   robust: { clipped_total, dp_epsilon, dp_delta },   // whole run (ε after the last round)
//!   local_dp: { clients: { id: ε }, median, max } | null }  // each client's latest stated ε
//! ```
//! README "Robust aggregation and client-level DP" explains each figure.
//! Byte counts are MQTT PUBLISH packets including framing (see [`crate::accounting`]).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::accounting::Traffic;
use crate::round::{MachineState, RoundRecord};

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub up_bytes: u64,
    pub down_bytes: u64,
    pub up_messages: u64,
    pub down_messages: u64,
    pub aggregator_published_bytes: u64,
    pub full_model_fedavg_bytes: u64,
    pub ratio_to_full_model: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub run_id: u64,
    pub fleet: String,
    pub strategy: String,
    pub peft: String,
    pub rounds_planned: u32,
    pub trainable_params: usize,
    pub backbone_params: u64,
    pub finished: bool,
    pub totals: Totals,
    pub rejected: std::collections::BTreeMap<String, u64>,
    pub clients: std::collections::BTreeMap<String, Traffic>,
    pub rounds: Vec<RoundRecord>,
    pub robust: RobustTotals,
    pub local_dp: Option<LocalDp>,
}

/// Sample-level DP-SGD run on the clients, as they stated it: each client's accountant covers
/// every step it has taken, so its latest stated ε is its whole-run ε (at its own δ; fedpeft's
/// edge client uses δ = 1e-5). Clients that never stated one (no DP-SGD) are not listed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalDp {
    pub clients: std::collections::BTreeMap<String, f64>,
    /// Median and largest over `clients`: the privacy of the typical and of the least
    /// protected client's data.
    pub median: f64,
    pub max: f64,
}

impl LocalDp {
    /// Each client's latest stated ε over `rounds` (in round order), or `None` if none stated one.
    pub fn from_rounds(rounds: &[RoundRecord]) -> Option<LocalDp> {
        let mut clients = std::collections::BTreeMap::new();
        for r in rounds {
            for (id, &eps) in &r.local_dp_epsilon {
                clients.insert(id.clone(), eps);
            }
        }
        let (median, max) = median_and_max(clients.values().copied())?;
        Some(LocalDp {
            clients,
            median,
            max,
        })
    }
}

/// Median and largest of `values`, or `None` for none.
fn median_and_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let v: Vec<f64> = values.collect();
    let median = crate::strategy::median_of(&v)?;
    Some((median, v.iter().copied().fold(f64::MIN, f64::max)))
}

/// Whole-run norm bounding and DP figures.
#[derive(Debug, Clone, Serialize)]
pub struct RobustTotals {
    pub clipped_total: u64,
    /// ε at `dp_delta` after the last aggregated round (client-level DP only).
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

/// Static facts about the run that the machine state does not hold.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub fleet: String,
    pub peft: String,
    pub rounds_planned: u32,
    pub backbone_params: u64,
}

impl Report {
    pub fn from_state(state: &MachineState, info: &RunInfo, finished: bool) -> Report {
        let t = state.ledger.total;
        let last_dp = state
            .records
            .iter()
            .rev()
            .find(|r| r.robust.dp_epsilon.is_some());
        let full: u64 = state
            .records
            .iter()
            .map(|r| r.full_model_fedavg_bytes)
            .sum();
        Report {
            schema: "fedpeft-aggregator-report/1",
            run_id: state.run_id,
            fleet: info.fleet.clone(),
            strategy: state.strategy.clone(),
            peft: info.peft.clone(),
            rounds_planned: info.rounds_planned,
            trainable_params: state.global.num_params(),
            backbone_params: info.backbone_params,
            finished,
            totals: Totals {
                up_bytes: t.up_bytes,
                down_bytes: t.down_bytes,
                up_messages: t.up_messages,
                down_messages: t.down_messages,
                aggregator_published_bytes: state.ledger.aggregator_published_bytes,
                full_model_fedavg_bytes: full,
                ratio_to_full_model: (full > 0)
                    .then(|| (t.up_bytes + t.down_bytes) as f64 / full as f64),
            },
            rejected: state.rejected_total.clone(),
            clients: state.ledger.per_client.clone(),
            rounds: state.records.clone(),
            robust: RobustTotals {
                clipped_total: state.clipped_total,
                dp_epsilon: last_dp.and_then(|r| r.robust.dp_epsilon),
                dp_delta: last_dp.and_then(|r| r.robust.dp_delta),
            },
            local_dp: LocalDp::from_rounds(&state.records),
        }
    }

    /// One CSV row per round.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "round,status,sampled,clients_ok,clients_failed,rejected,train_loss,train_accuracy,eval_loss,eval_accuracy,up_bytes,down_bytes,full_model_fedavg_bytes,duration_ms,clipped,dp_epsilon,local_dp_epsilon_median,local_dp_epsilon_max\n",
        );
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
        for r in &self.rounds {
            let local = median_and_max(r.local_dp_epsilon.values().copied());
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                r.round,
                r.status,
                r.sampled.len(),
                r.clients_ok,
                r.clients_failed,
                r.rejected.values().sum::<u64>(),
                opt(r.train_loss),
                opt(r.train_accuracy),
                opt(r.eval_loss),
                opt(r.eval_accuracy),
                r.traffic.up_bytes,
                r.traffic.down_bytes,
                r.full_model_fedavg_bytes,
                r.duration_ms,
                r.robust.clipped,
                opt(r.robust.dp_epsilon),
                opt(local.map(|l| l.0)),
                opt(local.map(|l| l.1))
            );
        }
        s
    }

    /// A table for people.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let pct = |v: Option<f64>| {
            v.map(|x| format!("{:.2}%", 100.0 * x))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            s,
            "run {} · fleet {} · {} · {} · {} trainable parameters",
            self.run_id, self.fleet, self.strategy, self.peft, self.trainable_params
        );
        let _ = writeln!(
            s,
            "{:>5}  {:<7} {:>4} {:>6} {:>8} {:>9} {:>9} {:>12} {:>12} {:>9}",
            "round",
            "status",
            "ok",
            "failed",
            "rejected",
            "eval acc",
            "eval loss",
            "up bytes",
            "down bytes",
            "secs"
        );
        for r in &self.rounds {
            let _ = writeln!(
                s,
                "{:>5}  {:<7} {:>4} {:>6} {:>8} {:>9} {:>9} {:>12} {:>12} {:>9.1}",
                r.round,
                r.status,
                r.clients_ok,
                r.clients_failed,
                r.rejected.values().sum::<u64>(),
                pct(r.eval_accuracy),
                r.eval_loss
                    .map(|x| format!("{x:.4}"))
                    .unwrap_or_else(|| "-".into()),
                r.traffic.up_bytes,
                r.traffic.down_bytes,
                r.duration_ms as f64 / 1000.0
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            s,
            "total: {} bytes up, {} bytes down ({} published by the aggregator); full-model FedAvg would move {} bytes{}",
            t.up_bytes,
            t.down_bytes,
            t.aggregator_published_bytes,
            t.full_model_fedavg_bytes,
            t.ratio_to_full_model
                .map(|r| format!(" (this run: {:.4}% of it, {:.0}x less)", 100.0 * r, 1.0 / r))
                .unwrap_or_default()
        );
        if self.robust.clipped_total > 0 {
            let per_round: Vec<String> = self
                .rounds
                .iter()
                .filter(|r| r.round > 0)
                .map(|r| r.robust.clipped.to_string())
                .collect();
            let _ = writeln!(
                s,
                "norm bound: {} updates clipped (per round: {})",
                self.robust.clipped_total,
                per_round.join(" ")
            );
        }
        if let (Some(eps), Some(delta)) = (self.robust.dp_epsilon, self.robust.dp_delta) {
            let _ = writeln!(s, "client-level DP: ε = {eps:.3} at δ = {delta:e}");
        }
        if let Some(l) = &self.local_dp {
            let _ = writeln!(
                s,
                "DP-SGD on the clients (their own accountants): ε median {:.3}, largest {:.3}, over {} clients",
                l.median,
                l.max,
                l.clients.len()
            );
        }
        if !self.rejected.is_empty() {
            let list: Vec<String> = self
                .rejected
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "rejected: {}", list.join(", "));
        }
        s
    }

    /// Writes `report.json` and `report.csv` into `dir` (each atomically: temp + rename).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::checkpoint::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        crate::checkpoint::write_atomic(&dir.join("report.csv"), self.csv().as_bytes())
    }
}
