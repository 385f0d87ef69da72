//! Layers with forward and backward passes over `ndarray`.
//!
//! Activations are 2-D row matrices: `[rows, features]`, where a row is a token
//! (`B*S` rows) or a pixel (`B*H*W` rows). Each layer's `forward` returns its output and a
//! cache holding exactly what `backward` needs; `backward` accumulates parameter gradients into
//! [`Grads`] (only for trainable tensors) and returns the input gradient when asked. Frozen
//! weights still pass gradients through; they just don't receive any.

use std::sync::Arc;

use ndarray::linalg::{general_mat_mul, general_mat_vec_mul};
use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, Axis, Zip, s};
use rand::Rng;
use rand::rngs::StdRng;

use crate::params::{Grads, ParamId, ParamStore};
use crate::real::Real;

/// `a · bᵀ` for row-major activations times a `[out, in]` weight.
#[inline]
pub(crate) fn mm_t<T: Real>(a: ArrayView2<'_, T>, b: ArrayView2<'_, T>) -> Array2<T> {
    a.dot(&b.t())
}

/// LoRA factors attached to a [`Linear`]: `y += scaling · B·A·dropout(x)`.
#[derive(Debug, Clone)]
pub struct LoraParams {
    /// `[r, in]`, kaiming-uniform initialised (as PEFT: bound `1/sqrt(in)`).
    pub a: ParamId,
    /// `[out, r]`, zero-initialised, so the adapted layer starts equal to the frozen one.
    pub b: ParamId,
    /// `alpha / r`.
    pub scaling: f64,
    /// Dropout probability on the LoRA branch's input (training only).
    pub dropout: f64,
}

/// A linear layer `y = x·Wᵀ + b` (PyTorch layout, `W: [out, in]`) with optional LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub w: ParamId,
    /// `[out]`, if the layer has a bias.
    pub b: Option<ParamId>,
    /// LoRA factors, if the layer is a LoRA target.
    pub lora: Option<LoraParams>,
}

/// What [`Linear::backward`] needs.
#[derive(Debug)]
pub struct LinearCache<T> {
    x: Option<Arc<Array2<T>>>,
    xa: Option<Array2<T>>,
    mask: Option<Array2<T>>,
}

impl Linear {
    /// Whether the backward pass needs the layer input (weight or LoRA gradients).
    fn needs_input<T: Real>(&self, p: &ParamStore<T>) -> bool {
        p.trainable(self.w)
            || self
                .lora
                .as_ref()
                .is_some_and(|l| p.trainable(l.a) || p.trainable(l.b))
    }

