//! The tail's matrix products, on the `gemm` crate: `C ← α·A·B + β·C` over `ndarray` views.
//!
//! `gemm` runs AVX-512 / AVX2+FMA / NEON kernels chosen at run time and splits a large product
//! over [`threads`] rayon threads; on the tail's shapes it is faster than matrixmultiply
//! (see `docs/src/results/training-speed.md`). Its entry point is an `unsafe fn` over raw
//! pointers and strides, so this module is the crate's one place with `unsafe`: one call,
//! whose arguments all come from borrowed `ndarray` views whose shapes are checked first.
//!
//! The scalar must be `f32` or `f64` ([`Real`]'s two implementations): `gemm` dispatches on
//! the type and panics on any other.

use ndarray::{ArrayView2, ArrayViewMut2};

use crate::layers::threads;
use crate::real::Real;

/// Below this many multiply-adds, or with a side shorter than [`PARALLEL_MIN_SIDE`], a
/// product runs on the calling thread: the attention's per-head products (already split over
/// threads by sample) and LoRA's rank-r factors, too thin to split well.
const PARALLEL_FROM: usize = 1 << 20;
const PARALLEL_MIN_SIDE: usize = 32;

/// `c ← alpha·a·b + beta·c`. With `beta == 0` the old `c` is not read (it may hold anything,
/// even NaN), as BLAS does.
///
/// # Panics
/// If the shapes disagree: `a: [m, k]`, `b: [k, n]`, `c: [m, n]`.
pub fn gemm<T: Real>(
    alpha: T,
    a: &ArrayView2<'_, T>,
    b: &ArrayView2<'_, T>,
    beta: T,
    c: &mut ArrayViewMut2<'_, T>,
) {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert!(
        k == k2 && c.dim() == (m, n),
        "gemm: [{m}, {k}]·[{k2}, {n}] into {:?}",
        c.dim()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // an empty sum: C ← β·C (β = 0 must not read C)
        if beta == T::zero() {
            c.fill(T::zero());
        } else {
            c.mapv_inplace(|v| v * beta);
        }
        return;
    }
    let parallel = m * n * k >= PARALLEL_FROM && m.min(n).min(k) >= PARALLEL_MIN_SIDE;
    let parallelism = if parallel && threads() > 1 {
        gemm::Parallelism::Rayon(threads())
    } else {
        gemm::Parallelism::None
    };
    let (sa, sb) = (a.strides(), b.strides());
    let (sc0, sc1) = (c.strides()[0], c.strides()[1]);
    // SAFETY: `gemm::gemm` reads `m×k` elements of `a` at `a_ptr + i·sa[0] + l·sa[1]`, `k×n` of
    // `b` likewise, and writes (and, when `read_dst`, reads) `m×n` elements of `c`. All three
    // pointers and strides (in elements, as `gemm` takes them) come from live `ndarray` views
    // of exactly those shapes (checked above, none empty), so every address is inside its
    // view. `c` is borrowed mutably, so it aliases neither `a` nor `b`, and nothing else
    // touches it during the call; `gemm`'s worker threads finish before it returns. `T` is
    // `f32` or `f64` (the only `Real`s), the types `gemm` supports.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            sc1,
            sc0,
            beta != T::zero(),
            a.as_ptr(),
            sa[1],
            sa[0],
            b.as_ptr(),
            sb[1],
            sb[0],
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `a·b` into a new matrix.
pub fn matmul<T: Real>(a: &ArrayView2<'_, T>, b: &ArrayView2<'_, T>) -> ndarray::Array2<T> {
    let mut c = ndarray::Array2::zeros((a.nrows(), b.ncols()));
    gemm(T::one(), a, b, T::zero(), &mut c.view_mut());
    c
}
