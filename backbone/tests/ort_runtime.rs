//! The onnxruntime trunk (`--features ort`) against the tract trunk on the same real inputs,
//! and the errors of a missing or unusable onnxruntime library.
//!
//! Run with `cargo test -p fedpeft-backbone --features ort` (the library comes from
//! `ORT_DYLIB_PATH`, else `models/build/onnxruntime/`). Without the feature this file is empty.

#![cfg(feature = "ort")]

mod common;

use std::path::PathBuf;

use common::{Fixture, max_abs_diff};
use fedpeft_backbone::data::{fashion_mnist, load_spam_assassin, spam_assassin_dir};
use fedpeft_backbone::{
    Backbone, BackboneError, ImagePreprocess, InputSpec, Runtime, RuntimeKind, Trunk, TrunkConfig,
    TrunkInput, WordPiece, open_trunk,
};
use ndarray::{Array2, Ix2};

/// tract and onnxruntime on identical inputs, at the split tensor: largest absolute
/// difference allowed, the same bound as each runtime's parity with PyTorch. Both are fp32 with
/// different kernels (conv / matmul summation order, erf and softmax approximations). Measured
/// on an x86-64 CPU: 2.8e-5 for EfficientNet-Lite0 (activations up to ~15), 6e-6 for MiniLM
/// (hidden states up to ~10.5); a wrong op or layout shows up as >1e-2.
const AGREE_TOL: f32 = 1e-4;

fn open(bb: &Backbone, rt: Runtime, size: Option<usize>) -> Box<dyn Trunk> {
    let mut cfg = TrunkConfig::default().with_runtime(rt);
    if let Some(s) = size {
        cfg = cfg.with_image_size(s);
    }
    let t = open_trunk(bb, &cfg).unwrap_or_else(|e| panic!("opening {rt:?}: {e}"));
    let want = match rt {
        Runtime::Tract => RuntimeKind::Tract,
        _ => RuntimeKind::Ort,
    };
    assert_eq!(t.runtime(), want, "{rt:?} must not fall back");
    t
}

/// Runs both runtimes on `input`; returns the max |tract - ort| and the output scale.
fn compare(tract: &dyn Trunk, ort: &dyn Trunk, input: &TrunkInput) -> (f32, f32) {
    let a = tract.run(input).unwrap();
    let b = ort.run(input).unwrap();
    assert_eq!(a.shape(), b.shape());
    assert!(b.iter().all(|v| v.is_finite()), "ort output not finite");
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.1, "degenerate output (max |x| = {scale})");
    (max_abs_diff(&a, &b), scale)
}

#[test]
fn tract_and_ort_agree_on_fashion_mnist_images_at_96_and_224_px() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let test = fashion_mnist(false).unwrap();
    // the parity-fixture images (test 0..4) and a spread of others, all ten classes
    let mut idx: Vec<usize> = (0..4).collect();
    idx.extend((1..=12).map(|i| i * 797));
    for (size, n) in [(96, idx.len()), (224, 3)] {
        let pre = ImagePreprocess::from_manifest(&bb.manifest, Some(size)).unwrap();
        let x = pre.batch(&test, &idx[..n]).unwrap();
        let tract = open(&bb, Runtime::Tract, Some(size));
        let ort = open(&bb, Runtime::Ort, Some(size));
        let (d, scale) = compare(tract.as_ref(), ort.as_ref(), &TrunkInput::Image(x));
        println!("{size}px x{n}: max |tract - ort| = {d:e} (max |x| = {scale})");
        assert!(d < AGREE_TOL, "{size}px: tract and ort differ by {d}");
    }
}

#[test]
fn tract_and_ort_agree_on_real_sentences_with_padding() {
    let bb = Backbone::by_id("all-minilm-l6-v2").unwrap();
    let tract = open(&bb, Runtime::Tract, None);
    let ort = open(&bb, Runtime::Ort, None);
    // the parity fixture (reference tokenizer ids, padded)
    let fx = Fixture::load("all-minilm-l6-v2.safetensors");
    let ids: Array2<i64> = fx.i64("input_ids").into_dimensionality::<Ix2>().unwrap();
    let mask: Array2<i64> = fx
        .i64("attention_mask")
        .into_dimensionality::<Ix2>()
        .unwrap();
    let (d, scale) = compare(
        tract.as_ref(),
        ort.as_ref(),
        &TrunkInput::Tokens { ids, mask },
    );
    println!("fixture sentences: max |tract - ort| = {d:e} (max |x| = {scale})");
    assert!(d < AGREE_TOL, "fixture: tract and ort differ by {d}");
    // SpamAssassin mails through the Rust tokenizer, padded to the longest (<= 128 tokens)
    let (max_len, lowercase, strip) = match &bb.manifest.input {
        InputSpec::Text {
            max_len,
            lowercase,
            strip_accents,
            ..
        } => ((*max_len).min(128), *lowercase, *strip_accents),
        InputSpec::Image { .. } => unreachable!(),
    };
    let wp = WordPiece::from_vocab_file(&bb.vocab_path().unwrap(), lowercase, strip).unwrap();
    let mails = load_spam_assassin(&spam_assassin_dir()).unwrap();
    let texts: Vec<&str> = mails
        .texts
        .iter()
        .step_by(750)
        .map(String::as_str)
        .collect();
    let (ids, mask) = wp.encode_batch(&texts, max_len);
    assert!(mask.iter().any(|&m| m == 0), "want padding in the batch");
    let shape = ids.shape().to_vec();
    let (d, scale) = compare(
        tract.as_ref(),
        ort.as_ref(),
        &TrunkInput::Tokens { ids, mask },
    );
    println!("SpamAssassin {shape:?}: max |tract - ort| = {d:e} (max |x| = {scale})");
    assert!(d < AGREE_TOL, "SpamAssassin: tract and ort differ by {d}");
}

