//! A channel-last depthwise convolution for tract, with its channel loop kept in registers.
//!
//! tract 0.23.9 runs a channel-last depthwise convolution with a vectorised kernel only where
//! `tract-linalg` has one (aarch64, wasm); elsewhere (x86_64) its generic loop reloads and
//! stores the output row once per kernel tap, about 2 GMAC/s. This op replaces those
//! convolutions in fedpeft's trunk graphs (see `replace_depthwise`): each output position's
//! channels are walked in blocks of 32 accumulators that stay in registers across the taps.
//!
//! The arithmetic is tract's own, in the same order: the bias, then per tap (kernel rows, then
//! columns, the padded ones skipped) one multiply and one add, no fused multiply-add. The result
//! is bit-identical to tract's depthwise paths (`channel_last_depthwise_matches_tract_bit_for_bit`
//! in the tests).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

/// A depthwise 2-D convolution on `[H, W, C]` or `[N, H, W, C]` f32 data, kernel `[KH·KW, C]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelLastDepthwise {
    has_n: bool,
    /// input height and width
    hw: [usize; 2],
    /// output height and width
    out_hw: [usize; 2],
    channels: usize,
    kernel_hw: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// padding before the first row and column
    pad: [usize; 2],
    /// `[KH·KW, C]`: one channel vector per tap, taps row-major
    kernel: Arc<Tensor>,
    /// `[C]`
    bias: Arc<Tensor>,
    /// A clamp fused from the `Max` and `Min` that followed (ReLU6), as f32 bits.
    clamp: Option<[u32; 2]>,
}

impl ChannelLastDepthwise {
    /// The op for a depthwise `Conv` of `model`'s `node`, if it is one this op covers: f32,
    /// channel-last, 2-D, OIHW kernel and bias constant, input shape concrete.
    pub fn from_conv(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Self>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let c = conv.input_channels();
        let spec = &conv.pool_spec;
        let fmt = spec.data_format;
        if !(conv.group > 1 && conv.group == c && c == conv.output_channels())
            || conv.q_params.is_some()
            || !matches!(fmt, DataFormat::NHWC | DataFormat::HWC)
            || spec.rank() != 2
            || conv.kernel_fmt != KernelFormat::OIHW
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let x = model.outlet_fact(node.inputs[0])?;
        let (Some(k), Some(b)) = (
            model.outlet_fact(node.inputs[1])?.konst.clone(),
            model.outlet_fact(node.inputs[2])?.konst.clone(),
        ) else {
            return Ok(None);
        };
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        if x.datum_type != f32::datum_type()
            || k.datum_type() != f32::datum_type()
            || b.datum_type() != f32::datum_type()
            || b.len() != c
        {
            return Ok(None);
        }
        let has_n = fmt.has_n();
        let hw = [shape[has_n as usize], shape[has_n as usize + 1]];
        let kernel_hw = [spec.kernel_shape[0], spec.kernel_shape[1]];
        // OIHW depthwise: [C, 1, KH, KW] -> [KH, KW, C]
        let k = k.to_plain_array_view::<f32>()?;
        if k.shape() != [c, 1, kernel_hw[0], kernel_hw[1]] {
            return Ok(None);
        }
        let taps = kernel_hw[0] * kernel_hw[1];
        let mut kernel = vec![0f32; taps * c];
        for (ix, v) in k.iter().enumerate() {
            let (ch, tap) = (ix / taps, ix % taps);
            kernel[tap * c + ch] = *v;
        }
        let bias: Vec<f32> = b.to_plain_array_view::<f32>()?.iter().copied().collect();
        let padding = spec.computed_padding(&hw[..]);
        let s = spec.strides();
        let d = spec.dilations();
        Ok(Some(Self {
            has_n,
            hw,
            out_hw: [padding[0].convoluted, padding[1].convoluted],
            channels: c,
            kernel_hw,
            strides: [s[0], s[1]],
            dilations: [d[0], d[1]],
            pad: [padding[0].pad_before, padding[1].pad_before],
            kernel: Arc::new(Tensor::from_shape(&[taps, c], &kernel)?),
            bias: Arc::new(Tensor::from_shape(&[c], &bias)?),
            clamp: None,
        }))
    }

