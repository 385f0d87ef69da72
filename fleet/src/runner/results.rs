//! After the run: the fleet's sections added to the aggregator's `report.json` (who took part,
//! the results row, the link measurements), printed, and the trial's plots drawn.

use std::path::Path;

use fedpeft_config::report::Report;

use crate::link_report::LinkReport;
use crate::report::TrialReport;
use crate::rounds::Participation;
use crate::summary::{self, Row};
use crate::trial::Trial;

/// The aggregator's `report.json` with the fleet's sections added and printed: who took part in
/// each round, the results row (`summary`, with its plots) and the link measurements from
/// `links` (given the aggregator's report, for the rounds' wall times; also to `links.csv`).
pub(super) fn record_results(
    trial: &Trial,
    out_dir: &Path,
    links: impl FnOnce(Option<&Report>) -> Option<LinkReport>,
) -> anyhow::Result<Option<LinkReport>> {
    let mut report = match TrialReport::read(out_dir) {
        Ok(report) => Some(report),
        Err(e) => {
            eprintln!("fleet: no participation table, summary or plots: {e:#}");
            None
        }
    };
    if let Some(report) = &mut report {
        let participation = Participation::new(trial, &report.aggregator);
        participation.print();
        report.participation = Some(participation);
        let row = summary::row(trial, &report.aggregator);
        print_and_plot(&row, out_dir);
        report.summary = Some(row);
    }
    let links = links(report.as_ref().map(|r| &r.aggregator));
    if let Some(links) = &links {
        links.write_csv(out_dir)?;
        links.print();
    }
    match (report, &links) {
        (Some(mut report), _) => {
            report.links = links.clone();
            report.write(out_dir)?;
        }
        (None, Some(links)) if !TrialReport::path(out_dir).exists() => {
            TrialReport::write_links_only(out_dir, links)?;
        }
        (None, _) => {}
    }
    Ok(links)
}

/// Prints how much less than full-model FedAvg the trial moved, and draws its plots.
fn print_and_plot(row: &Row, out_dir: &Path) {
    if let Some(x) = row.times_less_than_full_model {
        println!(
            "fleet: per participating client-round {:.0} B up + {:.0} B down: {x:.0}x less than \
             full-model FedAvg",
            row.up_bytes_per_client_round, row.down_bytes_per_client_round
        );
    }
    match crate::plot::plot_rows(std::slice::from_ref(row), out_dir) {
        Ok(files) => println!("fleet: {} plots in {}", files.len(), out_dir.display()),
        Err(e) => eprintln!("fleet: no plots: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real quickstart run's `report.json`, its `participation` and `summary` written when the
    /// fleet patched JSON values: recorded again from the aggregator's part alone, the typed
    /// sections are the same.
    #[test]
    fn recorded_results_are_what_the_fleet_has_always_added() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let trial = Trial::load(&root.join("../trials/quickstart.toml")).unwrap();
        let then: TrialReport =
            serde_json::from_str(include_str!("../../fixtures/trial-report-quickstart.json"))
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        TrialReport::new(then.aggregator.clone())
            .write(dir.path())
            .unwrap();
        let links = record_results(&trial, dir.path(), |_| None).unwrap();
        assert!(links.is_none());
        let now = TrialReport::read(dir.path()).unwrap();
        assert_eq!(now, then);
    }
}
