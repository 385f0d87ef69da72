//! The transformer family (MiniLM / ViT style): the last post-LN encoder blocks, optional
//! prompt tokens prepended to the sequence, and masked mean pooling under the classifier.

use std::sync::Arc;

use ndarray::{Array2, Array3, ArrayD, Axis, Ix3, IxDyn, s};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use super::batch::Batch;
use super::block::{Block, BlockCache, BlockSpec};
use super::build::{config_err, unsupported};
use crate::error::{PeftError, Result};
use crate::layers::{masked_mean_backward, masked_mean_forward};
use crate::method::{Family, LoraTarget, Method, TransformerSpec};
use crate::params::{Grads, ParamId, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

#[derive(Debug, Clone)]
pub(super) struct TransformerNet {
    blocks: Vec<Block>,
    prompt: Option<ParamId>,
    /// Hidden size (the features the head reads).
    pub(super) hidden: usize,
}

pub(super) struct TransformerCache<T> {
    blocks: Vec<BlockCache<T>>,
    pool_mask: Array2<T>,
    batch: usize,
    prompt: usize,
    seq: usize,
}

impl TransformerNet {
    /// Loads the blocks `blocks.{j}.*` present in the weights and applies `method`.
    pub(super) fn build<T: Real>(
        spec: &TransformerSpec,
        weights: &FrozenWeights,
        method: &Method,
        family: &Family,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
    ) -> Result<Self> {
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
            heads: spec.heads,
            ln_eps: spec.ln_eps,
        };
        let mut blocks = Vec::with_capacity(k);
        for j in 0..k {
            blocks.push(Block::load(&block_spec, j, params, rng)?);
        }
        Ok(TransformerNet {
            blocks,
            prompt,
            hidden: d,
        })
    }

    /// Whether any tensor below the head is trained.
    pub(super) fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.prompt.is_some_and(|id| p.trainable(id))
            || self.blocks.iter().any(|b| b.has_trainable(p))
    }

    /// Checks the features (`[B, S, D]`) and the mask's shape.
    pub(super) fn check_features<T: Real>(&self, batch: &Batch<T>) -> Result<()> {
        let shape = batch.features.shape();
        if shape.len() != 3 || shape[2] != self.hidden {
            return Err(PeftError::Batch(format!(
                "transformer tail expects features [B, S, {}], got {shape:?}",
                self.hidden
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
        Ok(())
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
        let mut h = Arc::new(x.into_shape_with_order((b * s_all, d)).expect("contiguous"));
        let mut caches = Vec::new();
        for blk in &self.blocks {
            let (out, c) = blk.forward(p, &h, key_bias.view(), rng.as_deref_mut());
            if keep_cache {
                caches.push(c);
            }
            h = Arc::new(out);
        }
        let pooled = masked_mean_forward(h.view(), pool_mask.view());
        let cache = keep_cache.then_some(TransformerCache {
            blocks: caches,
            pool_mask,
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

    /// The first block's input `[B, P+S, D]` (prompt tokens first), the pooling mask and the
    /// attention's key bias, both `[B, P+S]`.
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
        let np = self.prompt_len(p);
        let s_all = np + seq;
        // Prompt tokens are prepended to every sample; they are always attended to but
        // are left out of the mean pooling, so the pooled sentence embedding stays an
        // average over the real tokens.
        let mut x = Array3::<T>::zeros((b, s_all, d));
        if let Some(id) = self.prompt {
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
        (x, pool_mask, key_bias)
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
        let mut dh = masked_mean_backward(dpooled.view(), cache.pool_mask.view());
        for (j, (blk, c)) in self.blocks.iter().zip(cache.blocks).enumerate().rev() {
            match blk.backward(p, c, dh.view(), grads, need_below[j]) {
                Some(d) => dh = d,
                None => return,
            }
        }
        if let Some(id) = self.prompt
            && grads.wants(id)
        {
            let d = self.hidden;
            let dx = dh
                .into_shape_with_order((cache.batch, cache.prompt + cache.seq, d))
                .expect("rows are B*S");
            let g = dx.slice(s![.., ..cache.prompt, ..]).sum_axis(Axis(0));
            grads.acc2(id, g.view());
        }
    }
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