    fn output_shape(&self, n: Option<usize>) -> TVec<usize> {
        let mut shape: TVec<usize> = n.into_iter().collect();
        shape.extend([self.out_hw[0], self.out_hw[1], self.channels]);
        shape
    }

    /// One image: `x` is `[H, W, C]`, `y` `[OH, OW, C]`.
    #[allow(unsafe_code)]
    fn image(&self, x: &[f32], y: &mut [f32], kernel: &[f32], bias: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx") {
            // SAFETY: the CPU has AVX, the only requirement of `image_avx`.
            return unsafe { self.image_avx(x, y, kernel, bias) };
        }
        self.image_any(x, y, kernel, bias)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    fn image_avx(&self, x: &[f32], y: &mut [f32], kernel: &[f32], bias: &[f32]) {
        self.image_any(x, y, kernel, bias)
    }

    #[inline(always)]
    fn image_any(&self, x: &[f32], y: &mut [f32], kernel: &[f32], bias: &[f32]) {
        let c = self.channels;
        let [h, w] = self.hw;
        let [kh, kw] = self.kernel_hw;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let [ph, pw] = self.pad;
        let [lo, hi] = self.clamp.map_or([f32::NEG_INFINITY, f32::INFINITY], |c| {
            c.map(f32::from_bits)
        });
        // the tap offsets (into `x`, in channels) of one output position, reused
        let mut taps: Vec<(usize, usize)> = Vec::with_capacity(kh * kw);
        for (pos, out) in y.chunks_exact_mut(c).enumerate() {
            let (oy, ox) = (pos / self.out_hw[1], pos % self.out_hw[1]);
            taps.clear();
            for ky in 0..kh {
                let Some(iy) = (oy * sh + ky * dh).checked_sub(ph).filter(|&iy| iy < h) else {
                    continue;
                };
                for kx in 0..kw {
                    let Some(ix) = (ox * sw + kx * dw).checked_sub(pw).filter(|&ix| ix < w) else {
                        continue;
                    };
                    taps.push(((iy * w + ix) * c, (ky * kw + kx) * c));
                }
            }
            let mut c0 = 0;
            while c0 + 32 <= c {
                block::<32>(x, kernel, bias, &taps, c0, [lo, hi], &mut out[c0..c0 + 32]);
                c0 += 32;
            }
            while c0 + 8 <= c {
                block::<8>(x, kernel, bias, &taps, c0, [lo, hi], &mut out[c0..c0 + 8]);
                c0 += 8;
            }
            while c0 < c {
                block::<1>(x, kernel, bias, &taps, c0, [lo, hi], &mut out[c0..c0 + 1]);
                c0 += 1;
            }
        }
    }
}

