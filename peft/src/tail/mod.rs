//! Tails: the three families assembled from [`crate::layers`], with a PEFT method applied.
//!
//! A [`PeftTail<T>`] owns every tensor in a [`ParamStore`] and a `Net` that says how they
//! are wired. Its generic methods (loss and gradients, logits) serve both training in `f32`
//! and gradient checks in `f64`; the object-safe [`crate::Tail`] trait the edge client
//! drives is implemented for `PeftTail<f32>` in `object.rs` and exported at the crate root.
//!
//! Files:
//! - `mod.rs`: [`PeftTail`] — building, batch checks, the frozen prefix, forward and backward
//!   through the body of a family and the classifier head.
//! - `batch.rs`: [`Batch`], the trunk activations a tail reads.
//! - `object.rs`: [`crate::Tail`], [`crate::build_tail`], [`crate::StepStats`] and
//!   [`crate::EvalStats`] (exported at the crate root only).
//! - `build.rs`: config validation, frozen layers from the weights, fresh tensors (LoRA
//!   factors, the head).
//! - `conv.rs`: the conv-head family (1×1 conv, folded BatchNorm, ReLU6, average pooling).
//! - `transformer.rs`: the two families of transformer blocks, `transformer` (post-LN BERT,
//!   masked mean pooling) and `vit` (pre-LN with layer scale, final LayerNorm, CLS token),
//!   with their prompt tokens; `block.rs`: one block of either layout; `adapter.rs`: the
//!   Houlsby adapter; `pack.rs`: a padded batch's real tokens, packed for the blocks' row-wise
//!   layers.

mod adapter;
mod batch;
mod block;
mod build;
mod conv;
pub(crate) mod object;
mod pack;
mod transformer;

use std::sync::Arc;

use ndarray::{Array2, ArrayD, Ix2};
use rand::SeedableRng;
use rand::rngs::StdRng;

pub use batch::Batch;

use build::{build_head, validate};
use conv::{ConvCache, ConvNet};
use transformer::{TransformerCache, TransformerNet};

use crate::error::{PeftError, Result};
use crate::layers::{Linear, LinearCache, cross_entropy};
use crate::method::{Family, PeftConfig};
use crate::params::{Grads, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

/// What a tail's frozen prefix holds (see [`PeftTail::frozen_prefix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrozenPrefix {
    /// No tensor below the head is trained: `[B, F]`, the pooled features the head reads.
    Pooled,
    /// The conv head's weight is frozen (bias, LoRA): `[B, H*W, C_out]`, the product `x·Wᵀ`
    /// before its LoRA branch, BatchNorm and activation.
    ConvProduct,
}

/// Everything below the head: a conv head, or transformer blocks (`transformer`, `vit`).
#[derive(Debug, Clone)]
enum Net {
    Conv(ConvNet),
    Transformer(TransformerNet),
}

/// What the body's backward pass needs, by family.
enum Cache<T> {
    Conv(ConvCache<T>),
    Transformer(TransformerCache<T>),
}

/// Body cache (`None` when a pooled frozen prefix stood in for the body) plus the head's.
type FullCache<T> = (Option<Cache<T>>, LinearCache<T>);

impl Net {
    /// Whether any tensor of the body (everything below the head) is trained.
    fn body_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        match self {
            Net::Conv(c) => c.has_trainable(p),
            Net::Transformer(t) => t.has_trainable(p),
        }
    }

    fn frozen_prefix_kind<T: Real>(&self, p: &ParamStore<T>) -> Option<FrozenPrefix> {
        if !self.body_trainable(p) {
            return Some(FrozenPrefix::Pooled);
        }
        match self {
            Net::Conv(c) if !c.weight_trained(p) => Some(FrozenPrefix::ConvProduct),
            _ => None,
        }
    }

    fn check_features<T: Real>(&self, batch: &Batch<T>) -> Result<()> {
        match self {
            Net::Conv(c) => c.check_features(batch),
            Net::Transformer(t) => t.check_features(batch),
        }
    }

    /// Everything below the head: pooled features `[B, F]`, and the body's cache if kept.
    fn body_forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        batch: &Batch<T>,
        rng: Option<&mut StdRng>,
        keep_cache: bool,
    ) -> (Array2<T>, Option<Cache<T>>) {
        match self {
            Net::Conv(c) => {
                let (pooled, cache) = c.forward(p, batch, rng, keep_cache);
                (pooled, cache.map(Cache::Conv))
            }
            Net::Transformer(t) => {
                let (pooled, cache) = t.forward(p, batch, rng, keep_cache);
                (pooled, cache.map(Cache::Transformer))
            }
        }
    }

    fn body_backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        cache: Cache<T>,
        dpooled: Array2<T>,
        grads: &mut Grads<T>,
    ) {
        match (self, cache) {
            (Net::Conv(c), Cache::Conv(cache)) => c.backward(p, cache, dpooled, grads),
            (Net::Transformer(t), Cache::Transformer(cache)) => {
                t.backward(p, cache, dpooled, grads)
            }
            _ => unreachable!("cache matches the net"),
        }
    }
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

