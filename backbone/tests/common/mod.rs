//! Helpers shared by the integration tests: the committed fixtures and the built models.

#![allow(dead_code)]

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixture_path(name: &str) -> PathBuf {
    repo().join("models/fixtures").join(name)
}

/// A fixture file's tensors.
#[derive(Debug)]
pub struct Fixture(Vec<u8>);

impl Fixture {
    pub fn load(name: &str) -> Self {
        Self::at(&fixture_path(name))
    }

    /// A safetensors file anywhere (e.g. one `make models` built).
    pub fn at(p: &std::path::Path) -> Self {
        Self(std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }

    fn view(&self, name: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, name: &str) -> ArrayD<f32> {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::F32, "{name}");
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
    }

    pub fn i64(&self, name: &str) -> ArrayD<i64> {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::I64, "{name}");
        let v = data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        ArrayD::from_shape_vec(IxDyn(&shape), v).unwrap()
    }

    pub fn u8(&self, name: &str) -> ArrayD<u8> {
        let (dt, shape, data) = self.view(name);
        assert_eq!(dt, Dtype::U8, "{name}");
        ArrayD::from_shape_vec(IxDyn(&shape), data).unwrap()
    }
}

/// Largest absolute difference; panics on a shape mismatch.
pub fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
