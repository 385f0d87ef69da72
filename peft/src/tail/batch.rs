//! [`Batch`]: the trunk activations a tail reads, for every family.

use ndarray::{Array2, ArrayD, Axis, s};

use crate::real::Real;

/// A batch of trunk activations.
#[derive(Debug, Clone)]
pub struct Batch<T = f32> {
    /// `[B, C, H, W]` (conv head) or `[B, S, D]` (transformer, vit: CLS token first).
    pub features: ArrayD<T>,
    /// `[B, S]` attention mask, 1 for real tokens and 0 for padding (transformer only;
    /// `None` means every token is real, and a vit tail takes none).
    pub mask: Option<Array2<T>>,
    /// The part of the forward pass no trained tensor affects, for these samples, as
    /// [`PeftTail::frozen_prefix`](super::PeftTail::frozen_prefix) computed it; `None`: the
    /// forward pass computes it.
    pub frozen: Option<ArrayD<T>>,
}

impl<T: Real> Batch<T> {
    /// A batch of trunk activations (and, for a transformer, their attention mask).
    pub fn new(features: ArrayD<T>, mask: Option<Array2<T>>) -> Self {
        Self {
            features,
            mask,
            frozen: None,
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.features.shape().first().copied().unwrap_or(0)
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sub-batch of one sample (used for per-sample gradients).
    pub fn sample(&self, i: usize) -> Batch<T> {
        Batch {
            features: self
                .features
                .slice_axis(Axis(0), (i..i + 1).into())
                .to_owned(),
            mask: self
                .mask
                .as_ref()
                .map(|m| m.slice(s![i..i + 1, ..]).to_owned()),
            frozen: self
                .frozen
                .as_ref()
                .map(|f| f.slice_axis(Axis(0), (i..i + 1).into()).to_owned()),
        }
    }
}
