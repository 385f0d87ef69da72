//! The conv-head family: EfficientNet-Lite0's last stage, a 1×1 conv `conv_head` (+LoRA),
//! folded BatchNorm `bn_head`, ReLU6 and global average pooling under the classifier.

use std::sync::Arc;

use ndarray::{Array2, ArrayD, ArrayView4, Ix4};
use rand::rngs::StdRng;

use super::batch::Batch;
use super::build::{add_lora, unsupported};
use crate::error::{PeftError, Result};
use crate::layers::{
    FoldedBn, Linear, LinearCache, gap_backward, gap_forward, mm_t, nchw_to_rows, relu6_backward,
    relu6_forward,
};
use crate::method::{Family, LoraTarget, Method};
use crate::params::{Grads, ParamStore};
use crate::real::Real;
use crate::weights::FrozenWeights;

#[derive(Debug, Clone)]
pub(super) struct ConvNet {
    conv: Linear,
    bn: FoldedBn,
    in_ch: usize,
}

pub(super) struct ConvCache<T> {
    conv: LinearCache<T>,
    bn_x: Option<Array2<T>>,
    relu: Array2<T>,
    pixels: usize,
}

impl ConvNet {
    /// Loads `conv_head` and `bn_head` and applies `method`. Returns the net and its output
    /// channels (the features the head reads).
    pub(super) fn build<T: Real>(
        weights: &FrozenWeights,
        method: &Method,
        family: &Family,
        params: &mut ParamStore<T>,
        rng: &mut StdRng,
    ) -> Result<(Self, usize)> {
        if matches!(method, Method::Adapter(_) | Method::Prompt(_)) {
            return Err(unsupported(
                method,
                family,
                "adapters and prompts need transformer blocks; use head, bias, lora or full-tail",
            ));
        }
        let full = matches!(method, Method::FullTail);
        let bias = matches!(method, Method::Bias);
        let cw = weights.get::<T>("conv_head.weight", &[None, None])?;
        let (out, inp) = (cw.shape()[0], cw.shape()[1]);
        let conv_w = params.add("conv_head.weight", cw, full)?;
        let scale = params.add(
            "bn_head.scale",
            weights.get("bn_head.scale", &[Some(out)])?,
            full,
        )?;
        let shift = params.add(
            "bn_head.shift",
            weights.get("bn_head.shift", &[Some(out)])?,
            full || bias,
        )?;
        let lora = match method {
            Method::Lora(l) => {
                let targets = if l.targets.is_empty() {
                    vec![LoraTarget::ConvHead]
                } else {
                    l.targets.clone()
                };
                if let Some(t) = targets.iter().find(|&&t| t != LoraTarget::ConvHead) {
                    return Err(unsupported(
                        method,
                        family,
                        &format!(
                            "LoRA target `{}` does not exist in a conv head (only conv_head)",
                            t.as_str()
                        ),
                    ));
                }
                Some(add_lora(params, rng, "conv_head", out, inp, l)?)
            }
            _ => None,
        };
        let net = ConvNet {
            conv: Linear {
                w: conv_w,
                b: None,
                lora,
            },
            bn: FoldedBn { scale, shift },
            in_ch: inp,
        };
        Ok((net, out))
    }

    /// Whether any tensor below the head is trained.
    pub(super) fn has_trainable<T: Real>(&self, p: &ParamStore<T>) -> bool {
        self.conv.has_trainable(p) || p.trainable(self.bn.scale) || p.trainable(self.bn.shift)
    }

    /// Whether the conv weight itself is trained (no frozen product `x·Wᵀ` then).
    pub(super) fn weight_trained<T: Real>(&self, p: &ParamStore<T>) -> bool {
        p.trainable(self.conv.w)
    }

    /// Checks the features (`[B, C_in, H, W]`) and that there is no mask.
    pub(super) fn check_features<T: Real>(&self, batch: &Batch<T>) -> Result<()> {
        let shape = batch.features.shape();
        if shape.len() != 4 || shape[1] != self.in_ch {
            return Err(PeftError::Batch(format!(
                "conv head expects features [B, {}, H, W], got {shape:?}",
                self.in_ch
            )));
        }
        if batch.mask.is_some() {
            return Err(PeftError::Batch("conv head takes no attention mask".into()));
        }
        Ok(())
    }

    /// The shape of the frozen product for features of shape `[B, C_in, H, W]`.
    pub(super) fn product_shape<T: Real>(&self, p: &ParamStore<T>, shape: &[usize]) -> Vec<usize> {
        vec![shape[0], shape[2] * shape[3], p.w2(self.conv.w).nrows()]
    }

    /// The frozen product `x·Wᵀ`, `[B, H*W, C_out]`, of checked features.
    pub(super) fn frozen_product<T: Real>(&self, p: &ParamStore<T>, batch: &Batch<T>) -> ArrayD<T> {
        let x4 = nchw(batch);
        let (b, _, h, w) = x4.dim();
        let product = mm_t(nchw_to_rows(x4).view(), p.w2(self.conv.w));
        let out = product.ncols();
        product
            .into_shape_with_order((b, h * w, out))
            .expect("rows are B*H*W")
            .into_dyn()
    }

    /// Pooled features `[B, C_out]`, and the cache if kept.
    pub(super) fn forward<T: Real>(
        &self,
        p: &ParamStore<T>,
        batch: &Batch<T>,
        rng: Option<&mut StdRng>,
        keep_cache: bool,
    ) -> (Array2<T>, Option<ConvCache<T>>) {
        let b = batch.len();
        let x4 = nchw(batch);
        let (_, _, h, w) = x4.dim();
        let (y, conv) = match &batch.frozen {
            // The frozen product stands in for `x·Wᵀ`; the input rows are still needed
            // by a LoRA branch.
            Some(f) => {
                let product = f
                    .view()
                    .into_shape_with_order((b * h * w, f.shape()[2]))
                    .expect("checked")
                    .to_owned();
                let rows = self.conv.lora.is_some().then(|| Arc::new(nchw_to_rows(x4)));
                self.conv
                    .forward_from_product(p, rows.as_ref(), product, rng)
            }
            None => {
                let rows = Arc::new(nchw_to_rows(x4));
                self.conv.forward(p, &rows, rng)
            }
        };
        let (z, bn_x) = self.bn.forward(p, y);
        let r = relu6_forward(z);
        let pooled = gap_forward(r.view(), b);
        let cache = keep_cache.then_some(ConvCache {
            conv,
            bn_x,
            relu: r,
            pixels: h * w,
        });
        (pooled, cache)
    }

    /// Backward from `dL/dpooled` through the pooling, ReLU6, BatchNorm and conv.
    pub(super) fn backward<T: Real>(
        &self,
        p: &ParamStore<T>,
        cache: ConvCache<T>,
        dpooled: Array2<T>,
        grads: &mut Grads<T>,
    ) {
        let dr = gap_backward(dpooled.view(), cache.pixels);
        let dz = relu6_backward(cache.relu.view(), dr);
        let need_conv = self.conv.has_trainable(p);
        if let Some(dy) = self.bn.backward(p, cache.bn_x, dz.view(), grads, need_conv) {
            self.conv.backward(p, cache.conv, dy.view(), grads, false);
        }
    }
}

/// The features of a checked batch as `[B, C_in, H, W]`.
fn nchw<T: Real>(batch: &Batch<T>) -> ArrayView4<'_, T> {
    batch
        .features
        .view()
        .into_dimensionality::<Ix4>()
        .expect("checked")
}
