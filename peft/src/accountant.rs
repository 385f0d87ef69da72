//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism (DP-SGD).
//!
//! RDP of one step at order α follows Mironov, Talwar and Zhang, "Rényi Differential Privacy
//! of the Sampled Gaussian Mechanism" (2019): integer orders by the binomial expansion,
//! fractional orders by the two-sided series of §3.3, term for term as `dp-accounting`'s
//! `_compute_log_a_int` / `_compute_log_a_frac` (also TF-Privacy's and Opacus' `compute_rdp`).
//! RDP composes additively over steps and rounds. Conversion to (ε, δ) uses the improved bound
//! of Balle et al. 2020 (arXiv:2004.00010, Prop. 12; Canonne et al. 2020 eq. 20), the one in
//! `dp-accounting`'s `compute_epsilon` and Opacus' `get_privacy_spent`:
//! `ε = rdp + ln(1 − 1/α) − ln(δ·α)/(α − 1)`, minimised over α. The default orders are
//! `dp-accounting`'s `DEFAULT_RDP_ORDERS`.

use crate::error::{PeftError, Result};

/// `dp-accounting`'s default orders: 1.1, 1.2, …, 10.9, 11, 12, …, 63, 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let mut o: Vec<f64> = (1..100).map(|x| 1.0 + x as f64 / 10.0).collect();
    o.extend((11..64).map(|x| x as f64));
    o.extend([128.0, 256.0, 512.0, 1024.0]);
    o
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// ln |Γ(x)| (as scipy's `gammaln`, which drops the sign for negative arguments).
fn ln_gamma(x: f64) -> f64 {
    libm::lgamma_r(x).0
}

fn log_comb(n: f64, k: f64) -> f64 {
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

/// ln(erfc(x)), accurate far into the tail where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // Asymptotic (Laurent) series at infinity, as dp-accounting's fallback:
    // erfc(x) ~ exp(-x² - 0.5/x² + 0.625/x⁴ - …)/(x·√π).
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
        - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    for i in 0..=alpha {
        let fi = i as f64;
        let log_coef = log_comb(alpha as f64, fi) + fi * lq + (alpha as f64 - fi) * log1mq;
        let s = log_coef + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let lq = q.ln();
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let s2 = std::f64::consts::SQRT_2 * sigma;
    for i in 0..1000 {
        let fi = i as f64;
        let log_coef = log_comb(alpha, fi);
        let j = alpha - fi;
        let log_t0 = log_coef + fi * lq + j * log1mq;
        let log_t1 = log_coef + j * lq + fi * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last0 && log_s1 < last1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last0 = log_s0;
        last1 = log_s1;
    }
    // Not converged: the order is excluded from the minimisation, as dp-accounting does.
    f64::INFINITY
}

/// RDP of one step of the Poisson-subsampled Gaussian mechanism at order `alpha`.
pub fn rdp_subsampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// (ε, optimal order) for accumulated RDP values at `delta`.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    if delta == 0.0 {
        return if rdp.iter().all(|&r| r == 0.0) {
            (0.0, 0.0)
        } else {
            (f64::INFINITY, 0.0)
        };
    }
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(0.0));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Accumulates the RDP of every DP-SGD step a client takes, over all local steps and rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    steps: u64,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant over [`default_orders`].
    pub fn new() -> Self {
        Self::with_orders(default_orders())
    }

    /// An accountant over custom orders (each > 1).
    pub fn with_orders(orders: Vec<f64>) -> Self {
        let n = orders.len();
        Self {
            orders,
            rdp: vec![0.0; n],
            steps: 0,
        }
    }

    /// Restores an accountant saved as `(orders, rdp, steps)` (e.g. across client restarts, so
    /// ε keeps covering every round).
    pub fn restore(orders: Vec<f64>, rdp: Vec<f64>, steps: u64) -> Result<Self> {
        if orders.len() != rdp.len()
            || orders.iter().any(|&a| a.is_nan() || a <= 1.0)
            || rdp.iter().any(|r| r.is_nan())
        {
            return Err(PeftError::Config {
                field: "accountant".into(),
                why: format!(
                    "{} orders (each > 1) need as many non-NaN RDP values, got {}",
                    orders.len(),
                    rdp.len()
                ),
            });
        }
        Ok(Self { orders, rdp, steps })
    }

    /// Adds `steps` steps with sampling rate `q` and noise multiplier `sigma`.
    pub fn compose(&mut self, q: f64, sigma: f64, steps: u64) -> Result<()> {
        if !(0.0..=1.0).contains(&q) {
            return Err(PeftError::Config {
                field: "dp.sample_rate".into(),
                why: format!("must be in [0, 1], got {q}"),
            });
        }
        if sigma.is_nan() || sigma < 0.0 {
            return Err(PeftError::Config {
                field: "dp.noise_multiplier".into(),
                why: format!("must be non-negative, got {sigma}"),
            });
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_subsampled_gaussian(q, sigma, a);
        }
        self.steps += steps;
        Ok(())
    }

    /// Total steps composed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// ε at `delta` (and the order that attains it).
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}
