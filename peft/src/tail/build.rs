//! What building a tail shares between the families: config validation and its errors,
//! loading frozen layers from the weights, initialising the tensors a method adds (LoRA
//! factors, the classifier head).

use ndarray::{ArrayD, IxDyn};
use rand::Rng;
use rand::rngs::StdRng;

use crate::error::{PeftError, Result};
use crate::layers::{Linear, LoraParams};
use crate::method::{Family, HeadInit, LoraConfig, Method, PeftConfig};
use crate::params::{ParamId, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

pub(super) fn unsupported(method: &Method, family: &Family, why: &str) -> PeftError {
    PeftError::Unsupported {
        method: method.name().into(),
        family: family.name().into(),
        why: why.into(),
    }
}

pub(super) fn config_err(field: &str, why: impl Into<String>) -> PeftError {
    PeftError::Config {
        field: field.into(),
        why: why.into(),
    }
}

pub(super) fn validate(config: &PeftConfig) -> Result<()> {
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

/// Uniform(-bound, bound) init, as PyTorch's default `nn.Linear` / PEFT's LoRA A.
pub(super) fn uniform<T: Real>(rng: &mut StdRng, shape: &[usize], bound: f64) -> ArrayD<T> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || T::lit(rng.random_range(-bound..bound)))
}

pub(super) fn zeros<T: Real>(shape: &[usize]) -> ArrayD<T> {
    ArrayD::zeros(IxDyn(shape))
}

/// A linear layer with a bias and no LoRA branch.
pub(super) fn dense(w: ParamId, b: ParamId) -> Linear {
    Linear {
        w,
        b: Some(b),
        lora: None,
    }
}

/// Adds LoRA factors to a linear layer named `prefix` (`[out, in]`).
pub(super) fn add_lora<T: Real>(
    params: &mut ParamStore<T>,
    rng: &mut StdRng,
    prefix: &str,
    out: usize,
    inp: usize,
    cfg: &LoraConfig,
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

/// Adds the frozen `{prefix}.weight` (of shape `weight`) and `{prefix}.bias` (of length
/// `bias`) of a pretrained layer, in that order. `method` decides what is trained: the
/// weight under full-tail, the bias under full-tail and bias tuning.
pub(super) fn add_weight_and_bias<T: Real>(
    params: &mut ParamStore<T>,
    weights: &FrozenWeights,
    method: &Method,
    prefix: &str,
    weight: &[Option<usize>],
    bias: usize,
) -> Result<(ParamId, ParamId)> {
    let full = matches!(method, Method::FullTail);
    let bias_tuned = matches!(method, Method::Bias);
    let w = params.add(
        &format!("{prefix}.weight"),
        weights.get(&format!("{prefix}.weight"), weight)?,
        full,
    )?;
    let b = params.add(
        &format!("{prefix}.bias"),
        weights.get(&format!("{prefix}.bias"), &[Some(bias)])?,
        full || bias_tuned,
    )?;
    Ok((w, b))
}

/// The classifier over `feat_dim` pooled features, always trained: a fresh one initialised
/// as `nn.Linear`, or the pretrained `classifier.*`. Returns it with its number of classes.
pub(super) fn build_head<T: Real>(
    init: &HeadInit,
    feat_dim: usize,
    weights: &FrozenWeights,
    params: &mut ParamStore<T>,
    rng: &mut StdRng,
) -> Result<(Linear, usize)> {
    match *init {
        HeadInit::Fresh { num_classes } => {
            let bound = 1.0 / (feat_dim as f64).sqrt();
            let w = params.add(
                "head.weight",
                uniform(rng, &[num_classes, feat_dim], bound),
                true,
            )?;
            let b = params.add("head.bias", uniform(rng, &[num_classes], bound), true)?;
            Ok((dense(w, b), num_classes))
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
            Ok((dense(w, b), k))
        }
    }
}
