//! Optimizers behind one small trait, and the wrappers FedAvg/FedProx clients need.
//!
//! An optimizer sees the trainable tensors as [`ParamSlot`]s (name, values, gradient) in the
//! tail's stable order and keeps its state by name, so runs are deterministic. Gradient-norm
//! clipping and the FedProx proximal term are wrappers around any optimizer:
//! `FedProx::new(ClipGradNorm::new(Sgd::new(0.1), 1.0), 0.01, global)`.

use std::collections::HashMap;

use crate::error::{PeftError, Result};
use crate::params::NamedTensor;
// Defined in `params`, next to the store that lends the slots out; kept here as well.
pub use crate::params::ParamSlot;

/// An optimizer: updates parameters in place from their gradients.
pub trait Optimizer: std::fmt::Debug + Send {
    /// Applies one update.
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()>;
    /// The current learning rate.
    fn learning_rate(&self) -> f32;
    /// Changes the learning rate (schedules).
    fn set_learning_rate(&mut self, lr: f32);
}

/// SGD with momentum and (coupled, L2) weight decay, as `torch.optim.SGD` with dampening 0.
#[derive(Debug, Clone)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0 disables the buffer).
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    buffers: HashMap<String, Vec<f32>>,
}

impl Sgd {
    /// Plain SGD.
    pub fn new(lr: f32) -> Self {
        Self::with(lr, 0.0, 0.0)
    }

    /// SGD with momentum and weight decay.
    pub fn with(lr: f32, momentum: f32, weight_decay: f32) -> Self {
        Self {
            lr,
            momentum,
            weight_decay,
            buffers: HashMap::new(),
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()> {
        for p in params.iter_mut() {
            let wd = self.weight_decay;
            if self.momentum == 0.0 {
                for (w, &g) in p.value.iter_mut().zip(p.grad.iter()) {
                    *w -= self.lr * (g + wd * *w);
                }
                continue;
            }
            // torch: the first step initialises the buffer with the gradient itself.
            let fresh = !self.buffers.contains_key(p.name);
            let buf = self
                .buffers
                .entry(p.name.to_string())
                .or_insert_with(|| vec![0.0; p.value.len()]);
            for ((w, &g), b) in p.value.iter_mut().zip(p.grad.iter()).zip(buf.iter_mut()) {
                let d = g + wd * *w;
                *b = if fresh { d } else { self.momentum * *b + d };
                *w -= self.lr * *b;
            }
        }
        Ok(())
    }
    fn learning_rate(&self) -> f32 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}

/// AdamW (decoupled weight decay), as `torch.optim.AdamW`.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// `(beta1, beta2)`.
    pub betas: (f32, f32),
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    state: HashMap<String, (u64, Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    /// AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    pub fn new(lr: f32) -> Self {
        Self {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            state: HashMap::new(),
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()> {
        let (b1, b2) = self.betas;
        for p in params.iter_mut() {
            let (t, m, v) = self
                .state
                .entry(p.name.to_string())
                .or_insert_with(|| (0, vec![0.0; p.value.len()], vec![0.0; p.value.len()]));
            *t += 1;
            let bc1 = 1.0 - (b1 as f64).powi(*t as i32);
            let bc2 = 1.0 - (b2 as f64).powi(*t as i32);
            let step_size = (self.lr as f64 / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let decay = 1.0 - self.lr * self.weight_decay;
            for i in 0..p.value.len() {
                let g = p.grad[i];
                p.value[i] *= decay;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let denom = v[i].sqrt() / bc2_sqrt + self.eps;
                p.value[i] -= step_size * m[i] / denom;
            }
        }
        Ok(())
    }
    fn learning_rate(&self) -> f32 {
        self.lr
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.lr = lr;
    }
}

/// The global L2 norm of all gradients.
pub fn global_grad_norm(params: &[ParamSlot<'_>]) -> f32 {
    params
        .iter()
        .flat_map(|p| p.grad.iter())
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt() as f32
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (as `torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm(params: &mut [ParamSlot<'_>], max_norm: f32) -> f32 {
    let norm = global_grad_norm(params);
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for p in params.iter_mut() {
            p.grad.iter_mut().for_each(|g| *g *= coef);
        }
    }
    norm
}

/// Wraps an optimizer with global gradient-norm clipping.
#[derive(Debug, Clone)]
pub struct ClipGradNorm<O> {
    /// The wrapped optimizer.
    pub inner: O,
    /// Maximum global L2 norm.
    pub max_norm: f32,
    /// Norm of the last step's gradient before clipping.
    pub last_norm: f32,
}

impl<O: Optimizer> ClipGradNorm<O> {
    /// Clips to `max_norm` before every step of `inner`.
    pub fn new(inner: O, max_norm: f32) -> Self {
        Self {
            inner,
            max_norm,
            last_norm: 0.0,
        }
    }
}

impl<O: Optimizer> Optimizer for ClipGradNorm<O> {
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()> {
        self.last_norm = clip_grad_norm(params, self.max_norm);
        self.inner.step(params)
    }
    fn learning_rate(&self) -> f32 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.inner.set_learning_rate(lr);
    }
}

/// FedProx: adds the gradient of `mu/2 · ||w − w_global||²`, i.e. `mu · (w − w_global)`,
/// before the wrapped optimizer's step. The global tensors are the round's starting point.
#[derive(Debug, Clone)]
pub struct FedProx<O> {
    /// The wrapped optimizer.
    pub inner: O,
    /// Proximal coefficient `mu`.
    pub mu: f32,
    global: HashMap<String, Vec<f32>>,
}

impl<O: Optimizer> FedProx<O> {
    /// `global` must hold every trainable tensor (checked at each step).
    pub fn new(inner: O, mu: f32, global: &[NamedTensor]) -> Self {
        Self {
            inner,
            mu,
            global: global
                .iter()
                .map(|t| (t.name.clone(), t.values.clone()))
                .collect(),
        }
    }

    /// Replaces the global tensors (at the start of a new round).
    pub fn set_global(&mut self, global: &[NamedTensor]) {
        self.global = global
            .iter()
            .map(|t| (t.name.clone(), t.values.clone()))
            .collect();
    }
}

impl<O: Optimizer> Optimizer for FedProx<O> {
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()> {
        for p in params.iter_mut() {
            let g = self
                .global
                .get(p.name)
                .ok_or_else(|| PeftError::MissingTensor {
                    name: p.name.to_string(),
                })?;
            if g.len() != p.value.len() {
                return Err(PeftError::Length {
                    name: p.name.to_string(),
                    shape: vec![p.value.len()],
                    expected: p.value.len(),
                    got: g.len(),
                });
            }
            for ((gr, &w), &wg) in p.grad.iter_mut().zip(p.value.iter()).zip(g) {
                *gr += self.mu * (w - wg);
            }
        }
        self.inner.step(params)
    }
    fn learning_rate(&self) -> f32 {
        self.inner.learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f32) {
        self.inner.set_learning_rate(lr);
    }
}

impl Optimizer for Box<dyn Optimizer> {
    fn step(&mut self, params: &mut [ParamSlot<'_>]) -> Result<()> {
        (**self).step(params)
    }
    fn learning_rate(&self) -> f32 {
        (**self).learning_rate()
    }
    fn set_learning_rate(&mut self, lr: f32) {
        (**self).set_learning_rate(lr);
    }
}
