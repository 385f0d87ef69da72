//! tract-onnx: pure Rust, no native library; the only runtime on armv7.

use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::*;

use super::{RuntimeKind, Trunk, TrunkConfig, TrunkInput, check_input, image_side};
use crate::error::{BackboneError, Result};
use crate::manifest::{Backbone, InputSpec};

/// A trunk optimised by tract for a symbolic batch (and, for text, a symbolic sequence length).
pub struct TractTrunk {
    plan: std::sync::Arc<TypedSimplePlan>,
    backbone: Backbone,
    side: Option<usize>,
    path: PathBuf,
}

impl std::fmt::Debug for TractTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractTrunk")
            .field("path", &self.path)
            .field("side", &self.side)
            .finish()
    }
}

fn err(path: &std::path::Path, e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Trunk {
        path: path.to_path_buf(),
        runtime: "tract",
        reason: format!("{e:#}"),
    }
}

impl TractTrunk {
    pub fn open(backbone: &Backbone, cfg: &TrunkConfig) -> Result<Self> {
        let path = backbone.trunk_path();
        let mut model = tract_onnx::onnx()
            .model_for_path(&path)
            .map_err(|e| err(&path, e))?;
        let batch = model.symbols.sym("batch");
        let side = image_side(backbone, cfg);
        match &backbone.manifest.input {
            InputSpec::Image { channels, .. } => {
                let s = side.unwrap_or(224);
                let fact = f32::fact([batch.to_dim(), channels.to_dim(), s.to_dim(), s.to_dim()]);
                model
                    .set_input_fact(0, fact.into())
                    .map_err(|e| err(&path, e))?;
            }
            InputSpec::Text { .. } => {
                // The sequence length stays symbolic: one optimised plan serves every padding.
                let seq = model.symbols.sym("seq");
                for i in 0..2 {
                    let fact = i64::fact([batch.to_dim(), seq.to_dim()]);
                    model
                        .set_input_fact(i, fact.into())
                        .map_err(|e| err(&path, e))?;
                }
            }
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| err(&path, e))?;
        Ok(Self {
            plan,
            backbone: backbone.clone(),
            side,
            path,
        })
    }
}

fn to_tensor<T: Datum + Copy>(
    shape: &[usize],
    data: &[T],
    path: &std::path::Path,
) -> Result<TValue> {
    Tensor::from_shape(shape, data)
        .map(|t| t.into_tvalue())
        .map_err(|e| err(path, e))
}

impl Trunk for TractTrunk {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Tract
    }

    fn run(&self, input: &TrunkInput) -> Result<ArrayD<f32>> {
        check_input(input, &self.backbone, self.side)?;
        let p = &self.path;
        let inputs: TVec<TValue> = match input {
            TrunkInput::Image(x) => {
                let x = x.as_standard_layout();
                tvec![to_tensor(x.shape(), x.as_slice().unwrap_or_default(), p)?]
            }
            TrunkInput::Tokens { ids, mask } => {
                let ids = ids.as_standard_layout();
                let mask = mask.as_standard_layout();
                tvec![
                    to_tensor(ids.shape(), ids.as_slice().unwrap_or_default(), p)?,
                    to_tensor(mask.shape(), mask.as_slice().unwrap_or_default(), p)?
                ]
            }
        };
        let out = self.plan.run(inputs).map_err(|e| err(p, e))?;
        let view = out[0].to_plain_array_view::<f32>().map_err(|e| err(p, e))?;
        let shape = view.shape().to_vec();
        let data: Vec<f32> = view.iter().copied().collect();
        ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| err(p, e))
    }
}
