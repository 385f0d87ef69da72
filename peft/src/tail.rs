//! Tails: the two families assembled from [`crate::layers`], with a PEFT method applied.
//!
//! A [`PeftTail<T>`] owns every tensor in a [`ParamStore`] and a `Net` that says how they
//! are wired. Its generic methods (loss and gradients, logits) serve both training in `f32`
//! and gradient checks in `f64`; the object-safe [`crate::Tail`] trait is implemented for
//! `PeftTail<f32>` in `lib.rs`.

use std::sync::Arc;

use ndarray::{Array2, Array3, ArrayD, ArrayView2, Axis, Ix2, Ix3, Ix4, IxDyn, s};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::error::{PeftError, Result};
use crate::layers::{
    AttentionCache, AttentionCore, FoldedBn, LayerNorm, LayerNormCache, Linear, LinearCache,
    LoraParams, cross_entropy, gap_backward, gap_forward, gelu_backward, gelu_forward,
    masked_mean_backward, masked_mean_forward, mm_t, nchw_to_rows, relu6_backward, relu6_forward,
};
use crate::method::{Family, HeadInit, LoraTarget, Method, PeftConfig, TransformerSpec};
use crate::params::{Grads, ParamId, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

/// A batch of trunk activations.
#[derive(Debug, Clone)]
pub struct Batch<T = f32> {
    /// `[B, C, H, W]` (conv head) or `[B, S, D]` (transformer).
    pub features: ArrayD<T>,
    /// `[B, S]` attention mask, 1 for real tokens and 0 for padding (transformer only;
    /// `None` means every token is real).
    pub mask: Option<Array2<T>>,
    /// The part of the forward pass no trained tensor affects, for these samples, as
    /// [`PeftTail::frozen_prefix`] computed it; `None`: the forward pass computes it.
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

/// What a tail's frozen prefix holds (see [`PeftTail::frozen_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrozenPrefix {
    /// No tensor below the head is trained: `[B, F]`, the pooled features the head reads.
    Pooled,
    /// The conv head's weight is frozen (bias, LoRA): `[B, H*W, C_out]`, the product `x·Wᵀ`
    /// before its LoRA branch, BatchNorm and activation.
    ConvProduct,
}

fn frozen_prefix_kind<T: Real>(net: &Net, p: &ParamStore<T>) -> Option<FrozenPrefix> {
    if !body_trainable(net, p) {
        return Some(FrozenPrefix::Pooled);
    }
    match net {
        Net::Conv(c) if !p.trainable(c.conv.w) => Some(FrozenPrefix::ConvProduct),
        _ => None,
    }
}

/// Uniform(-bound, bound) init, as PyTorch's default `nn.Linear` / PEFT's LoRA A.
fn uniform<T: Real>(rng: &mut StdRng, shape: &[usize], bound: f64) -> ArrayD<T> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || T::lit(rng.random_range(-bound..bound)))
}

fn zeros<T: Real>(shape: &[usize]) -> ArrayD<T> {
    ArrayD::zeros(IxDyn(shape))
}

/// Adds LoRA factors to a linear layer named `prefix` (`[out, in]`).
fn add_lora<T: Real>(
    params: &mut ParamStore<T>,
    rng: &mut StdRng,
    prefix: &str,
    out: usize,
    inp: usize,
    cfg: &crate::method::LoraConfig,
) -> Result<LoraParams> {
    let bound = 1.0 / (inp as f64).sqrt();
    let a = params.add(
        &format!("{prefix}.lora_a"),
        uniform(rng, &[cfg.rank, inp], bound),
        true,
    )?;
    let b = params.add(&format!("{prefix}.lora_b"), zeros(&[out, cfg.rank]), true)?;
    Ok(LoraParams {
        a,
        b,
        scaling: cfg.alpha / cfg.rank as f64,
        dropout: cfg.dropout,
    })
}

/// A Houlsby adapter: `h + up(GELU(down(h)))`, `up` zero-initialised (identity at start).
#[derive(Debug, Clone)]
struct Adapter {
    down: Linear,
    up: Linear,
}

struct AdapterCache<T> {
    down: LinearCache<T>,
    z: Array2<T>,
    up: LinearCache<T>,
}

