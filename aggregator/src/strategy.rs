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

use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, Tensor};

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

/// The deltas of one round, as the strategy needs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Accumulator {
    /// Σ nᵢ·Δᵢ per value as `weighted + error` (f64 pair, exact) and Σ nᵢ: O(parameters)
    /// memory.
    Sum {
        weighted: Vec<Vec<f64>>,
        /// The rounding errors of the additions into `weighted`.
        #[serde(default)]
        error: Vec<Vec<f64>>,
        total_examples: u64,
        count: usize,
    },
    /// Every delta of the round (for order statistics): at most `capacity` (= sampled clients).
    Buffer {
        deltas: Vec<Vec<Vec<f32>>>,
        capacity: usize,
    },
}

impl Accumulator {
    /// An empty streaming sum for this layout.
    pub fn sum_for(layout: &Adapter) -> Accumulator {
        let zeros: Vec<Vec<f64>> = layout
            .tensors
            .iter()
            .map(|t| vec![0.0; t.data.len()])
            .collect();
        Accumulator::Sum {
            weighted: zeros.clone(),
            error: zeros,
            total_examples: 0,
            count: 0,
        }
    }

    /// An empty buffer for at most `capacity` deltas.
    pub fn buffer(capacity: usize) -> Accumulator {
        Accumulator::Buffer {
            deltas: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// Number of deltas folded in so far.
    pub fn count(&self) -> usize {
        match self {
            Accumulator::Sum { count, .. } => *count,
            Accumulator::Buffer { deltas, .. } => deltas.len(),
        }
    }

    /// Folds one client's delta in. The caller has checked its layout against the global adapter
    /// (see [`Adapter::check_layout`]). Returns `false` (and drops the delta) if a buffer is full,
    /// which the round machine prevents by accepting at most one update per sampled client.
    pub fn fold(&mut self, num_examples: u64, delta: &[Tensor]) -> bool {
        match self {
            Accumulator::Sum {
                weighted,
                error,
                total_examples,
                count,
            } => {
                if error.len() != weighted.len() {
                    // A checkpoint from before the error term: start it at zero.
                    *error = weighted.iter().map(|t| vec![0.0; t.len()]).collect();
                }
                let w = num_examples as f64;
                for ((acc, err), t) in weighted.iter_mut().zip(error.iter_mut()).zip(delta) {
                    for ((a, e), &d) in acc.iter_mut().zip(err.iter_mut()).zip(&t.data) {
                        let (sum, rounding) = two_sum(*a, w * f64::from(d));
                        *a = sum;
                        *e += rounding;
                    }
                }
                *total_examples += num_examples;
                *count += 1;
                true
            }
            Accumulator::Buffer { deltas, capacity } => {
                if deltas.len() >= *capacity {
                    return false;
                }
                deltas.push(delta.iter().map(|t| t.data.clone()).collect());
                true
            }
        }
    }
}

/// `a + b` rounded, and the rounding error: `sum + error == a + b` exactly (Knuth's TwoSum,
/// no branch, valid for any order of magnitude).
pub fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let sum = a + b;
    let b_part = sum - a;
    let a_part = sum - b_part;
    (sum, (a - a_part) + (b - b_part))
}

/// Scales `delta` so that its L2 norm is at most `max_norm` (norm bounding against outsized or
/// malicious updates). Returns the norm before scaling.
pub fn bound_norm(delta: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = crate::adapter::l2_norm(delta);
    if norm > max_norm && norm > 0.0 {
        let scale = (max_norm / norm) as f32;
        for t in delta.iter_mut() {
            for v in &mut t.data {
                *v *= scale;
            }
        }
    }
    norm
}

/// Weighted mean Σnᵢ·Δᵢ / Σnᵢ, per tensor, as f64.
pub fn weighted_mean(acc: &Accumulator) -> Option<Vec<Vec<f64>>> {
    match acc {
        Accumulator::Sum {
            weighted,
            error,
            total_examples,
            count,
        } => {
            if *count == 0 {
                return None;
            }
            // Every update may carry num_examples = 0 (a client with no data): fall back to an
            // unweighted mean rather than divide by zero.
            let denom = if *total_examples == 0 {
                *count as f64
            } else {
                *total_examples as f64
            };
            let no_error = Vec::new();
            Some(
                weighted
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let err = error.get(i).unwrap_or(&no_error);
                        t.iter()
                            .enumerate()
                            .map(|(j, &s)| (s + err.get(j).copied().unwrap_or(0.0)) / denom)
                            .collect()
                    })
                    .collect(),
            )
        }
        Accumulator::Buffer { deltas, .. } => {
            if deltas.is_empty() {
                return None;
            }
            let n = deltas.len() as f64;
            let mut mean: Vec<Vec<f64>> = deltas[0].iter().map(|t| vec![0.0; t.len()]).collect();
            for d in deltas {
                for (m, t) in mean.iter_mut().zip(d) {
                    for (a, &v) in m.iter_mut().zip(t) {
                        *a += f64::from(v) / n;
                    }
                }
            }
            Some(mean)
        }
    }
}

