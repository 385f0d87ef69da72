//! One encoder block of a transformer tail, post-LN (BERT) or pre-LN with layer scale (ViT):
//! loading it from the frozen weights with a method applied, forward and backward.
//!
//! A block is two residual sublayers, attention and MLP, around one [`Residual`] each, which
//! holds what the two layouts place differently:
//! - post-LN (BERT): `x ← LN(x + adapter(f(x)))`;
//! - pre-LN (ViT, DINOv2): `x ← x + ls ⊙ adapter(f(LN(x)))`, `ls` the layer scale if the
//!   family has one.
//!
//! In both the adapter acts on the sublayer's output (after the attention's output projection,
//! after the MLP's down-projection): before the residual sum, and under pre-LN also before the
//! layer scale, so a ViT adapter's update is scaled like the sublayer it adapts.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2, s};
use rand::rngs::StdRng;

use super::adapter::{Adapter, AdapterCache};
use super::build::{add_lora, add_weight_and_bias};
use super::pack::Packing;
use crate::error::Result;
use crate::layers::{
    AttentionCache, AttentionCore, LayerNorm, LayerNormCache, LayerScale, Linear, LinearCache,
    gelu_backward, gelu_forward,
};
use crate::method::{LoraTarget, Method};
use crate::params::{Grads, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

/// One encoder block.
#[derive(Debug, Clone)]
pub(super) struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    up: Linear,
    down: Linear,
    attn: Residual,
    ffn: Residual,
    core: AttentionCore,
}

/// The wrapping of one residual sublayer `f`: its LayerNorm, layer scale and adapter.
#[derive(Debug, Clone)]
struct Residual {
    ln: LayerNorm,
    /// Pre-LN (`x + ls ⊙ adapter(f(LN(x)))`) or post-LN (`LN(x + adapter(f(x)))`).
    pre_norm: bool,
    ls: Option<LayerScale>,
    adapter: Option<Adapter>,
}

/// What [`Residual::leave`]'s backward needs.
struct ResidualCache<T> {
    adapter: Option<AdapterCache<T>>,
    /// The sublayer's output before the layer scale, if the scale is trained.
    ls: Option<Array2<T>>,
    /// Post-LN only.
    ln: Option<LayerNormCache<T>>,
}

pub(super) struct BlockCache<T> {
    /// `Some(S)`: only every sample's first token was carried through (see
    /// [`Block::forward`]); the block's input had `S` tokens per sample.
    first_only: Option<usize>,
    attn_in: Option<LayerNormCache<T>>,
    q: LinearCache<T>,
    k: LinearCache<T>,
    v: LinearCache<T>,
    attn: AttentionCache<T>,
    o: LinearCache<T>,
    attn_out: ResidualCache<T>,
    ffn_in: Option<LayerNormCache<T>>,
    up: LinearCache<T>,
    u: Array2<T>,
    down: LinearCache<T>,
    ffn_out: ResidualCache<T>,
}

/// What loading every block of a tail shares.
pub(super) struct BlockSpec<'a> {
    pub weights: &'a FrozenWeights,
    pub method: &'a Method,
    /// The layers that get LoRA factors (empty unless the method is LoRA).
    pub lora_targets: &'a [LoraTarget],
    /// Hidden size.
    pub hidden: usize,
    /// Feed-forward size.
    pub inter: usize,
    pub heads: usize,
    pub ln_eps: f64,
    /// Pre-LN (ViT) rather than post-LN (BERT).
    pub pre_norm: bool,
    /// Whether the blocks have layer scales `blocks.{j}.ls1`, `ls2` (`[hidden]`).
    pub layer_scale: bool,
}

