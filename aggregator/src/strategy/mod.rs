//! Aggregation strategies (Flower's vocabulary: a strategy *configures* a round and *aggregates*
//! the replies).
//!
//! The arithmetic is pure and lives apart from the round orchestration:
//! - [`Accumulator`] collects a round's client deltas as they arrive. FedAvg-style strategies use
//!   a streaming weighted sum (O(parameters) memory, whatever the number of clients: each update
//!   is folded in and dropped). Coordinate-wise median and trimmed mean cannot stream: they keep
//!   the round's deltas, at most one per sampled client, so their memory is
//!   O(sampled clients × parameters).
//! - [`Strategy::aggregate`] turns the accumulated deltas into the next global adapter. FedAdam and
//!   FedYogi are server optimizers on the averaged delta (Reddi et al., "Adaptive Federated
//!   Optimization", ICLR 2021, Algorithm 2, without bias correction, as in the paper).
//!
//! Clients send `delta = local - global`; the new global is `global + step(deltas)`. The weighted
//! sum Σ nᵢ·Δᵢ is kept per value as an unevaluated pair of f64 (sum + running error, by Knuth's
//! TwoSum): each product `num_examples × f32` is exact in f64 and every addition's rounding error
//! is kept, so the pair holds the exact sum, and the global adapter is bit-for-bit the same
//! whatever order the updates arrived in (exact as long as the error term itself does not round:
//! terms within ~2^50 of each other in magnitude, which any real round is). FedAvg then rounds
//! twice, as documented in `docs/protocol.md`: `f32(global + f64(Σ nᵢΔᵢ) / Σ nᵢ)`.
//!
//! # Map
//! - `accumulator`: the round's deltas as they arrive ([`Accumulator`], the exact TwoSum sum,
//!   [`weighted_mean`]).
//! - `averaging`: [`FedAvg`], and FedAdam / FedYogi as [`ServerOpt`].
//! - `order`: coordinate-wise median and trimmed mean ([`OrderStatistic`]).
//! - `norm`: norm bounding ([`bound_norm`]) and [`median_of`], the adaptive bound's reference.
//! - `dp`: client-level DP ([`DpFedAvg`] wrapping an averaging strategy, [`ClientDp`]).
//!
//! [`StrategyKind`] and [`ServerOptParams`], the `[strategy]` table of the config file, are
//! spelled in the config crate (`fedpeft_config::strategy`) and re-exported here.

mod accumulator;
mod averaging;
mod dp;
mod norm;
mod order;
#[cfg(test)]
mod testing;

use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;

pub use accumulator::{Accumulator, two_sum, weighted_mean};
pub use averaging::{FedAvg, ServerOpt, ServerOptKind};
pub use dp::{ClientDp, DpFedAvg, noised_mean};
pub use fedpeft_config::strategy::{ServerOptParams, StrategyKind};
pub use norm::{bound_norm, median_of};
pub use order::{OrderRule, OrderStatistic, median_sorted, trim_count, trimmed_mean_sorted};

/// A strategy failed to produce a new global adapter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error("round {round}: no accepted updates to aggregate")]
    NoUpdates { round: u64 },
    #[error("round {round}: aggregation produced a non-finite value in tensor `{tensor}`")]
    NonFinite { round: u64, tensor: String },
    #[error("strategy `{strategy}`: saved state does not fit: {reason}")]
    State {
        strategy: &'static str,
        reason: String,
    },
}

/// State carried across rounds: server-optimizer moments (one vector per tensor) and, with
/// client-level DP, the accountant (RDP per order over every noised round), so a restarted
/// aggregator keeps counting ε where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StrategyState {
    pub m: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
    /// Client-level DP: accumulated RDP per order of [`fedpeft_peft::accountant::default_orders`].
    pub dp_rdp: Vec<f64>,
    /// Client-level DP: noised rounds composed into `dp_rdp`.
    pub dp_rounds: u64,
}

/// What the last [`Strategy::aggregate`] did besides averaging, for the round's report.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AggregateStats {
    /// Trimmed mean / median: client values discarded at every coordinate (the same number at
    /// each: 2·⌊trim·n⌋ for the trimmed mean; n − 1 (odd n) or n − 2 (even n) for the median).
    pub values_trimmed_per_coordinate: Option<usize>,
    /// Trimmed mean / median: for each update in fold order, the fraction of coordinates at
    /// which its value was among the discarded ones (a poisoned update that sits at an extreme
    /// everywhere shows ~1.0; an honest one about trimmed / n).
    pub trimmed_share: Vec<f64>,
    /// Client-level DP: standard deviation of the Gaussian noise added to each coordinate of the
    /// averaged delta (σ·S / expected clients).
    pub dp_noise_std: Option<f64>,
    /// Client-level DP: ε at `dp_delta` over every noised round so far, and that δ.
    pub dp_epsilon: Option<f64>,
    pub dp_delta: Option<f64>,
}