    /// Whether any tensor of this layer is trained.
    pub fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.needs_input(p) || self.b.is_some_and(|b| p.trainable(b))
    }

    /// Forward pass. `rng` is `Some` in training mode (LoRA dropout).
    pub fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: &Arc<Array2<T>>,
        rng: Option<&mut StdRng>,
    ) -> (Array2<T>, LinearCache<T>) {
        let product = mm_t(x.view(), p.w2(self.w));
        self.forward_from_product(p, Some(x), product, rng)
    }

    /// Forward pass given `x·Wᵀ` already computed (`W` frozen: the product is the same
    /// every step, so a caller may compute it once). Adds the bias and the LoRA branch. `x`
    /// may be `None` only when the layer has no LoRA branch and a frozen `W`.
    pub fn forward_from_product<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: Option<&Arc<Array2<T>>>,
        product: Array2<T>,
        rng: Option<&mut StdRng>,
    ) -> (Array2<T>, LinearCache<T>) {
        const NEEDS_X: &str =
            "Linear::forward_from_product: the input is needed (LoRA or a trained W)";
        let mut y = product;
        if let Some(b) = self.b {
            y += &p.w1(b);
        }
        let mut cache = LinearCache {
            x: self.needs_input(p).then(|| Arc::clone(x.expect(NEEDS_X))),
            xa: None,
            mask: None,
        };
        if let Some(l) = &self.lora {
            let x = x.expect(NEEDS_X);
            debug_assert_eq!(y.nrows(), x.nrows());
            let a = p.w2(l.a);
            let bm = p.w2(l.b);
            let mask = match rng {
                Some(rng) if l.dropout > 0.0 => {
                    let keep = 1.0 - l.dropout;
                    let inv = T::lit(1.0 / keep);
                    Some(Array2::from_shape_simple_fn(x.raw_dim(), || {
                        if rng.random::<f64>() < keep {
                            inv
                        } else {
                            T::zero()
                        }
                    }))
                }
                _ => None,
            };
            let xa = match &mask {
                Some(m) => mm_t((&**x * m).view(), a),
                None => mm_t(x.view(), a),
            };
            general_mat_mul(T::lit(l.scaling), &xa, &bm.t(), T::one(), &mut y);
            cache.xa = Some(xa);
            cache.mask = mask;
        }
        (y, cache)
    }

    /// Backward pass: accumulates gradients, returns `dL/dx` if `need_dx`.
    pub fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        cache: LinearCache<T>,
        dy: ArrayView2<'_, T>,
        grads: &mut Grads<T>,
        need_dx: bool,
    ) -> Option<Array2<T>> {
        if let Some(b) = self.b
            && grads.wants(b)
        {
            grads.acc1(b, dy.sum_axis(Axis(0)).view());
        }
        if grads.wants(self.w) {
            let x = cache.x.as_ref().expect("input cached when W is trained");
            grads.acc2(self.w, dy.t().dot(&**x).view());
        }
        let mut dx = need_dx.then(|| dy.dot(&p.w2(self.w)));
        if let Some(l) = &self.lora {
            let a = p.w2(l.a);
            let bm = p.w2(l.b);
            let xa = cache.xa.as_ref().expect("LoRA caches x·Aᵀ");
            let s = T::lit(l.scaling);
            if grads.wants(l.b) {
                let mut gb = dy.t().dot(xa);
                gb *= s;
                grads.acc2(l.b, gb.view());
            }
            // d(xa) = s · dy · B  ([N, r])
            let mut dxa = dy.dot(&bm);
            dxa *= s;
            if grads.wants(l.a) {
                let x = cache.x.as_ref().expect("input cached for LoRA");
                let ga = match &cache.mask {
                    Some(m) => dxa.t().dot(&(&**x * m)),
                    None => dxa.t().dot(&**x),
                };
                grads.acc2(l.a, ga.view());
            }
            if let Some(dx) = dx.as_mut() {
                match &cache.mask {
                    Some(m) => *dx += &(dxa.dot(&a) * m),
                    None => general_mat_mul(T::one(), &dxa, &a, T::one(), dx),
                }
            }
        }
        dx
    }
}

/// Converts `[B, C, H, W]` feature maps into `[B*H*W, C]` pixel rows (a 1×1 conv is then a
/// [`Linear`] over rows).
pub fn nchw_to_rows<T: Real>(x: ndarray::ArrayView4<'_, T>) -> Array2<T> {
    let (b, c, h, w) = x.dim();
    let nhwc = x.permuted_axes([0, 2, 3, 1]);
    let mut rows = Array2::zeros((b * h * w, c));
    Zip::from(rows.rows_mut())
        .and(
            nhwc.to_shape((b * h * w, c))
                .expect("permuted view reshapes")
                .rows(),
        )
        .for_each(|mut r, src| r.assign(&src));
    rows
}

/// Inverse of [`nchw_to_rows`]: `[B*H*W, C]` rows back to `[B, C, H, W]`.
pub fn rows_to_nchw<T: Real>(rows: ArrayView2<'_, T>, b: usize, h: usize, w: usize) -> Array4<T> {
    let c = rows.ncols();
    let nhwc = rows
        .to_shape((b, h, w, c))
        .expect("rows are B*H*W")
        .to_owned();
    nhwc.permuted_axes([0, 3, 1, 2])
        .as_standard_layout()
        .into_owned()
}

/// Per-feature scale `y = x ⊙ γ` (a ViT's layer scale; the scale half of [`FoldedBn`]).
#[derive(Debug, Clone, Copy)]
pub struct LayerScale {
    /// `[C]`.
    pub gamma: ParamId,
}

