//! Frozen weights from a `tail.safetensors` file: loading, and clear errors for bad files.

mod common;

use std::collections::HashMap;

use fedpeft_peft::*;
use safetensors::{Dtype, tensor::TensorView};

fn write(path: &std::path::Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn a_conv_head_loads_from_safetensors_and_matches_the_in_memory_map() {
    let dir = std::env::temp_dir().join(format!("fedpeft-peft-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tail.safetensors");
    let w: Vec<f32> = (0..24).map(|i| i as f32 / 24.0 - 0.5).collect();
    write(
        &path,
        &[
            ("conv_head.weight", Dtype::F32, vec![6, 4], f32_bytes(&w)),
            ("bn_head.scale", Dtype::F32, vec![6], f32_bytes(&[1.5; 6])),
            ("bn_head.shift", Dtype::F32, vec![6], f32_bytes(&[0.1; 6])),
        ],
    );
    let from_file = FrozenWeights::from_safetensors(&path).unwrap();
    let mut m = HashMap::new();
    m.insert("conv_head.weight".to_string(), (vec![6, 4], w));
    m.insert("bn_head.scale".to_string(), (vec![6], vec![1.5; 6]));
    m.insert("bn_head.shift".to_string(), (vec![6], vec![0.1; 6]));
    let from_map = FrozenWeights::from_map(m).unwrap();
    let batch = common::conv_batch::<f32>(2, 4, 3, 1);
    let cfg = PeftConfig::new(Method::Head, 3, 5);
    let a = build_tail(Family::ConvHead, &from_file, cfg.clone())
        .unwrap()
        .forward(&batch)
        .unwrap();
    let b = build_tail(Family::ConvHead, &from_map, cfg)
        .unwrap()
        .forward(&batch)
        .unwrap();
    assert_eq!(a, b);

    // Wrong dtype and wrong shape are named in the error.
    let bad = dir.join("bad.safetensors");
    write(
        &bad,
        &[("conv_head.weight", Dtype::F64, vec![1], vec![0u8; 8])],
    );
    let e = FrozenWeights::from_safetensors(&bad).unwrap_err();
    assert!(
        e.to_string().contains("conv_head.weight") && e.to_string().contains("F64"),
        "{e}"
    );
    write(
        &bad,
        &[
            (
                "conv_head.weight",
                Dtype::F32,
                vec![6, 4],
                f32_bytes(&[0.0; 24]),
            ),
            ("bn_head.scale", Dtype::F32, vec![5], f32_bytes(&[1.0; 5])),
        ],
    );
    let w = FrozenWeights::from_safetensors(&bad).unwrap();
    let e = build_tail(Family::ConvHead, &w, PeftConfig::new(Method::Head, 3, 0)).unwrap_err();
    assert!(
        e.to_string().contains("bn_head.scale") && e.to_string().contains("[5]"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unreadable_and_corrupt_files_are_typed_errors() {
    let missing = std::path::Path::new("/nonexistent/tail.safetensors");
    assert!(matches!(
        FrozenWeights::from_safetensors(missing),
        Err(PeftError::Io { .. })
    ));
    let e = FrozenWeights::from_safetensors_bytes(b"not a safetensors file", "upload").unwrap_err();
    assert!(
        matches!(e, PeftError::SafeTensors { .. }) && e.to_string().contains("upload"),
        "{e}"
    );
    let mut m = HashMap::new();
    m.insert("x".to_string(), (vec![2, 2], vec![0.0f32; 3]));
    assert!(matches!(
        FrozenWeights::from_map(m),
        Err(PeftError::Length { .. })
    ));
}
