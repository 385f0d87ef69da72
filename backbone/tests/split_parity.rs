//! Rust trunk (each runtime) + Rust tail (fedpeft-peft) against the original unsplit
//! pretrained model in PyTorch, on real inputs (fixtures from models/make_fixtures.py):
//! EfficientNet-Lite0's ImageNet logits and all-MiniLM-L6-v2's mean-pooled sentence embedding.

mod common;

use std::path::PathBuf;

use common::{Fixture, max_abs_diff};
use fedpeft_backbone::data::ImageDataset;
use fedpeft_backbone::{
    Backbone, ImagePreprocess, Runtime, RuntimeKind, TrunkConfig, TrunkInput, open_trunk,
};
use fedpeft_peft::{
    Batch, Family, FrozenWeights, HeadInit, Method, NamedTensor, PeftConfig, TransformerSpec,
    build_tail,
};
use ndarray::{Array2, ArrayD, Ix2, Ix4, s};

const TOL: f32 = 1e-4;

/// tract always; onnxruntime too under `--features ort` (opening it must then succeed: a
/// missing library fails the test rather than skipping the runtime).
fn runtimes() -> Vec<Runtime> {
    let mut r = vec![Runtime::Tract];
    if cfg!(feature = "ort") {
        r.push(Runtime::Ort);
    }
    r
}

/// The runtime a trunk must report when `rt` was asked for (no silent fallback).
fn kind(rt: Runtime) -> RuntimeKind {
    match rt {
        Runtime::Ort => RuntimeKind::Ort,
        _ => RuntimeKind::Tract,
    }
}

#[test]
fn efficientnet_trunk_plus_rust_tail_reproduces_the_unsplit_imagenet_logits() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let fx = Fixture::load("efficientnet-lite0.safetensors");
    let u8s = fx.u8("images_u8");
    let ds = ImageDataset {
        height: 28,
        width: 28,
        channels: 1,
        pixels: u8s.iter().copied().collect(),
        labels: vec![0; u8s.shape()[0]],
        classes: vec!["?".into()],
        source: PathBuf::from("fixture"),
    };
    let weights = FrozenWeights::from_safetensors(&bb.tail_path()).unwrap();
    let config = PeftConfig {
        method: Method::Head,
        head: HeadInit::Pretrained,
        seed: 0,
    };
    let tail = build_tail(Family::ConvHead, &weights, config).unwrap();
    let mut outputs: Vec<ArrayD<f32>> = Vec::new();
    for rt in runtimes() {
        for (size, key, n) in [(96, "logits_96", 4), (224, "logits_224", 2)] {
            let pre = ImagePreprocess::from_manifest(&bb.manifest, Some(size)).unwrap();
            let x = pre.batch(&ds, &(0..n).collect::<Vec<_>>()).unwrap();
            let trunk = open_trunk(
                &bb,
                &TrunkConfig::default()
                    .with_runtime(rt)
                    .with_image_size(size),
            )
            .unwrap();
            assert_eq!(trunk.runtime(), kind(rt));
            let features = trunk.run(&TrunkInput::Image(x)).unwrap();
            let logits = tail
                .forward(&Batch::new(features, None))
                .unwrap()
                .into_dyn();
            let want = fx.f32(key);
            let d = max_abs_diff(&logits, &want);
            println!("{rt:?} {size}px: logits max |diff| = {d:e}");
            assert!(
                d < TOL,
                "{rt:?} at {size}px: split model differs from PyTorch by {d}"
            );
            if size == 96 {
                outputs.push(logits);
            }
        }
    }
    // tract and ort agree with each other too
    for o in &outputs[1..] {
        assert!(max_abs_diff(o, &outputs[0]) < TOL);
    }
}

