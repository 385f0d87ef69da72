//! The frozen prefix (`PeftTail::frozen_prefix`, `Batch::frozen`): the part of the forward
//! pass that no trained tensor affects, computed once. A batch carrying it must give the same
//! logits, loss, gradients and DP-SGD step as the batch without it, for every method that has
//! one; methods that train where the features enter have none, and a prefix of the wrong shape
//! or for the wrong tail is refused.

mod common;

use common::*;
use fedpeft_peft::*;
use ndarray::ArrayD;

fn lora(dropout: f64) -> Method {
    Method::Lora(LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        targets: vec![],
    })
}

fn conv_tail(method: Method) -> PeftTail<f64> {
    PeftTail::build(
        Family::ConvHead,
        &conv_weights(6, 10, 1),
        PeftConfig::new(method, 4, 3),
    )
    .unwrap()
}

fn text_tail(method: Method) -> PeftTail<f64> {
    let fam = Family::Transformer(TransformerSpec {
        heads: 2,
        ln_eps: 1e-12,
    });
    PeftTail::build(
        fam,
        &transformer_weights(2, 8, 12, 2),
        PeftConfig::new(method, 3, 5),
    )
    .unwrap()
}

fn vit_tail(method: Method) -> PeftTail<f64> {
    let fam = Family::Vit(VitSpec {
        heads: 2,
        ..VitSpec::default()
    });
    PeftTail::build(
        fam,
        &vit_weights(2, 8, 12, 2),
        PeftConfig::new(method, 3, 5),
    )
    .unwrap()
}

fn with_prefix(tail: &PeftTail<f64>, batch: &Batch<f64>) -> Batch<f64> {
    let frozen = tail
        .frozen_prefix(batch)
        .unwrap()
        .expect("this method has a frozen prefix");
    Batch {
        frozen: Some(frozen),
        ..batch.clone()
    }
}

fn max_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Same logits, loss and gradients (in f64, to rounding) with and without the prefix; the
/// tail's dropout stream is cloned so both passes draw the same masks.
fn assert_same(tail: &PeftTail<f64>, batch: &Batch<f64>, labels: &[usize]) {
    let pre = with_prefix(tail, batch);
    let d = max_diff(
        &tail.logits(batch).unwrap().into_dyn(),
        &tail.logits(&pre).unwrap().into_dyn(),
    );
    assert!(d < 1e-12, "logits differ by {d}");
    let (mut a, mut b) = (tail.clone(), tail.clone());
    let (la, ca, ga) = a.loss_and_grads(batch, labels, true).unwrap();
    let (lb, cb, gb) = b.loss_and_grads(&pre, labels, true).unwrap();
    assert!((la - lb).abs() < 1e-12, "loss {la} vs {lb}");
    assert_eq!(ca, cb);
    let mut compared = 0;
    for (id, p) in tail.params().iter() {
        if p.trainable {
            let d = max_diff(ga.get(id).expect("trained"), gb.get(id).expect("trained"));
            assert!(d < 1e-12, "gradient of {} differs by {d}", p.name);
            compared += 1;
        }
    }
    assert!(compared > 0);
}

#[test]
fn conv_head_methods_give_the_same_logits_and_gradients_with_the_prefix() {
    let batch = conv_batch::<f64>(5, 6, 3, 11);
    let labels = [0, 1, 2, 3, 1];
    for method in [Method::Head, Method::Bias, lora(0.0), lora(0.3)] {
        let tail = conv_tail(method.clone());
        assert_same(&tail, &batch, &labels);
    }
}

#[test]
fn a_transformer_head_gives_the_same_logits_and_gradients_with_the_prefix() {
    let batch = token_batch::<f64>(4, 6, 8, 12);
    assert_same(&text_tail(Method::Head), &batch, &[0, 1, 2, 1]);
}

#[test]
fn a_vit_head_gives_the_same_logits_and_gradients_with_the_prefix() {
    let batch = vit_batch::<f64>(4, 5, 8, 13);
    assert_same(&vit_tail(Method::Head), &batch, &[0, 1, 2, 1]);
    let pooled = vit_tail(Method::Head)
        .frozen_prefix(&batch)
        .unwrap()
        .unwrap();
    assert_eq!(pooled.shape(), &[4, 8]);
}

