//! The `[strategy]` table of the aggregator's config file: which aggregation strategy, with its
//! hyper-parameters. The arithmetic lives in the aggregator.

use serde::{Deserialize, Serialize};

/// Which strategy, with its hyper-parameters (validated config form).
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
