//! One trial's results row: what it trained and on which data, its accuracy by round, the bytes
//! it moved against full-model FedAvg, and per link preset a round time *computed* from those
//! bytes. The runner adds it to the trial's `report.json` as `summary`; a sweep's table is one
//! row per trial; the plots draw rows.

use fedpeft_config::report::Report;
use serde::{Deserialize, Serialize};

use crate::links::{PRESETS, preset};
use crate::trial::Trial;

/// Round time on one link preset, computed from a client's bytes per round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputedRoundTime {
    pub preset: String,
    /// Upload of the update + download of the global + both ways' latency, seconds.
    pub comm_secs: f64,
}

/// One trial's line of the results table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// A finished trial's row, from the aggregator's report of it.
pub fn row(trial: &Trial, report: &Report) -> Row {
    let mut acc = Vec::new();
    let mut cum = Vec::new();
    let mut total = 0u64;
    let mut client_rounds = 0u64;
    let mut sampled_client_rounds = 0u64;
    let mut ms = Vec::new();
    for r in &report.rounds {
        acc.push(r.eval_accuracy);
        total += r.traffic.up_bytes + r.traffic.down_bytes;
        cum.push(total);
        if r.round > 0 {
            client_rounds += r.clients_ok as u64;
            sampled_client_rounds += r.sampled.len() as u64;
            ms.push(r.duration_ms as f64);
        }
    }
    let up = report.totals.up_bytes;
    let down = report.totals.down_bytes;
    let full = report.totals.full_model_fedavg_bytes;
    let up_per = if client_rounds == 0 {
        0.0
    } else {
        up as f64 / client_rounds as f64
    };
    // Every joined client receives each round's global model, sampled or not: the download is
    // counted per client and round, the upload per accepted update.
    let done_rounds = ms.len() as u64;
    let down_per = if done_rounds == 0 {
        0.0
    } else {
        down as f64 / (done_rounds * trial.clients as u64) as f64
    };
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
        dp_epsilon_median: report.local_dp.as_ref().map(|d| d.median),
        dp_epsilon_max: report.local_dp.as_ref().map(|d| d.max),
        final_accuracy: acc.last().copied().flatten(),
        best_accuracy: acc.iter().flatten().copied().reduce(f64::max),
        trainable_params: report.trainable_params as u64,
        backbone_params: report.backbone_params,
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
        computed_round_comm: computed_round_comm(up_per, down_per),
        accuracy_by_round: acc,
        cumulative_bytes_by_round: cum,
    }
}

/// A client-round's communication time on every preset: `up` bytes up, `down` bytes down.
fn computed_round_comm(up: f64, down: f64) -> Vec<ComputedRoundTime> {
    PRESETS
        .iter()
        .filter_map(|&name| {
            let p = preset(name)?;
            Some(ComputedRoundTime {
                preset: name.to_string(),
                comm_secs: up / p.up_bytes_per_sec()
                    + down / p.down_bytes_per_sec()
                    + 2.0 * p.latency_ms / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fedpeft_config::report::LocalDp;

    use super::*;
    use crate::report::fixtures::{report, round};

    /// A trial of a sweep `s`: 16 clients, 2 sampled a round.
    const TRIAL: &str = r#"
        name = "s-a0.1-lora"
        rounds = 3
        clients = 16
        fraction = 0.125
        shared_cache = true
        [model]
        backbone = "models/build/efficientnet-lite0"
        peft = "lora"
        [data]
        dataset = "fashion-mnist"
        alpha = 0.1
    "#;

    #[test]
    fn a_row_counts_bytes_per_accepted_client_round_and_computes_link_times() {
        let trial = Trial::parse(TRIAL, Path::new("x")).unwrap();
        let mut rounds = vec![
            round(0, &[], 0),
            round(1, &["a", "b", "c"], 2),
            round(2, &["a", "b"], 2),
        ];
        for (r, (acc, ms)) in rounds.iter_mut().zip([(0.1, 0), (0.5, 1000), (0.4, 3000)]) {
            r.eval_accuracy = Some(acc);
            r.duration_ms = ms;
            if r.round > 0 {
                (r.traffic.up_bytes, r.traffic.down_bytes) = (2000, 3000);
            }
        }
        let mut report = report(rounds);
        report.trainable_params = 25610;
        report.backbone_params = 4652008;
        (report.totals.up_bytes, report.totals.down_bytes) = (4000, 6000);
        report.totals.full_model_fedavg_bytes = 10_000_000;
        report.local_dp = Some(LocalDp {
            clients: [("a", 3.5), ("b", 4.0), ("c", 9.25)]
                .map(|(c, e)| (c.to_string(), e))
                .into(),
            median: 4.0,
            max: 9.25,
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
        let md = crate::table::markdown(std::slice::from_ref(&r));
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
        let md = crate::table::markdown(&[dp]);
        assert!(
            md.contains("; DP-SGD clip 1 z 1, ε 4.000 / 9.250 (median / largest) |"),
            "{md}"
        );
        let text = crate::table::csv(&[r]);
        assert_eq!(text.lines().count(), 2);
        assert!(
            text.lines()
                .nth(1)
                .unwrap()
                .starts_with("s-a0.1-lora,lora,")
        );
    }
}