#[test]
fn the_prefix_has_the_shape_its_method_needs() {
    let batch = conv_batch::<f64>(5, 6, 3, 11);
    let head = conv_tail(Method::Head)
        .frozen_prefix(&batch)
        .unwrap()
        .unwrap();
    assert_eq!(head.shape(), &[5, 10]);
    let product = conv_tail(Method::Bias)
        .frozen_prefix(&batch)
        .unwrap()
        .unwrap();
    assert_eq!(product.shape(), &[5, 9, 10]);
    let tokens = token_batch::<f64>(4, 6, 8, 12);
    let pooled = text_tail(Method::Head)
        .frozen_prefix(&tokens)
        .unwrap()
        .unwrap();
    assert_eq!(pooled.shape(), &[4, 8]);
}

#[test]
fn methods_that_train_where_the_features_enter_have_no_prefix_and_refuse_one() {
    let batch = conv_batch::<f64>(5, 6, 3, 11);
    let full = conv_tail(Method::FullTail);
    assert!(full.frozen_prefix(&batch).unwrap().is_none());
    let pre = with_prefix(&conv_tail(Method::Bias), &batch);
    let err = full.logits(&pre).unwrap_err().to_string();
    assert!(err.contains("full-tail trains the layer"), "{err}");
    let tokens = token_batch::<f64>(4, 6, 8, 12);
    let patches = vit_batch::<f64>(4, 5, 8, 13);
    for method in [
        Method::Bias,
        lora(0.0),
        Method::Adapter(AdapterConfig { bottleneck: 2 }),
        Method::Prompt(PromptConfig { tokens: 2 }),
        Method::FullTail,
    ] {
        let name = method.name();
        let p = text_tail(method.clone()).frozen_prefix(&tokens).unwrap();
        assert!(p.is_none(), "{name} has a prefix");
        let p = vit_tail(method).frozen_prefix(&patches).unwrap();
        assert!(p.is_none(), "vit {name} has a prefix");
    }
}

#[test]
fn a_prefix_of_the_wrong_shape_is_refused_with_both_shapes() {
    let batch = conv_batch::<f64>(5, 6, 3, 11);
    let lora_tail = conv_tail(lora(0.0));
    // A head's pooled prefix handed to a LoRA tail, and one for fewer samples.
    let pooled = with_prefix(&conv_tail(Method::Head), &batch);
    let err = lora_tail.logits(&pooled).unwrap_err().to_string();
    assert!(
        err.contains("[5, 10]") && err.contains("[5, 9, 10]"),
        "{err}"
    );
    let mut short = with_prefix(&lora_tail, &batch);
    short.frozen = Some(
        short
            .frozen
            .unwrap()
            .slice_axis(ndarray::Axis(0), (0..4).into())
            .to_owned(),
    );
    let err = lora_tail.logits(&short).unwrap_err().to_string();
    assert!(err.contains("frozen prefix has shape [4, 9, 10]"), "{err}");
}

#[test]
fn a_dp_sgd_step_is_the_same_with_the_prefix() {
    let w = conv_weights(6, 10, 1);
    let batch = conv_batch::<f32>(6, 6, 3, 13);
    let labels = [0, 1, 2, 3, 1, 0];
    for method in [Method::Head, lora(0.0)] {
        let build = || {
            PeftTail::<f32>::build(Family::ConvHead, &w, PeftConfig::new(method.clone(), 4, 3))
                .unwrap()
        };
        let (mut a, mut b) = (build(), build());
        let frozen = a.frozen_prefix(&batch).unwrap();
        let pre = Batch {
            frozen,
            ..batch.clone()
        };
        let cfg = DpSgdConfig {
            clip_norm: 0.5,
            noise_multiplier: 1.0,
            sample_rate: 0.1,
            expected_batch_size: Some(6),
        };
        let (mut da, mut db) = (
            DpSgd::new(cfg.clone(), 9).unwrap(),
            DpSgd::new(cfg, 9).unwrap(),
        );
        let sa = a
            .train_step_dp(&batch, &labels, &mut da, &mut Sgd::new(0.1))
            .unwrap();
        let sb = b
            .train_step_dp(&pre, &labels, &mut db, &mut Sgd::new(0.1))
            .unwrap();
        assert!(
            (sa.loss - sb.loss).abs() < 1e-5,
            "{} vs {}",
            sa.loss,
            sb.loss
        );
        for (x, y) in a.trainable().iter().zip(b.trainable()) {
            let d = x
                .values
                .iter()
                .zip(&y.values)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-5, "{} differs by {d} after a DP-SGD step", x.name);
        }
    }
}
