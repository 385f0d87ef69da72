//! Who took part in each round, from the aggregator's report: how many clients were sampled,
//! whose update was accepted, who *dropped* (vanished mid-round: the broker delivered its last
//! will, the aggregator counted it failed as `offline`), who was *late* (sampled, alive, but no
//! update by the deadline: a straggler), and who failed otherwise (a refused update). Added to
//! `report.json` under `participation` with the trial's dropout and straggler settings, and
//! printed as a table.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::trial::Trial;

/// The aggregator's reasons (`failed_clients` values) for the two emulated faults.
pub const DROPPED_REASON: &str = "offline";
pub const LATE_REASON: &str = "no reply by the deadline";

/// One round's participation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundParticipation {
    pub round: u32,
    pub status: String,
    pub sampled: usize,
    pub accepted: usize,
    pub dropped: usize,
    pub late: usize,
    /// Failed for another reason (e.g. a refused update).
    pub other_failed: usize,
    /// Updates refused as `late` while this round was open (for the round before it).
    pub late_updates_refused: u64,
    pub dropped_clients: Vec<String>,
    pub late_clients: Vec<String>,
    pub duration_ms: u64,
}

/// The whole run's participation and the trial's fault settings.
#[derive(Debug, Clone, Serialize)]
pub struct Participation {
    pub schema: &'static str,
    pub dropout: f64,
    pub dropout_offline_secs: f64,
    pub stragglers: Vec<String>,
    pub straggle_secs: f64,
    pub rounds: Vec<RoundParticipation>,
}

impl Participation {
    /// Reads `<out_dir>/report.json` (the aggregator's).
    pub fn build(trial: &Trial, out_dir: &Path) -> anyhow::Result<Participation> {
        let path = out_dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let report: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(Participation {
            schema: "fedpeft-fleet-participation/1",
            dropout: trial.dropout,
            dropout_offline_secs: trial.dropout_offline_secs,
            stragglers: trial
                .stragglers
                .iter()
                .map(|&i| trial.client_id(i))
                .collect(),
            straggle_secs: trial.straggle_secs,
            rounds: from_report(&report),
        })
    }

    /// Adds `participation` to `report.json`.
    pub fn write(&self, out_dir: &Path) -> anyhow::Result<()> {
        let path = out_dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut report: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        report["participation"] = serde_json::to_value(self)?;
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The printed table.
    pub fn print(&self) {
        if self.dropout > 0.0 || !self.stragglers.is_empty() {
            println!(
                "fleet: dropout {} (away {} s); stragglers {:?} (+{} s per update)",
                self.dropout, self.dropout_offline_secs, self.stragglers, self.straggle_secs
            );
        }
        println!(
            "{:>5} {:>7} {:>8} {:>9} {:>8} {:>5} {:>6} {:>9}",
            "round", "status", "sampled", "accepted", "dropped", "late", "other", "wall s"
        );
        for r in &self.rounds {
            println!(
                "{:>5} {:>7} {:>8} {:>9} {:>8} {:>5} {:>6} {:>9.1}",
                r.round,
                r.status,
                r.sampled,
                r.accepted,
                r.dropped,
                r.late,
                r.other_failed,
                r.duration_ms as f64 / 1000.0
            );
        }
    }
}

/// The participation of every round (not the initial round 0) of an aggregator report.
pub fn from_report(report: &serde_json::Value) -> Vec<RoundParticipation> {
    let Some(rounds) = report["rounds"].as_array() else {
        return Vec::new();
    };
    rounds
        .iter()
        .filter(|r| r["round"].as_u64().is_some_and(|n| n > 0))
        .map(|r| {
            let mut dropped = Vec::new();
            let mut late = Vec::new();
            let mut other = 0;
            if let Some(failed) = r["failed_clients"].as_object() {
                for (client, why) in failed {
                    match why.as_str().unwrap_or("") {
                        DROPPED_REASON => dropped.push(client.clone()),
                        LATE_REASON => late.push(client.clone()),
                        _ => other += 1,
                    }
                }
            }
            RoundParticipation {
                round: r["round"].as_u64().unwrap_or(0) as u32,
                status: r["status"].as_str().unwrap_or("").to_string(),
                sampled: r["sampled"].as_array().map_or(0, Vec::len),
                accepted: r["clients_ok"].as_u64().unwrap_or(0) as usize,
                dropped: dropped.len(),
                late: late.len(),
                other_failed: other,
                late_updates_refused: r["rejected"]["late"].as_u64().unwrap_or(0),
                dropped_clients: dropped,
                late_clients: late,
                duration_ms: r["duration_ms"].as_u64().unwrap_or(0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_clients_are_split_into_dropped_late_and_other() {
        let report = serde_json::json!({"rounds": [
            {"round": 0, "status": "initial", "sampled": [], "clients_ok": 0, "failed_clients": {}},
            {"round": 1, "status": "ok", "sampled": ["a", "b", "c", "d"], "clients_ok": 1,
             "failed_clients": {"b": "offline", "c": "no reply by the deadline",
                                "d": "rejected: wrong_shape"},
             "rejected": {"wrong_shape": 1}, "duration_ms": 30000},
            {"round": 2, "status": "ok", "sampled": ["a", "b"], "clients_ok": 2,
             "failed_clients": {}, "rejected": {"late": 1}, "duration_ms": 1000}
        ]});
        let rows = from_report(&report);
        assert_eq!(rows.len(), 2);
        let r1 = &rows[0];
        assert_eq!(
            (
                r1.sampled,
                r1.accepted,
                r1.dropped,
                r1.late,
                r1.other_failed
            ),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(r1.dropped_clients, ["b"]);
        assert_eq!(r1.late_clients, ["c"]);
        assert_eq!(rows[1].late_updates_refused, 1);
        assert_eq!(rows[1].dropped + rows[1].late, 0);
    }
}
