//! DP-SGD: per-sample gradient clipping and Gaussian noise, with privacy accounting.
//!
//! Each sample's gradient over the trainable tensors is computed on its own (the PEFT sets are
//! small, so this is cheap), scaled to L2 norm at most `C` (Opacus' factor
//! `min(1, C / (‖g‖ + 1e-6))`), summed, perturbed with `N(0, (σC)²)` per coordinate and divided
//! by the expected batch size. Every step is recorded in an [`RdpAccountant`] with the
//! configured Poisson sampling rate, so ε covers every local step of every round.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::accountant::RdpAccountant;
use crate::error::{PeftError, Result};
use crate::params::Grads;

/// DP-SGD parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSgdConfig {
    /// Per-sample L2 clipping bound `C`.
    pub clip_norm: f64,
    /// Noise multiplier `σ` (noise std is `σ·C`).
    pub noise_multiplier: f64,
    /// Poisson sampling rate `q` = expected batch size / local data set size.
    pub sample_rate: f64,
    /// Denominator of the noisy mean; `None` uses the actual batch size.
    pub expected_batch_size: Option<usize>,
}

/// DP-SGD state: noise generator and accountant.
#[derive(Debug, Clone)]
pub struct DpSgd {
    config: DpSgdConfig,
    rng: StdRng,
    /// RDP over every step taken with this state.
    pub accountant: RdpAccountant,
}

impl DpSgd {
    /// Validates the config; `seed` drives the noise.
    pub fn new(config: DpSgdConfig, seed: u64) -> Result<Self> {
        let bad = |field: &str, why: String| PeftError::Config {
            field: field.into(),
            why,
        };
        if !(config.clip_norm > 0.0 && config.clip_norm.is_finite()) {
            return Err(bad(
                "dp.clip_norm",
                format!("must be positive, got {}", config.clip_norm),
            ));
        }
        if !(config.noise_multiplier >= 0.0 && config.noise_multiplier.is_finite()) {
            return Err(bad(
                "dp.noise_multiplier",
                format!("must be non-negative, got {}", config.noise_multiplier),
            ));
        }
        if !(config.sample_rate > 0.0 && config.sample_rate <= 1.0) {
            return Err(bad(
                "dp.sample_rate",
                format!("must be in (0, 1], got {}", config.sample_rate),
            ));
        }
        if config.expected_batch_size == Some(0) {
            return Err(bad("dp.expected_batch_size", "must be at least 1".into()));
        }
        Ok(Self {
            config,
            rng: StdRng::seed_from_u64(seed),
            accountant: RdpAccountant::new(),
        })
    }

    /// The config.
    pub fn config(&self) -> &DpSgdConfig {
        &self.config
    }

    /// ε at `delta` over every step so far.
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.accountant.epsilon(delta).0
    }

    /// Per-sample clipping factor for a gradient of norm `norm`.
    pub(crate) fn clip_factor(&self, norm: f64) -> f64 {
        (self.config.clip_norm / (norm + 1e-6)).min(1.0)
    }

    /// Adds noise to the clipped sum, divides by the batch denominator and records the step.
    pub(crate) fn finish(&mut self, sum: &mut Grads<f32>, batch_len: usize) -> Result<()> {
        let std = self.config.noise_multiplier * self.config.clip_norm;
        if std > 0.0 {
            let normal = Normal::new(0.0, std).expect("std validated");
            for (_, g) in sum.iter_mut() {
                for v in g.iter_mut() {
                    *v += normal.sample(&mut self.rng) as f32;
                }
            }
        }
        let denom = self.config.expected_batch_size.unwrap_or(batch_len) as f32;
        sum.scale(1.0 / denom);
        self.accountant
            .compose(self.config.sample_rate, self.config.noise_multiplier, 1)
    }
}
