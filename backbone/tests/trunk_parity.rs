//! Rust trunks (tract; ort with `--features ort`) against PyTorch on real inputs, at the
//! split tensor. Fixtures: models/make_fixtures.py (Fashion-MNIST test images 0..4; sentences
//! tokenized by the reference tokenizer).

mod common;

use std::path::PathBuf;

use common::{Fixture, max_abs_diff};
use fedpeft_backbone::data::ImageDataset;
use fedpeft_backbone::{
    Backbone, ImagePreprocess, Runtime, RuntimeKind, TrunkConfig, TrunkInput, open_trunk,
};
use ndarray::{Array2, Ix2};

const TOL: f32 = 1e-4;

fn fixture_images(fx: &Fixture) -> ImageDataset {
    let u8s = fx.u8("images_u8");
    let n = u8s.shape()[0];
    ImageDataset {
        height: 28,
        width: 28,
        channels: 1,
        pixels: u8s.iter().copied().collect(),
        labels: vec![0; n],
        classes: vec!["?".into()],
        source: PathBuf::from("fixture"),
    }
}

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
fn efficientnet_trunk_matches_pytorch_at_the_split_at_96_and_224_px() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let fx = Fixture::load("efficientnet-lite0.safetensors");
    let ds = fixture_images(&fx);
    for rt in runtimes() {
        for (size, key, n) in [(96, "features_96", 4), (224, "features_224", 1)] {
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
            let got = trunk.run(&TrunkInput::Image(x)).unwrap();
            let want = fx.f32(key);
            let d = max_abs_diff(&got, &want);
            println!("{rt:?} {size}px: max |diff| = {d:e} over {:?}", got.shape());
            assert!(d < TOL, "{rt:?} at {size}px differs from PyTorch by {d}");
        }
    }
}

#[test]
fn minilm_trunk_matches_pytorch_at_the_split_with_padding() {
    let bb = Backbone::by_id("all-minilm-l6-v2").unwrap();
    let fx = Fixture::load("all-minilm-l6-v2.safetensors");
    let ids: Array2<i64> = fx.i64("input_ids").into_dimensionality::<Ix2>().unwrap();
    let mask: Array2<i64> = fx
        .i64("attention_mask")
        .into_dimensionality::<Ix2>()
        .unwrap();
    assert!(
        mask.iter().any(|&m| m == 0),
        "the fixture must exercise padding"
    );
    let want = fx.f32("hidden_split");
    for rt in runtimes() {
        let trunk = open_trunk(&bb, &TrunkConfig::default().with_runtime(rt)).unwrap();
        assert_eq!(trunk.runtime(), kind(rt));
        let got = trunk
            .run(&TrunkInput::Tokens {
                ids: ids.clone(),
                mask: mask.clone(),
            })
            .unwrap();
        let d = max_abs_diff(&got, &want);
        println!("{rt:?}: max |diff| = {d:e} over {:?}", got.shape());
        assert!(d < TOL, "{rt:?} differs from PyTorch by {d}");
        // a different sequence length through the same plan (symbolic seq dim)
        let short = trunk
            .run(&TrunkInput::Tokens {
                ids: ids.slice(ndarray::s![.., ..5]).to_owned(),
                mask: mask.slice(ndarray::s![.., ..5]).to_owned(),
            })
            .unwrap();
        assert_eq!(short.shape(), &[3, 5, 384]);
    }
}

#[test]
fn wrong_inputs_are_typed_errors() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let trunk = open_trunk(
        &bb,
        &TrunkConfig::default()
            .with_runtime(Runtime::Tract)
            .with_image_size(96),
    )
    .unwrap();
    let e = trunk
        .run(&TrunkInput::Image(ndarray::Array4::zeros((1, 3, 64, 64))))
        .unwrap_err();
    assert!(e.to_string().contains("[B, 3, 96, 96]"), "{e}");
    let e = trunk
        .run(&TrunkInput::Tokens {
            ids: Array2::zeros((1, 4)),
            mask: Array2::zeros((1, 4)),
        })
        .unwrap_err();
    assert!(e.to_string().contains("vision backbone"), "{e}");
}

#[test]
fn built_files_match_the_manifest_checksums() {
    for id in ["efficientnet-lite0", "all-minilm-l6-v2"] {
        let bb = Backbone::by_id(id).unwrap();
        bb.verify().unwrap();
        assert_eq!(bb.manifest.id, id);
    }
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    assert_eq!(bb.manifest.params.backbone, 4_652_008);
}

#[cfg(not(feature = "ort"))]
#[test]
fn asking_for_ort_in_a_build_without_it_names_the_missing_feature() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let e = open_trunk(&bb, &TrunkConfig::default().with_runtime(Runtime::Ort)).unwrap_err();
    assert!(e.to_string().contains("--features ort"), "{e}");
    // auto falls back to tract
    let t = open_trunk(&bb, &TrunkConfig::default().with_image_size(96)).unwrap();
    assert_eq!(t.runtime(), fedpeft_backbone::RuntimeKind::Tract);
}
