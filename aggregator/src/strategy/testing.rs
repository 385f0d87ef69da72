//! Helpers shared by the strategies' tests: one-tensor adapters and a whole round.

use super::Strategy;
use fedpeft_peft::NamedTensor;

use crate::adapter::Adapter;

/// One tensor `name` holding `data`.
pub(super) fn one(name: &str, data: Vec<f32>) -> Vec<NamedTensor> {
    vec![NamedTensor::new(name, vec![data.len()], data).unwrap()]
}

/// An adapter of one tensor `w`.
pub(super) fn global(data: Vec<f32>) -> Adapter {
    Adapter::new(one("w", data))
}

/// Round 1 from `g`: every `(num_examples, delta)` folded in, then aggregated.
pub(super) fn run(s: &mut dyn Strategy, g: &Adapter, updates: &[(u64, Vec<f32>)]) -> Adapter {
    let mut acc = s.configure_round(1, g, updates.len());
    for (n, d) in updates {
        assert!(acc.fold(*n, &one("w", d.clone())));
    }
    s.aggregate(1, g, &acc).unwrap()
}
