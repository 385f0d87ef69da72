//! The `[strategy]` table of the aggregator's config file: which aggregation strategy, with its
//! hyper-parameters.
//!
//! ```toml
//! [strategy]
//! kind = "fedyogi"      # fedavg | fedadam | fedyogi | median | trimmed-mean
//! server_lr = 0.1       # fedadam / fedyogi: server_lr (0.01), beta1 (0.9), beta2 (0.99), tau (1e-3)
//! ```
//!
//! The arithmetic lives in the aggregator (`fedpeft_aggregator::strategy`), which re-exports these
//! types under their old paths.

use serde::{Deserialize, Serialize};

/// Which strategy, with its hyper-parameters: the aggregator's `[strategy]` table, `kind` naming
/// the variant. The aggregator checks the ranges (`trim` in [0, 0.5), `server_lr` > 0, …) when it
/// validates its config, and builds the strategy from this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum StrategyKind {
    /// Weighted average of deltas by `num_examples` (McMahan et al. 2017).
    #[serde(rename = "fedavg")]
    FedAvg,
    /// Server Adam on the averaged delta.
    #[serde(rename = "fedadam")]
    FedAdam(ServerOptParams),
    /// Server Yogi on the averaged delta.
    #[serde(rename = "fedyogi")]
    FedYogi(ServerOptParams),
    /// Coordinate-wise median of the deltas (unweighted).
    Median,
    /// Coordinate-wise mean after dropping the `trim` fraction of lowest and of highest values.
    TrimmedMean {
        /// Fraction trimmed from each end, in [0, 0.5).
        trim: f64,
    },
}

/// Hyper-parameters of the server optimizers (FedAdam, FedYogi).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerOptParams {
    /// Server learning rate η. Default 0.01.
    #[serde(default = "default_server_lr")]
    pub server_lr: f64,
    /// First-moment decay β1. Default 0.9.
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    /// Second-moment decay β2. Default 0.99.
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// Adaptivity τ (added to √v; v starts at τ²). Default 1e-3.
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_server_lr() -> f64 {
    0.01
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

impl Default for ServerOptParams {
    fn default() -> Self {
        ServerOptParams {
            server_lr: default_server_lr(),
            beta1: default_beta1(),
            beta2: default_beta2(),
            tau: default_tau(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize, Serialize)]
    struct File {
        strategy: StrategyKind,
    }

    fn parse(text: &str) -> Result<StrategyKind, toml::de::Error> {
        toml::from_str::<File>(text).map(|f| f.strategy)
    }

    #[test]
    fn kinds_are_spelled_as_documented_and_unset_parameters_take_their_defaults() {
        assert_eq!(
            parse("[strategy]\nkind = \"fedavg\"\n").unwrap(),
            StrategyKind::FedAvg
        );
        assert_eq!(
            parse("[strategy]\nkind = \"median\"\n").unwrap(),
            StrategyKind::Median
        );
        assert_eq!(
            parse("[strategy]\nkind = \"trimmed-mean\"\ntrim = 0.2\n").unwrap(),
            StrategyKind::TrimmedMean { trim: 0.2 }
        );
        assert_eq!(
            parse("[strategy]\nkind = \"fedadam\"\n").unwrap(),
            StrategyKind::FedAdam(ServerOptParams::default())
        );
        assert_eq!(
            parse("[strategy]\nkind = \"fedyogi\"\nserver_lr = 0.1\n").unwrap(),
            StrategyKind::FedYogi(ServerOptParams {
                server_lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 1e-3,
            })
        );
    }

    #[test]
    fn unknown_kinds_and_keys_are_refused() {
        assert!(parse("[strategy]\nkind = \"krum\"\n").is_err());
        assert!(parse("[strategy]\nkind = \"fedadam\"\nlr = 0.1\n").is_err());
        assert!(parse("[strategy]\nkind = \"trimmed-mean\"\n").is_err());
    }

    #[test]
    fn a_written_table_reads_back_the_same() {
        for kind in [
            StrategyKind::FedAvg,
            StrategyKind::FedAdam(ServerOptParams::default()),
            StrategyKind::FedYogi(ServerOptParams {
                server_lr: 0.5,
                ..ServerOptParams::default()
            }),
            StrategyKind::Median,
            StrategyKind::TrimmedMean { trim: 0.1 },
        ] {
            let file = File { strategy: kind };
            let text = toml::to_string(&file).unwrap();
            assert_eq!(toml::from_str::<File>(&text).unwrap(), file, "{text}");
        }
    }
}
