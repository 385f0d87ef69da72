//! DP-SGD: per-sample clipping is exact, noise has the configured scale, and every step is
//! accounted.

mod common;

use common::*;
use fedpeft_peft::*;

fn tail(method: Method) -> PeftTail<f32> {
    PeftTail::<f32>::build(
        Family::ConvHead,
        &conv_weights(5, 7, 3),
        PeftConfig::new(method, 3, 1),
    )
    .unwrap()
}

fn cfg(clip: f64, sigma: f64) -> DpSgdConfig {
    DpSgdConfig {
        clip_norm: clip,
        noise_multiplier: sigma,
        sample_rate: 0.05,
        expected_batch_size: None,
    }
}

#[test]
fn without_noise_and_with_a_loose_bound_dp_sgd_equals_plain_sgd() {
    let b = conv_batch::<f32>(4, 5, 2, 2);
    let labels = [0, 1, 2, 1];
    let mut a = tail(Method::Bias);
    let mut c = a.clone();
    a.train_step(&b, &labels, &mut Sgd::new(0.5)).unwrap();
    let mut dp = DpSgd::new(cfg(1e6, 0.0), 0).unwrap();
    c.train_step_dp(&b, &labels, &mut dp, &mut Sgd::new(0.5))
        .unwrap();
    for (x, y) in a.trainable().iter().zip(c.trainable()) {
        for (u, v) in x.values.iter().zip(&y.values) {
            assert!((u - v).abs() < 1e-6, "{}: {u} vs {v}", x.name);
        }
    }
}

#[test]
fn each_sample_gradient_is_clipped_to_the_bound_before_averaging() {
    let b = conv_batch::<f32>(3, 5, 2, 2);
    let labels = [0, 1, 2];
    let clip = 0.05;
    let t0 = tail(Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![],
    }));
    // Expected update: mean over samples of g_i · min(1, C/‖g_i‖), computed one sample at a time.
    let mut expected: Vec<Vec<f32>> = t0
        .trainable()
        .iter()
        .map(|t| vec![0.0; t.values.len()])
        .collect();
    for i in 0..3 {
        let mut t = t0.clone();
        let (_, _, g) = t
            .loss_and_grads(&b.sample(i), &labels[i..i + 1], true)
            .unwrap();
        let norm = g.sq_norm().sqrt();
        assert!(norm > clip, "the bound must bind for this test");
        let f = (clip / (norm + 1e-6)) as f32 / 3.0;
        for (e, (_, gi)) in expected.iter_mut().zip(g.iter()) {
            for (x, y) in e.iter_mut().zip(gi.iter()) {
                *x += f * y;
            }
        }
    }
    let mut t = t0.clone();
    let mut dp = DpSgd::new(cfg(clip, 0.0), 0).unwrap();
    let stats = t
        .train_step_dp(&b, &labels, &mut dp, &mut Sgd::new(1.0))
        .unwrap();
    assert!(stats.grad_norm <= clip + 1e-6);
    for ((before, after), e) in t0.trainable().iter().zip(t.trainable()).zip(&expected) {
        for ((u, v), g) in before.values.iter().zip(&after.values).zip(e) {
            assert!(((u - v) - g).abs() < 1e-6, "{}", before.name);
        }
    }
}

#[test]
fn noise_has_standard_deviation_sigma_times_clip_over_batch_and_steps_are_accounted() {
    let b = conv_batch::<f32>(2, 5, 2, 2);
    let labels = [0, 1];
    let (clip, sigma) = (1.0, 3.0);
    let mut t = tail(Method::FullTail);
    let before = t.trainable();
    let mut dp = DpSgd::new(cfg(clip, sigma), 7).unwrap();
    t.train_step_dp(&b, &labels, &mut dp, &mut Sgd::new(1.0))
        .unwrap();
    // With ~10^3 coordinates the update is dominated by noise of std σC/B = 1.5.
    let deltas: Vec<f64> = before
        .iter()
        .zip(t.trainable())
        .flat_map(|(x, y)| {
            x.values
                .iter()
                .zip(y.values)
                .map(|(a, b)| (a - b) as f64)
                .collect::<Vec<_>>()
        })
        .collect();
    let n = deltas.len() as f64;
    let std = (deltas.iter().map(|d| d * d).sum::<f64>() / n).sqrt();
    assert!(
        n > 50.0 && (std - 1.5).abs() < 0.2,
        "std {std} over {n} coordinates"
    );
    assert_eq!(dp.accountant.steps(), 1);
    let mut reference = RdpAccountant::new();
    reference.compose(0.05, sigma, 1).unwrap();
    assert_eq!(dp.epsilon(1e-5), reference.epsilon(1e-5).0);
}
