//! Who took part in each round, from the aggregator's report: how many clients were sampled,
//! whose update was accepted, who *dropped* (vanished mid-round: the broker delivered its last
//! will, the aggregator counted it failed as `offline`), who was *late* (sampled, alive, but no
//! update by the deadline: a straggler), and who failed otherwise (a refused update). Added to
//! `report.json` under `participation` with the trial's dropout and straggler settings, and
//! printed as a table.

use fedpeft_config::report::{FailReason, RejectReason, Report, RoundStatus};
use serde::{Deserialize, Serialize};

use crate::trial::Trial;

/// One round's participation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundParticipation {
    pub round: u32,
    pub status: RoundStatus,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participation {
    /// [`Participation::SCHEMA`].
    pub schema: String,
    pub dropout: f64,
    pub dropout_offline_secs: f64,
    pub stragglers: Vec<String>,
    pub straggle_secs: f64,
    pub rounds: Vec<RoundParticipation>,
}

impl Participation {
    /// The schema name the `participation` section carries.
    pub const SCHEMA: &str = "fedpeft-fleet-participation/1";

    /// The participation in `trial`'s run, from the aggregator's report of it.
    pub fn new(trial: &Trial, report: &Report) -> Participation {
        Participation {
            schema: Participation::SCHEMA.into(),
            dropout: trial.dropout,
            dropout_offline_secs: trial.dropout_offline_secs,
            stragglers: trial
                .stragglers
                .iter()
                .map(|&i| trial.client_id(i))
                .collect(),
            straggle_secs: trial.straggle_secs,
            rounds: from_report(report),
        }
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
pub fn from_report(report: &Report) -> Vec<RoundParticipation> {
    report
        .rounds
        .iter()
        .filter(|r| r.round > 0)
        .map(|r| {
            let mut dropped = Vec::new();
            let mut late = Vec::new();
            let mut other = 0;
            for (client, why) in &r.failed_clients {
                match why {
                    FailReason::Offline => dropped.push(client.clone()),
                    FailReason::NoReply => late.push(client.clone()),
                    FailReason::Rejected(_) => other += 1,
                }
            }
            RoundParticipation {
                round: r.round,
                status: r.status,
                sampled: r.sampled.len(),
                accepted: r.clients_ok,
                dropped: dropped.len(),
                late: late.len(),
                other_failed: other,
                late_updates_refused: r.rejected.get(&RejectReason::Late).copied().unwrap_or(0),
                dropped_clients: dropped,
                late_clients: late,
                duration_ms: r.duration_ms,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::report::fixtures::{report, round};

    #[test]
    fn failed_clients_are_split_into_dropped_late_and_other() {
        let mut r1 = round(1, &["a", "b", "c", "d"], 1);
        r1.failed_clients = [
            ("b", FailReason::Offline),
            ("c", FailReason::NoReply),
            ("d", FailReason::Rejected(RejectReason::WrongShape)),
        ]
        .map(|(c, why)| (c.to_string(), why))
        .into();
        r1.rejected = [(RejectReason::WrongShape, 1)].into();
        let mut r2 = round(2, &["a", "b"], 2);
        r2.rejected = [(RejectReason::Late, 1)].into();
        let rows = from_report(&report(vec![round(0, &[], 0), r1, r2]));
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
