//! A tiny seeded generator for stochastic rounding: SplitMix64 (Steele, Lea, Flood 2014).
//!
//! Quantization must be reproducible from the round's seed and must not drag `rand` into a
//! `no_std` crate; SplitMix64 passes BigCrush and is four lines.

/// SplitMix64 pseudo-random generator. Not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` on a grid of 2^-24 (every value exactly representable in f32).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / 16_777_216.0)
    }
}

/// A reproducible draw, uniform in `[0, 1)`, keyed on a seed, a purpose, a client index and a
/// round: the same four numbers give the same value on every machine. Emulated faults (an edge
/// client vanishing mid-round) use it, so a trial's faults can be replayed and predicted.
pub fn keyed_unit(seed: u64, purpose: u64, client_index: u64, round: u64) -> f64 {
    let mut key = SplitMix64::new(seed);
    let mut h = key.next_u64();
    for part in [purpose, client_index, round] {
        h = SplitMix64::new(h ^ part).next_u64();
    }
    (h >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
}

/// [`keyed_unit`]'s purpose for "does client `i` vanish in round `r`" (edge client `[faults]`).
pub const DROPOUT_PURPOSE: u64 = 0xd0_0d;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of the reference C implementation for seed 1234567.
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn keyed_draws_are_reproducible_uniform_and_differ_by_every_key() {
        let a = keyed_unit(42, DROPOUT_PURPOSE, 3, 7);
        assert_eq!(a, keyed_unit(42, DROPOUT_PURPOSE, 3, 7));
        for other in [
            keyed_unit(43, DROPOUT_PURPOSE, 3, 7),
            keyed_unit(42, 1, 3, 7),
            keyed_unit(42, DROPOUT_PURPOSE, 4, 7),
            keyed_unit(42, DROPOUT_PURPOSE, 3, 8),
        ] {
            assert_ne!(a, other);
        }
        let n = 100_000u64;
        let below = (0..n)
            .filter(|&i| keyed_unit(42, DROPOUT_PURPOSE, i % 64, i / 64) < 0.3)
            .count();
        assert!((below as f64 / n as f64 - 0.3).abs() < 0.01, "{below}");
    }

    #[test]
    fn uniform_floats_stay_in_the_half_open_unit_interval() {
        let mut r = SplitMix64::new(7);
        let mut sum = 0.0f64;
        for _ in 0..100_000 {
            let u = r.next_f32();
            assert!((0.0..1.0).contains(&u));
            sum += f64::from(u);
        }
        assert!((sum / 100_000.0 - 0.5).abs() < 0.005);
    }
}