impl LayerScale {
    /// Forward; keeps `x` only if `γ` is trained.
    pub fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: Array2<T>,
    ) -> (Array2<T>, Option<Array2<T>>) {
        let keep = p.trainable(self.gamma).then(|| x.clone());
        let mut y = x;
        y *= &p.w1(self.gamma);
        (y, keep)
    }

    /// Backward: returns `dL/dx` if `need_dx`.
    pub fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: Option<Array2<T>>,
        dy: ArrayView2<'_, T>,
        grads: &mut Grads<T>,
        need_dx: bool,
    ) -> Option<Array2<T>> {
        if grads.wants(self.gamma) {
            let x = x.expect("input kept when the scale is trained");
            grads.acc1(self.gamma, (&dy * &x).sum_axis(Axis(0)).view());
        }
        need_dx.then(|| &dy * &p.w1(self.gamma))
    }
}

/// Folded BatchNorm: `y = x·scale + shift` per feature (column).
#[derive(Debug, Clone)]
pub struct FoldedBn {
    /// `[C]`: `gamma / sqrt(running_var + eps)`.
    pub scale: ParamId,
    /// `[C]`: `beta - running_mean · scale`.
    pub shift: ParamId,
}

impl FoldedBn {
    fn scale(&self) -> LayerScale {
        LayerScale { gamma: self.scale }
    }

    /// Forward; keeps `x` only if the scale is trained.
    pub fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: Array2<T>,
    ) -> (Array2<T>, Option<Array2<T>>) {
        let (mut y, keep) = self.scale().forward(p, x);
        y += &p.w1(self.shift);
        (y, keep)
    }

    /// Backward: returns `dL/dx` if `need_dx`.
    pub fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: Option<Array2<T>>,
        dy: ArrayView2<'_, T>,
        grads: &mut Grads<T>,
        need_dx: bool,
    ) -> Option<Array2<T>> {
        if grads.wants(self.shift) {
            grads.acc1(self.shift, dy.sum_axis(Axis(0)).view());
        }
        self.scale().backward(p, x, dy, grads, need_dx)
    }
}

/// ReLU6 (`clamp(x, 0, 6)`), in place; the output is its own cache.
pub fn relu6_forward<T: Real>(mut x: Array2<T>) -> Array2<T> {
    let six = T::lit(6.0);
    x.mapv_inplace(|v| v.max(T::zero()).min(six));
    x
}

/// ReLU6 backward from its output: gradient passes where `0 < x < 6` (as PyTorch's hardtanh).
/// The output equals the input exactly there, so the output suffices as cache.
pub fn relu6_backward<T: Real>(y: ArrayView2<'_, T>, mut dy: Array2<T>) -> Array2<T> {
    let six = T::lit(6.0);
    Zip::from(&mut dy).and(y).for_each(|d, &v| {
        if !(v > T::zero() && v < six) {
            *d = T::zero();
        }
    });
    dy
}

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

/// GELU forward over a matrix (the input is the cache).
pub fn gelu_forward<T: Real>(u: ArrayView2<'_, T>) -> Array2<T> {
    par_map(u, gelu)
}

/// GELU backward given the pre-activation.
pub fn gelu_backward<T: Real>(u: ArrayView2<'_, T>, mut dy: Array2<T>) -> Array2<T> {
    par_zip(dy.view_mut(), u, |d, x| *d *= gelu_grad(x));
    dy
}

/// `f(out, inp)` element-wise, split by rows over [`threads`] threads for large matrices.
fn par_zip<T: Real, F: Fn(&mut T, T) + Sync + Copy + Send>(
    out: ndarray::ArrayViewMut2<'_, T>,
    inp: ArrayView2<'_, T>,
    f: F,
) {
    let rows = out.nrows();
    if out.len() < 1 << 16 || rows < 2 {
        Zip::from(out).and(inp).for_each(|o, &x| f(o, x));
        return;
    }
    let chunks = split_batch(rows);
    std::thread::scope(|sc| {
        let mut rest = out;
        for (i, &(r0, r1)) in chunks.iter().enumerate() {
            let (here, next) = rest.split_at(Axis(0), r1 - r0);
            rest = next;
            let src = inp.slice(s![r0..r1, ..]);
            let work = move || Zip::from(here).and(src).for_each(|o, &x| f(o, x));
            if i + 1 == chunks.len() {
                work();
            } else {
                sc.spawn(work);
            }
        }
    });
}