impl Adapter {
    fn new<T: Real>(
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
        prefix: &str,
        d: usize,
        m: usize,
    ) -> Result<Self> {
        let bound = 1.0 / (d as f64).sqrt();
        let dw = params.add(
            &format!("{prefix}.down.weight"),
            uniform(rng, &[m, d], bound),
            true,
        )?;
        let db = params.add(
            &format!("{prefix}.down.bias"),
            uniform(rng, &[m], bound),
            true,
        )?;
        let uw = params.add(&format!("{prefix}.up.weight"), zeros(&[d, m]), true)?;
        let ub = params.add(&format!("{prefix}.up.bias"), zeros(&[d]), true)?;
        Ok(Self {
            down: Linear {
                w: dw,
                b: Some(db),
                lora: None,
            },
            up: Linear {
                w: uw,
                b: Some(ub),
                lora: None,
            },
        })
    }

    fn forward<T: Real>(&self, p: &ParamStore<T>, h: Array2<T>) -> (Array2<T>, AdapterCache<T>) {
        let h = Arc::new(h);
        let (z, down) = self.down.forward(p, &h, None);
        let g = Arc::new(gelu_forward(z.view()));
        let (r, up) = self.up.forward(p, &g, None);
        let mut out = Arc::try_unwrap(h).unwrap_or_else(|a| (*a).clone());
        out += &r;
        (out, AdapterCache { down, z, up })
    }

    fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        c: AdapterCache<T>,
        dy: Array2<T>,
        grads: &mut Grads<T>,
    ) -> Array2<T> {
        let dg = self
            .up
            .backward(p, c.up, dy.view(), grads, true)
            .expect("dx requested");
        let dz = gelu_backward(c.z.view(), dg);
        let dh = self
            .down
            .backward(p, c.down, dz.view(), grads, true)
            .expect("dx requested");
        dy + dh
    }
}

