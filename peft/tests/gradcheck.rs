//! Finite-difference gradient checks in f64: every layer, and every PEFT method on every
//! tail family (all trainable tensors randomised first so no gradient is trivially zero).

mod common;

use std::sync::Arc;

use common::*;
use fedpeft_peft::layers::*;
use fedpeft_peft::params::{Grads, ParamStore};
use fedpeft_peft::{
    AdapterConfig, Family, Gelu, LoraConfig, LoraTarget, Method, PeftConfig, PeftTail, Pool,
    PromptConfig, TransformerSpec, VitSpec,
};
use ndarray::{Array2, ArrayD, IxDyn};
use rand::SeedableRng;
use rand::rngs::StdRng;

const TOL: f64 = 1e-6;

fn a2(rng: &mut StdRng, r: usize, c: usize, s: f64) -> Array2<f64> {
    rand_array::<f64>(rng, &[r, c], s)
        .into_dimensionality()
        .unwrap()
}

fn flat(a: &ArrayD<f64>) -> Vec<f64> {
    a.iter().copied().collect()
}

/// A layer under test: `(store, x, Some(dy))` → `(y, Some((param grads, dx)))`.
type LayerRun<'a> = dyn Fn(
        &ParamStore<f64>,
        &Array2<f64>,
        Option<&Array2<f64>>,
    ) -> (Array2<f64>, Option<(Grads<f64>, Array2<f64>)>)
    + 'a;

/// Checks d(sum(y ⊙ r))/dx and /dθ for a layer given as `run(store, x) -> (y, grads, dx)`.
fn check_layer(name: &str, store: &ParamStore<f64>, x: &Array2<f64>, run: &LayerRun) {
    let mut rng = StdRng::seed_from_u64(99);
    let (y, _) = run(store, x, None);
    let r = a2(&mut rng, y.nrows(), y.ncols(), 1.0);
    let (_, g) = run(store, x, Some(&r));
    let (grads, dx) = g.unwrap();
    let dx = dx.as_standard_layout().into_owned();
    let loss = |st: &ParamStore<f64>, xx: &Array2<f64>| (&run(st, xx, None).0 * &r).sum();
    check_grad(
        &format!("{name}: dx"),
        x.as_slice().unwrap(),
        dx.as_slice().unwrap(),
        |v| {
            loss(
                store,
                &Array2::from_shape_vec(x.raw_dim(), v.to_vec()).unwrap(),
            )
        },
        TOL,
    );
    for (id, g) in grads.iter() {
        let p = store.param(id);
        let mut st = store.clone();
        check_grad(
            &format!("{name}: d{}", p.name),
            &flat(&p.value),
            &flat(g),
            |v| {
                st.param_mut(id).value =
                    ArrayD::from_shape_vec(p.value.raw_dim(), v.to_vec()).unwrap();
                loss(&st, x)
            },
            TOL,
        );
    }
}

#[test]
fn linear_with_bias_and_lora_passes_gradient_check() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut st = ParamStore::<f64>::new();
    let w = st
        .add("w", rand_array(&mut rng, &[5, 4], 0.5), true)
        .unwrap();
    let b = st.add("b", rand_array(&mut rng, &[5], 0.5), true).unwrap();
    let a = st
        .add("a", rand_array(&mut rng, &[2, 4], 0.5), true)
        .unwrap();
    let bb = st
        .add("bb", rand_array(&mut rng, &[5, 2], 0.5), true)
        .unwrap();
    let x = a2(&mut rng, 6, 4, 1.0);
    for dropout in [0.0, 0.3] {
        let lin = Linear {
            w,
            b: Some(b),
            lora: Some(LoraParams {
                a,
                b: bb,
                scaling: 2.0,
                dropout,
            }),
        };
        check_layer(
            &format!("linear+lora dropout {dropout}"),
            &st,
            &x,
            &|p, x, dy| {
                // The same seed every call: a fixed dropout mask, so the function is smooth.
                let mut drng = StdRng::seed_from_u64(5);
                let (y, c) = lin.forward(p, &Arc::new(x.clone()), Some(&mut drng));
                let g = dy.map(|dy| {
                    let mut g = Grads::zeros_like(p);
                    let dx = lin.backward(p, c, dy.view(), &mut g, true).unwrap();
                    (g, dx)
                });
                (y, g)
            },
        );
    }
}