impl BlockSpec<'_> {
    /// Linear layer `{pre}` (`[out, in]` with a bias), plus LoRA if it is a target.
    fn linear<T: Real>(
        &self,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
        pre: &str,
        target: LoraTarget,
        out: usize,
        inp: usize,
    ) -> Result<Linear> {
        let weight = [Some(out), Some(inp)];
        let (w, b) = add_weight_and_bias(params, self.weights, self.method, pre, &weight, out)?;
        let lora = match self.method {
            Method::Lora(l) if self.lora_targets.contains(&target) => {
                Some(add_lora(params, rng, pre, out, inp, l)?)
            }
            _ => None,
        };
        Ok(Linear {
            w,
            b: Some(b),
            lora,
        })
    }

    /// LayerNorm `{pre}` over the hidden size (its shift trained under bias tuning).
    pub(super) fn layer_norm<T: Real>(
        &self,
        params: &mut ParamStore<T>,
        pre: &str,
    ) -> Result<LayerNorm> {
        let d = self.hidden;
        let (weight, bias) =
            add_weight_and_bias(params, self.weights, self.method, pre, &[Some(d)], d)?;
        Ok(LayerNorm {
            weight,
            bias,
            eps: self.ln_eps,
        })
    }

    /// The layer scale `{name}` (`[hidden]`, trained under full-tail), if the blocks have one.
    fn layer_scale<T: Real>(
        &self,
        params: &mut ParamStore<T>,
        name: &str,
    ) -> Result<Option<LayerScale>> {
        if !self.layer_scale {
            return Ok(None);
        }
        let gamma = self.weights.get(name, &[Some(self.hidden)])?;
        let full = matches!(self.method, Method::FullTail);
        Ok(Some(LayerScale {
            gamma: params.add(name, gamma, full)?,
        }))
    }

    /// The adapter `{pre}`, if the method adds adapters.
    fn adapter<T: Real>(
        &self,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
        pre: &str,
    ) -> Result<Option<Adapter>> {
        match self.method {
            Method::Adapter(a) => Ok(Some(Adapter::new(
                params,
                rng,
                pre,
                self.hidden,
                a.bottleneck,
            )?)),
            _ => Ok(None),
        }
    }
}

impl Block {
    /// Loads block `j` and adds what the method puts in it. The order in which tensors are
    /// added is the wire order of the trainable ones and the order of their random init.
    pub(super) fn load<T: Real>(
        spec: &BlockSpec<'_>,
        j: usize,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let (d, inter) = (spec.hidden, spec.inter);
        let pre = |name: &str| format!("blocks.{j}.{name}");
        let q = spec.linear(params, rng, &pre("attn.q"), LoraTarget::Q, d, d)?;
        let k = spec.linear(params, rng, &pre("attn.k"), LoraTarget::K, d, d)?;
        let v = spec.linear(params, rng, &pre("attn.v"), LoraTarget::V, d, d)?;
        let o = spec.linear(params, rng, &pre("attn.o"), LoraTarget::O, d, d)?;
        let ln1 = spec.layer_norm(params, &pre("ln1"))?;
        let ls1 = spec.layer_scale(params, &pre("ls1"))?;
        let up = spec.linear(params, rng, &pre("ffn.up"), LoraTarget::Up, inter, d)?;
        let down = spec.linear(params, rng, &pre("ffn.down"), LoraTarget::Down, d, inter)?;
        let ln2 = spec.layer_norm(params, &pre("ln2"))?;
        let ls2 = spec.layer_scale(params, &pre("ls2"))?;
        let adapter_attn = spec.adapter(params, rng, &pre("adapter_attn"))?;
        let adapter_ffn = spec.adapter(params, rng, &pre("adapter_ffn"))?;
        let residual = |ln, ls, adapter| Residual {
            ln,
            pre_norm: spec.pre_norm,
            ls,
            adapter,
        };
        Ok(Block {
            q,
            k,
            v,
            o,
            up,
            down,
            attn: residual(ln1, ls1, adapter_attn),
            ffn: residual(ln2, ls2, adapter_ffn),
            core: AttentionCore { heads: spec.heads },
        })
    }

    fn linears(&self) -> [&Linear; 6] {
        [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
    }

    pub(super) fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.linears().iter().any(|l| l.has_trainable(p))
            || self.attn.has_trainable(p)
            || self.ffn.has_trainable(p)
    }