/// Element-wise map, split over [`threads`] threads for large matrices (GELU's `erf` is the costliest
/// element-wise op in the tail).
fn par_map<T: Real>(u: ArrayView2<'_, T>, f: fn(T) -> T) -> Array2<T> {
    let mut out = Array2::zeros(u.raw_dim());
    par_zip(out.view_mut(), u, move |o, x| *o = f(x));
    out
}

/// LayerNorm over the last axis with affine `weight` and `bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[D]` (gamma).
    pub weight: ParamId,
    /// `[D]` (beta).
    pub bias: ParamId,
    /// Variance epsilon (1e-12 for BERT).
    pub eps: f64,
}

/// What [`LayerNorm::backward`] needs.
#[derive(Debug)]
pub struct LayerNormCache<T> {
    xhat: Array2<T>,
    rstd: Array1<T>,
}

impl LayerNorm {
    /// Forward pass (biased variance, as PyTorch).
    pub fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: ArrayView2<'_, T>,
    ) -> (Array2<T>, LayerNormCache<T>) {
        let d = T::lit(x.ncols() as f64);
        let eps = T::lit(self.eps);
        let mut xhat = x.to_owned();
        let mut rstd = Array1::zeros(x.nrows());
        Zip::from(xhat.rows_mut())
            .and(&mut rstd)
            .for_each(|mut row, r| {
                let mean = row.sum() / d;
                row.mapv_inplace(|v| v - mean);
                let var = row.iter().map(|&v| v * v).sum::<T>() / d;
                let rs = T::one() / (var + eps).sqrt();
                row.mapv_inplace(|v| v * rs);
                *r = rs;
            });
        let mut y = &xhat * &p.w1(self.weight);
        y += &p.w1(self.bias);
        (y, LayerNormCache { xhat, rstd })
    }

    /// Backward pass; always returns `dL/dx` (LayerNorm sits on the residual path).
    pub fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        cache: LayerNormCache<T>,
        dy: ArrayView2<'_, T>,
        grads: &mut Grads<T>,
    ) -> Array2<T> {
        if grads.wants(self.bias) {
            grads.acc1(self.bias, dy.sum_axis(Axis(0)).view());
        }
        if grads.wants(self.weight) {
            grads.acc1(self.weight, (&dy * &cache.xhat).sum_axis(Axis(0)).view());
        }
        let d = T::lit(dy.ncols() as f64);
        let gamma = p.w1(self.weight);
        let mut dx = &dy * &gamma; // dxhat
        Zip::from(dx.rows_mut())
            .and(cache.xhat.rows())
            .and(&cache.rstd)
            .for_each(|mut g, xh, &rs| {
                let mean_g = g.sum() / d;
                let mean_gx = g.iter().zip(xh.iter()).map(|(&a, &b)| a * b).sum::<T>() / d;
                Zip::from(&mut g)
                    .and(&xh)
                    .for_each(|gi, &xi| *gi = rs * (*gi - mean_g - xi * mean_gx));
            });
        dx
    }
}

/// Scaled dot-product attention core over `heads` heads, with an additive key bias per
/// sample (`[B, S]`: 0 for real tokens, [`Real::mask_bias`] for padding).
#[derive(Debug, Clone, Copy)]
pub struct AttentionCore {
    /// Number of heads; the hidden size must be divisible by it.
    pub heads: usize,
}

/// What [`AttentionCore::backward`] needs.
#[derive(Debug)]
pub struct AttentionCache<T> {
    q: Array2<T>,
    k: Array2<T>,
    v: Array2<T>,
    probs: Array4<T>,
}

