//! Site aggregation: what a *site* aggregator sends its *root* once per round.
//!
//! A site runs the round for the devices on its own broker and forwards one [`SiteAggregate`]:
//! the exact weighted sum of the deltas it accepted, Σ nᵢ·Δᵢ per value, and the weight Σ nᵢ.
//! The root folds it into its own sum as if the site's devices had reported to it directly, so
//! its global is the one a flat federation over the same updates would compute.
//!
//! Each value of the sum is the unevaluated pair `sum + error` of two f64 (the aggregator's
//! running TwoSum accumulator): the f32 deltas times integer example counts add up without the
//! rounding a single f64 would lose, and the root adds the pairs in with the same TwoSum.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::ids::ClientId;
use crate::tensor::{MAX_ELEMENTS, MAX_NAME_LEN, TensorError};

/// One tensor of an exact weighted sum: per value, Σ nᵢ·Δᵢ = `sum[j] + error[j]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExactSum {
    /// The adapter tensor's name.
    pub name: String,
    /// The rounded running sums.
    pub sum: Vec<f64>,
    /// The rounding errors the running sums dropped (same length as `sum`).
    pub error: Vec<f64>,
}

/// A site's partial aggregate for one round, on the root fleet's `update/{site}` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteAggregate {
    /// The site, as the root knows it (its client id in the root's fleet).
    pub site: ClientId,
    /// The root's round.
    pub round: u32,
    /// The site's counter, increasing across rounds, like an update's.
    pub sequence: u32,
    /// Device updates folded into the sum.
    pub updates: u32,
    /// Σ nᵢ: the weight of the sum (the devices' example counts).
    pub weight: u64,
    /// Σ nᵢ·lossᵢ over the updates that stated finite metrics.
    pub train_loss_sum: f64,
    /// Σ nᵢ·accuracyᵢ over the same updates.
    pub train_accuracy_sum: f64,
    /// Σ nᵢ over the same updates.
    pub train_weight: f64,
    /// The weighted sums, in the global adapter's tensor order.
    pub tensors: Vec<ExactSum>,
}

impl SiteAggregate {
    /// Structure: names valid and unique, `sum` and `error` of one length, within the element
    /// limit.
    pub(crate) fn check(&self) -> Result<(), TensorError> {
        for (i, t) in self.tensors.iter().enumerate() {
            if t.name.is_empty() || t.name.len() > MAX_NAME_LEN {
                return Err(TensorError::BadName {
                    name: t.name.clone(),
                });
            }
            if t.sum.len() as u64 > MAX_ELEMENTS {
                return Err(TensorError::TooManyElements {
                    name: t.name.clone(),
                    elements: t.sum.len() as u64,
                });
            }
            if t.error.len() != t.sum.len() {
                return Err(TensorError::LengthMismatch {
                    name: t.name.clone(),
                    expected: t.sum.len() as u64,
                    found: t.error.len(),
                });
            }
            if self.tensors[..i].iter().any(|u| u.name == t.name) {
                return Err(TensorError::DuplicateName {
                    name: t.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The first value that is not finite, as (tensor, index), in `sum` or `error`.
    pub fn first_non_finite(&self) -> Option<(&str, usize)> {
        self.tensors.iter().find_map(|t| {
            t.sum
                .iter()
                .zip(&t.error)
                .position(|(s, e)| !s.is_finite() || !e.is_finite())
                .map(|j| (t.name.as_str(), j))
        })
    }
}