#[test]
fn per_pixel_linear_over_nchw_passes_gradient_check() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut st = ParamStore::<f64>::new();
    let w = st
        .add("w", rand_array(&mut rng, &[6, 3], 0.5), true)
        .unwrap();
    let lin = Linear {
        w,
        b: None,
        lora: None,
    };
    // x is the NCHW tensor flattened as [B, C*H*W]; rows_to_nchw is checked as the inverse.
    let (b, c, h, ww) = (2, 3, 2, 2);
    let x = a2(&mut rng, b, c * h * ww, 1.0);
    check_layer("pixel linear", &st, &x, &|p, x, dy| {
        let x4 = x.view().into_shape_with_order((b, c, h, ww)).unwrap();
        let rows = nchw_to_rows(x4);
        assert_eq!(rows_to_nchw(rows.view(), b, h, ww), x4);
        let (y, cache) = lin.forward(p, &Arc::new(rows), None);
        let yn = rows_to_nchw(y.view(), b, h, ww)
            .into_shape_with_order((b, 6 * h * ww))
            .unwrap();
        let g = dy.map(|dy| {
            let dy4 = dy.view().into_shape_with_order((b, 6, h, ww)).unwrap();
            let dyr = nchw_to_rows(dy4);
            let mut g = Grads::zeros_like(p);
            let dxr = lin.backward(p, cache, dyr.view(), &mut g, true).unwrap();
            (
                g,
                rows_to_nchw(dxr.view(), b, h, ww)
                    .into_shape_with_order((b, c * h * ww))
                    .unwrap(),
            )
        });
        (yn, g)
    });
}

#[test]
fn folded_batchnorm_and_relu6_pass_gradient_check() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut st = ParamStore::<f64>::new();
    let scale = st
        .add("scale", rand_array(&mut rng, &[4], 2.0), true)
        .unwrap();
    let shift = st
        .add("shift", rand_array(&mut rng, &[4], 2.0), true)
        .unwrap();
    let bn = FoldedBn { scale, shift };
    let x = a2(&mut rng, 7, 4, 4.0);
    check_layer("bn+relu6", &st, &x, &|p, x, dy| {
        let (z, keep) = bn.forward(p, x.clone());
        let y = relu6_forward(z);
        let g = dy.map(|dy| {
            let dz = relu6_backward(y.view(), dy.clone());
            let mut g = Grads::zeros_like(p);
            let dx = bn.backward(p, keep, dz.view(), &mut g, true).unwrap();
            (g, dx)
        });
        (y, g)
    });
}

#[test]
fn layer_scale_passes_gradient_check() {
    let mut rng = StdRng::seed_from_u64(9);
    let mut st = ParamStore::<f64>::new();
    let gamma = st.add("ls", rand_array(&mut rng, &[4], 1.0), true).unwrap();
    let ls = LayerScale { gamma };
    let x = a2(&mut rng, 5, 4, 2.0);
    check_layer("layer scale", &st, &x, &|p, x, dy| {
        let (y, keep) = ls.forward(p, x.clone());
        let g = dy.map(|dy| {
            let mut g = Grads::zeros_like(p);
            let dx = ls.backward(p, keep, dy.view(), &mut g, true).unwrap();
            (g, dx)
        });
        (y, g)
    });
}

#[test]
fn gelu_passes_gradient_check_and_matches_known_values() {
    // Known values of the erf GELU: Python's `0.5*x*(1+math.erf(x/math.sqrt(2)))`.
    assert!((gelu(1.0f64) - 0.841_344_746_068_542_9).abs() < 1e-15);
    assert!((gelu(-0.5f64) - (-0.154_268_769_362_993_44)).abs() < 1e-15);
    let mut rng = StdRng::seed_from_u64(4);
    let st = ParamStore::<f64>::new();
    let x = a2(&mut rng, 5, 6, 4.0);
    check_layer("gelu", &st, &x, &|p, x, dy| {
        let y = gelu_forward(x.view());
        (
            y,
            dy.map(|dy| (Grads::zeros_like(p), gelu_backward(x.view(), dy.clone()))),
        )
    });
}

