//! The round's deltas as the strategy needs them: a streaming, exact weighted sum, or every delta
//! of the round for order statistics.

use serde::{Deserialize, Serialize};

use fedpeft_peft::NamedTensor;
use fedpeft_protocol::ExactSum;

use crate::adapter::Adapter;

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
            .map(|t| vec![0.0; t.values.len()])
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
    pub fn fold(&mut self, num_examples: u64, delta: &[NamedTensor]) -> bool {
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
                    for ((a, e), &d) in acc.iter_mut().zip(err.iter_mut()).zip(&t.values) {
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
                deltas.push(delta.iter().map(|t| t.values.clone()).collect());
                true
            }
        }
    }
}

impl Accumulator {
    /// Folds a site's exact partial sum in (Σ nᵢ·Δᵢ over its devices as `sum + error`, weight
    /// Σ nᵢ, `updates` of them): each pair is added with the same TwoSum as a device's delta,
    /// so the sum equals the one the devices' deltas would have made, folded here one by one.
    /// The caller has checked the layout ([`Accumulator::check_exact_layout`]). `false` for a
    /// buffer, which needs each delta (order statistics).
    pub fn fold_exact(&mut self, weight: u64, updates: usize, sums: &[ExactSum]) -> bool {
        let Accumulator::Sum {
            weighted,
            error,
            total_examples,
            count,
        } = self
        else {
            return false;
        };
        if error.len() != weighted.len() {
            *error = weighted.iter().map(|t| vec![0.0; t.len()]).collect();
        }
        for ((acc, err), t) in weighted.iter_mut().zip(error.iter_mut()).zip(sums) {
            for (((a, e), &s), &se) in acc.iter_mut().zip(err.iter_mut()).zip(&t.sum).zip(&t.error)
            {
                let (sum, rounding) = two_sum(*a, s);
                *a = sum;
                *e += rounding + se;
            }
        }
        *total_examples += weight;
        *count += updates;
        true
    }

    /// Whether `sums` has the layout of this sum (tensor count, order, names' lengths):
    /// `Err` names the first difference.
    pub fn check_exact_layout(&self, layout: &Adapter, sums: &[ExactSum]) -> Result<(), String> {
        if sums.len() != layout.tensors.len() {
            return Err(format!(
                "{} tensors, the global adapter has {}",
                sums.len(),
                layout.tensors.len()
            ));
        }
        for (t, g) in sums.iter().zip(&layout.tensors) {
            if t.name != g.name {
                return Err(format!("tensor `{}` where `{}` belongs", t.name, g.name));
            }
            if t.sum.len() != g.values.len() {
                return Err(format!(
                    "tensor `{}`: {} values, the global adapter's has {}",
                    t.name,
                    t.sum.len(),
                    g.values.len()
                ));
            }
        }
        Ok(())
    }

    /// The exact sum as a site forwards it, named by `layout`'s tensors; `None` for a buffer.
    pub fn exact_sums(&self, layout: &Adapter) -> Option<Vec<ExactSum>> {
        let Accumulator::Sum {
            weighted, error, ..
        } = self
        else {
            return None;
        };
        Some(
            layout
                .tensors
                .iter()
                .zip(weighted)
                .enumerate()
                .map(|(i, (g, sum))| ExactSum {
                    name: g.name.clone(),
                    sum: sum.clone(),
                    error: error
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| vec![0.0; sum.len()]),
                })
                .collect(),
        )
    }

    /// The weight folded in so far (Σ nᵢ), for a sum.
    pub fn total_weight(&self) -> u64 {
        match self {
            Accumulator::Sum { total_examples, .. } => *total_examples,
            Accumulator::Buffer { .. } => 0,
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

/// `(weighted + error) / denom` per value: the exact sum a streaming [`Accumulator::Sum`] holds,
/// divided once. A missing error term (a checkpoint from before it) counts as zero.
pub(super) fn exact_sum_over(
    weighted: &[Vec<f64>],
    error: &[Vec<f64>],
    denom: f64,
) -> Vec<Vec<f64>> {
    weighted
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let err = error.get(i).map_or(&[][..], Vec::as_slice);
            t.iter()
                .enumerate()
                .map(|(j, &s)| (s + err.get(j).copied().unwrap_or(0.0)) / denom)
                .collect()
        })
        .collect()
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
            Some(exact_sum_over(weighted, error, denom))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::one;

    #[test]
    fn buffer_accumulator_refuses_more_deltas_than_sampled_clients() {
        let mut acc = Accumulator::buffer(1);
        assert!(acc.fold(1, &one("w", vec![1.0])));
        assert!(!acc.fold(1, &one("w", vec![2.0])));
        assert_eq!(acc.count(), 1);
    }
}