    /// The block on `x: [B*S, D]` → `[B*S, D]`; with `first_only` → `[B, D]`, the output of
    /// every sample's first token alone. Every token's keys and values are still computed
    /// (the first token attends to all of them), but the query, the attention's output
    /// projection, the MLP, the adapters and the residuals run on one row per sample: exact,
    /// since nothing in a block mixes tokens but attention. A CLS-pooled tail's last block
    /// needs nothing else, which saves 4/5 of that block's FLOPs at 65 tokens.
    ///
    /// With `packing` (not with `first_only`), `x` holds only the real tokens' rows
    /// (`[N, D]`, see [`Packing`]) and so does the output; attention alone runs on the padded
    /// `[B*S, D]` layout.
    pub(super) fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: &Arc<Array2<T>>,
        key_bias: ArrayView2<'_, T>,
        mut rng: Option<&mut StdRng>,
        first_only: bool,
        packing: Option<&Packing>,
    ) -> (Array2<T>, BlockCache<T>) {
        debug_assert!(!(first_only && packing.is_some()));
        let s = key_bias.ncols();
        let (a, attn_in) = self.attn.enter(p, x);
        let (x_q, a_q) = if first_only {
            let first = |m: &Array2<T>| m.slice(s![..;s, ..]).to_owned();
            (Arc::new(first(x)), Arc::new(first(&a)))
        } else {
            (Arc::clone(x), Arc::clone(&a))
        };
        let (q, cq) = self.q.forward(p, &a_q, rng.as_deref_mut());
        drop(a_q);
        let (k, ck) = self.k.forward(p, &a, rng.as_deref_mut());
        let (v, cv) = self.v.forward(p, &a, rng.as_deref_mut());
        drop(a);
        let (ctx, attn) = match packing {
            Some(pk) => {
                let padded = |m: Array2<T>| pk.scatter(m.view());
                let (ctx, attn) = self.core.forward(padded(q), padded(k), padded(v), key_bias);
                (pk.gather(ctx.view()), attn)
            }
            None => self.core.forward(q, k, v, key_bias),
        };
        let (o, co) = self.o.forward(p, &Arc::new(ctx), rng.as_deref_mut());
        let (h, attn_out) = self.attn.leave(p, &x_q, o);
        drop(x_q);
        let h = Arc::new(h);
        let (b, ffn_in) = self.ffn.enter(p, &h);
        let (u, cup) = self.up.forward(p, &b, rng.as_deref_mut());
        drop(b);
        let g = Arc::new(gelu_forward(u.view()));
        let (d, cdown) = self.down.forward(p, &g, rng);
        drop(g);
        let (out, ffn_out) = self.ffn.leave(p, &h, d);
        (
            out,
            BlockCache {
                first_only: first_only.then_some(s),
                attn_in,
                q: cq,
                k: ck,
                v: cv,
                attn,
                o: co,
                attn_out,
                ffn_in,
                up: cup,
                u,
                down: cdown,
                ffn_out,
            },
        )
    }

    /// Backward from `dL/dout`: accumulates the block's gradients and returns `dL/dx` if
    /// `need_dx` (something trainable sits below).
    ///
    /// `packing` as in [`Self::forward`]: `dout` and `dL/dx` are the real tokens' rows.
    pub(super) fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: BlockCache<T>,
        dout: Array2<T>,
        grads: &mut Grads<T>,
        need_dx: bool,
        packing: Option<&Packing>,
    ) -> Option<Array2<T>> {
        // MLP sublayer: its input gradient is always needed (the attention sublayer's output
        // projection sits below it).
        let (dh, dd) = self.ffn.leave_backward(p, c.ffn_out, dout, grads);
        let dg = self
            .down
            .backward(p, c.down, dd.as_ref().unwrap_or(&dh).view(), grads, true)
            .expect("dx requested");
        drop(dd);
        let du = gelu_backward(c.u.view(), dg);
        // The MLP's pre-activation (`[rows, inter]`, the largest saved tensor) is not needed
        // below: freed now rather than at the end of the block's backward.
        drop(c.u);
        let db = self
            .up
            .backward(p, c.up, du.view(), grads, true)
            .expect("dx requested");
        let dh = self.ffn.enter_backward(p, c.ffn_in, dh, db, grads);
        // Attention sublayer.
        let (dx, do_) = self.attn.leave_backward(p, c.attn_out, dh, grads);
        let dctx = self
            .o
            .backward(p, c.o, do_.as_ref().unwrap_or(&dx).view(), grads, true)
            .expect("dx requested");
        drop(do_);
        let (dq, dk, dv) = match packing {
            Some(pk) => {
                let (dq, dk, dv) = self.core.backward(c.attn, pk.scatter(dctx.view()).view());
                drop(dctx);
                let real = |m: Array2<T>| pk.gather(m.view());
                (real(dq), real(dk), real(dv))
            }
            None => self.core.backward(c.attn, dctx.view()),
        };
        // The q, k, v input's gradient: for the block's input, or for a pre-LN's trained LN.
        // With `first_only` the query (and the residual) saw one row per sample: their
        // gradients land on those rows of the block's input.
        let need_da = need_dx || self.attn.entry_trained(p);
        let rows = dk.nrows();
        let mut da: Option<Array2<T>> = None;
        for (lin, cache, dy) in [(&self.q, c.q, dq), (&self.k, c.k, dk), (&self.v, c.v, dv)] {
            if !need_da && !lin.has_trainable(p) {
                continue;
            }
            if let Some(g) = lin.backward(p, cache, dy.view(), grads, need_da) {
                let g = spread_first(g, c.first_only, rows);
                match da.as_mut() {
                    Some(da) => *da += &g,
                    None => da = Some(g),
                }
            }
        }
        let da = da?;
        let dx = spread_first(dx, c.first_only, rows);
        let dx = self.attn.enter_backward(p, c.attn_in, dx, da, grads);
        need_dx.then_some(dx)
    }
}