/// A federated aggregation strategy. The defaults are those of an averaging strategy without
/// state: fold the round's deltas into a weighted sum, and take [`Strategy::apply_mean`]'s step
/// from their mean. FedAvg needs nothing else; order statistics buffer and aggregate their own.
pub trait Strategy: std::fmt::Debug + Send {
    /// Short name for logs and reports (`fedavg`, `fedadam`, …).
    fn name(&self) -> &'static str;
    /// Prepares the accumulator for `server_round` with `sampled` clients (Flower's
    /// `configure_fit`, minus the instructions, which the round machine announces).
    fn configure_round(&self, server_round: u64, global: &Adapter, sampled: usize) -> Accumulator {
        let _ = (server_round, sampled);
        Accumulator::sum_for(global)
    }
    /// The next global adapter from the round's accumulated deltas (Flower's `aggregate_fit`).
    fn aggregate(
        &mut self,
        server_round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let mean = weighted_mean(acc).ok_or(StrategyError::NoUpdates {
            round: server_round,
        })?;
        self.apply_mean(server_round, global, &mean)
    }
    /// State carried across rounds (empty for stateless strategies), for checkpoints.
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }
    /// Restores state saved by [`Strategy::state`].
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        let _ = state;
        Ok(())
    }
    /// Whether the round machine folds each delta with weight `num_examples` (FedAvg-style) or
    /// 1 (client-level DP, whose sensitivity analysis needs every client to weigh the same).
    fn weighs_by_examples(&self) -> bool {
        true
    }
    /// The step from an already averaged delta (FedAvg, FedAdam, FedYogi; what the DP wrapper
    /// calls after adding noise). Order statistics do not average, so the default refuses.
    fn apply_mean(
        &mut self,
        round: u64,
        global: &Adapter,
        mean: &[Vec<f64>],
    ) -> Result<Adapter, StrategyError> {
        let _ = (round, global, mean);
        Err(StrategyError::State {
            strategy: self.name(),
            reason: "does not aggregate a mean".into(),
        })
    }
    /// What the last aggregation trimmed or noised (empty by default).
    fn last_stats(&self) -> AggregateStats {
        AggregateStats::default()
    }
}

/// Builds the strategy a config names.
pub fn build(kind: &StrategyKind) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::FedAvg => Box::new(FedAvg),
        StrategyKind::FedAdam(p) => Box::new(ServerOpt::new(ServerOptKind::Adam, p.clone())),
        StrategyKind::FedYogi(p) => Box::new(ServerOpt::new(ServerOptKind::Yogi, p.clone())),
        StrategyKind::Median => Box::new(OrderStatistic::median()),
        StrategyKind::TrimmedMean { trim } => Box::new(OrderStatistic::trimmed_mean(*trim)),
    }
}

/// Builds the strategy, wrapped in client-level DP when `dp` is set. DP wraps only the
/// averaging strategies (FedAvg, FedAdam, FedYogi); the config refuses the others (see
/// [`ClientDp`]), and so does this, naming the strategy.
pub fn build_with(
    kind: &StrategyKind,
    dp: Option<&ClientDp>,
) -> Result<Box<dyn Strategy>, StrategyError> {
    let inner = build(kind);
    match dp {
        None => Ok(inner),
        Some(dp) => DpFedAvg::wrap(inner, dp.clone()).map(|s| Box::new(s) as Box<dyn Strategy>),
    }
}

/// `global + step`, rounding to f32 once, and refusing a non-finite result.
fn apply_step(round: u64, global: &Adapter, step: &[Vec<f64>]) -> Result<Adapter, StrategyError> {
    let mut next = global.clone();
    for (t, s) in next.tensors.iter_mut().zip(step) {
        for (x, &d) in t.values.iter_mut().zip(s) {
            *x = (f64::from(*x) + d) as f32;
            if !x.is_finite() {
                return Err(StrategyError::NonFinite {
                    round,
                    tensor: t.name.clone(),
                });
            }
        }
    }
    Ok(next)
}
