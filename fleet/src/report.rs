//! A trial's `report.json`: the aggregator's [`Report`] (the schema `fedpeft_config` defines),
//! and the sections the runner adds once the run is over: `participation` (who took part in
//! each round, [`crate::rounds`]), `summary` (the trial's results row, [`crate::summary`]) and,
//! when links were emulated, `links` ([`crate::link_report`]). One type, read and written whole.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fedpeft_config::report::Report;
use serde::{Deserialize, Serialize};

use crate::link_report::LinkReport;
use crate::rounds::Participation;
use crate::summary::Row;

/// `report.json` of a trial: the aggregator's report, its keys at the top level beside the
/// fleet's sections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialReport {
    #[serde(flatten)]
    pub aggregator: Report,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participation: Option<Participation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Row>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub links: Option<LinkReport>,
}

/// What `report.json` holds when the aggregator wrote none (it failed early) but links were
/// measured: their section alone, so the measurements are kept.
#[derive(Serialize)]
struct LinksOnly<'a> {
    links: &'a LinkReport,
}

impl TrialReport {
    /// `<out_dir>/report.json`.
    pub fn path(out_dir: &Path) -> PathBuf {
        out_dir.join("report.json")
    }

    /// The aggregator's report for `aggregator`, without the fleet's sections yet.
    pub fn new(aggregator: Report) -> TrialReport {
        TrialReport {
            aggregator,
            participation: None,
            summary: None,
            links: None,
        }
    }

    /// Reads `<out_dir>/report.json` (the aggregator's, with any sections the fleet added).
    pub fn read(out_dir: &Path) -> anyhow::Result<TrialReport> {
        let path = TrialReport::path(out_dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a fedpeft report", path.display()))
    }

    /// Writes `<out_dir>/report.json`.
    pub fn write(&self, out_dir: &Path) -> anyhow::Result<()> {
        write_json(out_dir, self)
    }

    /// Writes a `report.json` of the `links` section alone, for a run whose aggregator wrote
    /// no report.
    pub fn write_links_only(out_dir: &Path, links: &LinkReport) -> anyhow::Result<()> {
        write_json(out_dir, &LinksOnly { links })
    }
}

fn write_json(out_dir: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let path = TrialReport::path(out_dir);
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Aggregator reports for tests, every figure zero or empty unless a test sets it.
#[cfg(test)]
pub(crate) mod fixtures {
    use fedpeft_config::report::{
        Report, RobustRecord, RobustTotals, RoundRecord, RoundStatus, SCHEMA, Totals, Traffic,
    };

    /// A report of `rounds`.
    pub fn report(rounds: Vec<RoundRecord>) -> Report {
        Report {
            schema: SCHEMA.into(),
            run_id: 1,
            fleet: "t".into(),
            strategy: "fedavg".into(),
            peft: "lora".into(),
            rounds_planned: rounds.len().saturating_sub(1) as u32,
            trainable_params: 0,
            backbone_params: 0,
            finished: true,
            totals: Totals {
                up_bytes: 0,
                down_bytes: 0,
                up_messages: 0,
                down_messages: 0,
                aggregator_published_bytes: 0,
                full_model_fedavg_bytes: 0,
                ratio_to_full_model: None,
            },
            rejected: Default::default(),
            clients: Default::default(),
            rounds,
            robust: RobustTotals {
                clipped_total: 0,
                dp_epsilon: None,
                dp_delta: None,
            },
            local_dp: None,
            globals: None,
            round_timing: Vec::new(),
        }
    }

    /// Round `n` (0: the initial adapter) that sampled `sampled` and accepted `ok` updates.
    pub fn round(n: u32, sampled: &[&str], ok: usize) -> RoundRecord {
        RoundRecord {
            round: n,
            status: if n == 0 {
                RoundStatus::Initial
            } else {
                RoundStatus::Ok
            },
            sampled: sampled.iter().map(|s| s.to_string()).collect(),
            clients_ok: ok,
            clients_failed: sampled.len().saturating_sub(ok),
            failed_clients: Default::default(),
            rejected: Default::default(),
            train_loss: None,
            train_accuracy: None,
            eval_loss: None,
            eval_accuracy: None,
            traffic: Traffic::default(),
            full_model_fedavg_bytes: 0,
            started_unix_ms: 0,
            duration_ms: 0,
            robust: RobustRecord::default(),
            local_dp_epsilon: Default::default(),
            secure: None,
            staleness: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use fedpeft_config::report::{FailReason, LocalDp};

    use super::fixtures::{report, round};
    use super::*;
    use crate::rounds::from_report;

    /// The fleet's sections sit beside the aggregator's keys, and the file reads back as it was
    /// written; a report without them (the aggregator's alone) reads too.
    #[test]
    fn a_trial_report_keeps_the_aggregators_keys_beside_the_fleets_sections() {
        let dir = tempfile::tempdir().unwrap();
        let mut r1 = round(1, &["client-00", "client-01"], 1);
        r1.failed_clients = [("client-01".to_string(), FailReason::Offline)].into();
        r1.eval_accuracy = Some(0.5);
        let mut aggregator = report(vec![round(0, &[], 0), r1]);
        aggregator.local_dp = Some(LocalDp {
            clients: [("client-00".to_string(), 3.5)].into(),
            median: 3.5,
            max: 3.5,
        });
        std::fs::write(
            TrialReport::path(dir.path()),
            serde_json::to_vec(&aggregator).unwrap(),
        )
        .unwrap();
        let mut read = TrialReport::read(dir.path()).unwrap();
        assert_eq!(read, TrialReport::new(aggregator.clone()));

        read.participation = Some(Participation {
            schema: Participation::SCHEMA.into(),
            dropout: 0.5,
            dropout_offline_secs: 2.0,
            stragglers: Vec::new(),
            straggle_secs: 0.0,
            rounds: from_report(&aggregator),
        });
        read.write(dir.path()).unwrap();
        let text = std::fs::read_to_string(TrialReport::path(dir.path())).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["rounds"][1]["failed_clients"]["client-01"], "offline");
        assert_eq!(json["local_dp"]["median"], 3.5);
        assert_eq!(json["participation"]["rounds"][0]["dropped"], 1);
        assert_eq!(json["participation"]["rounds"][0]["status"], "ok");
        assert!(json.get("summary").is_none() && json.get("links").is_none());
        assert_eq!(TrialReport::read(dir.path()).unwrap(), read);
    }

    /// The `report.json` of a real quickstart run (the aggregator's keys, `participation` and
    /// `summary`, as the fleet wrote them when it patched JSON values) reads as a trial report
    /// and writes back the same keys and values.
    #[test]
    fn a_real_trial_report_reads_and_writes_back_unchanged() {
        let text = include_str!("../fixtures/trial-report-quickstart.json");
        let report: TrialReport = serde_json::from_str(text).unwrap();
        assert!(report.participation.is_some() && report.summary.is_some());
        let then: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_value(&report).unwrap(), then);
    }

    #[test]
    fn a_missing_or_foreign_report_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", TrialReport::read(dir.path()).unwrap_err());
        assert!(e.contains("report.json"), "{e}");
        std::fs::write(TrialReport::path(dir.path()), r#"{"rounds": []}"#).unwrap();
        let e = format!("{:#}", TrialReport::read(dir.path()).unwrap_err());
        assert!(e.contains("report.json") && e.contains("schema"), "{e}");
    }
}
