//! The two families built of transformer blocks (see `block.rs`):
//! - `transformer` (MiniLM / BERT): the last post-LN encoder blocks and masked mean pooling;
//! - `vit` (DINOv2): the last pre-LN blocks with layer scale, the final LayerNorm, and the CLS
//!   token (or the mean over tokens) under the classifier.
//!
//! The `prompt` method's learned tokens join the sequence at the first block of the tail: in
//! front of every token for `transformer`, right after the CLS token for `vit` (as VPT does:
//! `[CLS, P_1..P_p, patches]`, so the CLS token stays at position 0 where the classifier reads
//! it). Every token attends to them in every block; mean pooling leaves them out.

use std::sync::Arc;

use ndarray::{
    Array2, Array3, ArrayD, ArrayView, ArrayView2, ArrayViewMut, Axis, Dimension, Ix3, IxDyn, s,
};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use super::batch::Batch;
use super::block::{Block, BlockCache, BlockSpec};
use super::build::{config_err, unsupported};
use super::pack::Packing;
use crate::error::{PeftError, Result};
use crate::layers::{LayerNorm, LayerNormCache, masked_mean_backward, masked_mean_forward};
use crate::method::{Family, LoraTarget, Method, Pool};
use crate::params::{Grads, ParamId, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

#[derive(Debug, Clone)]
pub(super) struct TransformerNet {
    /// The family's name, for error messages.
    family: &'static str,
    blocks: Vec<Block>,
    prompt: Option<ParamId>,
    /// The LayerNorm over every token after the last block (ViT's `final_ln`).
    final_ln: Option<LayerNorm>,
    pool: Pool,
    /// Where prompt tokens go: before token `prompt_at` of the trunk's tokens.
    prompt_at: usize,
    /// Whether a batch may carry an attention mask (BERT's padding; a ViT has none).
    takes_mask: bool,
    /// Hidden size (the features the head reads).
    pub(super) hidden: usize,
}

pub(super) struct TransformerCache<T> {
    blocks: Vec<BlockCache<T>>,
    final_ln: Option<LayerNormCache<T>>,
    pool_mask: Array2<T>,
    /// The real tokens the blocks ran on, if the batch had padding (mean pooling only).
    packing: Option<Packing>,
    batch: usize,
    prompt: usize,
    seq: usize,
}

/// How a family lays its blocks out: what tells a ViT tail from a BERT one.
struct Layout {
    heads: usize,
    ln_eps: f64,
    pre_norm: bool,
    layer_scale: bool,
    final_ln: bool,
    pool: Pool,
    prompt_at: usize,
    takes_mask: bool,
    /// The number of blocks the weights must hold (`None`: as many as they do).
    blocks: Option<usize>,
}

impl Layout {
    fn of(family: &Family) -> Self {
        match family {
            Family::Transformer(spec) => Layout {
                heads: spec.heads,
                ln_eps: spec.ln_eps,
                pre_norm: false,
                layer_scale: false,
                final_ln: false,
                pool: Pool::MaskedMean,
                prompt_at: 0,
                takes_mask: true,
                blocks: None,
            },
            Family::Vit(spec) => Layout {
                heads: spec.heads,
                ln_eps: spec.ln_eps,
                pre_norm: true,
                layer_scale: true,
                final_ln: true,
                pool: spec.pool,
                prompt_at: 1,
                takes_mask: false,
                blocks: Some(spec.k),
            },
            Family::ConvHead => unreachable!("a conv head has no transformer blocks"),
        }
    }
}

impl TransformerNet {
    /// Loads the blocks `blocks.{j}.*` present in the weights (and a ViT's `final_ln`) and
    /// applies `method`.
    pub(super) fn build<T: Real>(
        family: &Family,
        weights: &FrozenWeights,
        method: &Method,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
    ) -> Result<Self> {
        let layout = Layout::of(family);
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
        if let Some(want) = layout.blocks
            && want != k
        {
            return Err(config_err(
                "k",
                format!(
                    "the {} tail has k = {want} blocks, {} holds {k} (blocks.0 to blocks.{})",
                    family.name(),
                    weights.source(),
                    k - 1
                ),
            ));
        }
        let d = weights.shape("blocks.0.attn.q.weight").expect("checked")[0];
        if layout.heads == 0 || d % layout.heads != 0 {
            return Err(config_err(
                "heads",
                format!("hidden size {d} is not divisible by {} heads", layout.heads),
            ));
        }
        let inter =
            weights
                .shape("blocks.0.ffn.up.weight")
                .ok_or_else(|| PeftError::MissingWeight {
                    name: "blocks.0.ffn.up.weight".into(),
                    source_desc: weights.source().into(),
                })?[0];
        let lora_targets = lora_targets(method, family)?;
        let prompt = match method {
            Method::Prompt(p) => {
                let normal = Normal::new(0.0, 0.02).expect("valid std");
                let tokens = ArrayD::from_shape_simple_fn(IxDyn(&[p.tokens, d]), || {
                    T::lit(normal.sample(rng))
                });
                Some(params.add("prompt.tokens", tokens, true)?)
            }
            _ => None,
        };
        let block_spec = BlockSpec {
            weights,
            method,
            lora_targets: &lora_targets,
            hidden: d,
            inter,
            heads: layout.heads,
            ln_eps: layout.ln_eps,
            pre_norm: layout.pre_norm,
            layer_scale: layout.layer_scale,
        };
        let mut blocks = Vec::with_capacity(k);
        for j in 0..k {
            blocks.push(Block::load(&block_spec, j, params, rng)?);
        }
        let final_ln = if layout.final_ln {
            Some(block_spec.layer_norm(params, "final_ln")?)
        } else {
            None
        };
        Ok(TransformerNet {
            family: family.name(),
            blocks,
            prompt,
            final_ln,
            pool: layout.pool,
            prompt_at: layout.prompt_at,
            takes_mask: layout.takes_mask,
            hidden: d,
        })
    }

    /// Whether any tensor below the head is trained.
    pub(super) fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.prompt.is_some_and(|id| p.trainable(id))
            || self.blocks.iter().any(|b| b.has_trainable(p))
            || self
                .final_ln
                .as_ref()
                .is_some_and(|ln| p.trainable(ln.weight) || p.trainable(ln.bias))
    }

    /// Checks the features (`[B, S, D]`) and the mask's shape.
    pub(super) fn check_features<T: Real>(&self, batch: &Batch<T>) -> Result<()> {
        let shape = batch.features.shape();
        if shape.len() != 3 || shape[2] != self.hidden {
            return Err(PeftError::Batch(format!(
                "{} tail expects features [B, S, {}], got {shape:?}",
                self.family, self.hidden
            )));
        }
        if self.pool == Pool::Cls && shape[1] == 0 {
            return Err(PeftError::Batch(format!(
                "{} tail reads the CLS token, the features have no token",
                self.family
            )));
        }
        match &batch.mask {
            Some(_) if !self.takes_mask => Err(PeftError::Batch(format!(
                "{} tail reads unpadded tokens; the batch has an attention mask",
                self.family
            ))),
            Some(m) if m.dim() != (shape[0], shape[1]) => Err(PeftError::Batch(format!(
                "mask has shape {:?}, features need [{}, {}]",
                m.shape(),
                shape[0],
                shape[1]
            ))),
            _ => Ok(()),
        }
    }

    /// Pooled features `[B, D]`, and the cache if kept.
    pub(super) fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        batch: &Batch<T>,
        mut rng: Option<&mut StdRng>,
        keep_cache: bool,
    ) -> (Array2<T>, Option<TransformerCache<T>>) {
        let (x, pool_mask, key_bias) = self.inputs(p, batch);
        let (b, s_all, d) = x.dim();
        let np = self.prompt_len(p);
        let x = x.into_shape_with_order((b * s_all, d)).expect("contiguous");
        // Padding left out of the row-wise layers (exact; see `pack.rs`): mean pooling only,
        // the CLS-only last block has its own row selection.
        let packing = match self.pool {
            Pool::MaskedMean => Packing::from_masks(key_bias.view(), pool_mask.view()),
            Pool::Cls => None,
        };
        let mut h = Arc::new(match &packing {
            Some(pk) => pk.gather(x.view()),
            None => x,
        });
        let mut caches = Vec::new();
        let last = self.blocks.len() - 1;
        for (j, blk) in self.blocks.iter().enumerate() {
            // The classifier reads the CLS token alone: the last block computes no other.
            let first_only = self.pool == Pool::Cls && j == last;
            let (out, c) = blk.forward(
                p,
                &h,
                key_bias.view(),
                rng.as_deref_mut(),
                first_only,
                packing.as_ref(),
            );
            if keep_cache {
                caches.push(c);
            }
            h = Arc::new(out);
        }
        let final_ln = self.final_ln.as_ref().map(|ln| ln.forward(p, h.view()));
        let tokens = final_ln.as_ref().map_or(h.view(), |(y, _)| y.view());
        let pooled = match &packing {
            Some(pk) => self.pool_forward(pk.scatter(tokens).view(), pool_mask.view()),
            None => self.pool_forward(tokens, pool_mask.view()),
        };
        let cache = keep_cache.then(|| TransformerCache {
            blocks: caches,
            final_ln: final_ln.map(|(_, c)| c),
            pool_mask,
            packing,
            batch: b,
            prompt: np,
            seq: s_all - np,
        });
        (pooled, cache)
    }

    /// Number of prompt tokens (0 without a prompt).
    fn prompt_len<T: Real>(&self, p: &ParamStore<T>) -> usize {
        self.prompt
            .map(|id| p.param(id).value.shape()[0])
            .unwrap_or(0)
    }

    /// The first block's input `[B, P+S, D]` (the `P` prompt tokens from `prompt_at`), the
    /// pooling mask and the attention's key bias, both `[B, P+S]`.
    fn inputs<T: Real>(
        &self,
        p: &ParamStore<T>,
        batch: &Batch<T>,
    ) -> (Array3<T>, Array2<T>, Array2<T>) {
        let x3 = batch
            .features
            .view()
            .into_dimensionality::<Ix3>()
            .expect("checked");
        let (b, seq, d) = x3.dim();
        let (at, np) = (self.prompt_at, self.prompt_len(p));
        let s_all = np + seq;
        let prompt = s![.., at..at + np];
        let mut x = Array3::<T>::zeros((b, s_all, d));
        if let Some(id) = self.prompt {
            x.slice_mut(s![.., at..at + np, ..]).assign(&p.w2(id));
        }
        assign_around_prompt(x.view_mut(), x3, at, np);
        // Prompt tokens are always attended to but are left out of the mean pooling, so the
        // pooled embedding stays an average over the real tokens.
        let mut attended = Array2::<T>::ones((b, s_all));
        if let Some(m) = &batch.mask {
            assign_around_prompt(attended.view_mut(), m.view(), at, np);
        }
        let key_bias = attended.mapv(|m| (T::one() - m) * T::mask_bias());
        let mut pool_mask = attended;
        pool_mask.slice_mut(prompt).fill(T::zero());
        (x, pool_mask, key_bias)
    }

    /// `[B, D]` from the last tokens: `[B*S, D]` for a mean, `[B, D]` already for the CLS
    /// token (the last block computed no other).
    fn pool_forward<T: Real>(
        &self,
        tokens: ArrayView2<'_, T>,
        pool_mask: ArrayView2<'_, T>,
    ) -> Array2<T> {
        match self.pool {
            Pool::MaskedMean => masked_mean_forward(tokens, pool_mask),
            Pool::Cls => tokens.to_owned(),
        }
    }

    /// Backward of [`Self::pool_forward`].
    fn pool_backward<T: Real>(
        &self,
        dpooled: ArrayView2<'_, T>,
        pool_mask: ArrayView2<'_, T>,
    ) -> Array2<T> {
        match self.pool {
            Pool::MaskedMean => masked_mean_backward(dpooled, pool_mask),
            Pool::Cls => dpooled.to_owned(),
        }
    }

    /// Backward from `dL/dpooled` down to the lowest trained block (or the prompt).
    pub(super) fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        cache: TransformerCache<T>,
        dpooled: Array2<T>,
        grads: &mut Grads<T>,
    ) {
        let prompt_trained = self.prompt.is_some_and(|id| p.trainable(id));
        // need_below[j]: something trainable sits below block j.
        let mut need_below = vec![prompt_trained; self.blocks.len()];
        for j in 1..self.blocks.len() {
            need_below[j] = need_below[j - 1] || self.blocks[j - 1].has_trainable(p);
        }
        let packing = cache.packing.as_ref();
        let mut dh = self.pool_backward(dpooled.view(), cache.pool_mask.view());
        if let Some(pk) = packing {
            dh = pk.gather(dh.view());
        }
        if let (Some(ln), Some(c)) = (&self.final_ln, cache.final_ln) {
            dh = ln.backward(p, c, dh.view(), grads);
        }
        for (j, (blk, c)) in self.blocks.iter().zip(cache.blocks).enumerate().rev() {
            match blk.backward(p, c, dh, grads, need_below[j], packing) {
                Some(d) => dh = d,
                None => return,
            }
        }
        if let Some(pk) = packing {
            dh = pk.scatter(dh.view());
        }
        if let Some(id) = self.prompt
            && grads.wants(id)
        {
            let (d, at) = (self.hidden, self.prompt_at);
            let dx = dh
                .into_shape_with_order((cache.batch, cache.prompt + cache.seq, d))
                .expect("rows are B*S");
            let g = dx
                .slice(s![.., at..at + cache.prompt, ..])
                .sum_axis(Axis(0));
            grads.acc2(id, g.view());
        }
    }
}

/// Copies `src`'s tokens (axis 1) into `dst`'s around the `np` positions from `at` that the
/// prompt tokens take.
fn assign_around_prompt<T: Real, D: Dimension>(
    mut dst: ArrayViewMut<'_, T, D>,
    src: ArrayView<'_, T, D>,
    at: usize,
    np: usize,
) {
    let at = at.min(src.len_of(Axis(1)));
    dst.slice_axis_mut(Axis(1), (..at).into())
        .assign(&src.slice_axis(Axis(1), (..at).into()));
    dst.slice_axis_mut(Axis(1), (at + np..).into())
        .assign(&src.slice_axis(Axis(1), (at..).into()));
}

/// The layers LoRA targets (Q and V unless the config names others).
fn lora_targets(method: &Method, family: &Family) -> Result<Vec<LoraTarget>> {
    Ok(match method {
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
    })
}