/// One post-LN BERT encoder block.
#[derive(Debug, Clone)]
struct Block {
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

struct BlockCache<T> {
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

impl Block {
    fn linears(&self) -> [&Linear; 6] {
        [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
    }

    fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
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

    fn forward<T: Real>(
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
        let (o, adapter_attn) = match &self.adapter_attn {
            Some(a) => {
                let (o, c) = a.forward(p, o);
                (o, Some(c))
            }
            None => (o, None),
        };
        let (a, ln1) = self.ln1.forward(p, (&**x + &o).view());
        drop(o);
        let a = Arc::new(a);
        let (u, cup) = self.up.forward(p, &a, rng.as_deref_mut());
        let g = Arc::new(gelu_forward(u.view()));
        let (d, cdown) = self.down.forward(p, &g, rng);
        drop(g);
        let (d, adapter_ffn) = match &self.adapter_ffn {
            Some(ad) => {
                let (d, c) = ad.forward(p, d);
                (d, Some(c))
            }
            None => (d, None),
        };
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

    fn backward<T: Real>(
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
        let dd = match (&self.adapter_ffn, c.adapter_ffn) {
            (Some(ad), Some(ac)) => Some(ad.backward(p, ac, dres.clone(), grads)),
            _ => None,
        };
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
        let do_ = match (&self.adapter_attn, c.adapter_attn) {
            (Some(ad), Some(ac)) => Some(ad.backward(p, ac, dsum.clone(), grads)),
            _ => None,
        };
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

#[derive(Debug, Clone)]
struct ConvNet {
    conv: Linear,
    bn: FoldedBn,
    in_ch: usize,
}

#[derive(Debug, Clone)]
struct TransformerNet {
    blocks: Vec<Block>,
    prompt: Option<ParamId>,
    hidden: usize,
}

#[derive(Debug, Clone)]
enum Net {
    Conv(ConvNet),
    Transformer(TransformerNet),
}

/// Body cache (`None` when a pooled frozen prefix stood in for the body) plus the head's.
type FullCache<T> = (Option<Cache<T>>, LinearCache<T>);

enum Cache<T> {
    Conv {
        conv: LinearCache<T>,
        bn_x: Option<Array2<T>>,
        relu: Array2<T>,
        pixels: usize,
    },
    Transformer {
        blocks: Vec<BlockCache<T>>,
        pool_mask: Array2<T>,
        batch: usize,
        prompt: usize,
        seq: usize,
    },
}

/// A tail with a PEFT method applied, generic over `f32` (training) and `f64` (checks).
#[derive(Debug, Clone)]
pub struct PeftTail<T: Real = f32> {
    family: Family,
    config: PeftConfig,
    params: ParamStore<T>,
    net: Net,
    head: Linear,
    num_classes: usize,
    pub(crate) rng: StdRng,
    pub(crate) steps: u64,
}

fn unsupported(method: &Method, family: &Family, why: &str) -> PeftError {
    PeftError::Unsupported {
        method: method.name().into(),
        family: family.name().into(),
        why: why.into(),
    }
}

fn config_err(field: &str, why: impl Into<String>) -> PeftError {
    PeftError::Config {
        field: field.into(),
        why: why.into(),
    }
}

impl<T: Real> PeftTail<T> {
    /// Builds a tail of `family` from frozen weights (names and shapes as in the weights
    /// contract) and applies `config`'s PEFT method.
    pub fn build(family: Family, weights: &FrozenWeights, config: PeftConfig) -> Result<Self> {
        validate(&config)?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut params = ParamStore::new();
        let method = config.method.clone();
        let full = matches!(method, Method::FullTail);
        let bias = matches!(method, Method::Bias);
        let (net, feat_dim) = match &family {
            Family::ConvHead => {
                if matches!(method, Method::Adapter(_) | Method::Prompt(_)) {
                    return Err(unsupported(
                        &method,
                        &family,
                        "adapters and prompts need transformer blocks; use head, bias, lora or full-tail",
                    ));
                }
                let cw = weights.get::<T>("conv_head.weight", &[None, None])?;
                let (out, inp) = (cw.shape()[0], cw.shape()[1]);
                let conv_w = params.add("conv_head.weight", cw, full)?;
                let scale = params.add(
                    "bn_head.scale",
                    weights.get("bn_head.scale", &[Some(out)])?,
                    full,
                )?;
                let shift = params.add(
                    "bn_head.shift",
                    weights.get("bn_head.shift", &[Some(out)])?,
                    full || bias,
                )?;
                let lora = match &method {
                    Method::Lora(l) => {
                        let targets = if l.targets.is_empty() {
                            vec![LoraTarget::ConvHead]
                        } else {
                            l.targets.clone()
                        };
                        if let Some(t) = targets.iter().find(|&&t| t != LoraTarget::ConvHead) {
                            return Err(unsupported(
                                &method,
                                &family,
                                &format!(
                                    "LoRA target `{}` does not exist in a conv head (only conv_head)",
                                    t.as_str()
                                ),
                            ));
                        }
                        Some(add_lora(&mut params, &mut rng, "conv_head", out, inp, l)?)
                    }
                    _ => None,
                };
                (
                    Net::Conv(ConvNet {
                        conv: Linear {
                            w: conv_w,
                            b: None,
                            lora,
                        },
                        bn: FoldedBn { scale, shift },
                        in_ch: inp,
                    }),
                    out,
                )
            }
            Family::Transformer(spec) => {
                let net =
                    build_transformer(spec, weights, &method, &family, &mut params, &mut rng)?;
                let d = net.hidden;
                (Net::Transformer(net), d)
            }
        };
        let (head, num_classes) = match config.head {
            HeadInit::Fresh { num_classes } => {
                let bound = 1.0 / (feat_dim as f64).sqrt();
                let w = params.add(
                    "head.weight",
                    uniform(&mut rng, &[num_classes, feat_dim], bound),
                    true,
                )?;
                let b = params.add("head.bias", uniform(&mut rng, &[num_classes], bound), true)?;
                (
                    Linear {
                        w,
                        b: Some(b),
                        lora: None,
                    },
                    num_classes,
                )
            }
            HeadInit::Pretrained => {
                let w = weights.get::<T>("classifier.weight", &[None, Some(feat_dim)])?;
                let k = w.shape()[0];
                let w = params.add("head.weight", w, true)?;
                let b = params.add(
                    "head.bias",
                    weights.get("classifier.bias", &[Some(k)])?,
                    true,
                )?;
                (
                    Linear {
                        w,
                        b: Some(b),
                        lora: None,
                    },
                    k,
                )
            }
        };
        // Dropout gets its own stream so that changing it never shifts initialisation.
        let rng = StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15);
        Ok(Self {
            family,
            config,
            params,
            net,
            head,
            num_classes,
            rng,
            steps: 0,
        })
    }

    /// The family.
    pub fn family(&self) -> &Family {
        &self.family
    }

    /// The PEFT config.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// Number of classes of the head.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// All tensors.
    pub fn params(&self) -> &ParamStore<T> {
        &self.params
    }

    /// All tensors, mutably (gradient checks perturb them here).
    pub fn params_mut(&mut self) -> &mut ParamStore<T> {
        &mut self.params
    }

    /// Checks a batch against the tail's input shape.
    pub fn check_batch(&self, batch: &Batch<T>, labels: Option<&[usize]>) -> Result<()> {
        let shape = batch.features.shape();
        match &self.net {
            Net::Conv(c) => {
                if shape.len() != 4 || shape[1] != c.in_ch {
                    return Err(PeftError::Batch(format!(
                        "conv head expects features [B, {}, H, W], got {shape:?}",
                        c.in_ch
                    )));
                }
                if batch.mask.is_some() {
                    return Err(PeftError::Batch("conv head takes no attention mask".into()));
                }
            }
            Net::Transformer(t) => {
                if shape.len() != 3 || shape[2] != t.hidden {
                    return Err(PeftError::Batch(format!(
                        "transformer tail expects features [B, S, {}], got {shape:?}",
                        t.hidden
                    )));
                }
                if let Some(m) = &batch.mask
                    && m.dim() != (shape[0], shape[1])
                {
                    return Err(PeftError::Batch(format!(
                        "mask has shape {:?}, features need [{}, {}]",
                        m.shape(),
                        shape[0],
                        shape[1]
                    )));
                }
            }
        }
        if shape[0] == 0 {
            return Err(PeftError::Batch("empty batch".into()));
        }
        if let Some(f) = &batch.frozen {
            let want = match (frozen_prefix_kind(&self.net, &self.params), &self.net) {
                (None, _) => {
                    return Err(PeftError::Batch(format!(
                        "a frozen prefix was given, but {} trains the layer the features enter",
                        self.config.method.name()
                    )));
                }
                (Some(FrozenPrefix::Pooled), _) => {
                    vec![shape[0], self.params.w2(self.head.w).ncols()]
                }
                (Some(FrozenPrefix::ConvProduct), Net::Conv(c)) => vec![
                    shape[0],
                    shape[2] * shape[3],
                    self.params.w2(c.conv.w).nrows(),
                ],
                (Some(FrozenPrefix::ConvProduct), Net::Transformer(_)) => {
                    unreachable!("a conv product exists only in a conv head")
                }
            };
            if f.shape() != want.as_slice() {
                return Err(PeftError::Batch(format!(
                    "frozen prefix has shape {:?}, these features need {want:?}",
                    f.shape()
                )));
            }
        }
        if let Some(labels) = labels {
            if labels.len() != shape[0] {
                return Err(PeftError::Batch(format!(
                    "{} labels for {} samples",
                    labels.len(),
                    shape[0]
                )));
            }
            if let Some((index, &label)) = labels
                .iter()
                .enumerate()
                .find(|(_, l)| **l >= self.num_classes)
            {
                return Err(PeftError::Label {
                    index,
                    label,
                    num_classes: self.num_classes,
                });
            }
        }
        Ok(())
    }

    /// The part of the forward pass that no trained tensor affects, computed once for a set
    /// of samples so that training and evaluation skip it: the pooled features when only the
    /// head is trained, the conv head's product `x·Wᵀ` when its weight is frozen (bias, LoRA).
    /// `None` when the features enter a trained layer straight away (full-tail; bias, LoRA,
    /// adapters and prompts on a transformer). Put it in [`Batch::frozen`], row for row;
    /// logits and gradients are then those of the batch without it.
    pub fn frozen_prefix(&self, batch: &Batch<T>) -> Result<Option<ArrayD<T>>> {
        // A prefix already in the batch is neither checked nor used: this computes it anew.
        let stripped;
        let plain = if batch.frozen.is_some() {
            stripped = Batch::new(batch.features.clone(), batch.mask.clone());
            &stripped
        } else {
            batch
        };
        self.check_batch(plain, None)?;
        Ok(match frozen_prefix_kind(&self.net, &self.params) {
            None => None,
            Some(FrozenPrefix::Pooled) => {
                let (pooled, _) = body_forward(&self.net, &self.params, plain, None, false);
                Some(pooled.into_dyn())
            }
            Some(FrozenPrefix::ConvProduct) => {
                let Net::Conv(c) = &self.net else {
                    unreachable!("a conv product exists only in a conv head")
                };
                let x4 = plain
                    .features
                    .view()
                    .into_dimensionality::<Ix4>()
                    .expect("checked");
                let (b, _, h, w) = x4.dim();
                let product = mm_t(nchw_to_rows(x4).view(), self.params.w2(c.conv.w));
                let out = product.ncols();
                Some(
                    product
                        .into_shape_with_order((b, h * w, out))
                        .expect("rows are B*H*W")
                        .into_dyn(),
                )
            }
        })
    }

    /// Logits in evaluation mode (no dropout, no caches kept).
    pub fn logits(&self, batch: &Batch<T>) -> Result<Array2<T>> {
        self.check_batch(batch, None)?;
        let (logits, _) = forward(&self.net, &self.head, &self.params, batch, None, false);
        Ok(logits)
    }

    /// Mean cross-entropy loss in evaluation mode.
    pub fn loss(&self, batch: &Batch<T>, labels: &[usize]) -> Result<f64> {
        self.check_batch(batch, Some(labels))?;
        let logits = self.logits(batch)?;
        Ok(cross_entropy(logits.view(), labels).0)
    }

    /// Loss, correct count and gradients of the trainable tensors. `train` enables dropout
    /// (drawn from the tail's own seeded stream).
    pub fn loss_and_grads(
        &mut self,
        batch: &Batch<T>,
        labels: &[usize],
        train: bool,
    ) -> Result<(f64, usize, Grads<T>)> {
        let mut grads = Grads::zeros_like(&self.params);
        let (loss, correct) = self.accumulate_grads(batch, labels, train, &mut grads)?;
        Ok((loss, correct, grads))
    }

    /// Like [`Self::loss_and_grads`] but adds into existing gradients.
    pub fn accumulate_grads(
        &mut self,
        batch: &Batch<T>,
        labels: &[usize],
        train: bool,
        grads: &mut Grads<T>,
    ) -> Result<(f64, usize)> {
        self.check_batch(batch, Some(labels))?;
        let rng = train.then_some(&mut self.rng);
        let (logits, cache) = forward(&self.net, &self.head, &self.params, batch, rng, true);
        let (loss, dlogits, correct) = cross_entropy(logits.view(), labels);
        backward(
            &self.net,
            &self.head,
            &self.params,
            cache.expect("cache kept"),
            dlogits,
            grads,
        );
        Ok((loss, correct))
    }
}

fn validate(config: &PeftConfig) -> Result<()> {
    if let HeadInit::Fresh { num_classes } = config.head
        && num_classes < 2
    {
        return Err(config_err(
            "num_classes",
            format!("need at least 2 classes, got {num_classes}"),
        ));
    }
    match &config.method {
        Method::Lora(l) => {
            if l.rank == 0 {
                return Err(config_err("lora.rank", "must be at least 1"));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return Err(config_err(
                    "lora.alpha",
                    format!("must be positive, got {}", l.alpha),
                ));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(config_err(
                    "lora.dropout",
                    format!("must be in [0, 1), got {}", l.dropout),
                ));
            }
        }
        Method::Adapter(a) if a.bottleneck == 0 => {
            return Err(config_err("adapter.bottleneck", "must be at least 1"));
        }
        Method::Prompt(p) if p.tokens == 0 => {
            return Err(config_err("prompt.tokens", "must be at least 1"));
        }
        _ => {}
    }
    Ok(())
}

fn build_transformer<T: Real>(
    spec: &TransformerSpec,
    weights: &FrozenWeights,
    method: &Method,
    family: &Family,
    params: &mut ParamStore<T>,
    rng: &mut StdRng,
) -> Result<TransformerNet> {
    let full = matches!(method, Method::FullTail);
    let bias = matches!(method, Method::Bias);
    let mut k = 0;
    while weights.contains(&format!("blocks.{k}.attn.q.weight")) {
        k += 1;
    }
    if k == 0 {
        return Err(PeftError::MissingWeight {
            name: "blocks.0.attn.q.weight".into(),
            source_desc: weights.source().into(),
        });
    }
    let d = weights.shape("blocks.0.attn.q.weight").expect("checked")[0];
    if spec.heads == 0 || d % spec.heads != 0 {
        return Err(config_err(
            "heads",
            format!("hidden size {d} is not divisible by {} heads", spec.heads),
        ));
    }
    let inter =
        weights
            .shape("blocks.0.ffn.up.weight")
            .ok_or_else(|| PeftError::MissingWeight {
                name: "blocks.0.ffn.up.weight".into(),
                source_desc: weights.source().into(),
            })?[0];
    let targets = match method {
        Method::Lora(l) => {
            let t = if l.targets.is_empty() {
                vec![LoraTarget::Q, LoraTarget::V]
            } else {
                l.targets.clone()
            };
            if t.contains(&LoraTarget::ConvHead) {
                return Err(unsupported(
                    method,
                    family,
                    "LoRA target `conv_head` exists only in the conv head family",
                ));
            }
            t
        }
        _ => Vec::new(),
    };
    let prompt = match method {
        Method::Prompt(p) => {
            let normal = Normal::new(0.0, 0.02).expect("valid std");
            let tokens =
                ArrayD::from_shape_simple_fn(IxDyn(&[p.tokens, d]), || T::lit(normal.sample(rng)));
            Some(params.add("prompt.tokens", tokens, true)?)
        }
        _ => None,
    };
    let mut blocks = Vec::with_capacity(k);
    for j in 0..k {
        let lin = |params: &mut ParamStore<T>,
                   rng: &mut StdRng,
                   name: &str,
                   target: LoraTarget,
                   out: usize,
                   inp: usize|
         -> Result<Linear> {
            let pre = format!("blocks.{j}.{name}");
            let w = params.add(
                &format!("{pre}.weight"),
                weights.get(&format!("{pre}.weight"), &[Some(out), Some(inp)])?,
                full,
            )?;
            let b = params.add(
                &format!("{pre}.bias"),
                weights.get(&format!("{pre}.bias"), &[Some(out)])?,
                full || bias,
            )?;
            let lora = match method {
                Method::Lora(l) if targets.contains(&target) => {
                    Some(add_lora(params, rng, &pre, out, inp, l)?)
                }
                _ => None,
            };
            Ok(Linear {
                w,
                b: Some(b),
                lora,
            })
        };
        let q = lin(params, rng, "attn.q", LoraTarget::Q, d, d)?;
        let kk = lin(params, rng, "attn.k", LoraTarget::K, d, d)?;
        let v = lin(params, rng, "attn.v", LoraTarget::V, d, d)?;
        let o = lin(params, rng, "attn.o", LoraTarget::O, d, d)?;
        let ln = |params: &mut ParamStore<T>, name: &str| -> Result<LayerNorm> {
            let pre = format!("blocks.{j}.{name}");
            let weight = params.add(
                &format!("{pre}.weight"),
                weights.get(&format!("{pre}.weight"), &[Some(d)])?,
                full,
            )?;
            let b = params.add(
                &format!("{pre}.bias"),
                weights.get(&format!("{pre}.bias"), &[Some(d)])?,
                full || bias,
            )?;
            Ok(LayerNorm {
                weight,
                bias: b,
                eps: spec.ln_eps,
            })
        };
        let ln1 = ln(params, "ln1")?;
        let up = lin(params, rng, "ffn.up", LoraTarget::Up, inter, d)?;
        let down = lin(params, rng, "ffn.down", LoraTarget::Down, d, inter)?;
        let ln2 = ln(params, "ln2")?;
        let (adapter_attn, adapter_ffn) = match method {
            Method::Adapter(a) => (
                Some(Adapter::new(
                    params,
                    rng,
                    &format!("blocks.{j}.adapter_attn"),
                    d,
                    a.bottleneck,
                )?),
                Some(Adapter::new(
                    params,
                    rng,
                    &format!("blocks.{j}.adapter_ffn"),
                    d,
                    a.bottleneck,
                )?),
            ),
            _ => (None, None),
        };
        blocks.push(Block {
            q,
            k: kk,
            v,
            o,
            ln1,
            up,
            down,
            ln2,
            adapter_attn,
            adapter_ffn,
            core: AttentionCore { heads: spec.heads },
        });
    }
    Ok(TransformerNet {
        blocks,
        prompt,
        hidden: d,
    })
}

/// Forward pass. With `keep_cache` false nothing is kept for backward (evaluation).
fn forward<T: Real>(
    net: &Net,
    head: &Linear,
    p: &ParamStore<T>,
    batch: &Batch<T>,
    mut rng: Option<&mut StdRng>,
    keep_cache: bool,
) -> (Array2<T>, Option<FullCache<T>>) {
    let (pooled, cache) = match (&batch.frozen, frozen_prefix_kind(net, p)) {
        (Some(f), Some(FrozenPrefix::Pooled)) => {
            let pooled = f.view().into_dimensionality::<Ix2>().expect("checked");
            (pooled.to_owned(), None)
        }
        _ => body_forward(net, p, batch, rng.as_deref_mut(), keep_cache),
    };
    let pooled = Arc::new(pooled);
    let (logits, hc) = head.forward(p, &pooled, rng);
    (logits, keep_cache.then_some((cache, hc)))
}

/// Everything below the head: pooled features `[B, F]`, and the body's cache if kept.
fn body_forward<T: Real>(
    net: &Net,
    p: &ParamStore<T>,
    batch: &Batch<T>,
    mut rng: Option<&mut StdRng>,
    keep_cache: bool,
) -> (Array2<T>, Option<Cache<T>>) {
    let b = batch.len();
    match net {
        Net::Conv(c) => {
            let x4 = batch
                .features
                .view()
                .into_dimensionality::<Ix4>()
                .expect("checked");
            let (_, _, h, w) = x4.dim();
            let (y, conv) = match &batch.frozen {
                // The frozen product stands in for `x·Wᵀ`; the input rows are still needed
                // by a LoRA branch.
                Some(f) => {
                    let product = f
                        .view()
                        .into_shape_with_order((b * h * w, f.shape()[2]))
                        .expect("checked")
                        .to_owned();
                    let rows = c.conv.lora.is_some().then(|| Arc::new(nchw_to_rows(x4)));
                    c.conv
                        .forward_from_product(p, rows.as_ref(), product, rng.as_deref_mut())
                }
                None => {
                    let rows = Arc::new(nchw_to_rows(x4));
                    c.conv.forward(p, &rows, rng.as_deref_mut())
                }
            };
            let (z, bn_x) = c.bn.forward(p, y);
            let r = relu6_forward(z);
            let pooled = gap_forward(r.view(), b);
            let cache = keep_cache.then_some(Cache::Conv {
                conv,
                bn_x,
                relu: r,
                pixels: h * w,
            });
            (pooled, cache)
        }
        Net::Transformer(t) => {
            let x3 = batch
                .features
                .view()
                .into_dimensionality::<Ix3>()
                .expect("checked");
            let (_, seq, d) = x3.dim();
            let np = t.prompt.map(|id| p.param(id).value.shape()[0]).unwrap_or(0);
            let s_all = np + seq;
            // Prompt tokens are prepended to every sample; they are always attended to but
            // are left out of the mean pooling, so the pooled sentence embedding stays an
            // average over the real tokens.
            let mut x = Array3::<T>::zeros((b, s_all, d));
            if let Some(id) = t.prompt {
                let pt = p.w2(id);
                for bi in 0..b {
                    x.slice_mut(s![bi, ..np, ..]).assign(&pt);
                }
            }
            x.slice_mut(s![.., np.., ..]).assign(&x3);
            let mut pool_mask = Array2::<T>::zeros((b, s_all));
            match &batch.mask {
                Some(m) => pool_mask.slice_mut(s![.., np..]).assign(m),
                None => pool_mask.slice_mut(s![.., np..]).fill(T::one()),
            }
            let mut key_bias = Array2::<T>::zeros((b, s_all));
            key_bias
                .slice_mut(s![.., np..])
                .zip_mut_with(&pool_mask.slice(s![.., np..]), |kb, &m| {
                    *kb = (T::one() - m) * T::mask_bias()
                });
            let mut h = Arc::new(x.into_shape_with_order((b * s_all, d)).expect("contiguous"));
            let mut caches = Vec::new();
            for blk in &t.blocks {
                let (out, c) = blk.forward(p, &h, key_bias.view(), rng.as_deref_mut());
                if keep_cache {
                    caches.push(c);
                }
                h = Arc::new(out);
            }
            let pooled = masked_mean_forward(h.view(), pool_mask.view());
            let cache = keep_cache.then_some(Cache::Transformer {
                blocks: caches,
                pool_mask,
                batch: b,
                prompt: np,
                seq,
            });
            (pooled, cache)
        }
    }
}

/// Whether any tensor of the body (everything below the head) is trained.
fn body_trainable<T: Real>(net: &Net, p: &ParamStore<T>) -> bool {
    match net {
        Net::Conv(c) => {
            c.conv.has_trainable(p) || p.trainable(c.bn.scale) || p.trainable(c.bn.shift)
        }
        Net::Transformer(t) => {
            t.prompt.is_some_and(|id| p.trainable(id))
                || t.blocks.iter().any(|b| b.has_trainable(p))
        }
    }
}

/// Backward pass from `dL/dlogits`, accumulating into `grads`. Gradients flow only as far
/// down as the lowest trained tensor.
fn backward<T: Real>(
    net: &Net,
    head: &Linear,
    p: &ParamStore<T>,
    cache: FullCache<T>,
    dlogits: Array2<T>,
    grads: &mut Grads<T>,
) {
    let (body, hc) = cache;
    let need_body = body_trainable(net, p);
    let dpooled = head.backward(p, hc, dlogits.view(), grads, need_body);
    let Some(dpooled) = dpooled else { return };
    let body = body.expect("a trained body keeps its cache");
    match (net, body) {
        (
            Net::Conv(c),
            Cache::Conv {
                conv,
                bn_x,
                relu,
                pixels,
            },
        ) => {
            let dr = gap_backward(dpooled.view(), pixels);
            let dz = relu6_backward(relu.view(), dr);
            let need_conv = c.conv.has_trainable(p);
            if let Some(dy) = c.bn.backward(p, bn_x, dz.view(), grads, need_conv) {
                c.conv.backward(p, conv, dy.view(), grads, false);
            }
        }
        (
            Net::Transformer(t),
            Cache::Transformer {
                blocks,
                pool_mask,
                batch,
                prompt,
                seq,
            },
        ) => {
            let prompt_trained = t.prompt.is_some_and(|id| p.trainable(id));
            // need_below[j]: something trainable sits below block j.
            let mut need_below = vec![prompt_trained; t.blocks.len()];
            for j in 1..t.blocks.len() {
                need_below[j] = need_below[j - 1] || t.blocks[j - 1].has_trainable(p);
            }
            let mut dh = masked_mean_backward(dpooled.view(), pool_mask.view());
            for (j, (blk, c)) in t.blocks.iter().zip(blocks).enumerate().rev() {
                match blk.backward(p, c, dh.view(), grads, need_below[j]) {
                    Some(d) => dh = d,
                    None => return,
                }
            }
            if let Some(id) = t.prompt
                && grads.wants(id)
            {
                let d = t.hidden;
                let dx = dh
                    .into_shape_with_order((batch, prompt + seq, d))
                    .expect("rows are B*S");
                let g = dx.slice(s![.., ..prompt, ..]).sum_axis(Axis(0));
                grads.acc2(id, g.view());
            }
        }
        _ => unreachable!("cache matches the net"),
    }
}
