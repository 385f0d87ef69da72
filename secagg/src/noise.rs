//! Distributed differential privacy: discrete Gaussian noise that each device adds to its
//! quantized input before masking, so that the sum the aggregator unmasks already carries the
//! noise of a Gaussian mechanism and no single input is ever noise-free in anyone's hands.
//!
//! The sampler is Algorithm 3 of Canonne, Kamath and Steinke, "The Discrete Gaussian for
//! Differential Privacy" (NeurIPS 2020): a discrete Laplace proposal with scale
//! `t = ⌊σ⌋ + 1` (their Algorithm 2) accepted with probability
//! `exp(−(|y| − σ²/t)² / (2σ²))`. The Bernoulli trials use 53-bit uniform doubles against
//! `exp(−γ)` rather than the paper's exact rational arithmetic, so the output distribution is
//! the discrete Gaussian up to double-precision rounding of those probabilities (relative error
//! about 1e-16 per trial).
//!
//! Why discrete: noise added to the integers is part of the sum itself, so the aggregator sees
//! `Σ q(x_u) + Σ z_u mod 2^m` and the privacy analysis is that of the (sum of) discrete
//! Gaussians on an integer-valued sum, whose Rényi divergence is at most the continuous
//! Gaussian's at the same σ (Canonne et al., Prop. 1.7 / Thm. 1.8). A sum of independent
//! discrete Gaussians is not exactly a discrete Gaussian; Kairouz, Liu and Steinke, "The
//! Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation"
//! (ICML 2021, Prop. 14) bound the difference, which is negligible (below 1e-100) for the
//! per-device σ of several hundred quantization steps that fedpeft's defaults give.

use rand::Rng;

/// One draw from the discrete Gaussian `N_Z(0, sigma²)` (0 for `sigma <= 0` or not finite).
pub fn discrete_gaussian(sigma: f64, rng: &mut impl Rng) -> i64 {
    if !(sigma.is_finite() && sigma > 0.0) {
        return 0;
    }
    let t = sigma.floor() + 1.0;
    let t_int = t as u64;
    let sigma2 = sigma * sigma;
    let exp_minus_one = (-1.0f64).exp();
    loop {
        // Discrete Laplace with scale t (Algorithm 2): X = U + t·V, U uniform in [0, t),
        // accepted with probability exp(−U/t); V geometric with success 1 − e^−1.
        let u = rng.random_range(0..t_int);
        if rng.random::<f64>() >= (-(u as f64) / t).exp() {
            continue;
        }
        let mut v: u64 = 0;
        while rng.random::<f64>() < exp_minus_one {
            v += 1;
        }
        let negative = rng.random::<bool>();
        let x = u + t_int * v;
        if negative && x == 0 {
            continue;
        }
        let y = x as f64;
        let gamma = (y - sigma2 / t).powi(2) / (2.0 * sigma2);
        if rng.random::<f64>() < (-gamma).exp() {
            let x = x as i64;
            return if negative { -x } else { x };
        }
    }
}

/// Adds an independent `N_Z(0, sigma²)` draw to every value, mod `2^modulus_bits`
/// (`modulus_bits` clamped to `1..=32`).
pub fn add_discrete_gaussian(values: &mut [u32], sigma: f64, modulus_bits: u8, rng: &mut impl Rng) {
    let m = u32::from(modulus_bits.clamp(1, 32));
    let mask: u64 = if m == 32 {
        u64::from(u32::MAX)
    } else {
        (1u64 << m) - 1
    };
    for v in values {
        let z = discrete_gaussian(sigma, rng);
        *v = ((i64::from(*v)).wrapping_add(z) as u64 & mask) as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn moments(sigma: f64, n: usize, seed: u8) -> (f64, f64) {
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        let draws: Vec<f64> = (0..n)
            .map(|_| discrete_gaussian(sigma, &mut rng) as f64)
            .collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        (mean, var)
    }

    #[test]
    fn draws_have_mean_zero_and_variance_sigma_squared() {
        // For σ ≥ 1 the discrete Gaussian's variance is σ² to within 1e-8 relative.
        for (sigma, seed) in [(1.5, 1u8), (7.0, 2), (300.0, 3), (20_000.0, 4)] {
            let n = 40_000;
            let (mean, var) = moments(sigma, n, seed);
            let se = sigma / (n as f64).sqrt();
            assert!(mean.abs() < 5.0 * se, "σ {sigma}: mean {mean}");
            // The sample variance's relative standard error is √(2/n) ≈ 0.7 %.
            assert!(
                (var / (sigma * sigma) - 1.0).abs() < 0.04,
                "σ {sigma}: variance {var}, expected {}",
                sigma * sigma
            );
        }
    }

    #[test]
    fn small_sigma_matches_the_probability_mass_function() {
        // σ = 0.8: P(y) ∝ exp(−y²/(2σ²)); compare the frequencies of −2..=2.
        let sigma: f64 = 0.8;
        let mut rng = ChaCha20Rng::from_seed([9; 32]);
        let n = 100_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            let y = discrete_gaussian(sigma, &mut rng);
            if (-2..=2).contains(&y) {
                counts[(y + 2) as usize] += 1;
            }
        }
        let weight = |y: i64| (-(y * y) as f64 / (2.0 * sigma * sigma)).exp();
        let norm: f64 = (-40..=40).map(weight).sum();
        for (i, &c) in counts.iter().enumerate() {
            let y = i as i64 - 2;
            let p = weight(y) / norm;
            let f = c as f64 / n as f64;
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!((f - p).abs() < 5.0 * se, "P({y}) = {p:.5}, observed {f:.5}");
        }
    }

    #[test]
    fn no_noise_for_zero_or_invalid_sigma() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(discrete_gaussian(s, &mut rng), 0);
        }
    }

    #[test]
    fn noise_wraps_modulo_two_to_the_m() {
        let mut rng = ChaCha20Rng::from_seed([5; 32]);
        let mut values = vec![0u32; 2_000];
        add_discrete_gaussian(&mut values, 50.0, 16, &mut rng);
        assert!(values.iter().all(|&v| v < 1 << 16));
        // Read back as signed 16-bit: centred on zero with σ ≈ 50.
        let signed: Vec<f64> = values
            .iter()
            .map(|&v| {
                if v >= 1 << 15 {
                    v as f64 - 65_536.0
                } else {
                    v as f64
                }
            })
            .collect();
        let var = signed.iter().map(|s| s * s).sum::<f64>() / signed.len() as f64;
        assert!((var.sqrt() - 50.0).abs() < 3.0, "σ {}", var.sqrt());
        assert!(
            signed.iter().any(|&s| s < 0.0),
            "negative draws wrap to the top"
        );
    }
}
