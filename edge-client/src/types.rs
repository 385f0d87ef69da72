//! The edge client's own view of a round: decoded dense f32 tensors (fedpeft-peft's
//! [`NamedTensor`], what the tail trains), the training plan a round announces and what local
//! training produces. The wire layer ([`crate::wire`]) converts between these and the protocol
//! crate's encoded messages (u32 shapes, f32 / f16 / int8 / sparse values), so the session and
//! the trainer never see bytes.

use std::sync::Arc;

use fedpeft_peft::NamedTensor;

/// A round number, as announced by the aggregator.
pub type Round = u32;

/// How update values travel on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireDtype {
    F32,
    F16,
    Int8,
}

/// The local optimizer a round asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerPlan {
    Sgd {
        momentum: f32,
        weight_decay: f32,
    },
    AdamW {
        beta1: f32,
        beta2: f32,
        epsilon: f32,
        weight_decay: f32,
    },
}

/// Sample-level DP-SGD settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpPlan {
    pub clip_norm: f32,
    pub noise_multiplier: f32,
}

/// What the aggregator asks sampled clients to do this round.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPlan {
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f32,
    pub optimizer: OptimizerPlan,
    pub dp: Option<DpPlan>,
    /// FedProx proximal coefficient (0 = plain FedAvg local training).
    pub proximal_mu: f32,
    pub dtype: WireDtype,
    /// Keep only this fraction of the largest-magnitude delta entries (`None` = dense).
    pub top_k: Option<f32>,
    /// Seed for this round's local shuffling.
    pub seed: u64,
}

/// A round announcement.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    /// The training run (a restarted aggregator keeps it; a new run gets a new one).
    pub run_id: u64,
    pub round: Round,
    pub sampled: Vec<String>,
    pub plan: TrainPlan,
    /// Milliseconds since the Unix epoch after which the aggregator stops waiting.
    pub deadline_unix_ms: u64,
    /// A secure-aggregation round's parameters (the update goes out masked, in stages).
    pub secure: Option<fedpeft_protocol::SecAggSetup>,
    /// An asynchronous (buffered) run: an update that finishes after the round moved on is
    /// still sent when it is at most this many rounds behind.
    pub max_staleness: Option<u32>,
}

/// The global adapter clients start round `round` from.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalAdapter {
    pub run_id: u64,
    pub round: Round,
    pub tensors: Vec<NamedTensor>,
}

/// Loss and accuracy over the examples a step saw.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Metrics {
    pub loss: f32,
    pub accuracy: f32,
    pub num_examples: u64,
    /// Optimizer steps taken (training only).
    pub steps: u32,
    /// Wall time, ms.
    pub elapsed_ms: u32,
    /// Privacy spent so far at the client's delta, when DP-SGD is on.
    pub epsilon: Option<f32>,
}

/// The result of local training: `delta = local - global` for every trainable tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedUpdate {
    pub deltas: Vec<NamedTensor>,
    pub metrics: Metrics,
}

/// A shared, immutable global adapter (handed to the trainer without copying).
pub type SharedAdapter = Arc<GlobalAdapter>;
