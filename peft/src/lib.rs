//! fedpeft-peft: the Rust-native tail of a split backbone — frozen pretrained layers plus a
//! few trainable PEFT parameters, trained by backpropagation on the device.
//!
//! Module map (dependencies point one way, from the top of the list down):
//! - [`tail`]: [`PeftTail`], the three families assembled from layers with a method applied,
//!   one file per concern:
//!   - `tail/mod.rs`: [`PeftTail`] itself — building, batch checks, the frozen prefix,
//!     forward and backward through a family's body and the head;
//!   - `tail/object.rs`: the object-safe [`Tail`] trait, [`build_tail`], [`StepStats`],
//!     [`EvalStats`] (exported here at the root);
//!   - `tail/batch.rs`: [`Batch`];
//!   - `tail/build.rs`: config validation, frozen layers from the weights, fresh LoRA
//!     factors and head;
//!   - `tail/conv.rs`: the conv-head family (1×1 conv, folded BatchNorm, ReLU6, pooling);
//!   - `tail/transformer.rs`, `tail/block.rs`, `tail/adapter.rs`: the two families built of
//!     transformer blocks (post-LN BERT `transformer`, pre-LN ViT `vit` with layer scale),
//!     one block of either kind, the Houlsby adapter.
//! - [`dp`] and [`accountant`]: DP-SGD and the RDP accountant.
//! - [`optim`]: SGD, AdamW, gradient-norm clipping and the FedProx term behind [`Optimizer`].
//! - [`layers`]: forward/backward of linear (+LoRA), folded BatchNorm, layer scale, ReLU6,
//!   GELU, LayerNorm, multi-head attention, poolings and softmax cross-entropy.
//! - [`weights`]: frozen weights from `tail.safetensors` or an in-memory map.
//! - [`params`]: every tensor of a tail by stable name ([`ParamStore`]), gradients, the
//!   [`ParamSlot`]s an optimizer updates, and the wire form of trainable tensors
//!   ([`NamedTensor`]).
//! - [`method`]: PEFT methods (`head`, `bias`, `lora`, `adapter`, `prompt`, `full-tail`) and
//!   the three tail families (`conv_head`, `transformer`, `vit`).
//! - [`gelu`]: GELU and its derivative; in `f32` vectorised, with a stated error bound.
//! - [`gemm`]: the matrix products (the `gemm` crate; the crate's one `unsafe` call).
//! - [`real`]: the scalar trait (`f32` for training, `f64` for gradient checks).
//! - [`error`]: the one error type, [`PeftError`].
//!
//! The edge client uses the object-safe [`Tail`] trait:
//!
//! ```
//! use std::collections::HashMap;
//! use fedpeft_peft::{build_tail, Batch, Family, Method, PeftConfig, Sgd, Tail};
//! use ndarray::ArrayD;
//!
//! // A tiny conv head: 4 input channels -> 8, as `tail.safetensors` would hold it.
//! let mut w = HashMap::new();
//! w.insert("conv_head.weight".to_string(), (vec![8, 4], vec![0.1f32; 32]));
//! w.insert("bn_head.scale".to_string(), (vec![8], vec![1.0f32; 8]));
//! w.insert("bn_head.shift".to_string(), (vec![8], vec![0.0f32; 8]));
//! let weights = fedpeft_peft::FrozenWeights::from_map(w).unwrap();
//! let mut tail = build_tail(Family::ConvHead, &weights, PeftConfig::new(Method::Bias, 3, 7)).unwrap();
//! assert_eq!(tail.num_trainable(), 8 + 3 * 8 + 3); // BN shift + head
//! let batch = Batch::new(ArrayD::from_elem(vec![2, 4, 3, 3], 0.5f32), None);
//! let mut opt = Sgd::new(0.1);
//! let stats = tail.train_step(&batch, &[0, 2], &mut opt).unwrap();
//! assert!(stats.loss.is_finite());
//! let update = tail.trainable(); // what goes on the wire
//! tail.set_trainable(&update).unwrap();
//! ```

pub mod accountant;
pub mod dp;
pub mod error;
pub mod gelu;
pub mod gemm;
pub mod layers;
pub mod method;
pub mod optim;
pub mod params;
pub mod real;
pub mod tail;
pub mod weights;

pub use accountant::RdpAccountant;
pub use dp::{DpSgd, DpSgdConfig};
pub use error::{PeftError, Result};
pub use method::{
    AdapterConfig, Family, Gelu, HeadInit, LoraConfig, LoraTarget, Method, PeftConfig, Pool,
    PromptConfig, TransformerSpec, VitSpec,
};
pub use optim::{AdamW, ClipGradNorm, FedProx, Optimizer, Sgd};
pub use params::{Grads, NamedTensor, ParamSlot, ParamStore};
pub use real::Real;
pub use tail::object::{EvalStats, StepStats, Tail, build_tail};
pub use tail::{Batch, PeftTail};
pub use weights::{FrozenWeights, write_safetensors};
