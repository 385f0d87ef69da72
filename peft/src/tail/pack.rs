//! Padding left out: the real tokens of a padded `[B*S, D]` batch packed into `[N, D]`.
//!
//! Everything in a transformer block but attention works row by row, and a padded token
//! changes no real token's output: as a key its bias is the dtype's most negative value, so
//! its softmax weight is exactly 0, and mean pooling gives it weight 0. So the blocks run
//! their projections, MLP, LayerNorms and residuals on the `N` real rows only (at sequence
//! lengths 32–64 that is a quarter fewer FLOPs), and attention, which needs the `[B, S]`
//! layout, gets its queries, keys and values scattered into it (zeros in padded rows) and its
//! output gathered back. The gradients of the real rows are unchanged: a padded row's
//! gradient is exactly zero in the padded computation.

use ndarray::{Array2, ArrayView2, Zip};

use crate::real::Real;

/// Which rows of the padded layout hold real tokens.
#[derive(Debug, Clone)]
pub(super) struct Packing {
    /// Indices into the `B*S` padded rows, ascending.
    rows: Vec<usize>,
    /// `B*S`.
    padded: usize,
}

impl Packing {
    /// From the attention's key bias and the pooling weights (both `[B, S]`): a row is left
    /// out when it is masked as a key (a non-zero bias, at most `mask_bias()·2⁻²⁴`, whose
    /// softmax weight underflows to 0) and pooling gives it no weight. `None` when no row is.
    pub(super) fn from_masks<T: Real>(
        key_bias: ArrayView2<'_, T>,
        pool_mask: ArrayView2<'_, T>,
    ) -> Option<Self> {
        debug_assert_eq!(key_bias.dim(), pool_mask.dim());
        let rows: Vec<usize> = key_bias
            .iter()
            .zip(pool_mask.iter())
            .enumerate()
            .filter(|&(_, (&b, &m))| b == T::zero() || m != T::zero())
            .map(|(i, _)| i)
            .collect();
        (rows.len() < key_bias.len()).then(|| Packing {
            rows,
            padded: key_bias.len(),
        })
    }

    /// The real rows of a padded matrix: `[B*S, D]` → `[N, D]`.
    pub(super) fn gather<T: Real>(&self, full: ArrayView2<'_, T>) -> Array2<T> {
        debug_assert_eq!(full.nrows(), self.padded);
        let mut out = Array2::zeros((self.rows.len(), full.ncols()));
        Zip::from(out.rows_mut())
            .and(&self.rows)
            .for_each(|mut o, &r| o.assign(&full.row(r)));
        out
    }

    /// Real rows back into the padded layout, zeros in the padded rows: `[N, D]` → `[B*S, D]`.
    pub(super) fn scatter<T: Real>(&self, packed: ArrayView2<'_, T>) -> Array2<T> {
        debug_assert_eq!(packed.nrows(), self.rows.len());
        let mut out = Array2::zeros((self.padded, packed.ncols()));
        for (src, &r) in packed.rows().into_iter().zip(&self.rows) {
            out.row_mut(r).assign(&src);
        }
        out
    }
}