/// Channels `c0..c0 + B` of one output position: `B` accumulators across all the taps, then
/// the clamp (`max(lo)` then `min(hi)`, as tract's `Max` and `Min` compute it).
#[inline(always)]
fn block<const B: usize>(
    x: &[f32],
    kernel: &[f32],
    bias: &[f32],
    taps: &[(usize, usize)],
    c0: usize,
    [lo, hi]: [f32; 2],
    out: &mut [f32],
) {
    let mut acc: [f32; B] = bias[c0..c0 + B].try_into().expect("B channels");
    for &(xo, ko) in taps {
        let xs: &[f32; B] = x[xo + c0..xo + c0 + B].try_into().expect("B channels");
        let ks: &[f32; B] = kernel[ko + c0..ko + c0 + B].try_into().expect("B channels");
        for j in 0..B {
            acc[j] += ks[j] * xs[j];
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a.max(lo).min(hi);
    }
}

impl Op for ChannelLastDepthwise {
    fn name(&self) -> StaticName {
        "ChannelLastDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "input {:?} kernel {:?} strides {:?} dilations {:?} pad {:?} channels {} clamp {:?}",
            self.hw,
            self.kernel_hw,
            self.strides,
            self.dilations,
            self.pad,
            self.channels,
            self.clamp.map(|c| c.map(f32::from_bits))
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ChannelLastDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let x = x
            .as_slice()
            .ok_or_else(|| format_err!("depthwise input is not contiguous"))?;
        let n = self.has_n.then(|| inputs[0].shape()[0]);
        let shape = self.output_shape(n);
        let per_in = self.hw[0] * self.hw[1] * self.channels;
        let per_out = self.out_hw[0] * self.out_hw[1] * self.channels;
        let kernel = self.kernel.to_plain_array_view::<f32>()?;
        let bias = self.bias.to_plain_array_view::<f32>()?;
        let (kernel, bias) = (
            kernel.as_slice().unwrap_or_default(),
            bias.as_slice().unwrap_or_default(),
        );
        let mut y = vec![0f32; per_out * n.unwrap_or(1)];
        for (xi, yi) in x.chunks_exact(per_in).zip(y.chunks_exact_mut(per_out)) {
            self.image(xi, yi, kernel, bias);
        }
        Ok(tvec!(
            tract_ndarray::ArrayD::from_shape_vec(&*shape, y)?
                .into_tensor()
                .into_tvalue()
        ))
    }
}

impl TypedOp for ChannelLastDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = if self.has_n {
            Some(inputs[0].shape[0].to_usize()?)
        } else {
            None
        };
        Ok(tvec!(f32::fact(self.output_shape(n))))
    }

    as_op!();
}

/// The f32 scalar a constant outlet holds, if it holds one.
fn scalar(model: &TypedModel, outlet: OutletId) -> TractResult<Option<f32>> {
    let fact = model.outlet_fact(outlet)?;
    Ok(match &fact.konst {
        Some(t) if t.len() == 1 && t.datum_type() == f32::datum_type() => {
            t.to_plain_array_view::<f32>()?.iter().next().copied()
        }
        _ => None,
    })
}

/// The node `op` (a binary op with a scalar constant) that alone reads `from`, and its
/// constant: one link of a clamp chain.
fn scalar_successor(
    model: &TypedModel,
    from: OutletId,
    op: &str,
) -> TractResult<Option<(usize, f32)>> {
    let succ = &model.node(from.node).outputs[from.slot].successors;
    if succ.len() != 1 || model.output_outlets()?.contains(&from) {
        return Ok(None);
    }
    let node = model.node(succ[0].node);
    if node.op_as::<TypedBinOp>().is_none() || node.op().name() != op || node.inputs.len() != 2 {
        return Ok(None);
    }
    let other = node.inputs[1 - succ[0].slot];
    let same_shape = model.outlet_fact(node.id.into())?.shape == model.outlet_fact(from)?.shape;
    Ok(scalar(model, other)?
        .filter(|_| same_shape)
        .map(|v| (node.id, v)))
}

