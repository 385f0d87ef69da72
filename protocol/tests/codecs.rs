//! Tensor codec properties: int8 error bound and unbiasedness, f16 accuracy, top-k with error
//! feedback.

use fedpeft_protocol::f16::{f16_bits_to_f32, f32_to_f16_bits};
use fedpeft_protocol::*;
use proptest::prelude::*;

#[test]
fn int8_error_is_at_most_one_scale_step_for_every_element() {
    let mut rng = SplitMix64::new(3);
    let data: Vec<f32> = (0..10_000)
        .map(|i| ((i as f32) * 0.7231).sin() * 3.0 - 0.4)
        .collect();
    let t = Tensor::encode("w", &[100, 100], &data, Codec::dense(DType::I8), &mut rng).unwrap();
    let Values::I8 { scale, .. } = *t.values() else {
        panic!("not int8")
    };
    let max = data.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert_eq!(scale, max / 127.0);
    for (x, q) in data.iter().zip(t.to_f32()) {
        assert!(
            (x - q).abs() <= scale * (1.0 + 1e-6),
            "x={x} q={q} scale={scale}"
        );
    }
}

#[test]
fn int8_stochastic_rounding_is_unbiased() {
    // Each value quantized 20 000 times with different seeds: the mean of the dequantized
    // values must approach x. The standard error is at most scale / (2 sqrt(n)) ~ 0.0035 scale,
    // so 0.02 scale is a > 5-sigma bound.
    let data = [0.013f32, -0.5, 0.77, 1.0, -0.999, 0.25, 0.0001];
    let trials = 20_000;
    let mut sums = [0.0f64; 7];
    let mut scale = 0.0;
    for seed in 0..trials {
        let mut rng = SplitMix64::new(seed);
        let t = Tensor::encode("w", &[7], &data, Codec::dense(DType::I8), &mut rng).unwrap();
        scale = match t.values() {
            Values::I8 { scale, .. } => *scale,
            _ => unreachable!(),
        };
        for (s, v) in sums.iter_mut().zip(t.to_f32()) {
            *s += f64::from(v);
        }
    }
    for (x, s) in data.iter().zip(sums) {
        let mean = s / trials as f64;
        assert!(
            (mean - f64::from(*x)).abs() < 0.02 * f64::from(scale),
            "x={x} mean={mean} scale={scale}"
        );
    }
}

#[test]
fn nearest_rounding_would_fail_the_unbiasedness_test() {
    // Guards the test above against being vacuous: with scale 1/127, 0.013 is 1.65 steps;
    // round-to-nearest always gives 2 steps, a bias of 0.35 steps, far outside its tolerance.
    let scale = 1.0f32 / 127.0;
    let nearest = (0.013f32 / scale).round() * scale;
    assert!((nearest - 0.013).abs() > 0.02 * scale);
}

#[test]
fn f16_codec_is_within_half_an_ulp_of_the_input() {
    let mut rng = SplitMix64::new(0);
    let data: Vec<f32> = (0..20_000)
        .map(|_| (rng.next_f32() - 0.5) * 2.0f32.powi((rng.next_u64() % 40) as i32 - 25))
        .collect();
    let t = Tensor::encode("w", &[20_000], &data, Codec::dense(DType::F16), &mut rng).unwrap();
    for (x, y) in data.iter().zip(t.to_f32()) {
        let h = f32_to_f16_bits(*x);
        // ulp of the f16 result: distance to the next f16 away from zero.
        let ulp = (f16_bits_to_f32((h & 0x7fff) + 1) - f16_bits_to_f32(h & 0x7fff)).abs();
        assert!((x - y).abs() <= ulp / 2.0, "x={x} y={y} ulp={ulp}");
    }
}

#[test]
fn top_k_with_error_feedback_eventually_sends_everything() {
    // With error feedback, what top-k drops is carried over: summed over rounds, what was sent
    // plus the final residual equals what was meant to be sent.
    let mut rng = SplitMix64::new(5);
    let n = 1_000;
    let mut residual = vec![0.0f32; n];
    let mut sent = vec![0.0f32; n];
    let mut meant = vec![0.0f32; n];
    for round in 0..20 {
        let delta: Vec<f32> = (0..n)
            .map(|i| ((i * 31 + round * 7) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let t = Tensor::encode_with_feedback(
            "w",
            &[n as u32],
            &delta,
            &mut residual,
            Codec::top_k(DType::I8, 0.1),
            &mut rng,
        )
        .unwrap();
        assert_eq!(t.indices().unwrap().len(), 100);
        t.accumulate_into(&mut sent, 1.0).unwrap();
        for (m, d) in meant.iter_mut().zip(&delta) {
            *m += d;
        }
    }
    for i in 0..n {
        assert!(
            (sent[i] + residual[i] - meant[i]).abs() < 1e-3,
            "element {i}"
        );
    }
}

#[test]
fn codec_inputs_with_the_wrong_length_are_rejected() {
    let mut rng = SplitMix64::new(0);
    assert_eq!(
        Tensor::encode("w", &[2, 3], &[0.0; 5], Codec::dense(DType::F32), &mut rng),
        Err(TensorError::LengthMismatch {
            name: "w".into(),
            expected: 6,
            found: 5
        })
    );
    let mut residual = [0.0; 4];
    assert!(matches!(
        Tensor::encode_with_feedback(
            "w",
            &[5],
            &[0.0; 5],
            &mut residual,
            Codec::dense(DType::F16),
            &mut rng
        ),
        Err(TensorError::ResidualLengthMismatch { .. })
    ));
}

proptest! {
    #[test]
    fn f32_codec_round_trips_bit_exactly(data in prop::collection::vec(any::<f32>(), 0..200)) {
        let mut rng = SplitMix64::new(0);
        let t = Tensor::encode("w", &[data.len() as u32], &data, Codec::dense(DType::F32), &mut rng).unwrap();
        let back: Vec<u32> = t.to_f32().iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = data.iter().map(|x| x.to_bits()).collect();
        prop_assert_eq!(back, want);
    }

    #[test]
    fn int8_bound_holds_for_arbitrary_finite_inputs(
        data in prop::collection::vec(-1e30f32..1e30f32, 1..200),
        seed in any::<u64>(),
        frac in 0.01f32..=1.0,
    ) {
        let mut rng = SplitMix64::new(seed);
        let t = Tensor::encode("w", &[data.len() as u32], &data, Codec::top_k(DType::I8, frac), &mut rng).unwrap();
        let Values::I8 { scale, .. } = *t.values() else { unreachable!() };
        let dense = t.to_f32();
        for &i in t.indices().unwrap() {
            let (x, q) = (data[i as usize], dense[i as usize]);
            prop_assert!((x - q).abs() <= scale * (1.0 + 1e-6), "x={} q={} scale={}", x, q, scale);
        }
    }
}
