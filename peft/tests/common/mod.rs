//! Shared helpers: random frozen weights with the contract's names, random batches, and a
//! central-difference gradient checker.
#![allow(dead_code)]

use std::collections::HashMap;

use fedpeft_peft::{Batch, FrozenWeights, Real};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Conv head weights: `cin -> cout`, BN scale around 1.
pub fn conv_weights(cin: usize, cout: usize, seed: u64) -> FrozenWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = HashMap::new();
    m.insert(
        "conv_head.weight".into(),
        (vec![cout, cin], rand_vec(&mut rng, cout * cin, 0.5)),
    );
    m.insert(
        "bn_head.scale".into(),
        (
            vec![cout],
            (0..cout).map(|_| rng.random_range(0.5..1.5)).collect(),
        ),
    );
    m.insert(
        "bn_head.shift".into(),
        (vec![cout], rand_vec(&mut rng, cout, 0.5)),
    );
    FrozenWeights::from_map(m).unwrap()
}

/// `k` BERT blocks of hidden `d`, intermediate `inter`.
pub fn transformer_weights(k: usize, d: usize, inter: usize, seed: u64) -> FrozenWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    FrozenWeights::from_map(block_map(k, d, inter, &mut rng)).unwrap()
}

/// `k` ViT blocks (the BERT block's tensors plus layer scales `ls1`, `ls2` in `[0.2, 1)`) and
/// the final LayerNorm.
pub fn vit_weights(k: usize, d: usize, inter: usize, seed: u64) -> FrozenWeights {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = block_map(k, d, inter, &mut rng);
    for j in 0..k {
        for n in ["ls1", "ls2"] {
            let ls = (0..d).map(|_| rng.random_range(0.2..1.0)).collect();
            m.insert(format!("blocks.{j}.{n}"), (vec![d], ls));
        }
    }
    let gamma = (0..d).map(|_| rng.random_range(0.8..1.2)).collect();
    m.insert("final_ln.weight".into(), (vec![d], gamma));
    m.insert(
        "final_ln.bias".into(),
        (vec![d], rand_vec(&mut rng, d, 0.1)),
    );
    FrozenWeights::from_map(m).unwrap()
}

type WeightMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors every transformer block has, for `k` blocks.
fn block_map(k: usize, d: usize, inter: usize, rng: &mut StdRng) -> WeightMap {
    let mut m = HashMap::new();
    let s = 1.0 / (d as f32).sqrt();
    for j in 0..k {
        for n in ["q", "k", "v", "o"] {
            m.insert(
                format!("blocks.{j}.attn.{n}.weight"),
                (vec![d, d], rand_vec(rng, d * d, s)),
            );
            m.insert(
                format!("blocks.{j}.attn.{n}.bias"),
                (vec![d], rand_vec(rng, d, 0.1)),
            );
        }
        for n in ["ln1", "ln2"] {
            m.insert(
                format!("blocks.{j}.{n}.weight"),
                (
                    vec![d],
                    (0..d).map(|_| rng.random_range(0.8..1.2)).collect(),
                ),
            );
            m.insert(
                format!("blocks.{j}.{n}.bias"),
                (vec![d], rand_vec(rng, d, 0.1)),
            );
        }
        m.insert(
            format!("blocks.{j}.ffn.up.weight"),
            (vec![inter, d], rand_vec(rng, inter * d, s)),
        );
        m.insert(
            format!("blocks.{j}.ffn.up.bias"),
            (vec![inter], rand_vec(rng, inter, 0.1)),
        );
        let s2 = 1.0 / (inter as f32).sqrt();
        m.insert(
            format!("blocks.{j}.ffn.down.weight"),
            (vec![d, inter], rand_vec(rng, d * inter, s2)),
        );
        m.insert(
            format!("blocks.{j}.ffn.down.bias"),
            (vec![d], rand_vec(rng, d, 0.1)),
        );
    }
    m
}

pub fn rand_array<T: Real>(rng: &mut StdRng, shape: &[usize], scale: f64) -> ArrayD<T> {
    ArrayD::from_shape_simple_fn(IxDyn(shape), || T::lit(rng.random_range(-scale..scale)))
}

/// A conv batch `[b, c, h, w]` of non-negative activations (trunk outputs follow a ReLU6).
pub fn conv_batch<T: Real>(b: usize, c: usize, hw: usize, seed: u64) -> Batch<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let features = ArrayD::from_shape_simple_fn(IxDyn(&[b, c, hw, hw]), || {
        T::lit(rng.random_range(0.0..2.0))
    });
    Batch::new(features, None)
}

/// A token batch `[b, s, d]` whose later samples have trailing padding.
pub fn token_batch<T: Real>(b: usize, s: usize, d: usize, seed: u64) -> Batch<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    let features = rand_array(&mut rng, &[b, s, d], 1.0);
    let mask = Array2::from_shape_fn(
        (b, s),
        |(i, j)| if j + i < s { T::one() } else { T::zero() },
    );
    Batch::new(features, Some(mask))
}

/// A ViT token batch `[b, s, d]` (CLS token first, no padding, no mask).
pub fn vit_batch<T: Real>(b: usize, s: usize, d: usize, seed: u64) -> Batch<T> {
    let mut rng = StdRng::seed_from_u64(seed);
    Batch::new(rand_array(&mut rng, &[b, s, d], 1.0), None)
}

/// Compares an analytic gradient with central differences of `f` at `x`.
/// Tolerance: `|a − n| ≤ tol · max(1, |a|, |n|)`.
pub fn check_grad(
    what: &str,
    x: &[f64],
    analytic: &[f64],
    mut f: impl FnMut(&[f64]) -> f64,
    tol: f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-6;
    let mut xp = x.to_vec();
    let mut worst = 0.0f64;
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * h);
        let a = analytic[i];
        let err = (a - num).abs() / 1f64.max(a.abs()).max(num.abs());
        worst = worst.max(err);
        assert!(
            err <= tol,
            "{what}[{i}]: analytic {a:e} vs numeric {num:e} (rel err {err:e})"
        );
    }
    assert!(worst.is_finite(), "{what}: non-finite error");
}
