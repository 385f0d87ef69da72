//! The seeded neighbour graph of SecAgg+.

use std::collections::BTreeMap;

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// The neighbourhoods of a round: a seeded k-regular graph over the roster.
///
/// Exactly (so that any implementation can reproduce it):
/// 1. the roster is sorted (byte order of the ids) and duplicates are removed;
/// 2. it is shuffled with `ChaCha20Rng::from_seed(graph_seed)` (rand_chacha 0.9, ChaCha20, stream
///    0) by Fisher–Yates: for `i` from `n - 1` down to `1`, draw `j` uniform in `0..=i` by
///    rejection sampling (`x = next_u64()`, accepted when `x < zone` with
///    `zone = (u64::MAX / (i + 1)) * (i + 1)`, then `j = x % (i + 1)`) and swap positions `i` and
///    `j`;
/// 3. the shuffled list is a ring; the neighbours of position `p` are the `k/2` positions on
///    each side (`p ± 1 ..= p ± k/2` mod n);
/// 4. if `k >= n - 1`, every other member is a neighbour (the complete graph).
///
/// The graph is symmetric (`v ∈ N(u) ⇔ u ∈ N(v)`), has no self loops, and each list is sorted.
/// An odd `k` acts as `k - 1` ([`crate::Params::check`] refuses odd `k`).
pub fn neighbourhoods(
    graph_seed: &[u8; 32],
    roster: &[String],
    k: u16,
) -> BTreeMap<String, Vec<String>> {
    let mut ring: Vec<&str> = roster.iter().map(String::as_str).collect();
    ring.sort_unstable();
    ring.dedup();
    let n = ring.len();
    let mut rng = ChaCha20Rng::from_seed(*graph_seed);
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        ring.swap(i, j);
    }
    let k = usize::from(k);
    let complete = k >= n.saturating_sub(1);
    let half = k / 2;
    let mut out = BTreeMap::new();
    for (p, &me) in ring.iter().enumerate() {
        let mut list: Vec<String> = if complete {
            ring.iter()
                .filter(|&&other| other != me)
                .map(|&s| s.to_owned())
                .collect()
        } else {
            (1..=half)
                .flat_map(|o| [ring[(p + o) % n], ring[(p + n - o) % n]])
                .map(str::to_owned)
                .collect()
        };
        list.sort_unstable();
        out.insert(me.to_owned(), list);
    }
    out
}

/// Uniform in `0..bound` (`bound >= 1`) by rejection sampling on `next_u64`.
fn below(rng: &mut ChaCha20Rng, bound: u64) -> u64 {
    let zone = (u64::MAX / bound) * bound;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return x % bound;
        }
    }
}
