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

// The `[strategy]` table (which strategy, with its hyper-parameters) is spelled in the config crate.
pub use fedpeft_config::strategy::{ServerOptParams, StrategyKind};

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
///
/// The result's norm (computed in f64 over the f32 values) is never above `max_norm`: the f32
/// scale is nudged down by an ulp at a time when rounding left it a hair above, since
/// client-level DP's sensitivity is exactly this bound.
pub fn bound_norm(delta: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = crate::adapter::l2_norm(delta);
    if norm > max_norm && norm > 0.0 {
        let original: Vec<Vec<f32>> = delta.iter().map(|t| t.data.clone()).collect();
        let mut scale = (max_norm / norm) as f32;
        loop {
            for (t, o) in delta.iter_mut().zip(&original) {
                for (v, &x) in t.data.iter_mut().zip(o) {
                    *v = x * scale;
                }
            }
            if crate::adapter::l2_norm(delta) <= max_norm || scale == 0.0 {
                break;
            }
            scale = f32::from_bits(scale.to_bits() - 1);
        }
    }
    norm
}

/// Median of a list (mean of the two middle values for an even length), `None` when empty:
/// the pre-bound norms (the adaptive bound's reference), the ε clients state.
pub fn median_of(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
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
/// sorted and `reduce` maps the sorted slice to one number. `kept(n)` is the range of sorted
/// positions the statistic uses; the others are counted, per delta, in `trimmed_count`.
fn coordinatewise(
    deltas: &[Vec<Vec<f32>>],
    reduce: impl Fn(&[f32]) -> f64,
    kept: impl Fn(usize) -> std::ops::Range<usize>,
    trimmed_count: &mut [u64],
) -> Vec<Vec<f64>> {
    let n = deltas.len();
    let keep = kept(n);
    let mut column: Vec<(f32, usize)> = Vec::with_capacity(n);
    let mut sorted: Vec<f32> = Vec::with_capacity(n);
    deltas[0]
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            (0..t.len())
                .map(|i| {
                    column.clear();
                    column.extend(deltas.iter().enumerate().map(|(k, d)| (d[ti][i], k)));
                    // Ties broken by fold index so the attribution is deterministic.
                    column.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                    for (pos, &(_, k)) in column.iter().enumerate() {
                        if !keep.contains(&pos) {
                            trimmed_count[k] += 1;
                        }
                    }
                    sorted.clear();
                    sorted.extend(column.iter().map(|c| c.0));
                    reduce(&sorted)
                })
                .collect()
        })
        .collect()
}

/// Values trimmed from each end by a trimmed mean over `n` values: ⌊trim·n⌋, never all.
pub fn trim_count(n: usize, trim: f64) -> usize {
    let mut k = (trim * n as f64).floor() as usize;
    if 2 * k >= n {
        k = n.saturating_sub(1) / 2;
    }
    k
}

/// The sorted positions a median of `n` values uses (one or the two middle ones).
fn median_positions(n: usize) -> std::ops::Range<usize> {
    if n % 2 == 1 {
        n / 2..n / 2 + 1
    } else {
        n / 2 - 1..n / 2 + 1
    }
}