impl<T: Real> PeftTail<T> {
    /// Builds a tail of `family` from frozen weights (names and shapes as in the weights
    /// contract) and applies `config`'s PEFT method.
    pub fn build(family: Family, weights: &FrozenWeights, config: PeftConfig) -> Result<Self> {
        validate(&config)?;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut params = ParamStore::new();
        let method = &config.method;
        let (net, feat_dim) = match &family {
            Family::ConvHead => {
                let (net, out) = ConvNet::build(weights, method, &family, &mut params, &mut rng)?;
                (Net::Conv(net), out)
            }
            Family::Transformer(_) | Family::Vit(_) => {
                let net = TransformerNet::build(&family, weights, method, &mut params, &mut rng)?;
                let d = net.hidden;
                (Net::Transformer(net), d)
            }
        };
        let (head, num_classes) =
            build_head(&config.head, feat_dim, weights, &mut params, &mut rng)?;
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
        self.net.check_features(batch)?;
        let shape = batch.features.shape();
        if shape[0] == 0 {
            return Err(PeftError::Batch("empty batch".into()));
        }
        if let Some(f) = &batch.frozen {
            let want = match (self.net.frozen_prefix_kind(&self.params), &self.net) {
                (None, _) => {
                    return Err(PeftError::Batch(format!(
                        "a frozen prefix was given, but {} trains the layer the features enter",
                        self.config.method.name()
                    )));
                }
                (Some(FrozenPrefix::Pooled), _) => {
                    vec![shape[0], self.params.w2(self.head.w).ncols()]
                }
                (Some(FrozenPrefix::ConvProduct), Net::Conv(c)) => {
                    c.product_shape(&self.params, shape)
                }
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
            self.check_labels(labels, shape[0])?;
        }
        Ok(())
    }

    fn check_labels(&self, labels: &[usize], samples: usize) -> Result<()> {
        if labels.len() != samples {
            return Err(PeftError::Batch(format!(
                "{} labels for {} samples",
                labels.len(),
                samples
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
        Ok(())
    }

    /// The part of the forward pass that no trained tensor affects, computed once for a set
    /// of samples so that training and evaluation skip it: the pooled features when only the
    /// head is trained, the conv head's product `x·Wᵀ` when its weight is frozen (bias, LoRA).
    /// `None` when the features enter a trained layer straight away (full-tail; bias, LoRA,
    /// adapters and prompts on transformer blocks). Put it in [`Batch::frozen`], row for row;
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
        Ok(match self.net.frozen_prefix_kind(&self.params) {
            None => None,
            Some(FrozenPrefix::Pooled) => {
                let (pooled, _) = self.net.body_forward(&self.params, plain, None, false);
                Some(pooled.into_dyn())
            }
            Some(FrozenPrefix::ConvProduct) => {
                let Net::Conv(c) = &self.net else {
                    unreachable!("a conv product exists only in a conv head")
                };
                Some(c.frozen_product(&self.params, plain))
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

/// Forward pass. With `keep_cache` false nothing is kept for backward (evaluation).
fn forward<T: Real>(
    net: &Net,
    head: &Linear,
    p: &ParamStore<T>,
    batch: &Batch<T>,
    mut rng: Option<&mut StdRng>,
    keep_cache: bool,
) -> (Array2<T>, Option<FullCache<T>>) {
    let (pooled, cache) = match (&batch.frozen, net.frozen_prefix_kind(p)) {
        (Some(f), Some(FrozenPrefix::Pooled)) => {
            let pooled = f.view().into_dimensionality::<Ix2>().expect("checked");
            (pooled.to_owned(), None)
        }
        _ => net.body_forward(p, batch, rng.as_deref_mut(), keep_cache),
    };
    let pooled = Arc::new(pooled);
    let (logits, hc) = head.forward(p, &pooled, rng);
    (logits, keep_cache.then_some((cache, hc)))
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
    let need_body = net.body_trainable(p);
    let dpooled = head.backward(p, hc, dlogits.view(), grads, need_body);
    let Some(dpooled) = dpooled else { return };
    let body = body.expect("a trained body keeps its cache");
    net.body_backward(p, body, dpooled, grads);
}