/// Coordinate-wise order statistic over buffered deltas: for each coordinate the values are
/// sorted and `reduce` maps the sorted slice to one number.
fn coordinatewise(deltas: &[Vec<Vec<f32>>], reduce: impl Fn(&[f32]) -> f64) -> Vec<Vec<f64>> {
    let mut column = Vec::with_capacity(deltas.len());
    deltas[0]
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            (0..t.len())
                .map(|i| {
                    column.clear();
                    column.extend(deltas.iter().map(|d| d[ti][i]));
                    column.sort_by(f32::total_cmp);
                    reduce(&column)
                })
                .collect()
        })
        .collect()
}

/// Median of a sorted, non-empty slice (mean of the two middle values for an even length).
pub fn median_sorted(v: &[f32]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        f64::from(v[n / 2])
    } else {
        (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2])) / 2.0
    }
}

/// Mean of a sorted, non-empty slice after dropping ⌊trim·n⌋ values at each end (never all).
pub fn trimmed_mean_sorted(v: &[f32], trim: f64) -> f64 {
    let n = v.len();
    let mut k = (trim * n as f64).floor() as usize;
    if 2 * k >= n {
        k = (n - 1) / 2;
    }
    let kept = &v[k..n - k];
    kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
}

/// Server-optimizer state: first and second moments, one vector per tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StrategyState {
    pub m: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
}

/// A federated aggregation strategy.
pub trait Strategy: std::fmt::Debug + Send {
    /// Short name for logs and reports (`fedavg`, `fedadam`, …).
    fn name(&self) -> &'static str;
    /// Prepares the accumulator for `server_round` with `sampled` clients (Flower's
    /// `configure_fit`, minus the instructions, which the round machine announces).
    fn configure_round(&self, server_round: u64, global: &Adapter, sampled: usize) -> Accumulator;
    /// The next global adapter from the round's accumulated deltas (Flower's `aggregate_fit`).
    fn aggregate(
        &mut self,
        server_round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError>;
    /// State carried across rounds (empty for stateless strategies), for checkpoints.
    fn state(&self) -> StrategyState;
    /// Restores state saved by [`Strategy::state`].
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError>;
}

/// Builds the strategy a config names.
pub fn build(kind: &StrategyKind) -> Box<dyn Strategy> {
    match kind {
        StrategyKind::FedAvg => Box::new(FedAvg),
        StrategyKind::FedAdam(p) => Box::new(ServerOpt::new(ServerOptKind::Adam, p.clone())),
        StrategyKind::FedYogi(p) => Box::new(ServerOpt::new(ServerOptKind::Yogi, p.clone())),
        StrategyKind::Median => Box::new(Median),
        StrategyKind::TrimmedMean { trim } => Box::new(TrimmedMean { trim: *trim }),
    }
}

/// `global + step`, rounding to f32 once, and refusing a non-finite result.
fn apply_step(round: u64, global: &Adapter, step: &[Vec<f64>]) -> Result<Adapter, StrategyError> {
    let mut next = global.clone();
    for (t, s) in next.tensors.iter_mut().zip(step) {
        for (x, &d) in t.data.iter_mut().zip(s) {
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

/// FedAvg: new global = global + Σnᵢ·Δᵢ / Σnᵢ.
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }
    fn configure_round(&self, _: u64, global: &Adapter, _: usize) -> Accumulator {
        Accumulator::sum_for(global)
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let mean = weighted_mean(acc).ok_or(StrategyError::NoUpdates { round })?;
        apply_step(round, global, &mean)
    }
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }
    fn restore(&mut self, _: StrategyState) -> Result<(), StrategyError> {
        Ok(())
    }
}

/// Which second-moment rule a server optimizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerOptKind {
    Adam,
    Yogi,
}

