//! tract-onnx: pure Rust, no native library; the only runtime on armv7.
//!
//! The trunk is planned for a batch of ONE sample with every other dimension concrete (a text
//! trunk keeps its sequence length symbolic) and a batch runs sample by sample, split over
//! `threads` workers that share the plan. tract lowers convolutions to its fast kernels only on
//! concrete shapes: with a symbolic batch every depthwise convolution of EfficientNet-Lite0 fell
//! back to an explicit im2col and a `k = 9` matrix product (43% and 28% of the time), and a
//! concrete batch above one folds the batch into the pointwise convolutions' matrix products,
//! which then pay a transpose and an unfused bias add each. See
//! docs/src/results/trunk-throughput.md for the profiles.

use std::collections::HashSet;
use std::path::PathBuf;

use ndarray::{ArrayD, Axis, IxDyn};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_core::ops::change_axes::{AxisChange, AxisOp};
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::optim::change_axes::change_axes;

use super::tract_depthwise::replace_depthwise;
use super::{RuntimeKind, Trunk, TrunkConfig, TrunkInput, check_input, image_side};
use crate::error::{BackboneError, Result};
use crate::manifest::{Backbone, InputSpec};

/// A trunk optimised by tract for one sample at a time (and, for text, a symbolic sequence
/// length), run on `threads` workers.
pub struct TractTrunk {
    plan: std::sync::Arc<TypedSimplePlan>,
    threads: usize,
    backbone: Backbone,
    side: Option<usize>,
    path: PathBuf,
}

impl std::fmt::Debug for TractTrunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractTrunk")
            .field("path", &self.path)
            .field("side", &self.side)
            .field("threads", &self.threads)
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
        let plan = Self::optimized_model(backbone, cfg)
            .and_then(|m| m.into_runnable().map_err(|e| err(&path, e)))?;
        Ok(Self {
            plan,
            // tract's own default is one thread; `threads = 0` keeps it.
            threads: cfg.threads.max(1),
            backbone: backbone.clone(),
            side: image_side(backbone, cfg),
            path,
        })
    }

    /// The optimised graph this trunk runs (one sample; for profiling and inspection).
    pub fn optimized_model(backbone: &Backbone, cfg: &TrunkConfig) -> Result<TypedModel> {
        let path = backbone.trunk_path();
        let mut model = tract_onnx::onnx()
            .model_for_path(&path)
            .map_err(|e| err(&path, e))?;
        match &backbone.manifest.input {
            InputSpec::Image { channels, .. } => {
                let s = image_side(backbone, cfg).unwrap_or(224);
                let fact = f32::fact([1, *channels, s, s]);
                model
                    .set_input_fact(0, fact.into())
                    .map_err(|e| err(&path, e))?;
            }
            InputSpec::Text { .. } => {
                // The sequence length stays symbolic: one optimised plan serves every padding.
                let seq = model.symbols.sym("seq");
                for i in 0..2 {
                    let fact = i64::fact([1.to_dim(), seq.to_dim()]);
                    model
                        .set_input_fact(i, fact.into())
                        .map_err(|e| err(&path, e))?;
                }
            }
        }
        let mut typed = model
            .into_typed()
            .and_then(|m| m.into_decluttered())
            .map_err(|e| err(&path, e))?;
        channel_last_depthwise(&mut typed)
            .and_then(|_| replace_depthwise(&mut typed))
            .map_err(|e| err(&path, e))?;
        typed.into_optimized().map_err(|e| err(&path, e))
    }
}