#[test]
fn minilm_trunk_plus_rust_tail_reproduces_the_unsplit_sentence_embedding() {
    let bb = Backbone::by_id("all-minilm-l6-v2").unwrap();
    let fx = Fixture::load("all-minilm-l6-v2.safetensors");
    let ids: Array2<i64> = fx.i64("input_ids").into_dimensionality::<Ix2>().unwrap();
    let mask: Array2<i64> = fx
        .i64("attention_mask")
        .into_dimensionality::<Ix2>()
        .unwrap();
    let want = fx.f32("embedding");
    let weights = FrozenWeights::from_safetensors(&bb.tail_path()).unwrap();
    let family = Family::Transformer(TransformerSpec {
        heads: 12,
        ln_eps: 1e-12,
    });
    // A 384-class head set to the identity exposes the pooled embedding as the logits.
    let mut tail = build_tail(family, &weights, PeftConfig::new(Method::Head, 384, 0)).unwrap();
    let eye: Vec<f32> = (0..384 * 384)
        .map(|i| if i / 384 == i % 384 { 1.0 } else { 0.0 })
        .collect();
    tail.set_trainable(&[
        NamedTensor::new("head.weight", vec![384, 384], eye).unwrap(),
        NamedTensor::new("head.bias", vec![384], vec![0.0; 384]).unwrap(),
    ])
    .unwrap();
    let mut outputs: Vec<ArrayD<f32>> = Vec::new();
    for rt in runtimes() {
        let trunk = open_trunk(&bb, &TrunkConfig::default().with_runtime(rt)).unwrap();
        assert_eq!(trunk.runtime(), kind(rt));
        let features = trunk
            .run(&TrunkInput::Tokens {
                ids: ids.clone(),
                mask: mask.clone(),
            })
            .unwrap();
        let batch = Batch::new(features, Some(mask.mapv(|m| m as f32)));
        let emb = tail.forward(&batch).unwrap().into_dyn();
        let d = max_abs_diff(&emb, &want);
        println!("{rt:?}: embedding max |diff| = {d:e}");
        assert!(d < TOL, "{rt:?}: split model differs from PyTorch by {d}");
        outputs.push(emb);
    }
    for o in &outputs[1..] {
        assert!(max_abs_diff(o, &outputs[0]) < TOL);
    }
}

#[test]
fn dinov2_trunk_plus_rust_vit_tail_reproduces_the_unsplit_final_layer_norm() {
    let bb = Backbone::by_id("dinov2-vits14").unwrap();
    // Written by `make models` from the unsplit graph (models/export_dinov2.py).
    let fx = Fixture::at(&bb.dir.join("parity.safetensors"));
    let pixels = fx.f32("pixels").into_dimensionality::<Ix4>().unwrap();
    let (want_tokens, final_ln) = (fx.f32("tokens"), fx.f32("final_ln"));
    let family = bb.manifest.tail_family().unwrap();
    assert!(matches!(family, Family::Vit(_)), "{family:?}");
    let weights = FrozenWeights::from_safetensors(&bb.tail_path()).unwrap();
    // A 384-class head set to the identity exposes the CLS token's final layer norm.
    let mut tail = build_tail(family, &weights, PeftConfig::new(Method::Head, 384, 0)).unwrap();
    let eye: Vec<f32> = (0..384 * 384)
        .map(|i| if i / 384 == i % 384 { 1.0 } else { 0.0 })
        .collect();
    tail.set_trainable(&[
        NamedTensor::new("head.weight", vec![384, 384], eye).unwrap(),
        NamedTensor::new("head.bias", vec![384], vec![0.0; 384]).unwrap(),
    ])
    .unwrap();
    let want_cls = final_ln.slice(s![.., 0, ..]).to_owned().into_dyn();
    for rt in runtimes() {
        let trunk = open_trunk(&bb, &TrunkConfig::default().with_runtime(rt)).unwrap();
        assert_eq!(trunk.runtime(), kind(rt));
        let tokens = trunk.run(&TrunkInput::Image(pixels.clone())).unwrap();
        let d_tokens = max_abs_diff(&tokens, &want_tokens);
        let cls = tail.forward(&Batch::new(tokens, None)).unwrap().into_dyn();
        let d_cls = max_abs_diff(&cls, &want_cls);
        println!("{rt:?}: tokens max |diff| = {d_tokens:e}, CLS final LN max |diff| = {d_cls:e}");
        assert!(d_tokens < TOL, "{rt:?}: trunk tokens differ by {d_tokens}");
        assert!(
            d_cls < TOL,
            "{rt:?}: trunk + tail differ from the unsplit model by {d_cls}"
        );
    }
}
