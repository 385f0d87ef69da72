//! Layers with forward and backward passes over `ndarray`.
//!
//! Activations are 2-D row matrices: `[rows, features]`, where a row is a token
//! (`B*S` rows) or a pixel (`B*H*W` rows). Each layer's `forward` returns its output and a
//! cache holding exactly what `backward` needs; `backward` accumulates parameter gradients into
//! [`Grads`] (only for trainable tensors) and returns the input gradient when asked. Frozen
//! weights still pass gradients through; they just don't receive any.

use std::sync::Arc;

use ndarray::linalg::general_mat_vec_mul;
use ndarray::{Array1, Array2, Array4, ArrayView1, ArrayView2, Axis, Zip, s};
use rand::Rng;
use rand::rngs::StdRng;

pub use crate::gelu::{gelu, gelu_backward, gelu_forward, gelu_grad};
use crate::gemm::{gemm, matmul};
use crate::params::{Grads, ParamId, ParamStore};
use crate::real::Real;

/// `a · bᵀ` for row-major activations times a `[out, in]` weight.
#[inline]
pub(crate) fn mm_t<T: Real>(a: ArrayView2<'_, T>, b: ArrayView2<'_, T>) -> Array2<T> {
    matmul(&a, &b.t())
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
            gemm(
                T::lit(l.scaling),
                &xa.view(),
                &bm.t(),
                T::one(),
                &mut y.view_mut(),
            );
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
            grads.acc2(self.w, matmul(&dy.t(), &x.view()).view());
        }
        let mut dx = need_dx.then(|| matmul(&dy, &p.w2(self.w)));
        if let Some(l) = &self.lora {
            let a = p.w2(l.a);
            let bm = p.w2(l.b);
            let xa = cache.xa.as_ref().expect("LoRA caches x·Aᵀ");
            let s = T::lit(l.scaling);
            if grads.wants(l.b) {
                let mut gb = matmul(&dy.t(), &xa.view());
                gb *= s;
                grads.acc2(l.b, gb.view());
            }
            // d(xa) = s · dy · B  ([N, r])
            let mut dxa = matmul(&dy, &bm);
            dxa *= s;
            if grads.wants(l.a) {
                let x = cache.x.as_ref().expect("input cached for LoRA");
                let ga = match &cache.mask {
                    Some(m) => matmul(&dxa.t(), &(&**x * m).view()),
                    None => matmul(&dxa.t(), &x.view()),
                };
                grads.acc2(l.a, ga.view());
            }
            if let Some(dx) = dx.as_mut() {
                match &cache.mask {
                    Some(m) => *dx += &(matmul(&dxa.view(), &a) * m),
                    None => gemm(T::one(), &dxa.view(), &a, T::one(), &mut dx.view_mut()),
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
    // A select, not a branch: with about half the pixels clamped a branch mispredicts often
    // (it was a quarter of a conv-head `bias` step); `&` rather than `&&` keeps it one.
    Zip::from(&mut dy).and(y).for_each(|d, &v| {
        let pass = (v > T::zero()) & (v < six);
        *d = if pass { *d } else { T::zero() };
    });
    dy
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

/// What [`AttentionCore::backward`] needs. The attention probabilities (`[B, heads, Sq, S]`,
/// 12.6 MiB per MiniLM block at batch 64) are not kept: backward recomputes each (sample, head)
/// block of them with the forward's own operations, in the same order, so they are bitwise the
/// same, for ~1 % more FLOPs.
#[derive(Debug)]
pub struct AttentionCache<T> {
    q: Array2<T>,
    k: Array2<T>,
    v: Array2<T>,
    key_bias: Array2<T>,
}

impl AttentionCore {
    /// `q: [B*Sq, D]`, `k, v: [B*S, D]`, `key_bias: [B, S]` → context `[B*Sq, D]`. Each
    /// sample's `Sq` queries attend to its `S` keys: `Sq = S` in every block but a CLS-pooled
    /// tail's last, which needs only the CLS token's query (`Sq = 1`). Samples are split over
    /// [`threads`] threads: each (sample, head) pair is a small GEMM that [`crate::gemm`]
    /// runs on the calling thread.
    pub fn forward<T: Real>(
        &self,
        q: Array2<T>,
        k: Array2<T>,
        v: Array2<T>,
        key_bias: ArrayView2<'_, T>,
    ) -> (Array2<T>, AttentionCache<T>) {
        let b = key_bias.nrows();
        let sq = q.nrows() / b.max(1);
        let d = q.ncols();
        let mut ctx = Array2::<T>::zeros((b * sq, d));
        let heads = self.heads;
        let chunks = split_batch(b);
        std::thread::scope(|sc| {
            let mut ctx_rest = ctx.view_mut();
            for (i, &(b0, b1)) in chunks.iter().enumerate() {
                let (c_here, c_next) = ctx_rest.split_at(Axis(0), (b1 - b0) * sq);
                ctx_rest = c_next;
                let s = key_bias.ncols();
                let (qv, kv, vv) = (
                    q.slice(s![b0 * sq..b1 * sq, ..]),
                    k.slice(s![b0 * s..b1 * s, ..]),
                    v.slice(s![b0 * s..b1 * s, ..]),
                );
                let bias = key_bias.slice(s![b0..b1, ..]);
                let work = move || attn_forward_chunk(heads, qv, kv, vv, bias, c_here);
                if i + 1 == chunks.len() {
                    work();
                } else {
                    sc.spawn(work);
                }
            }
        });
        let key_bias = key_bias.to_owned();
        (ctx, AttentionCache { q, k, v, key_bias })
    }

    /// Backward: `dctx [B*Sq, D]` → `(dq [B*Sq, D], dk [B*S, D], dv [B*S, D])`.
    pub fn backward<T: Real>(
        &self,
        cache: AttentionCache<T>,
        dctx: ArrayView2<'_, T>,
    ) -> (Array2<T>, Array2<T>, Array2<T>) {
        let AttentionCache { q, k, v, key_bias } = cache;
        let (b, s) = key_bias.dim();
        let sq = q.nrows() / b.max(1);
        let heads = self.heads;
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
                let inputs = AttnInputs {
                    heads,
                    q: q.slice(s![b0 * sq..b1 * sq, ..]),
                    k: k.slice(s![b0 * s..b1 * s, ..]),
                    v: v.slice(s![b0 * s..b1 * s, ..]),
                    key_bias: key_bias.slice(s![b0..b1, ..]),
                };
                let dc = dctx.slice(s![b0 * sq..b1 * sq, ..]);
                let work = move || attn_backward_chunk(inputs, dc, dq_here, dk_here, dv_here);
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

/// Threads for the hand-parallelised parts (attention, element-wise maps) and for splitting a
/// large GEMM ([`crate::gemm`]): `FEDPEFT_THREADS`, else `MATMUL_NUM_THREADS` (matrixmultiply's
/// threads, kept for its remaining uses), else the available cores.
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

/// One thread's samples of an attention: queries `[b*Sq, D]`, keys and values `[b*S, D]`,
/// key bias `[b, S]`.
#[derive(Clone, Copy)]
struct AttnInputs<'a, T> {
    heads: usize,
    q: ArrayView2<'a, T>,
    k: ArrayView2<'a, T>,
    v: ArrayView2<'a, T>,
    key_bias: ArrayView2<'a, T>,
}

impl<T: Real> AttnInputs<'_, T> {
    /// Sample `bi`'s attention probabilities for head `hi` into `pm: [Sq, S]`:
    /// `softmax(scale·q·kᵀ + bias)` by rows. Forward and backward both call this, so the
    /// probabilities backward recomputes are bitwise the forward's.
    fn probs_into(&self, bi: usize, hi: usize, pm: &mut Array2<T>) {
        let (sq, s) = pm.dim();
        let dh = self.q.ncols() / self.heads;
        let scale = T::lit(1.0 / (dh as f64).sqrt());
        let cols = hi * dh..(hi + 1) * dh;
        let qs = self.q.slice(s![bi * sq..(bi + 1) * sq, cols.clone()]);
        let ks = self.k.slice(s![bi * s..(bi + 1) * s, cols]);
        gemm(scale, &qs, &ks.t(), T::zero(), &mut pm.view_mut());
        let bias = self.key_bias.row(bi);
        for mut row in pm.rows_mut() {
            row += &bias;
            softmax_in_place(row.as_slice_mut().expect("contiguous"));
        }
    }
}

fn attn_forward_chunk<T: Real>(
    heads: usize,
    q: ArrayView2<'_, T>,
    k: ArrayView2<'_, T>,
    v: ArrayView2<'_, T>,
    key_bias: ArrayView2<'_, T>,
    mut ctx: ndarray::ArrayViewMut2<'_, T>,
) {
    let (b, s) = key_bias.dim();
    let sq = q.nrows() / b.max(1);
    let dh = q.ncols() / heads;
    let inputs = AttnInputs {
        heads,
        q,
        k,
        v,
        key_bias,
    };
    let mut pm = Array2::<T>::zeros((sq, s));
    for bi in 0..b {
        let (qrows, rows) = (bi * sq..(bi + 1) * sq, bi * s..(bi + 1) * s);
        for hi in 0..heads {
            let cols = hi * dh..(hi + 1) * dh;
            inputs.probs_into(bi, hi, &mut pm);
            let vs = v.slice(s![rows.clone(), cols.clone()]);
            let mut cs = ctx.slice_mut(s![qrows.clone(), cols]);
            gemm(T::one(), &pm.view(), &vs, T::zero(), &mut cs);
        }
    }
}

fn attn_backward_chunk<T: Real>(
    inputs: AttnInputs<'_, T>,
    dctx: ArrayView2<'_, T>,
    mut dq: ndarray::ArrayViewMut2<'_, T>,
    mut dk: ndarray::ArrayViewMut2<'_, T>,
    mut dv: ndarray::ArrayViewMut2<'_, T>,
) {
    let AttnInputs {
        heads: h,
        q,
        k,
        v,
        key_bias,
    } = inputs;
    let (b, s) = key_bias.dim();
    let sq = q.nrows() / b.max(1);
    let dh = q.ncols() / h;
    let scale = T::lit(1.0 / (dh as f64).sqrt());
    let mut pm = Array2::<T>::zeros((sq, s));
    let mut ds = Array2::<T>::zeros((sq, s));
    for bi in 0..b {
        let (qrows, rows) = (bi * sq..(bi + 1) * sq, bi * s..(bi + 1) * s);
        for hi in 0..h {
            let cols = hi * dh..(hi + 1) * dh;
            inputs.probs_into(bi, hi, &mut pm);
            let dc = dctx.slice(s![qrows.clone(), cols.clone()]);
            let qs = q.slice(s![qrows.clone(), cols.clone()]);
            let ks = k.slice(s![rows.clone(), cols.clone()]);
            let vs = v.slice(s![rows.clone(), cols.clone()]);
            // dV = Pᵀ·dC
            gemm(
                T::one(),
                &pm.t(),
                &dc,
                T::zero(),
                &mut dv.slice_mut(s![rows.clone(), cols.clone()]),
            );
            // dP = dC·Vᵀ, then the softmax Jacobian: dS = P ⊙ (dP − rowsum(dP ⊙ P))
            gemm(T::one(), &dc, &vs.t(), T::zero(), &mut ds.view_mut());
            Zip::from(ds.rows_mut())
                .and(pm.rows())
                .for_each(|mut dr, pr| {
                    let dot = dr.iter().zip(pr.iter()).map(|(&a, &b)| a * b).sum::<T>();
                    Zip::from(&mut dr)
                        .and(&pr)
                        .for_each(|g, &pv| *g = pv * (*g - dot));
                });
            gemm(
                scale,
                &ds.view(),
                &ks,
                T::zero(),
                &mut dq.slice_mut(s![qrows.clone(), cols.clone()]),
            );
            gemm(
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