#[test]
fn layernorm_passes_gradient_check() {
    let mut rng = StdRng::seed_from_u64(5);
    let mut st = ParamStore::<f64>::new();
    let weight = st.add("g", rand_array(&mut rng, &[6], 1.5), true).unwrap();
    let bias = st.add("b", rand_array(&mut rng, &[6], 1.0), true).unwrap();
    let ln = LayerNorm {
        weight,
        bias,
        eps: 1e-12,
    };
    let x = a2(&mut rng, 4, 6, 2.0);
    check_layer("layernorm", &st, &x, &|p, x, dy| {
        let (y, c) = ln.forward(p, x.view());
        let g = dy.map(|dy| {
            let mut g = Grads::zeros_like(p);
            let dx = ln.backward(p, c, dy.view(), &mut g);
            (g, dx)
        });
        (y, g)
    });
}

#[test]
fn masked_multi_head_attention_passes_gradient_check() {
    let mut rng = StdRng::seed_from_u64(6);
    let (b, s, d, heads) = (2, 4, 6, 3);
    let st = ParamStore::<f64>::new();
    // q, k, v side by side in one input matrix [B*S, 3D].
    let x = a2(&mut rng, b * s, 3 * d, 1.5);
    let mut bias = Array2::<f64>::zeros((b, s));
    bias[[1, 3]] = f64::MIN;
    bias[[1, 2]] = f64::MIN;
    let core = AttentionCore { heads };
    check_layer("attention", &st, &x, &|p, x, dy| {
        let q = x.slice(ndarray::s![.., ..d]).to_owned();
        let k = x.slice(ndarray::s![.., d..2 * d]).to_owned();
        let v = x.slice(ndarray::s![.., 2 * d..]).to_owned();
        let (ctx, c) = core.forward(q, k, v, bias.view());
        let g = dy.map(|dy| {
            let (dq, dk, dv) = core.backward(c, dy.view());
            (
                Grads::zeros_like(p),
                ndarray::concatenate![ndarray::Axis(1), dq, dk, dv],
            )
        });
        (ctx, g)
    });
}

#[test]
fn masked_mean_and_global_average_pooling_pass_gradient_check() {
    let mut rng = StdRng::seed_from_u64(7);
    let st = ParamStore::<f64>::new();
    let mask = Array2::from_shape_vec((2, 3), vec![1.0, 1.0, 0.0, 1.0, 0.0, 0.0]).unwrap();
    let x = a2(&mut rng, 6, 4, 1.0);
    check_layer("masked mean", &st, &x, &|p, x, dy| {
        let y = masked_mean_forward(x.view(), mask.view());
        (
            y,
            dy.map(|dy| {
                (
                    Grads::zeros_like(p),
                    masked_mean_backward(dy.view(), mask.view()),
                )
            }),
        )
    });
    check_layer("gap", &st, &x, &|p, x, dy| {
        let y = gap_forward(x.view(), 2);
        (
            y,
            dy.map(|dy| (Grads::zeros_like(p), gap_backward(dy.view(), 3))),
        )
    });
}

#[test]
fn softmax_cross_entropy_passes_gradient_check_and_is_stable() {
    let mut rng = StdRng::seed_from_u64(8);
    let labels = [0usize, 2, 1];
    let x = a2(&mut rng, 3, 4, 3.0);
    let (_, g, _) = cross_entropy(x.view(), &labels);
    check_grad(
        "cross entropy",
        x.as_slice().unwrap(),
        g.as_slice().unwrap(),
        |v| {
            cross_entropy(
                Array2::from_shape_vec((3, 4), v.to_vec()).unwrap().view(),
                &labels,
            )
            .0
        },
        TOL,
    );
    // Huge logits must not overflow (log-sum-exp with the max subtracted).
    let big = Array2::from_shape_vec((1, 2), vec![1000.0f32, 0.0]).unwrap();
    let (loss, g, correct) = cross_entropy(big.view(), &[1]);
    assert!((loss - 1000.0).abs() < 1e-3 && g.iter().all(|v| v.is_finite()) && correct == 0);
}

