//! The frozen trunk: a small trait with a pure-Rust implementation (tract, always built) and an
//! onnxruntime one (`ort` feature). Inputs carry a dynamic batch dimension.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use ndarray::{Array2, Array4, ArrayD};

use crate::error::{BackboneError, Result};
use crate::manifest::{Backbone, InputSpec};

#[cfg(feature = "ort")]
mod ort_impl;
mod tract_depthwise;
mod tract_impl;

#[cfg(feature = "ort")]
pub use ort_impl::OrtTrunk;
pub use tract_depthwise::{ChannelLastDepthwise, replace_depthwise};
pub use tract_impl::{TractTrunk, channel_last_depthwise};

/// A batch of trunk inputs.
#[derive(Debug, Clone)]
pub enum TrunkInput {
    /// Normalised pixels `[B, 3, H, W]`.
    Image(Array4<f32>),
    /// Token ids and attention mask `[B, S]` from the tokenizer.
    Tokens { ids: Array2<i64>, mask: Array2<i64> },
}

impl TrunkInput {
    pub fn batch_size(&self) -> usize {
        match self {
            Self::Image(x) => x.shape()[0],
            Self::Tokens { ids, .. } => ids.shape()[0],
        }
    }
}

/// Runs the frozen part of a backbone: inputs -> activation at the split point.
pub trait Trunk: Send + Sync + fmt::Debug {
    /// Which runtime executes this trunk.
    fn runtime(&self) -> RuntimeKind;
    /// Forward pass of one batch; the output's first dimension is the batch.
    fn run(&self, input: &TrunkInput) -> Result<ArrayD<f32>>;
}

/// A concrete runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Ort,
    Tract,
}

impl RuntimeKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ort => "ort",
            Self::Tract => "tract",
        }
    }
}

/// Runtime choice: `auto` takes onnxruntime when the `ort` feature is built and its library
/// loads, tract otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    #[default]
    Auto,
    Ort,
    Tract,
}

impl FromStr for Runtime {
    type Err = BackboneError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "ort" => Ok(Self::Ort),
            "tract" => Ok(Self::Tract),
            other => Err(BackboneError::Input(format!(
                "unknown runtime `{other}` (expected auto, ort or tract)"
            ))),
        }
    }
}

/// Execution providers for onnxruntime, tried in order before CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionProvider {
    Cuda,
    TensorRt,
}

/// How to open a trunk.
#[derive(Debug, Clone)]
pub struct TrunkConfig {
    pub runtime: Runtime,
    /// Threads: onnxruntime's intra-op threads (0 = its default); tract splits a batch's samples
    /// over this many workers (0 = one, tract's default).
    pub threads: usize,
    /// Path of `libonnxruntime.so`; else `ORT_DYLIB_PATH`, else `models/build/onnxruntime/`.
    pub ort_library: Option<PathBuf>,
    /// Extra onnxruntime execution providers (CUDA, TensorRT); CPU is the fallback.
    pub providers: Vec<ExecutionProvider>,
    /// Image side for vision trunks (tract optimises for one spatial size); defaults to the
    /// manifest's `default_size`.
    pub image_size: Option<usize>,
}

impl Default for TrunkConfig {
    fn default() -> Self {
        Self {
            runtime: Runtime::Auto,
            threads: 0,
            ort_library: None,
            providers: Vec::new(),
            image_size: None,
        }
    }
}

impl TrunkConfig {
    pub fn with_runtime(mut self, runtime: Runtime) -> Self {
        self.runtime = runtime;
        self
    }
    pub fn with_image_size(mut self, size: usize) -> Self {
        self.image_size = Some(size);
        self
    }
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
}

/// Where the onnxruntime library is looked for when nothing is configured.
pub fn default_ort_library() -> PathBuf {
    crate::manifest::default_models_dir().join("onnxruntime/libonnxruntime.so.1.31.1")
}

/// The image side a vision trunk is opened for.
pub(crate) fn image_side(backbone: &Backbone, cfg: &TrunkConfig) -> Option<usize> {
    match &backbone.manifest.input {
        InputSpec::Image { default_size, .. } => Some(cfg.image_size.unwrap_or(*default_size)),
        InputSpec::Text { .. } => None,
    }
}

/// Opens the backbone's trunk with the configured runtime.
pub fn open_trunk(backbone: &Backbone, cfg: &TrunkConfig) -> Result<Box<dyn Trunk>> {
    match cfg.runtime {
        Runtime::Tract => Ok(Box::new(TractTrunk::open(backbone, cfg)?)),
        Runtime::Ort => open_ort(backbone, cfg),
        Runtime::Auto => match open_ort(backbone, cfg) {
            Ok(t) => Ok(t),
            Err(BackboneError::RuntimeUnavailable { reason, .. }) => {
                tracing::info!(%reason, "onnxruntime unavailable, using tract");
                Ok(Box::new(TractTrunk::open(backbone, cfg)?))
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(feature = "ort")]
fn open_ort(backbone: &Backbone, cfg: &TrunkConfig) -> Result<Box<dyn Trunk>> {
    Ok(Box::new(OrtTrunk::open(backbone, cfg)?))
}

#[cfg(not(feature = "ort"))]
fn open_ort(_backbone: &Backbone, _cfg: &TrunkConfig) -> Result<Box<dyn Trunk>> {
    Err(BackboneError::RuntimeUnavailable {
        runtime: "ort",
        reason: "this build has no onnxruntime support (rebuild with `--features ort`)".into(),
    })
}

/// Checks an input against the family of the trunk.
pub(crate) fn check_input(
    input: &TrunkInput,
    backbone: &Backbone,
    side: Option<usize>,
) -> Result<()> {
    match (input, &backbone.manifest.input) {
        (TrunkInput::Image(x), InputSpec::Image { channels, .. }) => {
            let s = x.shape();
            let side = side.unwrap_or(s[2]);
            if s[1] != *channels || s[2] != side || s[3] != side {
                return Err(BackboneError::Input(format!(
                    "{}: image batch has shape {s:?}, trunk expects [B, {channels}, {side}, {side}]",
                    backbone.manifest.id
                )));
            }
            Ok(())
        }
        (TrunkInput::Tokens { ids, mask }, InputSpec::Text { max_position, .. }) => {
            if ids.shape() != mask.shape() {
                return Err(BackboneError::Input(format!(
                    "ids {:?} and mask {:?} differ in shape",
                    ids.shape(),
                    mask.shape()
                )));
            }
            if ids.shape()[1] > *max_position {
                return Err(BackboneError::Input(format!(
                    "sequence length {} exceeds the model's {max_position} positions",
                    ids.shape()[1]
                )));
            }
            Ok(())
        }
        (TrunkInput::Image(_), _) => Err(BackboneError::Input(format!(
            "{} is a text backbone; got an image batch",
            backbone.manifest.id
        ))),
        (TrunkInput::Tokens { .. }, _) => Err(BackboneError::Input(format!(
            "{} is a vision backbone; got a token batch",
            backbone.manifest.id
        ))),
    }
}
