//! GELU (erf form), the transformer tails' MLP activation, and its derivative: the exact
//! scalar functions ([`gelu`], [`gelu_grad`]; re-exported from [`crate::layers`]), the matrix
//! forward and backward the blocks call ([`gelu_forward`], [`gelu_backward`]; through
//! [`Real::gelu_slice`], split over threads), and below them the vectorised `f32` kernels
//! ([`gelu_slice`], [`gelu_grad_mul`]), one pass over memory each.
//!
//! musl's `erff` (what [`Real::erf_`] calls) is exact to 1 ulp but
//! branchy and scalar; it was 14–16 % of a MiniLM training step. Here `erf` is an
//! approximation, Abramowitz and Stegun 7.1.26 (what PyTorch's own vectorised CPU `erf`
//! computes, so PyTorch's GELU carries the same approximation), and the `exp` both it and the
//! derivative need is a Cephes-style range reduction with a degree-6 polynomial. Both are
//! branch-free, so the loops vectorise; [`pulp`] compiles them for AVX-512 or AVX2 and
//! picks one at run time (NEON on aarch64, plain code elsewhere). Plain multiplies and adds,
//! no fused multiply-add, so every instruction set gives bit-identical results.
//!
//! Error against the exact functions (evaluated in `f64`), measured by the test below over
//! every 1/4096 step of `[-12, 12]`: [`ERF_MAX_ERROR`] (4.8e-7 measured), [`GELU_MAX_ERROR`]
//! (4.6e-7) and [`GELU_GRAD_MAX_ERROR`] (3.3e-7), absolute; beyond `|x| = 12` GELU is `x` or
//! `0` exactly. For comparison, musl's `erff` errs by up to 4.4e-8; Abramowitz and Stegun bound 7.1.26 itself (in
//! exact arithmetic) by 1.5e-7. The `f64` path (gradient checks) keeps `libm`.

use std::f32::consts::{FRAC_1_SQRT_2, LN_2, LOG2_E};

use ndarray::{Array2, ArrayView2};

use crate::layers::threads;
use crate::real::Real;

/// GELU, erf form (as BERT): `0.5·x·(1 + erf(x/√2))`.
pub fn gelu<T: Real>(x: T) -> T {
    T::lit(0.5) * x * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf_())
}

/// Derivative of [`gelu`]: `Φ(x) + x·φ(x)`.
pub fn gelu_grad<T: Real>(x: T) -> T {
    let cdf = T::lit(0.5) * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf_());
    let pdf = (T::lit(-0.5) * x * x).exp() * T::lit(0.398_942_280_401_432_7);
    cdf + x * pdf
}

/// GELU forward over a matrix (the input is the cache): [`Real::gelu_slice`], split over
/// [`threads`] threads for large matrices.
pub fn gelu_forward<T: Real>(u: ArrayView2<'_, T>) -> Array2<T> {
    let u = u.as_standard_layout();
    let mut out = Array2::zeros(u.raw_dim());
    par_slices(
        out.as_slice_mut().expect("standard layout"),
        u.as_slice().expect("standard layout"),
        T::gelu_slice,
    );
    out
}

/// GELU backward given the pre-activation: `dy ⊙ GELU'(u)`, in place in `dy`.
pub fn gelu_backward<T: Real>(u: ArrayView2<'_, T>, dy: Array2<T>) -> Array2<T> {
    let u = u.as_standard_layout();
    let mut dy = if dy.is_standard_layout() {
        dy
    } else {
        dy.as_standard_layout().into_owned()
    };
    par_slices(
        dy.as_slice_mut().expect("standard layout"),
        u.as_slice().expect("standard layout"),
        |u, d| T::gelu_grad_mul(u, d),
    );
    dy
}

/// `f(inp_chunk, out_chunk)` over matching chunks of two equally long slices, split over
/// [`threads`] threads when there is enough work.
fn par_slices<T: Real, F: Fn(&[T], &mut [T]) + Sync + Copy + Send>(out: &mut [T], inp: &[T], f: F) {
    debug_assert_eq!(out.len(), inp.len());
    let t = threads();
    if out.len() < 1 << 16 || t < 2 {
        f(inp, out);
        return;
    }
    let chunk = out.len().div_ceil(t);
    std::thread::scope(|sc| {
        let mut pieces = out.chunks_mut(chunk).zip(inp.chunks(chunk)).peekable();
        while let Some((o, i)) = pieces.next() {
            if pieces.peek().is_none() {
                f(i, o);
            } else {
                sc.spawn(move || f(i, o));
            }
        }
    });
}

/// Max absolute error of [`erf`] (measured; see the module docs).
pub const ERF_MAX_ERROR: f64 = 5e-7;
/// Max absolute error of [`gelu_slice`]'s values for `|x| ≤ 12` (measured).
pub const GELU_MAX_ERROR: f64 = 5e-7;
/// Max absolute error of [`gelu_grad_mul`]'s factor `GELU'(x)` (measured).
pub const GELU_GRAD_MAX_ERROR: f64 = 4e-7;