#[test]
fn auto_picks_ort_when_its_library_loads() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let t = open_trunk(&bb, &TrunkConfig::default().with_image_size(96)).unwrap();
    assert_eq!(t.runtime(), RuntimeKind::Ort);
}

/// A configured library path that does not exist: a typed error naming the path and
/// ORT_DYLIB_PATH, for `ort`; `auto` falls back to tract. Does not poison later opens.
#[test]
fn a_missing_library_is_an_error_naming_the_path_and_ort_dylib_path() {
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let missing = PathBuf::from("/nonexistent/fedpeft/libonnxruntime.so.1.31.1");
    let mut cfg = TrunkConfig::default()
        .with_runtime(Runtime::Ort)
        .with_image_size(96);
    cfg.ort_library = Some(missing.clone());
    let e = open_trunk(&bb, &cfg).unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert!(
        matches!(e, BackboneError::RuntimeUnavailable { runtime: "ort", .. }),
        "{e:?}"
    );
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("ORT_DYLIB_PATH"), "{msg}");
    cfg.runtime = Runtime::Auto;
    assert_eq!(open_trunk(&bb, &cfg).unwrap().runtime(), RuntimeKind::Tract);
    // the default library still opens afterwards
    cfg.ort_library = None;
    cfg.runtime = Runtime::Ort;
    assert_eq!(open_trunk(&bb, &cfg).unwrap().runtime(), RuntimeKind::Ort);
}

/// ORT_DYLIB_PATH itself pointing nowhere: run in a child process of this test binary (the
/// variable is process-wide), which must fail with a message naming the variable and path.
#[test]
fn ort_dylib_path_pointing_nowhere_is_named_in_the_error() {
    let missing = "/nonexistent/from-env/libonnxruntime.so";
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_opens_ort_with_the_environment_variable",
            "--include-ignored",
            "--nocapture",
        ])
        .env("ORT_DYLIB_PATH", missing)
        .env("FEDPEFT_ORT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}");
    assert!(stdout.contains("1 passed"), "child did not run:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("child error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stdout}"));
    println!("{line}");
    assert!(line.contains(missing), "{line}");
    assert!(line.contains("(ORT_DYLIB_PATH)"), "{line}");
}

#[test]
#[ignore = "run by ort_dylib_path_pointing_nowhere_is_named_in_the_error in a child process"]
fn child_opens_ort_with_the_environment_variable() {
    // Only meaningful in the child (with a bad ORT_DYLIB_PATH); a no-op under --include-ignored.
    if std::env::var_os("FEDPEFT_ORT_CHILD").is_none() {
        return;
    }
    let bb = Backbone::by_id("efficientnet-lite0").unwrap();
    let cfg = TrunkConfig::default()
        .with_runtime(Runtime::Ort)
        .with_image_size(96);
    let e = open_trunk(&bb, &cfg).unwrap_err();
    println!("child error: {e}");
}

/// Not a library at all (here: a vocabulary file): the loader's error names the file. Checked
/// in a child process, since in this one the real library may already be loaded.
#[test]
fn a_file_that_is_not_a_library_is_an_error_naming_it() {
    let bb = Backbone::by_id("all-minilm-l6-v2").unwrap();
    let bogus = bb.vocab_path().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_opens_ort_with_the_environment_variable",
            "--include-ignored",
            "--nocapture",
        ])
        .env("ORT_DYLIB_PATH", &bogus)
        .env("FEDPEFT_ORT_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 passed"), "child did not run:\n{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("child error: "))
        .unwrap_or_else(|| panic!("no error line:\n{stdout}"));
    println!("{line}");
    assert!(line.contains(&bogus.display().to_string()), "{line}");
    assert!(line.contains("loading onnxruntime library"), "{line}");
}
