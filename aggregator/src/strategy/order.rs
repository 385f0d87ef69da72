//! Coordinate-wise order statistics of the round's deltas: the median and the trimmed mean.

use super::{Accumulator, AggregateStats, Strategy, StrategyError, apply_step};
use crate::adapter::Adapter;

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

/// Median of a sorted, non-empty slice (mean of the two middle values for an even length), in
/// f64: the coordinate-wise median of f32 deltas, and [`median_of`](super::median_of) of f64 lists.
pub fn median_sorted<T: Copy + Into<f64>>(v: &[T]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2].into()
    } else {
        (v[n / 2 - 1].into() + v[n / 2].into()) / 2.0
    }
}

/// Mean of a sorted, non-empty slice after dropping ⌊trim·n⌋ values at each end (never all).
pub fn trimmed_mean_sorted(v: &[f32], trim: f64) -> f64 {
    let n = v.len();
    let k = trim_count(n, trim);
    let kept = &v[k..n - k];
    kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::{global, run};

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
        assert_eq!(next.tensors[0].values, vec![2.0, 0.0]);
        // Even count: mean of the two middle values.
        let next = run(
            &mut OrderStatistic::median(),
            &g,
            &[(1, vec![1.0, 0.0]), (1, vec![4.0, 1.0])],
        );
        assert_eq!(next.tensors[0].values, vec![2.5, 0.5]);
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
        assert_eq!(run(&mut s, &g, &ups).tensors[0].values, vec![4.0]);
        assert_eq!(trimmed_mean_sorted(&[1.0, 2.0], 0.49), 1.5);
        assert_eq!(trimmed_mean_sorted(&[5.0], 0.4), 5.0);
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
}