/// Randomises every trainable tensor (so LoRA B, adapter up-projections etc. are non-zero)
/// and checks every trainable gradient of the tail's loss by central differences.
fn check_tail(mut tail: PeftTail<f64>, batch: &fedpeft_peft::Batch<f64>, labels: &[usize]) {
    let mut rng = StdRng::seed_from_u64(42);
    let ids: Vec<_> = tail
        .params()
        .iter()
        .filter(|(_, p)| p.trainable)
        .map(|(id, _)| id)
        .collect();
    assert!(!ids.is_empty());
    for &id in &ids {
        let shape = tail.params().param(id).value.shape().to_vec();
        let p = tail.params_mut().param_mut(id);
        p.value = &p.value + &rand_array::<f64>(&mut rng, &shape, 0.3);
    }
    let (_, _, grads) = tail.loss_and_grads(batch, labels, false).unwrap();
    for &id in &ids {
        let p = tail.params().param(id).clone();
        let g = grads.get(id).unwrap();
        let mut t = tail.clone();
        let what = format!(
            "{} {}: d{}",
            tail.family().name(),
            tail.config().method,
            p.name
        );
        check_grad(
            &what,
            &flat(&p.value),
            &flat(g),
            |v| {
                t.params_mut().param_mut(id).value =
                    ArrayD::from_shape_vec(IxDyn(p.value.shape()), v.to_vec()).unwrap();
                t.loss(batch, labels).unwrap()
            },
            TOL,
        );
    }
}

fn spec() -> Family {
    Family::Transformer(TransformerSpec {
        heads: 2,
        ln_eps: 1e-12,
    })
}

#[test]
fn every_conv_head_method_passes_gradient_check() {
    let w = conv_weights(5, 7, 10);
    let batch = conv_batch::<f64>(3, 5, 2, 11);
    let labels = [0, 2, 1];
    let lora = Method::Lora(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![],
    });
    for m in [Method::Head, Method::Bias, lora, Method::FullTail] {
        check_tail(
            PeftTail::<f64>::build(Family::ConvHead, &w, PeftConfig::new(m, 3, 1)).unwrap(),
            &batch,
            &labels,
        );
    }
}

/// Every method a family of transformer blocks supports, LoRA on every linear layer.
fn block_methods() -> [Method; 6] {
    [
        Method::Head,
        Method::Bias,
        Method::Lora(LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: LoraTarget::ALL_LINEAR.to_vec(),
        }),
        Method::Adapter(AdapterConfig { bottleneck: 3 }),
        Method::Prompt(PromptConfig { tokens: 2 }),
        Method::FullTail,
    ]
}

#[test]
fn every_transformer_method_passes_gradient_check() {
    let w = transformer_weights(2, 8, 12, 20);
    let batch = token_batch::<f64>(3, 4, 8, 21);
    let labels = [1, 0, 2];
    for m in block_methods() {
        check_tail(
            PeftTail::<f64>::build(spec(), &w, PeftConfig::new(m, 3, 1)).unwrap(),
            &batch,
            &labels,
        );
    }
}

fn vit(pool: Pool) -> Family {
    Family::Vit(VitSpec {
        heads: 2,
        ln_eps: 1e-6,
        gelu: Gelu::Erf,
        k: 2,
        pool,
    })
}

#[test]
fn every_vit_method_passes_gradient_check() {
    let w = vit_weights(2, 8, 12, 22);
    let batch = vit_batch::<f64>(3, 4, 8, 23);
    let labels = [2, 0, 1];
    for m in block_methods() {
        check_tail(
            PeftTail::<f64>::build(vit(Pool::Cls), &w, PeftConfig::new(m, 3, 1)).unwrap(),
            &batch,
            &labels,
        );
    }
}

#[test]
fn a_mean_pooled_vit_with_prompts_or_bias_tuning_passes_gradient_check() {
    let w = vit_weights(2, 8, 12, 24);
    let batch = vit_batch::<f64>(2, 3, 8, 25);
    for m in [Method::Prompt(PromptConfig { tokens: 2 }), Method::Bias] {
        let cfg = PeftConfig::new(m, 3, 1);
        let tail = PeftTail::<f64>::build(vit(Pool::MaskedMean), &w, cfg).unwrap();
        check_tail(tail, &batch, &[2, 0]);
    }
}