/// Replaces every channel-last f32 depthwise `Conv` of a decluttered model by
/// [`ChannelLastDepthwise`], with the `Max`-then-`Min` clamp (ReLU6) that follows it fused in;
/// returns how many. Run before `into_optimized`: codegen would lower them to tract's
/// `DepthWise`.
pub fn replace_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(mut op) = ChannelLastDepthwise::from_conv(model, node)? else {
            continue;
        };
        let mut last = OutletId::new(id, 0);
        if let Some((max, lo)) = scalar_successor(model, last, "Max")?
            && let Some((min, hi)) = scalar_successor(model, OutletId::new(max, 0), "Min")?
        {
            op.clamp = Some([lo.to_bits(), hi.to_bits()]);
            last = OutletId::new(min, 0);
        }
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let y = patch.wire_node(&node.name, op, &[x])?;
        patch.shunt_outside(model, last, y[0])?;
        patch.obliterate(id)?;
        patch.apply(model)?;
        replaced += 1;
    }
    model.compact()?;
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::type_complexity)]
    use super::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    /// One depthwise `Conv`, channel-last, deterministic kernel, bias and input.
    fn model(
        n: Option<usize>,
        hw: usize,
        c: usize,
        k: usize,
        stride: usize,
        pad: ([usize; 2], [usize; 2]),
        clamp: bool,
    ) -> (TypedModel, Tensor) {
        let mut shape: Vec<usize> = n.into_iter().collect();
        shape.extend([hw, hw, c]);
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(&shape)).unwrap();
        let kv: Vec<f32> = (0..c * k * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bv: Vec<f32> = (0..c).map(|i| (i as f32 * 0.11).cos()).collect();
        let kc = m
            .add_const("k", Tensor::from_shape(&[c, 1, k, k], &kv).unwrap())
            .unwrap();
        let b = m
            .add_const("b", Tensor::from_shape(&[c], &bv).unwrap())
            .unwrap();
        let pool_spec = PoolSpec {
            data_format: if n.is_some() {
                DataFormat::NHWC
            } else {
                DataFormat::HWC
            },
            kernel_shape: tvec!(k, k),
            padding: PaddingSpec::Explicit(
                pad.0.into_iter().collect(),
                pad.1.into_iter().collect(),
            ),
            dilations: None,
            strides: Some(tvec!(stride, stride)),
            input_channels: c,
            output_channels: c,
        };
        let conv = Conv {
            pool_spec,
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: None,
        };
        let mut y = m.wire_node("dw", conv, &[x, kc, b]).unwrap();
        if clamp {
            // ReLU6 as the ONNX import declutters a Clip: Max with 0, then Min with 6
            let rank = shape.len();
            let lo = m
                .add_const("lo", tensor0(0f32).broadcast_into_rank(rank).unwrap())
                .unwrap();
            let hi = m
                .add_const("hi", tensor0(6f32).broadcast_into_rank(rank).unwrap())
                .unwrap();
            y = m
                .wire_node("max", tract_onnx::tract_core::ops::math::max(), &[y[0], lo])
                .unwrap();
            y = m
                .wire_node("min", tract_onnx::tract_core::ops::math::min(), &[y[0], hi])
                .unwrap();
        }
        m.select_output_outlets(&y).unwrap();
        let xv: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|i| (i as f32 * 0.013).cos() * 2.0)
            .collect();
        (m, Tensor::from_shape(&shape, &xv).unwrap())
    }

    fn run(m: TypedModel, x: &Tensor) -> Vec<u32> {
        let out = m
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec![x.clone().into_tvalue()])
            .unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn channel_last_depthwise_matches_tract_bit_for_bit() {
        // EfficientNet-Lite0's shapes: 3x3 and 5x5, stride 1 and 2 with its asymmetric
        // padding; channel counts that use the 32-, 8- and 1-wide blocks
        let cases = [
            (None, 12, 40, 3, 1, ([1, 1], [1, 1]), false),
            (None, 12, 21, 3, 2, ([0, 0], [1, 1]), true),
            (Some(2), 9, 48, 5, 1, ([2, 2], [2, 2]), true),
            (Some(3), 14, 144, 5, 2, ([1, 1], [2, 2]), false),
        ];
        for (n, hw, c, k, stride, pad, clamp) in cases {
            let (m, x) = model(n, hw, c, k, stride, pad, clamp);
            let expected = run(m.clone(), &x);
            let mut ours = m;
            assert_eq!(replace_depthwise(&mut ours).unwrap(), 1);
            assert!(
                ours.nodes()
                    .iter()
                    .any(|n| n.op_is::<ChannelLastDepthwise>()),
                "{ours}"
            );
            assert_eq!(ours.nodes().len(), 2, "the clamp is fused: {ours}");
            let got = run(ours, &x);
            assert_eq!(got, expected, "n {n:?} hw {hw} c {c} k {k} stride {stride}");
        }
    }
}
