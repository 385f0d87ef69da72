//! Reproducible sampling and per-round seeds.

use fedpeft_protocol::SplitMix64;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Mixed into a round's seed for the global adapter's stochastic rounding (so it is not the
/// stream the clients use for their updates).
pub(super) const GLOBAL_ROUNDING_STREAM: u64 = 0x6c0b_a1ad_a97e_0001;

/// The seed announced for `round` (local shuffling, stochastic rounding).
pub fn round_seed(seed: u64, round: u32) -> u64 {
    SplitMix64::new(seed ^ (u64::from(round) << 32)).next_u64()
}

/// Samples `max(min_clients, ⌈fraction·n⌉)` of `available` (capped at n), reproducibly from
/// `(seed, round)`. Returned sorted.
pub fn sample_clients(
    available: &[String],
    fraction: f64,
    min_clients: usize,
    seed: u64,
    round: u32,
) -> Vec<String> {
    let n = available.len();
    let k = ((fraction * n as f64).ceil() as usize)
        .max(min_clients)
        .min(n);
    let mut rng = StdRng::seed_from_u64(round_seed(seed, round));
    let mut picked: Vec<String> = rand::seq::index::sample(&mut rng, n, k)
        .into_iter()
        .map(|i| available[i].clone())
        .collect();
    picked.sort();
    picked
}