/// Stats of an order-statistic aggregation from per-delta trimmed counts.
fn trim_stats(trimmed: &[u64], coords: usize, kept: usize) -> AggregateStats {
    AggregateStats {
        values_trimmed_per_coordinate: Some(trimmed.len() - kept),
        trimmed_share: trimmed
            .iter()
            .map(|&c| c as f64 / coords.max(1) as f64)
            .collect(),
        ..AggregateStats::default()
    }
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
    let k = trim_count(n, trim);
    let kept = &v[k..n - k];
    kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
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
    fn apply_mean(
        &mut self,
        round: u64,
        global: &Adapter,
        mean: &[Vec<f64>],
    ) -> Result<Adapter, StrategyError> {
        apply_step(round, global, mean)
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
    fn apply_mean(
        &mut self,
        round: u64,
        global: &Adapter,
        delta: &[Vec<f64>],
    ) -> Result<Adapter, StrategyError> {
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

/// Which order statistic [`OrderStatistic`] takes at each coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OrderRule {
    /// The median.
    Median,
    /// The trimmed mean (Yin et al. 2018): drop ⌊trim·n⌋ lowest and highest values.
    TrimmedMean { trim: f64 },
}

impl OrderRule {
    /// The sorted positions the statistic uses among `n` values.
    fn kept(self, n: usize) -> std::ops::Range<usize> {
        match self {
            OrderRule::Median => median_positions(n),
            OrderRule::TrimmedMean { trim } => {
                let k = trim_count(n, trim);
                k..n - k
            }
        }
    }

    /// The statistic of a sorted, non-empty slice.
    fn reduce(self, sorted: &[f32]) -> f64 {
        match self {
            OrderRule::Median => median_sorted(sorted),
            OrderRule::TrimmedMean { trim } => trimmed_mean_sorted(sorted, trim),
        }
    }
}

/// Coordinate-wise order statistic of the round's deltas, unweighted (robust, not
/// example-weighted): the median or the trimmed mean. Both need every delta of the round.
#[derive(Debug, Clone)]
pub struct OrderStatistic {
    pub rule: OrderRule,
    stats: AggregateStats,
}

impl OrderStatistic {
    pub fn median() -> OrderStatistic {
        OrderStatistic::new(OrderRule::Median)
    }
    pub fn trimmed_mean(trim: f64) -> OrderStatistic {
        OrderStatistic::new(OrderRule::TrimmedMean { trim })
    }
    fn new(rule: OrderRule) -> OrderStatistic {
        OrderStatistic {
            rule,
            stats: AggregateStats::default(),
        }
    }
}

impl Strategy for OrderStatistic {
    fn name(&self) -> &'static str {
        match self.rule {
            OrderRule::Median => "median",
            OrderRule::TrimmedMean { .. } => "trimmed-mean",
        }
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
                let n = deltas.len();
                let mut trimmed = vec![0u64; n];
                let rule = self.rule;
                let step =
                    coordinatewise(deltas, |v| rule.reduce(v), |n| rule.kept(n), &mut trimmed);
                let kept = rule.kept(n).len();
                self.stats = trim_stats(&trimmed, global.num_params(), kept);
                apply_step(round, global, &step)
            }
            Accumulator::Buffer { .. } => Err(StrategyError::NoUpdates { round }),
            Accumulator::Sum { .. } => Err(StrategyError::State {
                strategy: self.name(),
                reason: "needs buffered deltas, got a streaming sum".into(),
            }),
        }
    }
    fn last_stats(&self) -> AggregateStats {
        self.stats.clone()
    }
}

/// Client-level differential privacy at the aggregator (DP-FedAvg, McMahan et al., "Learning
/// Differentially Private Recurrent Language Models", ICLR 2018), validated config form.
///
/// Each round: every accepted delta is clipped to L2 norm `clip_norm` (S) by the round machine,
/// the clipped deltas are summed *unweighted* (every client weighs the same, whatever its
/// `num_examples`), the sum is divided by the fixed denominator `expected_clients` (W, not the
/// number that replied: a fixed denominator keeps the sensitivity of the average at S/W when a
/// client is added or removed), and Gaussian noise N(0, (σ·S/W)²) is added to every coordinate.
/// The noised average then goes through the inner strategy's step (FedAvg: added to the global;
/// FedAdam / FedYogi: server optimizer; post-processing, so no further privacy cost).
///
/// Accounting: each aggregated round is one application of the sampled Gaussian mechanism with
/// noise multiplier σ and sampling rate q = expected_clients / fleet_size, composed in Rényi DP
/// (`fedpeft_peft::accountant`, Mironov et al. 2019) and converted to ε at `delta`. The analysis
/// is for Poisson sampling of clients with rate q, as McMahan et al.; the aggregator samples a
/// fixed-size set uniformly (`sample_clients`), for which the Poisson figure is the usual
/// approximation. The guarantee is central DP at the user (client) level against anyone who sees
/// the published global adapters; the aggregator itself sees every raw update. Rounds that fail
/// (no quorum) publish nothing new and cost nothing.
///
/// Not supported: DP over coordinate-wise median or trimmed mean. The noise is calibrated to the
/// L2 sensitivity of a sum of clipped updates (S); one client can move an order statistic of every
/// coordinate at once, by up to S per coordinate, so its L2 sensitivity is up to S·√d for d
/// parameters, and noise σ·S would give no meaningful guarantee. The config refuses the
/// combination rather than report an ε that does not hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientDp {
    /// S: L2 bound every client delta is clipped to.
    pub clip_norm: f64,
    /// σ: noise standard deviation in units of S (before dividing by W).
    pub noise_multiplier: f64,
    /// W: the fixed denominator of the average (expected sampled clients per round).
    pub expected_clients: usize,
    /// N: clients in the fleet, for q = W / N.
    pub fleet_size: usize,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Seed of the noise. `None` (the default) draws it from the OS: noise an observer can
    /// predict protects nothing. A fixed seed is for tests only.
    pub noise_seed: Option<u64>,
}