impl AttentionCore {
    /// `q: [B*Sq, D]`, `k, v: [B*S, D]`, `key_bias: [B, S]` → context `[B*Sq, D]`. Each
    /// sample's `Sq` queries attend to its `S` keys: `Sq = S` in every block but a CLS-pooled
    /// tail's last, which needs only the CLS token's query (`Sq = 1`). Samples are split over
    /// [`threads`] threads: each (sample, head) pair is a small GEMM that matrixmultiply
    /// would run on one thread.
    pub fn forward<T: Real>(
        &self,
        q: Array2<T>,
        k: Array2<T>,
        v: Array2<T>,
        key_bias: ArrayView2<'_, T>,
    ) -> (Array2<T>, AttentionCache<T>) {
        let (b, s) = key_bias.dim();
        let sq = q.nrows() / b.max(1);
        let d = q.ncols();
        let mut probs = Array4::<T>::zeros((b, self.heads, sq, s));
        let mut ctx = Array2::<T>::zeros((b * sq, d));
        let heads = self.heads;
        let chunks = split_batch(b);
        std::thread::scope(|sc| {
            let mut probs_rest = probs.view_mut();
            let mut ctx_rest = ctx.view_mut();
            for (i, &(b0, b1)) in chunks.iter().enumerate() {
                let (p_here, p_next) = probs_rest.split_at(Axis(0), b1 - b0);
                let (c_here, c_next) = ctx_rest.split_at(Axis(0), (b1 - b0) * sq);
                probs_rest = p_next;
                ctx_rest = c_next;
                let (qv, kv, vv) = (
                    q.slice(s![b0 * sq..b1 * sq, ..]),
                    k.slice(s![b0 * s..b1 * s, ..]),
                    v.slice(s![b0 * s..b1 * s, ..]),
                );
                let bias = key_bias.slice(s![b0..b1, ..]);
                let work = move || attn_forward_chunk(heads, qv, kv, vv, bias, p_here, c_here);
                if i + 1 == chunks.len() {
                    work();
                } else {
                    sc.spawn(work);
                }
            }
        });
        (ctx, AttentionCache { q, k, v, probs })
    }

    /// Backward: `dctx [B*Sq, D]` → `(dq [B*Sq, D], dk [B*S, D], dv [B*S, D])`.
    pub fn backward<T: Real>(
        &self,
        cache: AttentionCache<T>,
        dctx: ArrayView2<'_, T>,
    ) -> (Array2<T>, Array2<T>, Array2<T>) {
        let AttentionCache { q, k, v, probs } = cache;
        let (b, _, sq, s) = probs.dim();
        let mut dq = Array2::<T>::zeros(q.raw_dim());
        let mut dk = Array2::<T>::zeros(k.raw_dim());
        let mut dv = Array2::<T>::zeros(v.raw_dim());
        let chunks = split_batch(b);
        std::thread::scope(|sc| {
            let (mut dq_rest, mut dk_rest, mut dv_rest) =
                (dq.view_mut(), dk.view_mut(), dv.view_mut());
            for (i, &(b0, b1)) in chunks.iter().enumerate() {
                let (nq, n) = ((b1 - b0) * sq, (b1 - b0) * s);
                let (dq_here, r) = dq_rest.split_at(Axis(0), nq);
                dq_rest = r;
                let (dk_here, r) = dk_rest.split_at(Axis(0), n);
                dk_rest = r;
                let (dv_here, r) = dv_rest.split_at(Axis(0), n);
                dv_rest = r;
                let (qv, kv, vv) = (
                    q.slice(s![b0 * sq..b1 * sq, ..]),
                    k.slice(s![b0 * s..b1 * s, ..]),
                    v.slice(s![b0 * s..b1 * s, ..]),
                );
                let dc = dctx.slice(s![b0 * sq..b1 * sq, ..]);
                let pv = probs.slice(s![b0..b1, .., .., ..]);
                let work =
                    move || attn_backward_chunk(qv, kv, vv, pv, dc, dq_here, dk_here, dv_here);
                if i + 1 == chunks.len() {
                    work();
                } else {
                    sc.spawn(work);
                }
            }
        });
        (dq, dk, dv)
    }
}

/// Threads for the hand-parallelised parts (attention, element-wise maps): `FEDPEFT_THREADS`,
/// else `MATMUL_NUM_THREADS` (the GEMM threads), else the available cores.
pub fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        ["FEDPEFT_THREADS", "MATMUL_NUM_THREADS"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    })
}