/// `g` as the gradient of all `rows` rows: as it is, or (`first_only = Some(S)`) `g`'s row
/// `i` on row `i·S` and zeros elsewhere.
fn spread_first<T: Real>(g: Array2<T>, first_only: Option<usize>, rows: usize) -> Array2<T> {
    match first_only {
        Some(s) if g.nrows() != rows => {
            let mut all = Array2::zeros((rows, g.ncols()));
            all.slice_mut(s![..;s, ..]).assign(&g);
            all
        }
        _ => g,
    }
}

impl Residual {
    fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        p.trainable(self.ln.weight)
            || p.trainable(self.ln.bias)
            || self.ls.is_some_and(|ls| p.trainable(ls.gamma))
            || self.adapter.is_some()
    }

    /// Whether the sublayer's entry holds a trained tensor (a pre-LN's LayerNorm).
    fn entry_trained<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.pre_norm && (p.trainable(self.ln.weight) || p.trainable(self.ln.bias))
    }

    /// The sublayer's input: `LN(x)` (pre-LN) or `x` itself (post-LN).
    fn enter<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: &Arc<Array2<T>>,
    ) -> (Arc<Array2<T>>, Option<LayerNormCache<T>>) {
        if self.pre_norm {
            let (a, c) = self.ln.forward(p, x.view());
            (Arc::new(a), Some(c))
        } else {
            (Arc::clone(x), None)
        }
    }

    /// The block's stream after the sublayer, from its input `x` and the sublayer's output
    /// `f`: `x + ls ⊙ adapter(f)` (pre-LN) or `LN(x + adapter(f))` (post-LN).
    fn leave<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: &Array2<T>,
        f: Array2<T>,
    ) -> (Array2<T>, ResidualCache<T>) {
        let (f, adapter) = adapter_forward(self.adapter.as_ref(), p, f);
        let (mut sum, ls) = match &self.ls {
            Some(s) => s.forward(p, f),
            None => (f, None),
        };
        sum += x;
        let (out, ln) = if self.pre_norm {
            (sum, None)
        } else {
            let (y, c) = self.ln.forward(p, sum.view());
            (y, Some(c))
        };
        (out, ResidualCache { adapter, ls, ln })
    }

    /// Backward of [`Self::leave`]: the gradient of the residual input `x` and of the
    /// sublayer's output `f` (`None`: the same as `x`'s, no copy).
    fn leave_backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: ResidualCache<T>,
        dout: Array2<T>,
        grads: &mut Grads<T>,
    ) -> (Array2<T>, Option<Array2<T>>) {
        let dsum = match c.ln {
            Some(ln) => self.ln.backward(p, ln, dout.view(), grads),
            None => dout,
        };
        let df = self
            .ls
            .and_then(|s| s.backward(p, c.ls, dsum.view(), grads, true));
        let below = adapter_backward(
            self.adapter.as_ref(),
            c.adapter,
            p,
            df.as_ref().unwrap_or(&dsum),
            grads,
        );
        (dsum, below.or(df))
    }

    /// Backward of [`Self::enter`]: `dx` from the residual's gradient `dres` and the
    /// sublayer input's `din`.
    fn enter_backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: Option<LayerNormCache<T>>,
        mut dres: Array2<T>,
        din: Array2<T>,
        grads: &mut Grads<T>,
    ) -> Array2<T> {
        match c {
            Some(c) => dres += &self.ln.backward(p, c, din.view(), grads),
            None => dres += &din,
        }
        dres
    }
}

/// `h` through the adapter, if the block has one.
fn adapter_forward<T: Real>(
    adapter: Option<&Adapter>,
    p: &ParamStore<T>,
    h: Array2<T>,
) -> (Array2<T>, Option<AdapterCache<T>>) {
    match adapter {
        Some(a) => {
            let (h, c) = a.forward(p, h);
            (h, Some(c))
        }
        None => (h, None),
    }
}

/// The gradient below the adapter, if the block has one (`None`: `dy` passes unchanged).
fn adapter_backward<T: Real>(
    adapter: Option<&Adapter>,
    cache: Option<AdapterCache<T>>,
    p: &ParamStore<T>,
    dy: &Array2<T>,
    grads: &mut Grads<T>,
) -> Option<Array2<T>> {
    match (adapter, cache) {
        (Some(a), Some(c)) => Some(a.backward(p, c, dy.clone(), grads)),
        _ => None,
    }
}
