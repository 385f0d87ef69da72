//! The object-safe [`Tail`] trait the edge client drives, implemented for
//! [`PeftTail<f32>`]: training steps (plain and DP-SGD), evaluation, and the trainable
//! tensors as they go on the wire.

use std::collections::HashSet;

use ndarray::{Array2, ArrayD, IxDyn};

use super::PeftTail;
use super::batch::Batch;
use crate::dp::DpSgd;
use crate::error::{PeftError, Result};
use crate::layers;
use crate::method::{Family, PeftConfig};
use crate::optim::Optimizer;
use crate::params::{Grads, NamedTensor, check_len};
use crate::weights::FrozenWeights;

/// What one training step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the batch (before the update).
    pub loss: f64,
    /// Correctly classified samples (before the update).
    pub correct: usize,
    /// Samples in the batch.
    pub samples: usize,
    /// Global L2 norm of the gradient that reached the optimizer (after DP clipping and
    /// noise when DP is on).
    pub grad_norm: f64,
}

/// Evaluation over a batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EvalStats {
    /// Sum of per-sample cross-entropy.
    pub loss_sum: f64,
    /// Correctly classified samples.
    pub correct: usize,
    /// Samples seen.
    pub samples: usize,
}

/// A trainable tail, as the edge client drives it. Implemented by [`PeftTail<f32>`].
pub trait Tail: Send + std::fmt::Debug {
    /// `conv_head`, `transformer` or `vit`.
    fn family_name(&self) -> &'static str;
    /// The PEFT method's name.
    fn method_name(&self) -> &'static str;
    /// Classes of the head.
    fn num_classes(&self) -> usize;
    /// Logits `[B, num_classes]` in evaluation mode.
    fn forward(&self, batch: &Batch) -> Result<Array2<f32>>;
    /// The part of the forward pass no trained tensor affects, for [`Batch::frozen`]
    /// (see [`PeftTail::frozen_prefix`]); `None` if the method trains where the features enter.
    fn frozen_prefix(&self, batch: &Batch) -> Result<Option<ArrayD<f32>>>;
    /// One optimizer step on a batch (dropout on).
    fn train_step(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        opt: &mut dyn Optimizer,
    ) -> Result<StepStats>;
    /// One DP-SGD step: per-sample clipping, noise, accounting in `dp`.
    fn train_step_dp(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        dp: &mut DpSgd,
        opt: &mut dyn Optimizer,
    ) -> Result<StepStats>;
    /// Loss and accuracy without updating.
    fn evaluate(&self, batch: &Batch, labels: &[usize]) -> Result<EvalStats>;
    /// The trainable tensors in stable order (the update that goes on the wire).
    fn trainable(&self) -> Vec<NamedTensor>;
    /// Replaces all trainable tensors; every trainable name must be present exactly once
    /// with its shape.
    fn set_trainable(&mut self, tensors: &[NamedTensor]) -> Result<()>;
    /// Every tensor of the tail as trained, for a deployable model: the frozen weights in
    /// `tail.safetensors`' names, each LoRA pair folded into its weight
    /// (`W + (α/r)·B·A`), the classifier as `classifier.weight` / `classifier.bias` (so a
    /// tail built with [`crate::HeadInit::Pretrained`] reads it), adapters and prompt tokens
    /// under their own names.
    fn merged(&self) -> Vec<NamedTensor>;
    /// Number of trainable scalars.
    fn num_trainable(&self) -> usize;
    /// Number of frozen scalars in the tail.
    fn num_frozen(&self) -> usize;
}

/// Builds an `f32` tail behind the [`Tail`] trait.
pub fn build_tail(
    family: Family,
    weights: &FrozenWeights,
    config: PeftConfig,
) -> Result<Box<dyn Tail>> {
    Ok(Box::new(PeftTail::<f32>::build(family, weights, config)?))
}

impl PeftTail<f32> {
    fn apply(&mut self, grads: &mut Grads<f32>, loss: f64, opt: &mut dyn Optimizer) -> Result<f64> {
        self.steps += 1;
        if !loss.is_finite() {
            return Err(PeftError::NonFinite {
                what: "loss".into(),
                step: self.steps,
            });
        }
        let norm = grads.sq_norm().sqrt();
        if !norm.is_finite() {
            return Err(PeftError::NonFinite {
                what: "gradient".into(),
                step: self.steps,
            });
        }
        let mut slots = self.params_mut().slots(grads);
        opt.step(&mut slots)?;
        Ok(norm)
    }
}