/// FedAdam / FedYogi: Δ = weighted mean delta; m ← β1·m + (1−β1)·Δ;
/// Adam: v ← β2·v + (1−β2)·Δ²; Yogi: v ← v − (1−β2)·Δ²·sign(v − Δ²);
/// x ← x + η·m / (√v + τ). m starts at 0 and v at τ² (Reddi et al. 2021, Algorithm 2).
#[derive(Debug, Clone)]
pub struct ServerOpt {
    kind: ServerOptKind,
    params: ServerOptParams,
    state: StrategyState,
}

impl ServerOpt {
    pub fn new(kind: ServerOptKind, params: ServerOptParams) -> ServerOpt {
        ServerOpt {
            kind,
            params,
            state: StrategyState::default(),
        }
    }
}

impl Strategy for ServerOpt {
    fn name(&self) -> &'static str {
        match self.kind {
            ServerOptKind::Adam => "fedadam",
            ServerOptKind::Yogi => "fedyogi",
        }
    }
    fn configure_round(&self, _: u64, global: &Adapter, _: usize) -> Accumulator {
        Accumulator::sum_for(global)
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let delta = weighted_mean(acc).ok_or(StrategyError::NoUpdates { round })?;
        let ServerOptParams {
            server_lr,
            beta1,
            beta2,
            tau,
        } = self.params;
        if self.state.m.is_empty() {
            self.state.m = delta.iter().map(|t| vec![0.0; t.len()]).collect();
            self.state.v = delta.iter().map(|t| vec![tau * tau; t.len()]).collect();
        }
        let mut step = Vec::with_capacity(delta.len());
        for ((d, m), v) in delta.iter().zip(&mut self.state.m).zip(&mut self.state.v) {
            let mut s = Vec::with_capacity(d.len());
            for ((&g, m), v) in d.iter().zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = beta1 * *m + (1.0 - beta1) * g;
                let g2 = g * g;
                *v = match self.kind {
                    ServerOptKind::Adam => beta2 * *v + (1.0 - beta2) * g2,
                    ServerOptKind::Yogi => *v - (1.0 - beta2) * g2 * (*v - g2).signum(),
                };
                s.push(server_lr * *m / (v.sqrt() + tau));
            }
            step.push(s);
        }
        apply_step(round, global, &step)
    }
    fn state(&self) -> StrategyState {
        self.state.clone()
    }
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        if state.m.len() != state.v.len() {
            return Err(StrategyError::State {
                strategy: self.name(),
                reason: format!(
                    "{} first-moment tensors but {} second-moment tensors",
                    state.m.len(),
                    state.v.len()
                ),
            });
        }
        self.state = state;
        Ok(())
    }
}

/// Coordinate-wise median of the round's deltas (unweighted: robust, not example-weighted).
#[derive(Debug, Clone, Copy, Default)]
pub struct Median;

impl Strategy for Median {
    fn name(&self) -> &'static str {
        "median"
    }
    fn configure_round(&self, _: u64, _: &Adapter, sampled: usize) -> Accumulator {
        Accumulator::buffer(sampled)
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        match acc {
            Accumulator::Buffer { deltas, .. } if !deltas.is_empty() => {
                apply_step(round, global, &coordinatewise(deltas, median_sorted))
            }
            Accumulator::Buffer { .. } => Err(StrategyError::NoUpdates { round }),
            Accumulator::Sum { .. } => Err(StrategyError::State {
                strategy: "median",
                reason: "needs buffered deltas, got a streaming sum".into(),
            }),
        }
    }
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }
    fn restore(&mut self, _: StrategyState) -> Result<(), StrategyError> {
        Ok(())
    }
}

