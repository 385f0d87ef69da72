//! The model side of the aggregator, behind a small trait: where the round-0 adapter comes from
//! and how a global adapter is evaluated on the held-out set.
//!
//! The round machine never sees a model (its tests need none); the shell asks the host.

use fedpeft_peft::NamedTensor;

use crate::adapter::Adapter;
use crate::config::ModelConfig;

/// Loss and accuracy of a global adapter on held-out data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub examples: usize,
}

/// A model host failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("model host: {0}")]
    Model(String),
}

/// What the aggregator needs from the model.
pub trait ModelHost: Send + std::fmt::Debug {
    /// The round-0 global adapter: the PEFT tail's trainable tensors at initialization.
    fn initial_adapter(&self) -> Result<Adapter, HostError>;
    /// Evaluates `adapter` on the held-out set; `None` if this host has no evaluation data.
    fn evaluate(&mut self, adapter: &Adapter) -> Result<Option<Evaluation>, HostError>;
    /// Parameters of the whole backbone (trunk + tail), for the full-model comparison.
    fn backbone_params(&self) -> u64;
    /// Backbone identity that joining clients must match, if known.
    fn backbone_id(&self) -> Option<String> {
        None
    }
    fn backbone_sha256(&self) -> Option<[u8; 32]> {
        None
    }
    /// The class names in label-id order, if the host knows them.
    fn classes(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A host without a model: the adapter layout comes from the config (`model.tensors`), starts
/// at zero, and nothing is evaluated. For brokers and tests where the aggregator only averages.
#[derive(Debug, Clone)]
pub struct LayoutHost {
    tensors: Vec<(String, Vec<u32>)>,
    backbone_params: u64,
}

impl LayoutHost {
    pub fn new(model: &ModelConfig, backbone_params: u64) -> LayoutHost {
        LayoutHost {
            tensors: model.tensors.clone(),
            backbone_params,
        }
    }
}

impl ModelHost for LayoutHost {
    fn initial_adapter(&self) -> Result<Adapter, HostError> {
        Ok(Adapter::new(
            self.tensors
                .iter()
                .map(|(name, shape)| {
                    let shape = shape.iter().map(|&d| d as usize).collect();
                    NamedTensor::zeros(name.clone(), shape)
                })
                .collect(),
        ))
    }
    fn evaluate(&mut self, _: &Adapter) -> Result<Option<Evaluation>, HostError> {
        Ok(None)
    }
    fn backbone_params(&self) -> u64 {
        self.backbone_params
    }
}
