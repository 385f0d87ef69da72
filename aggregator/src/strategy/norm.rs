//! Norm bounding of client deltas, and the median its adaptive bound is a multiple of.

use fedpeft_peft::NamedTensor;

/// Scales `delta` so that its L2 norm is at most `max_norm` (norm bounding against outsized or
/// malicious updates). Returns the norm before scaling.
///
/// The result's norm (computed in f64 over the f32 values) is never above `max_norm`: the f32
/// scale is nudged down by an ulp at a time when rounding left it a hair above, since
/// client-level DP's sensitivity is exactly this bound.
pub fn bound_norm(delta: &mut [NamedTensor], max_norm: f64) -> f64 {
    let norm = crate::adapter::l2_norm(delta);
    if norm > max_norm && norm > 0.0 {
        let original: Vec<Vec<f32>> = delta.iter().map(|t| t.values.clone()).collect();
        let mut scale = (max_norm / norm) as f32;
        loop {
            for (t, o) in delta.iter_mut().zip(&original) {
                for (v, &x) in t.values.iter_mut().zip(o) {
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
    Some(super::median_sorted(&v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::testing::one;

    #[test]
    fn norm_bounding_scales_large_deltas_and_keeps_small_ones() {
        let mut d = one("w", vec![3.0, 4.0]);
        assert_eq!(bound_norm(&mut d, 1.0), 5.0);
        // [0.6f32, 0.8f32] has norm 1 + 1.7e-8 in f64: the scale goes an ulp lower so the result
        // is never above the bound (DP's sensitivity).
        assert_eq!(d[0].values, vec![0.599_999_96, 0.799_999_95]);
        assert!(crate::adapter::l2_norm(&d) <= 1.0);
        let mut small = one("w", vec![0.3, 0.4]);
        bound_norm(&mut small, 1.0);
        assert_eq!(small[0].values, vec![0.3, 0.4]);
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
            let ratio = f64::from(d[0].values[0]) / f64::from(data[0]);
            for (a, b) in d[0].values.iter().zip(&data) {
                assert!(
                    (f64::from(*a) - ratio * f64::from(*b)).abs()
                        <= 1e-6 * f64::from(b.abs()).max(1e-30) + 1e-12
                );
            }
        }
    }
}