/// Coordinate-wise trimmed mean (Yin et al. 2018): drop ⌊trim·n⌋ lowest and highest values.
#[derive(Debug, Clone, Copy)]
pub struct TrimmedMean {
    pub trim: f64,
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }
    fn configure_round(&self, _: u64, _: &Adapter, sampled: usize) -> Accumulator {
        Accumulator::buffer(sampled)
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let trim = self.trim;
        match acc {
            Accumulator::Buffer { deltas, .. } if !deltas.is_empty() => apply_step(
                round,
                global,
                &coordinatewise(deltas, |v| trimmed_mean_sorted(v, trim)),
            ),
            Accumulator::Buffer { .. } => Err(StrategyError::NoUpdates { round }),
            Accumulator::Sum { .. } => Err(StrategyError::State {
                strategy: "trimmed-mean",
                reason: "needs buffered deltas, got a streaming sum".into(),
            }),
        }
    }
    fn state(&self) -> StrategyState {
        StrategyState::default()
    }
    fn restore(&mut self, _: StrategyState) -> Result<(), StrategyError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, data: Vec<f32>) -> Vec<Tensor> {
        vec![Tensor::new(name, vec![data.len() as u32], data).unwrap()]
    }

    fn global(data: Vec<f32>) -> Adapter {
        Adapter::new(one("w", data))
    }

    fn run(s: &mut dyn Strategy, g: &Adapter, updates: &[(u64, Vec<f32>)]) -> Adapter {
        let mut acc = s.configure_round(1, g, updates.len());
        for (n, d) in updates {
            assert!(acc.fold(*n, &one("w", d.clone())));
        }
        s.aggregate(1, g, &acc).unwrap()
    }

    #[test]
    fn fedavg_weights_deltas_by_num_examples() {
        // (1·[1,2] + 3·[5,−2]) / 4 = [4, −1]; global [10, 10] → [14, 9].
        let g = global(vec![10.0, 10.0]);
        let next = run(
            &mut FedAvg,
            &g,
            &[(1, vec![1.0, 2.0]), (3, vec![5.0, -2.0])],
        );
        assert_eq!(next.tensors[0].data, vec![14.0, 9.0]);
    }

    #[test]
    fn fedavg_result_does_not_depend_on_arrival_order() {
        let g = global(vec![0.1, -0.3, 0.7]);
        let ups = vec![
            (17, vec![0.123_456_7, -1.1e-3, 3.3]),
            (5, vec![-0.777, 2.5e-4, 0.1]),
            (123, vec![1e-6, 0.333_333, -2.0]),
        ];
        let a = run(&mut FedAvg, &g, &ups);
        let mut rev = ups.clone();
        rev.reverse();
        let b = run(&mut FedAvg, &g, &rev);
        assert_eq!(a, b);
    }

    #[test]
    fn fedavg_is_bit_identical_in_every_arrival_order_where_plain_f64_sums_are_not() {
        // Values of very different magnitudes: a plain f64 running sum depends on the order.
        let g = global(vec![0.25, -1.0]);
        let ups = vec![
            (2, vec![1.0e8, 0.1]),
            (7, vec![1.0e-9, 0.3]),
            (2, vec![-1.0e8, 0.7]),
            (9, vec![3.3e-7, -0.2]),
        ];
        let plain = |order: &[usize]| {
            order
                .iter()
                .map(|&i| ups[i].0 as f64 * f64::from(ups[i].1[0]))
                .fold(0.0f64, |a, x| a + x)
        };
        assert_ne!(
            plain(&[0, 1, 2, 3]),
            plain(&[0, 2, 1, 3]),
            "the example must matter"
        );
        let first = run(&mut FedAvg, &g, &ups);
        let orders = [
            [0, 1, 2, 3],
            [0, 2, 1, 3],
            [3, 2, 1, 0],
            [1, 3, 0, 2],
            [2, 0, 3, 1],
        ];
        for order in orders {
            let shuffled: Vec<_> = order.iter().map(|&i| ups[i].clone()).collect();
            assert_eq!(run(&mut FedAvg, &g, &shuffled), first, "order {order:?}");
        }
        // And it is the exact mean (the ±2e8 cancel), rounded as documented.
        let exact = (7.0 * f64::from(1.0e-9f32) + 9.0 * f64::from(3.3e-7f32)) / 20.0;
        assert_eq!(first.tensors[0].data[0], (0.25 + exact) as f32);
    }

    #[test]
    fn fedavg_with_no_updates_is_an_error_naming_the_round() {
        let g = global(vec![1.0]);
        let acc = FedAvg.configure_round(7, &g, 3);
        let err = FedAvg.aggregate(7, &g, &acc).unwrap_err();
        assert_eq!(err, StrategyError::NoUpdates { round: 7 });
    }

    #[test]
    fn fedadam_first_step_matches_hand_computed_value() {
        // Δ = 0.5, m = 0.1·0.5 = 0.05, v = 0.99·τ² + 0.01·0.25 with τ = 1e-3
        // = 9.9e-7 + 2.5e-3 = 0.00250099; x = 1 + 0.01·0.05/(√v + τ)
        let p = ServerOptParams::default();
        let mut s = ServerOpt::new(ServerOptKind::Adam, p);
        let g = global(vec![1.0]);
        let next = run(&mut s, &g, &[(2, vec![0.5])]);
        let v: f64 = 0.99 * 1e-6 + 0.01 * 0.25;
        let expected = 1.0 + 0.01 * 0.05 / (v.sqrt() + 1e-3);
        assert_eq!(next.tensors[0].data[0], expected as f32);
        assert!((expected - 1.009_804).abs() < 1e-5, "{expected}");
        // Second step with the same delta: m = 0.9·0.05 + 0.05 = 0.095.
        let v2 = 0.99 * v + 0.01 * 0.25;
        let expected2 = f64::from(next.tensors[0].data[0]) + 0.01 * 0.095 / (v2.sqrt() + 1e-3);
        let next2 = run(&mut s, &next, &[(2, vec![0.5])]);
        assert_eq!(next2.tensors[0].data[0], expected2 as f32);
    }

    #[test]
    fn fedyogi_moves_v_towards_delta_squared_additively() {
        // v0 = τ² = 1e-6 < Δ² = 0.25, so sign(v − Δ²) = −1 and v = 1e-6 + 0.01·0.25.
        let mut s = ServerOpt::new(ServerOptKind::Yogi, ServerOptParams::default());
        let g = global(vec![0.0]);
        let next = run(&mut s, &g, &[(1, vec![-0.5])]);
        let v: f64 = 1e-6 + 0.01 * 0.25;
        let expected = 0.01 * (-0.05) / (v.sqrt() + 1e-3);
        assert_eq!(next.tensors[0].data[0], expected as f32);
        let st = s.state();
        assert!((st.v[0][0] - v).abs() < 1e-15);
        assert!((st.m[0][0] + 0.05).abs() < 1e-15);
    }

    #[test]
    fn server_optimizer_state_survives_a_restore() {
        let g = global(vec![0.0, 1.0]);
        let mut a = ServerOpt::new(ServerOptKind::Adam, ServerOptParams::default());
        let g1 = run(&mut a, &g, &[(1, vec![0.2, -0.4])]);
        let mut b = ServerOpt::new(ServerOptKind::Adam, ServerOptParams::default());
        b.restore(a.state()).unwrap();
        assert_eq!(
            run(&mut a, &g1, &[(1, vec![0.1, 0.1])]),
            run(&mut b, &g1, &[(1, vec![0.1, 0.1])])
        );
    }

    #[test]
    fn median_ignores_one_outlier_per_coordinate() {
        let g = global(vec![0.0, 0.0]);
        let next = run(
            &mut Median,
            &g,
            &[
                (1, vec![1.0, -1.0]),
                (100, vec![2.0, 1000.0]),
                (1, vec![3.0, 0.0]),
            ],
        );
        assert_eq!(next.tensors[0].data, vec![2.0, 0.0]);
        // Even count: mean of the two middle values.
        let next = run(&mut Median, &g, &[(1, vec![1.0, 0.0]), (1, vec![4.0, 1.0])]);
        assert_eq!(next.tensors[0].data, vec![2.5, 0.5]);
    }

    #[test]
    fn trimmed_mean_drops_the_extremes_of_each_coordinate() {
        // trim 0.2 of 5 values = 1 from each end: mean of [2, 3, 4] = 3.
        let mut s = TrimmedMean { trim: 0.2 };
        let g = global(vec![1.0]);
        let ups: Vec<_> = [-100.0, 2.0, 3.0, 4.0, 100.0]
            .iter()
            .map(|&v| (1, vec![v]))
            .collect();
        assert_eq!(run(&mut s, &g, &ups).tensors[0].data, vec![4.0]);
        assert_eq!(trimmed_mean_sorted(&[1.0, 2.0], 0.49), 1.5);
        assert_eq!(trimmed_mean_sorted(&[5.0], 0.4), 5.0);
    }

    #[test]
    fn buffer_accumulator_refuses_more_deltas_than_sampled_clients() {
        let mut acc = Accumulator::buffer(1);
        assert!(acc.fold(1, &one("w", vec![1.0])));
        assert!(!acc.fold(1, &one("w", vec![2.0])));
        assert_eq!(acc.count(), 1);
    }

    #[test]
    fn norm_bounding_scales_large_deltas_and_keeps_small_ones() {
        let mut d = one("w", vec![3.0, 4.0]);
        assert_eq!(bound_norm(&mut d, 1.0), 5.0);
        assert_eq!(d[0].data, vec![0.6, 0.8]);
        let mut small = one("w", vec![0.3, 0.4]);
        bound_norm(&mut small, 1.0);
        assert_eq!(small[0].data, vec![0.3, 0.4]);
    }

    #[test]
    fn non_finite_aggregate_is_refused() {
        let g = global(vec![f32::MAX]);
        let mut acc = FedAvg.configure_round(1, &g, 1);
        acc.fold(1, &one("w", vec![f32::MAX]));
        assert!(matches!(
            FedAvg.aggregate(1, &g, &acc),
            Err(StrategyError::NonFinite { .. })
        ));
    }
}