/// Splits `0..b` into at most [`threads`] contiguous ranges.
fn split_batch(b: usize) -> Vec<(usize, usize)> {
    let t = threads().min(b).max(1);
    (0..t)
        .map(|i| (i * b / t, (i + 1) * b / t))
        .filter(|(a, z)| a < z)
        .collect()
}

fn attn_forward_chunk<T: Real>(
    heads: usize,
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    key_bias: ArrayView2<'_, T>,
    mut probs: ndarray::ArrayViewMut4<'_, T>,
    mut ctx: ndarray::ArrayViewMut2<'_, T>,
) {
    let (b, s) = key_bias.dim();
    let sq = probs.dim().2;
    let dh = q.ncols() / heads;
    let scale = T::lit(1.0 / (dh as f64).sqrt());
    for bi in 0..b {
        let (qrows, rows) = (bi * sq..(bi + 1) * sq, bi * s..(bi + 1) * s);
        let bias = key_bias.row(bi);
        for hi in 0..heads {
            let cols = hi * dh..(hi + 1) * dh;
            let qs = q.slice(s![qrows.clone(), cols.clone()]);
            let ks = k.slice(s![rows.clone(), cols.clone()]);
            let vs = v.slice(s![rows.clone(), cols.clone()]);
            let mut pm = probs.slice_mut(s![bi, hi, .., ..]);
            general_mat_mul(scale, &qs, &ks.t(), T::zero(), &mut pm);
            for mut row in pm.rows_mut() {
                row += &bias;
                softmax_in_place(row.as_slice_mut().expect("contiguous"));
            }
            let mut cs = ctx.slice_mut(s![qrows.clone(), cols]);
            general_mat_mul(T::one(), &pm, &vs, T::zero(), &mut cs);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attn_backward_chunk<T: Real>(
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    probs: ndarray::ArrayView4<'_, T>,
    dctx: ArrayView2<'_, T>,
    mut dq: ndarray::ArrayViewMut2<'_, T>,
    mut dk: ndarray::ArrayViewMut2<'_, T>,
    mut dv: ndarray::ArrayViewMut2<'_, T>,
) {
    let (b, h, sq, s) = probs.dim();
    let dh = q.ncols() / h;
    let scale = T::lit(1.0 / (dh as f64).sqrt());
    let mut ds = Array2::<T>::zeros((sq, s));
    for bi in 0..b {
        let (qrows, rows) = (bi * sq..(bi + 1) * sq, bi * s..(bi + 1) * s);
        for hi in 0..h {
            let cols = hi * dh..(hi + 1) * dh;
            let pm = probs.slice(s![bi, hi, .., ..]);
            let dc = dctx.slice(s![qrows.clone(), cols.clone()]);
            let qs = q.slice(s![qrows.clone(), cols.clone()]);
            let ks = k.slice(s![rows.clone(), cols.clone()]);
            let vs = v.slice(s![rows.clone(), cols.clone()]);
            // dV = Pᵀ·dC
            general_mat_mul(
                T::one(),
                &pm.t(),
                &dc,
                T::zero(),
                &mut dv.slice_mut(s![rows.clone(), cols.clone()]),
            );
            // dP = dC·Vᵀ, then the softmax Jacobian: dS = P ⊙ (dP − rowsum(dP ⊙ P))
            general_mat_mul(T::one(), &dc, &vs.t(), T::zero(), &mut ds);
            Zip::from(ds.rows_mut())
                .and(pm.rows())
                .for_each(|mut dr, pr| {
                    let dot = dr.iter().zip(pr.iter()).map(|(&a, &b)| a * b).sum::<T>();
                    Zip::from(&mut dr)
                        .and(&pr)
                        .for_each(|g, &pv| *g = pv * (*g - dot));
                });
            general_mat_mul(
                scale,
                &ds,
                &ks,
                T::zero(),
                &mut dq.slice_mut(s![qrows.clone(), cols.clone()]),
            );
            general_mat_mul(
                scale,
                &ds.t(),
                &qs,
                T::zero(),
                &mut dk.slice_mut(s![rows.clone(), cols]),
            );
        }
    }
}

/// Numerically stable softmax of a slice, in place.
pub fn softmax_in_place<T: Real>(x: &mut [T]) {
    let m = x.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
    let mut sum = T::zero();
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = T::one() / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Masked mean over tokens (sentence-transformers pooling): `x: [B*S, D]`, `mask: [B, S]`
/// → `[B, D]`. The token count is clamped below at 1e-9 as sentence-transformers does.
pub fn masked_mean_forward<T: Real>(x: ArrayView2<'_, T>, mask: ArrayView2<'_, T>) -> Array2<T> {
    let (b, s) = mask.dim();
    let d = x.ncols();
    let mut out = Array2::zeros((b, d));
    for bi in 0..b {
        let m = mask.row(bi);
        let denom = m.sum().max(T::lit(1e-9));
        let xs = x.slice(s![bi * s..(bi + 1) * s, ..]);
        // o = xsᵀ·m / denom, written in place (no temporary per sample)
        general_mat_vec_mul(
            T::one() / denom,
            &xs.t(),
            &m,
            T::zero(),
            &mut out.row_mut(bi),
        );
    }
    out
}

/// Backward of [`masked_mean_forward`]: `dy: [B, D]` → `[B*S, D]`.
pub fn masked_mean_backward<T: Real>(dy: ArrayView2<'_, T>, mask: ArrayView2<'_, T>) -> Array2<T> {
    let (b, s) = mask.dim();
    let d = dy.ncols();
    let mut dx = Array2::zeros((b * s, d));
    for bi in 0..b {
        let m = mask.row(bi);
        let denom = m.sum().max(T::lit(1e-9));
        let g = dy.row(bi);
        for si in 0..s {
            let f = m[si] / denom;
            if f != T::zero() {
                Zip::from(dx.row_mut(bi * s + si))
                    .and(&g)
                    .for_each(|d, &gv| *d = gv * f);
            }
        }
    }
    dx
}

/// Global average pooling: `[B*P, C]` pixel rows → `[B, C]`.
pub fn gap_forward<T: Real>(x: ArrayView2<'_, T>, batch: usize) -> Array2<T> {
    let p = x.nrows() / batch;
    let c = x.ncols();
    let inv = T::lit(1.0 / p as f64);
    let mut out = Array2::zeros((batch, c));
    for bi in 0..batch {
        // summed row by row into the output: `sum_axis` would allocate a row per sample
        let mut o = out.row_mut(bi);
        for r in x.slice(s![bi * p..(bi + 1) * p, ..]).rows() {
            o += &r;
        }
        o *= inv;
    }
    out
}

/// Backward of [`gap_forward`]: `[B, C]` → `[B*P, C]`.
pub fn gap_backward<T: Real>(dy: ArrayView2<'_, T>, pixels: usize) -> Array2<T> {
    let (b, c) = dy.dim();
    let inv = T::lit(1.0 / pixels as f64);
    let mut dx = Array2::zeros((b * pixels, c));
    for bi in 0..b {
        let g = dy.row(bi);
        for pi in 0..pixels {
            Zip::from(dx.row_mut(bi * pixels + pi))
                .and(&g)
                .for_each(|d, &gv| *d = gv * inv);
        }
    }
    dx
}

/// Softmax cross-entropy, mean over the batch. Returns `(loss, dL/dlogits, correct)`.
/// Labels must already be validated against the number of classes.
pub fn cross_entropy<T: Real>(
    logits: ArrayView2<'_, T>,
    labels: &[usize],
) -> (f64, Array2<T>, usize) {
    let b = logits.nrows();
    let inv_b = T::lit(1.0 / b as f64);
    let mut grad = logits.to_owned();
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (i, mut row) in grad.rows_mut().into_iter().enumerate() {
        let l = labels[i];
        let argmax = argmax(row.view());
        if argmax == l {
            correct += 1;
        }
        // log-sum-exp with the max subtracted
        let m = row.fold(T::neg_infinity(), |a, &v| a.max(v));
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<T>().ln();
        loss += (lse - row[l]).wide();
        row.mapv_inplace(|v| (v - lse).exp() * inv_b);
        row[l] -= inv_b;
    }
    (loss / b as f64, grad, correct)
}

/// Index of the largest value (first on ties).
pub fn argmax<T: Real>(row: ArrayView1<'_, T>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