/// Moves every depthwise convolution's channels last, with the layout change pushed through the
/// graph (pointwise convolutions and element-wise ops absorb it; a move stays only where an op
/// cannot). Returns how many moves were applied.
///
/// tract's own declutter asks for this only on hosts with a channel-inner depthwise kernel
/// (aarch64, wasm). On the others its channel-first depthwise path vectorises a stride-1 row and
/// nothing else: EfficientNet-Lite0's stride-2 convolutions and 96 px images' short rows ran
/// scalar. The channel-last loop runs over 16 to 1152 contiguous channels wherever it runs.
pub fn channel_last_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let mut tried = HashSet::new();
    let mut applied = 0;
    loop {
        let mut interfaces = model.output_outlets()?.to_vec();
        interfaces.extend(model.input_outlets()?.iter().copied());
        let mut explored = HashSet::new();
        let mut patch = None;
        for node in model.nodes() {
            let Some(conv) = node.op_as::<Conv>() else {
                continue;
            };
            let fmt = conv.pool_spec.data_format;
            let channels = conv.input_channels();
            let depthwise = conv.group > 1
                && conv.group == channels
                && conv.group == conv.output_channels()
                && conv.q_params.is_none();
            // below 16 channels a channel vector is shorter than a row
            if !depthwise || channels < 16 || fmt.c_is_last() {
                continue;
            }
            let rank = conv.pool_spec.rank() + 1 + usize::from(fmt.has_n());
            let c_axis = usize::from(fmt.has_n());
            let change = AxisChange {
                outlet: node.inputs[0],
                op: AxisOp::Move(c_axis, rank - 1),
            };
            if !tried.insert(change.clone()) {
                continue;
            }
            if let Some((p, _)) = change_axes(model, &change, &interfaces, &[], &mut explored)? {
                patch = Some(p);
                break;
            }
        }
        match patch {
            Some(p) => {
                p.apply(model)?;
                applied += 1;
            }
            None => return Ok(applied),
        }
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

impl TractTrunk {
    /// The inputs of sample `i`, as a batch of one.
    fn sample(&self, input: &TrunkInput, i: usize) -> Result<TVec<TValue>> {
        let p = &self.path;
        Ok(match input {
            TrunkInput::Image(x) => {
                let x = x.index_axis(Axis(0), i);
                let x = x.as_standard_layout();
                let shape: Vec<usize> = std::iter::once(1)
                    .chain(x.shape().iter().copied())
                    .collect();
                tvec![to_tensor(&shape, x.as_slice().unwrap_or_default(), p)?]
            }
            TrunkInput::Tokens { ids, mask } => {
                let ids = ids.index_axis(Axis(0), i);
                let mask = mask.index_axis(Axis(0), i);
                let (ids, mask) = (ids.as_standard_layout(), mask.as_standard_layout());
                let shape = [1, ids.len()];
                tvec![
                    to_tensor(&shape, ids.as_slice().unwrap_or_default(), p)?,
                    to_tensor(&shape, mask.as_slice().unwrap_or_default(), p)?
                ]
            }
        })
    }

    /// Runs samples `range` one after the other on this thread: their outputs, concatenated,
    /// and the shape of one.
    fn run_range(
        &self,
        input: &TrunkInput,
        range: std::ops::Range<usize>,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let p = &self.path;
        let mut state = self.plan.spawn().map_err(|e| err(p, e))?;
        let mut data = Vec::new();
        let mut shape = Vec::new();
        for i in range {
            let out = state.run(self.sample(input, i)?).map_err(|e| err(p, e))?;
            let view = out[0].to_plain_array_view::<f32>().map_err(|e| err(p, e))?;
            shape = view.shape().to_vec();
            data.extend(view.iter().copied());
        }
        Ok((data, shape))
    }

    /// The output shape of an empty batch, from the plan's output fact.
    fn empty_output(&self, input: &TrunkInput) -> Result<ArrayD<f32>> {
        let p = &self.path;
        let fact = self.plan.model().output_fact(0).map_err(|e| err(p, e))?;
        let mut values = SymbolValues::default();
        if let TrunkInput::Tokens { ids, .. } = input {
            let seq = self.plan.model().symbols.sym("seq");
            values = values.with(&seq, ids.shape()[1] as i64);
        }
        let mut shape = vec![0];
        for d in fact.shape.iter().skip(1) {
            shape.push(d.eval(&values).to_usize().map_err(|e| err(p, e))?);
        }
        Ok(ArrayD::zeros(IxDyn(&shape)))
    }
}

impl Trunk for TractTrunk {
    fn runtime(&self) -> RuntimeKind {
        RuntimeKind::Tract
    }

    fn run(&self, input: &TrunkInput) -> Result<ArrayD<f32>> {
        check_input(input, &self.backbone, self.side)?;
        let n = input.batch_size();
        if n == 0 {
            return self.empty_output(input);
        }
        let workers = self.threads.min(n);
        // contiguous, near-equal shares; the first worker is this thread
        let ranges: Vec<_> = (0..workers)
            .map(|w| w * n / workers..(w + 1) * n / workers)
            .collect();
        let parts = std::thread::scope(|s| {
            let handles: Vec<_> = ranges[1..]
                .iter()
                .map(|r| s.spawn(|| self.run_range(input, r.clone())))
                .collect();
            let mut parts = vec![self.run_range(input, ranges[0].clone())];
            parts.extend(handles.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(err(&self.path, "a trunk worker panicked")))
            }));
            parts
        });
        let mut data = Vec::new();
        let mut shape = Vec::new();
        for part in parts {
            let (d, s) = part?;
            data.extend(d);
            shape = s;
        }
        shape[0] = n;
        ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(|e| err(&self.path, e))
    }
}