impl ClientDp {
    /// q = expected_clients / fleet_size.
    pub fn sample_rate(&self) -> f64 {
        self.expected_clients as f64 / self.fleet_size as f64
    }

    /// Standard deviation of the noise on each coordinate of the average: σ·S / W.
    pub fn noise_std(&self) -> f64 {
        self.noise_multiplier * self.clip_norm / self.expected_clients as f64
    }

    /// ε at `delta` after `rounds` noised rounds (what the accountant reports), computed afresh.
    pub fn epsilon_after(&self, rounds: u64) -> f64 {
        let mut acc = fedpeft_peft::accountant::RdpAccountant::new();
        let _ = acc.compose(self.sample_rate(), self.noise_multiplier, rounds);
        acc.epsilon(self.delta).0
    }
}

/// DP-FedAvg: wraps an averaging strategy (FedAvg, FedAdam, FedYogi); see [`ClientDp`].
#[derive(Debug)]
pub struct DpFedAvg {
    inner: Box<dyn Strategy>,
    dp: ClientDp,
    accountant: fedpeft_peft::accountant::RdpAccountant,
    rounds: u64,
    stats: AggregateStats,
}

impl DpFedAvg {
    /// Wraps `inner`; refuses strategies that do not average.
    pub fn wrap(inner: Box<dyn Strategy>, dp: ClientDp) -> Result<DpFedAvg, StrategyError> {
        if !matches!(inner.name(), "fedavg" | "fedadam" | "fedyogi") {
            return Err(StrategyError::State {
                strategy: inner.name(),
                reason: "client-level DP needs an averaging strategy (fedavg, fedadam, fedyogi): \
                         the noise is calibrated to a sum of clipped updates, not to an order \
                         statistic"
                    .into(),
            });
        }
        Ok(DpFedAvg {
            inner,
            dp,
            accountant: fedpeft_peft::accountant::RdpAccountant::new(),
            rounds: 0,
            stats: AggregateStats::default(),
        })
    }

    /// ε at the configured δ over every noised round so far.
    pub fn epsilon(&self) -> f64 {
        self.accountant.epsilon(self.dp.delta).0
    }

    fn noise_rng(&self, round: u64) -> rand::rngs::StdRng {
        use rand::SeedableRng;
        match self.dp.noise_seed {
            Some(seed) => {
                rand::rngs::StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            }
            None => {
                let mut key = [0u8; 32];
                // getrandom fails only where the OS has no entropy source at all; noise from a
                // fixed key would be predictable, so that is fatal rather than silently weak.
                getrandom::fill(&mut key).expect("the OS random source is unavailable");
                rand::rngs::StdRng::from_seed(key)
            }
        }
    }
}

