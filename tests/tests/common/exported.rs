//! An exported `model.onnx` (`edge-client export --onnx`) run by tract and by onnxruntime's
//! Python API (the models toolchain's venv), for comparing with the Rust path.

use std::path::Path;
use std::process::Command;

use ndarray::{Array2, Array4};

/// What the exported model takes: the trunk's inputs.
#[derive(Debug)]
pub enum Inputs {
    /// `pixels [N, 3, S, S]`.
    Pixels(Array4<f32>),
    /// `input_ids` and `attention_mask`, `[N, S]`.
    Tokens(Array2<i64>, Array2<i64>),
}

/// Logits from `model`, run by tract.
pub fn tract_logits(model: &Path, inputs: &Inputs) -> Array2<f32> {
    use tract_onnx::prelude::*;
    let mut m = tract_onnx::onnx()
        .model_for_path(model)
        .expect("tract reads model.onnx");
    let values: TVec<TValue> = match inputs {
        Inputs::Pixels(p) => {
            m = m.with_input_fact(0, f32::fact(p.shape()).into()).unwrap();
            tvec![
                Tensor::from_shape(p.shape(), p.as_slice().unwrap())
                    .unwrap()
                    .into_tvalue()
            ]
        }
        Inputs::Tokens(ids, mask) => {
            m = m
                .with_input_fact(0, i64::fact(ids.shape()).into())
                .and_then(|m| m.with_input_fact(1, i64::fact(mask.shape()).into()))
                .unwrap();
            tvec![
                Tensor::from_shape(ids.shape(), ids.as_slice().unwrap())
                    .unwrap()
                    .into_tvalue(),
                Tensor::from_shape(mask.shape(), mask.as_slice().unwrap())
                    .unwrap()
                    .into_tvalue(),
            ]
        }
    };
    let plan = m
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .expect("tract plans model.onnx");
    let out = plan.run(values).expect("tract runs model.onnx");
    let v = out[0].to_plain_array_view::<f32>().unwrap();
    v.to_owned()
        .into_dimensionality()
        .expect("logits [N, classes]")
}

/// Logits from `model`, run by onnxruntime's Python API; `dir` holds the inputs' files.
pub fn onnxruntime_logits(model: &Path, inputs: &Inputs, dir: &Path) -> Array2<f32> {
    let feeds = match inputs {
        Inputs::Pixels(p) => {
            let raw = dir.join("pixels.f32");
            let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(&raw, bytes).unwrap();
            format!(
                "{{'pixels': np.fromfile({:?}, dtype='<f4').reshape({:?})}}",
                raw.display().to_string(),
                p.shape()
            )
        }
        Inputs::Tokens(ids, mask) => {
            let mut feeds = Vec::new();
            for (name, a) in [("input_ids", ids), ("attention_mask", mask)] {
                let raw = dir.join(format!("{name}.i64"));
                let bytes: Vec<u8> = a.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(&raw, bytes).unwrap();
                feeds.push(format!(
                    "'{name}': np.fromfile({:?}, dtype='<i8').reshape({:?})",
                    raw.display().to_string(),
                    a.shape()
                ));
            }
            format!("{{{}}}", feeds.join(", "))
        }
    };
    let python = fedpeft_tests::workspace_root().join(".venv-models/bin/python");
    let script = format!(
        "import json, numpy as np, onnxruntime as ort\n\
         s = ort.InferenceSession({model:?}, providers=['CPUExecutionProvider'])\n\
         print(json.dumps(s.run(['logits'], {feeds})[0].tolist()))\n",
        model = model.display().to_string(),
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).expect("logits JSON");
    let n = rows.len();
    Array2::from_shape_vec((n, rows[0].len()), rows.concat()).unwrap()
}

/// Largest absolute difference.
pub fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    assert_eq!(a.dim(), b.dim());
    (a - b).mapv(f32::abs).fold(0.0, |m, &v| m.max(v))
}

/// The predicted class of each row.
pub fn argmax(l: &Array2<f32>) -> Vec<usize> {
    l.rows()
        .into_iter()
        .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
        .collect()
}

/// Runs `edge-client export --onnx` of `run`'s best round into `out` (from the workspace, where
/// the models toolchain is) and returns its stderr.
pub fn export(run: &Path, out: &Path) -> String {
    let o = Command::new(fedpeft_tests::binary("edge-client"))
        .current_dir(fedpeft_tests::workspace_root())
        .args(["export", "--onnx", "--adapter"])
        .arg(run)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run edge-client export");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "export failed: {err}");
    err
}