impl Tail for PeftTail<f32> {
    fn family_name(&self) -> &'static str {
        self.family().name()
    }

    fn method_name(&self) -> &'static str {
        self.config().method.name()
    }

    fn num_classes(&self) -> usize {
        PeftTail::num_classes(self)
    }

    fn forward(&self, batch: &Batch) -> Result<Array2<f32>> {
        self.logits(batch)
    }

    fn frozen_prefix(&self, batch: &Batch) -> Result<Option<ArrayD<f32>>> {
        PeftTail::frozen_prefix(self, batch)
    }

    fn train_step(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        opt: &mut dyn Optimizer,
    ) -> Result<StepStats> {
        let (loss, correct, mut grads) = self.loss_and_grads(batch, labels, true)?;
        let grad_norm = self.apply(&mut grads, loss, opt)?;
        Ok(StepStats {
            loss,
            correct,
            samples: batch.len(),
            grad_norm,
        })
    }

    fn train_step_dp(
        &mut self,
        batch: &Batch,
        labels: &[usize],
        dp: &mut DpSgd,
        opt: &mut dyn Optimizer,
    ) -> Result<StepStats> {
        self.check_batch(batch, Some(labels))?;
        let mut sum = Grads::zeros_like(self.params());
        let mut one = Grads::zeros_like(self.params());
        let (mut loss, mut correct) = (0.0, 0);
        for i in 0..batch.len() {
            one.zero();
            let (l, c) =
                self.accumulate_grads(&batch.sample(i), &labels[i..i + 1], true, &mut one)?;
            loss += l;
            correct += c;
            let factor = dp.clip_factor(one.sq_norm().sqrt());
            sum.add_scaled(&one, factor as f32);
        }
        dp.finish(&mut sum, batch.len())?;
        let loss = loss / batch.len() as f64;
        let grad_norm = self.apply(&mut sum, loss, opt)?;
        Ok(StepStats {
            loss,
            correct,
            samples: batch.len(),
            grad_norm,
        })
    }

    fn evaluate(&self, batch: &Batch, labels: &[usize]) -> Result<EvalStats> {
        self.check_batch(batch, Some(labels))?;
        let logits = self.logits(batch)?;
        let (loss, _, correct) = layers::cross_entropy(logits.view(), labels);
        Ok(EvalStats {
            loss_sum: loss * batch.len() as f64,
            correct,
            samples: batch.len(),
        })
    }

    fn trainable(&self) -> Vec<NamedTensor> {
        self.params()
            .iter()
            .filter(|(_, p)| p.trainable)
            .map(|(_, p)| NamedTensor {
                name: p.name.clone(),
                shape: p.value.shape().to_vec(),
                values: p.value.iter().copied().collect(),
            })
            .collect()
    }

    fn set_trainable(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        let store = self.params();
        let mut seen = HashSet::new();
        let mut ids = Vec::with_capacity(tensors.len());
        for t in tensors {
            let id = store
                .id(&t.name)
                .filter(|&id| store.trainable(id))
                .ok_or_else(|| PeftError::UnknownTensor {
                    name: t.name.clone(),
                    known: store.trainable_names(),
                })?;
            let shape = store.param(id).value.shape();
            if shape != t.shape.as_slice() {
                return Err(PeftError::Shape {
                    name: t.name.clone(),
                    expected: shape.to_vec(),
                    got: t.shape.clone(),
                });
            }
            check_len(&t.name, shape, t.values.len())?;
            if !seen.insert(id) {
                return Err(PeftError::Config {
                    field: t.name.clone(),
                    why: "tensor given twice".into(),
                });
            }
            ids.push(id);
        }
        if let Some((_, p)) = store
            .iter()
            .find(|(id, p)| p.trainable && !seen.contains(id))
        {
            return Err(PeftError::MissingTensor {
                name: p.name.clone(),
            });
        }
        for (id, t) in ids.into_iter().zip(tensors) {
            let p = self.params_mut().param_mut(id);
            p.value =
                ArrayD::from_shape_vec(IxDyn(&t.shape), t.values.clone()).expect("shape checked");
        }
        Ok(())
    }

    fn merged(&self) -> Vec<NamedTensor> {
        let store = self.params();
        let scaling = match &self.config().method {
            crate::Method::Lora(l) => l.alpha / l.rank as f64,
            _ => 0.0,
        };
        let mut out = Vec::new();
        for (_, p) in store.iter() {
            let name = p.name.as_str();
            if name.ends_with(".lora_a") || name.ends_with(".lora_b") {
                continue;
            }
            let mut value = p.value.clone();
            if let Some(prefix) = name.strip_suffix(".weight")
                && let (Some(a), Some(b)) = (
                    store.id(&format!("{prefix}.lora_a")),
                    store.id(&format!("{prefix}.lora_b")),
                )
            {
                // [out, r]·[r, in] → [out, in], added to the weight whatever its trailing
                // 1×1 dimensions (the conv head's).
                let delta = store.w2(b).dot(&store.w2(a));
                let scaled = delta.mapv(|v| v * scaling as f32);
                let flat = scaled
                    .into_shape_with_order(IxDyn(value.shape()))
                    .expect("LoRA product has the weight's size");
                value += &flat;
            }
            let name = match name {
                "head.weight" => "classifier.weight",
                "head.bias" => "classifier.bias",
                other => other,
            };
            out.push(NamedTensor {
                name: name.to_string(),
                shape: value.shape().to_vec(),
                values: value.iter().copied().collect(),
            });
        }
        out
    }

    fn num_trainable(&self) -> usize {
        self.params().num_trainable()
    }

    fn num_frozen(&self) -> usize {
        self.params().num_frozen()
    }
}