/// `sum / denom + N(0, std²)` per coordinate, the Gaussian mechanism on a clipped sum.
pub fn noised_mean(
    sum: &[Vec<f64>],
    denom: f64,
    std: f64,
    rng: &mut impl rand::Rng,
) -> Vec<Vec<f64>> {
    use rand_distr::Distribution;
    let normal = rand_distr::Normal::new(0.0, std.max(0.0)).expect("finite, non-negative std");
    sum.iter()
        .map(|t| t.iter().map(|&s| s / denom + normal.sample(rng)).collect())
        .collect()
}

impl Strategy for DpFedAvg {
    fn name(&self) -> &'static str {
        match self.inner.name() {
            "fedadam" => "dp-fedadam",
            "fedyogi" => "dp-fedyogi",
            _ => "dp-fedavg",
        }
    }
    fn configure_round(&self, round: u64, global: &Adapter, sampled: usize) -> Accumulator {
        let _ = (round, sampled);
        Accumulator::sum_for(global)
    }
    fn weighs_by_examples(&self) -> bool {
        false
    }
    fn aggregate(
        &mut self,
        round: u64,
        global: &Adapter,
        acc: &Accumulator,
    ) -> Result<Adapter, StrategyError> {
        let Accumulator::Sum {
            weighted,
            error,
            count,
            ..
        } = acc
        else {
            return Err(StrategyError::State {
                strategy: "dp-fedavg",
                reason: "needs a streaming sum, got buffered deltas".into(),
            });
        };
        if *count == 0 {
            return Err(StrategyError::NoUpdates { round });
        }
        // Every delta was folded with weight 1, so weighted + error is the exact sum of the
        // clipped deltas.
        let sum: Vec<Vec<f64>> = weighted
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.iter()
                    .enumerate()
                    .map(|(j, &s)| s + error.get(i).and_then(|e| e.get(j)).copied().unwrap_or(0.0))
                    .collect()
            })
            .collect();
        let mut rng = self.noise_rng(round);
        let std = self.dp.noise_std();
        let mean = noised_mean(&sum, self.dp.expected_clients as f64, std, &mut rng);
        let next = self.inner.apply_mean(round, global, &mean)?;
        self.accountant
            .compose(self.dp.sample_rate(), self.dp.noise_multiplier, 1)
            .map_err(|e| StrategyError::State {
                strategy: "dp-fedavg",
                reason: e.to_string(),
            })?;
        self.rounds += 1;
        self.stats = AggregateStats {
            dp_noise_std: Some(std),
            dp_epsilon: Some(self.epsilon()),
            dp_delta: Some(self.dp.delta),
            ..AggregateStats::default()
        };
        Ok(next)
    }
    fn state(&self) -> StrategyState {
        let mut s = self.inner.state();
        s.dp_rdp = self.accountant.rdp().to_vec();
        s.dp_rounds = self.rounds;
        s
    }
    fn restore(&mut self, state: StrategyState) -> Result<(), StrategyError> {
        let orders = fedpeft_peft::accountant::default_orders();
        if !state.dp_rdp.is_empty() {
            self.accountant = fedpeft_peft::accountant::RdpAccountant::restore(
                orders,
                state.dp_rdp.clone(),
                state.dp_rounds,
            )
            .map_err(|e| StrategyError::State {
                strategy: "dp-fedavg",
                reason: e.to_string(),
            })?;
        }
        self.rounds = state.dp_rounds;
        self.inner.restore(StrategyState {
            dp_rdp: Vec::new(),
            dp_rounds: 0,
            ..state
        })
    }
    fn last_stats(&self) -> AggregateStats {
        self.stats.clone()
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
            &mut OrderStatistic::median(),
            &g,
            &[
                (1, vec![1.0, -1.0]),
                (100, vec![2.0, 1000.0]),
                (1, vec![3.0, 0.0]),
            ],
        );
        assert_eq!(next.tensors[0].data, vec![2.0, 0.0]);
        // Even count: mean of the two middle values.
        let next = run(
            &mut OrderStatistic::median(),
            &g,
            &[(1, vec![1.0, 0.0]), (1, vec![4.0, 1.0])],
        );
        assert_eq!(next.tensors[0].data, vec![2.5, 0.5]);
    }

    #[test]
    fn trimmed_mean_drops_the_extremes_of_each_coordinate() {
        // trim 0.2 of 5 values = 1 from each end: mean of [2, 3, 4] = 3.
        let mut s = OrderStatistic::trimmed_mean(0.2);
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
        // [0.6f32, 0.8f32] has norm 1 + 1.7e-8 in f64: the scale goes an ulp lower so the result
        // is never above the bound (DP's sensitivity).
        assert_eq!(d[0].data, vec![0.599_999_96, 0.799_999_95]);
        assert!(crate::adapter::l2_norm(&d) <= 1.0);
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

    #[test]
    fn clipping_lands_on_the_bound_never_above_and_keeps_the_direction() {
        // Deterministic pseudo-random deltas of several sizes and scales.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for (len, scale, bound) in [(7, 3.0, 0.5), (1000, 0.01, 0.05), (25_610, 1e3, 1.0)] {
            let data: Vec<f32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * scale
                })
                .collect();
            let mut d = one("w", data.clone());
            let before = bound_norm(&mut d, bound);
            assert!(before > bound, "the test delta must exceed the bound");
            let after = crate::adapter::l2_norm(&d);
            assert!(after <= bound, "{after} > {bound}");
            assert!(after >= bound * (1.0 - 1e-6), "{after} far below {bound}");
            // Same direction: every value scaled by the same factor.
            let ratio = f64::from(d[0].data[0]) / f64::from(data[0]);
            for (a, b) in d[0].data.iter().zip(&data) {
                assert!(
                    (f64::from(*a) - ratio * f64::from(*b)).abs()
                        <= 1e-6 * f64::from(b.abs()).max(1e-30) + 1e-12
                );
            }
        }
    }

    #[test]
    fn trimmed_mean_reports_what_it_trimmed_and_whose_values() {
        // 5 clients, trim 0.2: 1 value per end per coordinate; client 4 is always the largest.
        let mut s = OrderStatistic::trimmed_mean(0.2);
        let g = global(vec![0.0, 0.0, 0.0, 0.0]);
        let ups: Vec<_> = (0..5)
            .map(|c| {
                let v = if c == 4 { 100.0 } else { c as f32 };
                (1, vec![v, v, v, -(c as f32)])
            })
            .collect();
        run(&mut s, &g, &ups);
        let st = s.last_stats();
        assert_eq!(st.values_trimmed_per_coordinate, Some(2));
        // Client 4 is at an extreme of every coordinate (100, then −4); client 0 too (0 is the
        // lowest of the first three, the highest of the last); clients 1-3 never are.
        assert_eq!(st.trimmed_share, vec![1.0, 0.0, 0.0, 0.0, 1.0]);
        let mut m = OrderStatistic::median();
        run(&mut m, &g, &ups);
        assert_eq!(m.last_stats().values_trimmed_per_coordinate, Some(4));
        assert_eq!(m.last_stats().trimmed_share, vec![1.0, 1.0, 0.0, 1.0, 1.0]);
    }

    fn dp(noise_multiplier: f64, expected_clients: usize, fleet_size: usize) -> ClientDp {
        ClientDp {
            clip_norm: 2.0,
            noise_multiplier,
            expected_clients,
            fleet_size,
            delta: 1e-6,
            noise_seed: Some(7),
        }
    }

    #[test]
    fn dp_noise_has_the_documented_scale_and_the_unweighted_mean() {
        // 40 000 coordinates, 4 clients folded with weight 1 (what the machine does under DP),
        // denominator W = 5: mean = sum / 5; noise std = σ·S/W = 1.5·2/5 = 0.6.
        let d = 40_000;
        let g = global(vec![0.0; d]);
        let mut s = build_with(&StrategyKind::FedAvg, Some(&dp(1.5, 5, 50))).unwrap();
        assert!(!s.weighs_by_examples());
        let mut acc = s.configure_round(1, &g, 4);
        for c in 0..4 {
            acc.fold(1, &one("w", vec![0.25 * c as f32; d]));
        }
        let next = s.aggregate(1, &g, &acc).unwrap();
        let expected_mean = 0.25 * (0.0 + 1.0 + 2.0 + 3.0) / 5.0;
        let v: Vec<f64> = next.tensors[0].data.iter().map(|&x| f64::from(x)).collect();
        let mean = v.iter().sum::<f64>() / d as f64;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (d - 1) as f64).sqrt();
        // Standard errors: 0.6/√d = 0.003 for the mean, 0.6/√(2d) = 0.0021 for the std: 5 σ.
        assert!(
            (mean - expected_mean).abs() < 0.015,
            "mean {mean} vs {expected_mean}"
        );
        assert!((std - 0.6).abs() < 0.011, "std {std} vs 0.6");
        assert_eq!(s.last_stats().dp_noise_std, Some(0.6));
        // A fixed seed is reproducible; the same round again gives the same noise.
        let mut s2 = build_with(&StrategyKind::FedAvg, Some(&dp(1.5, 5, 50))).unwrap();
        assert_eq!(s2.aggregate(1, &g, &acc).unwrap(), next);
    }

    #[test]
    fn dp_epsilon_grows_every_round_matches_dp_accounting_and_survives_a_restore() {
        // dp-accounting 0.6.0 (peft/tests/accountant.rs): q = 0.1, σ = 2, 200 compositions,
        // δ = 1e-6 → ε = 4.117567643450246. Here: 10 expected clients of a fleet of 100.
        let cfg = dp(2.0, 10, 100);
        let g = global(vec![0.0; 3]);
        let mut s = build_with(&StrategyKind::FedAvg, Some(&cfg)).unwrap();
        assert_eq!(s.name(), "dp-fedavg");
        let mut last = 0.0;
        let mut restored = None;
        for r in 1..=200u64 {
            let mut acc = s.configure_round(r, &g, 10);
            acc.fold(1, &one("w", vec![0.1, 0.2, 0.3]));
            s.aggregate(r, &g, &acc).unwrap();
            let eps = s.last_stats().dp_epsilon.unwrap();
            assert!(eps > last, "round {r}: ε {eps} did not grow from {last}");
            last = eps;
            if r == 100 {
                // A restart from the checkpointed state goes on from the same ε.
                let mut b = build_with(&StrategyKind::FedAvg, Some(&cfg)).unwrap();
                b.restore(s.state()).unwrap();
                restored = Some(b);
            }
        }
        assert!(
            (last - 4.117_567_643_450_246).abs() / 4.117_567_643_450_246 < 0.01,
            "{last}"
        );
        assert!((cfg.epsilon_after(200) - last).abs() < 1e-9);
        let mut b = restored.unwrap();
        for r in 101..=200u64 {
            let mut acc = b.configure_round(r, &g, 10);
            acc.fold(1, &one("w", vec![0.1, 0.2, 0.3]));
            b.aggregate(r, &g, &acc).unwrap();
        }
        assert!((b.last_stats().dp_epsilon.unwrap() - last).abs() < 1e-9);
        assert_eq!(b.state().dp_rounds, 200);
    }

    #[test]
    fn dp_refuses_to_wrap_an_order_statistic() {
        for kind in [
            StrategyKind::Median,
            StrategyKind::TrimmedMean { trim: 0.1 },
        ] {
            let err = build_with(&kind, Some(&dp(1.0, 5, 50))).unwrap_err();
            assert!(err.to_string().contains("averaging strategy"), "{err}");
        }
        let s = build_with(
            &StrategyKind::FedAdam(ServerOptParams::default()),
            Some(&dp(1.0, 5, 50)),
        );
        assert_eq!(s.unwrap().name(), "dp-fedadam");
    }
}