/// `erf(x)`, branch-free: Abramowitz and Stegun 7.1.26,
/// `1 − t·(a₁ + t·(a₂ + t·(a₃ + t·(a₄ + t·a₅))))·exp(−x²)` with `t = 1/(1 + p·|x|)`, the form
/// PyTorch's vectorised CPU `erf` evaluates (see the module docs for the error).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4_f32;
    p = p * t + -1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t + -0.284_496_74;
    p = p * t + 0.254_829_6;
    let r = 1.0 - p * t * exp_nonpositive(-a * a);
    r.copysign(x)
}

/// `exp(x)` for `x ≤ 0`, branch-free: `2ⁿ·exp(r)`, `|r| ≤ ln2/2`; below `-87` it returns
/// `exp(-87)` (~1.6e-38) rather than a subnormal or zero.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer (round-to-nearest), in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = LN_2 - LN2_HI;
    let x = x.max(-87.0);
    let shifted = x * LOG2_E + SHIFT;
    let n = shifted - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n ∈ [-126, 0] sits in `shifted`'s low mantissa bits (read as integers: no float-to-int
    // conversion, which would not vectorise); 2ⁿ is a normal float built from its exponent.
    let n_int = shifted.to_bits().wrapping_sub(SHIFT.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    e * scale
}

/// `Φ(x) = ½(1 + erf(x/√2))`.
#[inline(always)]
fn cdf(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `out[i] = GELU(x[i]) = x[i]·Φ(x[i])`.
///
/// # Panics
/// If the slices' lengths differ.
pub fn gelu_slice(x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "gelu_slice: lengths differ");
    pulp::Arch::new().dispatch(Forward { x, out });
}

/// `dy[i] *= GELU'(u[i]) = Φ(u[i]) + u[i]·φ(u[i])`: the backward pass in place.
///
/// # Panics
/// If the slices' lengths differ.
pub fn gelu_grad_mul(u: &[f32], dy: &mut [f32]) {
    assert_eq!(u.len(), dy.len(), "gelu_grad_mul: lengths differ");
    pulp::Arch::new().dispatch(Backward { u, dy });
}

// The loops as `pulp` operations: `with_simd` is inlined into a function compiled for the
// instruction set `pulp` picked, so the scalar code below vectorises for it.
struct Forward<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
}

impl pulp::WithSimd for Forward<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (o, &v) in self.out.iter_mut().zip(self.x) {
            *o = v * cdf(v);
        }
    }
}

struct Backward<'a> {
    u: &'a [f32],
    dy: &'a mut [f32],
}

impl pulp::WithSimd for Backward<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        // 1/√(2π)
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (d, &x) in self.dy.iter_mut().zip(self.u) {
            let pdf = exp_nonpositive(-0.5 * x * x) * INV_SQRT_2PI;
            *d *= cdf(x) + x * pdf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact_gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
    }

    fn exact_gelu_grad(x: f64) -> f64 {
        let cdf = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
        cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }

    /// Every 1/4096 step of [-12, 12], plus the extremes.
    fn grid() -> Vec<f32> {
        let mut v: Vec<f32> = (-12 * 4096..=12 * 4096)
            .map(|i| i as f32 / 4096.0)
            .collect();
        v.extend([-1e4, -100.0, -30.0, 30.0, 100.0, 1e4, 1e-30, -1e-30, 0.0]);
        v
    }

    #[test]
    fn erf_stays_within_its_stated_error() {
        let worst = grid()
            .iter()
            .map(|&x| (erf(x) as f64 - libm::erf(x as f64)).abs())
            .fold(0.0, f64::max);
        assert!(worst <= ERF_MAX_ERROR, "max |erf error| {worst:e}");
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn gelu_and_its_gradient_stay_within_their_stated_errors() {
        let x = grid();
        let mut y = vec![0.0; x.len()];
        gelu_slice(&x, &mut y);
        let mut g = vec![1.0; x.len()];
        gelu_grad_mul(&x, &mut g);
        let (mut worst_y, mut worst_g) = (0.0f64, 0.0f64);
        for ((&xi, &yi), &gi) in x.iter().zip(&y).zip(&g) {
            let xd = xi as f64;
            if xd.abs() <= 12.0 {
                worst_y = worst_y.max((yi as f64 - exact_gelu(xd)).abs());
            }
            worst_g = worst_g.max((gi as f64 - exact_gelu_grad(xd)).abs());
            assert!(yi.is_finite() && gi.is_finite(), "x = {xi}");
        }
        assert!(worst_y <= GELU_MAX_ERROR, "max |GELU error| {worst_y:e}");
        assert!(
            worst_g <= GELU_GRAD_MAX_ERROR,
            "max |GELU' error| {worst_g:e}"
        );
        // Far out in the tails GELU is x or 0 and its derivative 1 or 0, exactly.
        let mut out = [0.0f32; 2];
        gelu_slice(&[-1e4, 1e4], &mut out);
        assert_eq!(out, [0.0, 1e4]);
    }

    #[test]
    fn exp_is_accurate_to_a_few_ulp() {
        for i in 0..=87 * 1024 {
            let x = -(i as f32) / 1024.0;
            let (got, want) = (exp_nonpositive(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 3.0 * want * f32::EPSILON as f64,
                "exp({x})"
            );
        }
    }
}
