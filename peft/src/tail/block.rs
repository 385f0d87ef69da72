//! One post-LN BERT encoder block of the transformer tail: loading it from the frozen
//! weights with a method applied, forward and backward.

use std::sync::Arc;

use ndarray::{Array2, ArrayView2};
use rand::rngs::StdRng;

use super::adapter::{Adapter, AdapterCache};
use super::build::{add_lora, add_weight_and_bias};
use crate::error::Result;
use crate::layers::{
    AttentionCache, AttentionCore, LayerNorm, LayerNormCache, Linear, LinearCache, gelu_backward,
    gelu_forward,
};
use crate::method::{LoraTarget, Method};
use crate::params::{Grads, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

/// One post-LN BERT encoder block.
#[derive(Debug, Clone)]
pub(super) struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    up: Linear,
    down: Linear,
    ln2: LayerNorm,
    adapter_attn: Option<Adapter>,
    adapter_ffn: Option<Adapter>,
    core: AttentionCore,
}

pub(super) struct BlockCache<T> {
    q: LinearCache<T>,
    k: LinearCache<T>,
    v: LinearCache<T>,
    attn: AttentionCache<T>,
    o: LinearCache<T>,
    adapter_attn: Option<AdapterCache<T>>,
    ln1: LayerNormCache<T>,
    up: LinearCache<T>,
    u: Array2<T>,
    down: LinearCache<T>,
    adapter_ffn: Option<AdapterCache<T>>,
    ln2: LayerNormCache<T>,
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

    /// LayerNorm `{pre}` over the hidden size.
    fn layer_norm<T: Real>(&self, params: &mut ParamStore<T>, pre: &str) -> Result<LayerNorm> {
        let d = self.hidden;
        let (weight, bias) =
            add_weight_and_bias(params, self.weights, self.method, pre, &[Some(d)], d)?;
        Ok(LayerNorm {
            weight,
            bias,
            eps: self.ln_eps,
        })
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
        let up = spec.linear(params, rng, &pre("ffn.up"), LoraTarget::Up, inter, d)?;
        let down = spec.linear(params, rng, &pre("ffn.down"), LoraTarget::Down, d, inter)?;
        let ln2 = spec.layer_norm(params, &pre("ln2"))?;
        let adapter_attn = spec.adapter(params, rng, &pre("adapter_attn"))?;
        let adapter_ffn = spec.adapter(params, rng, &pre("adapter_ffn"))?;
        Ok(Block {
            q,
            k,
            v,
            o,
            ln1,
            up,
            down,
            ln2,
            adapter_attn,
            adapter_ffn,
            core: AttentionCore { heads: spec.heads },
        })
    }

    fn linears(&self) -> [&Linear; 6] {
        [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
    }

    pub(super) fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.linears().iter().any(|l| l.has_trainable(p))
            || [
                self.ln1.weight,
                self.ln1.bias,
                self.ln2.weight,
                self.ln2.bias,
            ]
            .iter()
            .any(|&id| p.trainable(id))
            || self.adapter_attn.is_some()
            || self.adapter_ffn.is_some()
    }

    pub(super) fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        x: &Arc<Array2<T>>,
        key_bias: ArrayView2<'_, T>,
        mut rng: Option<&mut StdRng>,
    ) -> (Array2<T>, BlockCache<T>) {
        let (q, cq) = self.q.forward(p, x, rng.as_deref_mut());
        let (k, ck) = self.k.forward(p, x, rng.as_deref_mut());
        let (v, cv) = self.v.forward(p, x, rng.as_deref_mut());
        let (ctx, attn) = self.core.forward(q, k, v, key_bias);
        let (o, co) = self.o.forward(p, &Arc::new(ctx), rng.as_deref_mut());
        let (o, adapter_attn) = adapter_forward(self.adapter_attn.as_ref(), p, o);
        let (a, ln1) = self.ln1.forward(p, (&**x + &o).view());
        drop(o);
        let a = Arc::new(a);
        let (u, cup) = self.up.forward(p, &a, rng.as_deref_mut());
        let g = Arc::new(gelu_forward(u.view()));
        let (d, cdown) = self.down.forward(p, &g, rng);
        drop(g);
        let (d, adapter_ffn) = adapter_forward(self.adapter_ffn.as_ref(), p, d);
        let mut res = d;
        res += &*a;
        let (out, ln2) = self.ln2.forward(p, res.view());
        (
            out,
            BlockCache {
                q: cq,
                k: ck,
                v: cv,
                attn,
                o: co,
                adapter_attn,
                ln1,
                up: cup,
                u,
                down: cdown,
                adapter_ffn,
                ln2,
            },
        )
    }

    pub(super) fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: BlockCache<T>,
        dout: ArrayView2<'_, T>,
        grads: &mut Grads<T>,
        need_dx: bool,
    ) -> Option<Array2<T>> {
        let dres = self.ln2.backward(p, c.ln2, dout, grads);
        // res = a + adapter(down(gelu(up(a))))
        // Without an adapter the residual branch's gradient is `dres` itself: no copy.
        let dd = adapter_backward(self.adapter_ffn.as_ref(), c.adapter_ffn, p, &dres, grads);
        let dg = self
            .down
            .backward(p, c.down, dd.as_ref().unwrap_or(&dres).view(), grads, true)
            .expect("dx requested");
        drop(dd);
        let du = gelu_backward(c.u.view(), dg);
        let mut da = dres;
        let da_ffn = self
            .up
            .backward(p, c.up, du.view(), grads, true)
            .expect("dx requested");
        da += &da_ffn;
        drop(da_ffn);
        // a = LN1(x + adapter(o(ctx)))
        let dsum = self.ln1.backward(p, c.ln1, da.view(), grads);
        let do_ = adapter_backward(self.adapter_attn.as_ref(), c.adapter_attn, p, &dsum, grads);
        let dctx = self
            .o
            .backward(p, c.o, do_.as_ref().unwrap_or(&dsum).view(), grads, true)
            .expect("dx requested");
        drop(do_);
        let (dq, dk, dv) = self.core.backward(c.attn, dctx.view());
        let mut dx = need_dx.then_some(dsum);
        for (lin, cache, dy) in [(&self.q, c.q, dq), (&self.k, c.k, dk), (&self.v, c.v, dv)] {
            if !need_dx && !lin.has_trainable(p) {
                continue;
            }
            if let Some(g) = lin.backward(p, cache, dy.view(), grads, need_dx) {
                *dx.as_mut().expect("need_dx") += &g;
            }
        }
        dx
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
