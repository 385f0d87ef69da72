//! The messages of a federation's lifecycle. Each travels as the body of an
//! [`Envelope`](crate::Envelope); see `docs/protocol.md` for topics and field-by-field layout.
//!
//! Field order is the wire order (postcard is positional): append-only changes need a new
//! protocol version, so never reorder or insert fields.

use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::ids::ClientId;
use crate::secagg::{
    SecAggKeys, SecAggMasked, SecAggRelay, SecAggReveal, SecAggRoster, SecAggShares, SecAggUnmask,
    SecureRoundAnnounce,
};
use crate::site::SiteAggregate;
use crate::tensor::{DType, Tensor, TensorError};

/// Longest backbone id, in bytes.
pub const MAX_BACKBONE_ID_LEN: usize = 64;

/// The parameter-efficient fine-tuning method a client trains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum PeftMethod {
    /// Classifier head only.
    Head,
    /// Bias terms (BitFit) plus the head.
    Bias,
    /// Low-rank adapters of rank `rank`, scaled by `alpha / rank`.
    Lora {
        /// Rank r.
        rank: u16,
        /// Scaling numerator alpha.
        alpha: f32,
    },
    /// Bottleneck adapters of width `bottleneck`.
    Adapter {
        /// Hidden width of the adapter.
        bottleneck: u16,
    },
    /// `tokens` learned prompt tokens prepended at the tail's input.
    Prompt {
        /// Number of prompt tokens.
        tokens: u16,
    },
    /// Every tail weight (the accuracy baseline).
    FullTail,
}

/// A [`PeftMethod`] as named fields: its name (`head`, `bias`, `lora`, `adapter`, `prompt`,
/// `full-tail`) and the settings the method has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeftFields {
    pub name: &'static str,
    pub lora_rank: Option<u16>,
    pub lora_alpha: Option<f32>,
    pub bottleneck: Option<u16>,
    pub prompt_tokens: Option<u16>,
}

impl PeftMethod {
    /// The method as named fields (what model files and reports write).
    pub fn fields(self) -> PeftFields {
        let mut f = PeftFields {
            name: "",
            lora_rank: None,
            lora_alpha: None,
            bottleneck: None,
            prompt_tokens: None,
        };
        f.name = match self {
            PeftMethod::Head => "head",
            PeftMethod::Bias => "bias",
            PeftMethod::Lora { rank, alpha } => {
                (f.lora_rank, f.lora_alpha) = (Some(rank), Some(alpha));
                "lora"
            }
            PeftMethod::Adapter { bottleneck } => {
                f.bottleneck = Some(bottleneck);
                "adapter"
            }
            PeftMethod::Prompt { tokens } => {
                f.prompt_tokens = Some(tokens);
                "prompt"
            }
            PeftMethod::FullTail => "full-tail",
        };
        f
    }
}

/// What a client can do; sent once in [`Join`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Backbone identifier, e.g. `efficientnet-lite0@split-6`.
    pub backbone_id: heapless::String<MAX_BACKBONE_ID_LEN>,
    /// SHA-256 of the backbone's trunk file, so clients with a different trunk are refused.
    pub backbone_sha256: [u8; 32],
    /// PEFT method trained.
    pub peft: PeftMethod,
    /// Update dtypes the client can produce and global adapter dtypes it can read.
    pub accepted_dtypes: heapless::Vec<DType, 3>,
    /// Largest MQTT packet the client accepts, in bytes; larger payloads must be chunked.
    pub max_packet_size: u32,
}

/// A client announces itself and its capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// Who.
    pub client: ClientId,
    /// What it can do.
    pub capabilities: Capabilities,
    /// Local training examples (the FedAvg weight).
    pub num_examples: u64,
}

/// Which clients take part in a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Sampling {
    /// Every connected client.
    All,
    /// Exactly these clients.
    Clients(Vec<ClientId>),
    /// Each client joins independently with this probability (decided from the round seed).
    Rate(f32),
}

/// Client optimizer for local training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// SGD with (heavy-ball) momentum and L2 weight decay.
    Sgd {
        /// Momentum, 0 for plain SGD.
        momentum: f32,
        /// L2 weight decay.
        weight_decay: f32,
    },
    /// Adam with decoupled weight decay (AdamW; weight_decay 0 is plain Adam).
    AdamW {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator epsilon.
        epsilon: f32,
        /// Decoupled weight decay.
        weight_decay: f32,
    },
}

/// Sample-level DP-SGD on the client.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpSgd {
    /// Per-sample gradient L2 clipping norm.
    pub clip_norm: f32,
    /// Gaussian noise standard deviation as a multiple of `clip_norm`.
    pub noise_multiplier: f32,
}

/// Local training hyper-parameters for one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalConfig {
    /// Local epochs.
    pub epochs: u16,
    /// Mini-batch size.
    pub batch_size: u32,
    /// Learning rate.
    pub learning_rate: f32,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// FedProx proximal coefficient mu (0 = FedAvg).
    pub fedprox_mu: f32,
    /// DP-SGD, if any.
    pub dp_sgd: Option<DpSgd>,
    /// Encoding for the update.
    pub update_dtype: DType,
    /// Top-k fraction for the update, if sparsified.
    pub top_k_fraction: Option<f32>,
    /// Seed for sampling, shuffling and stochastic rounding this round.
    pub seed: u64,
}

/// The aggregator opens a round (published retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnounce {
    /// Round number.
    pub round: u32,
    /// Updates arriving after this instant (Unix time, ms) are late.
    pub deadline_unix_ms: u64,
    /// Who takes part.
    pub sampling: Sampling,
    /// How to train.
    pub config: LocalConfig,
}

impl RoundAnnounce {
    /// Whether this is the aggregator's "run is done" marker: no deadline
    /// (`deadline_unix_ms == 0`) and nobody sampled (`Sampling::Clients([])`). The aggregator
    /// publishes it (retained) for round `rounds + 1`; clients exit cleanly when they see it.
    /// Nobody sampled with a real deadline is only a round everyone sits out.
    pub fn is_run_done(&self) -> bool {
        self.deadline_unix_ms == 0 && matches!(&self.sampling, Sampling::Clients(c) if c.is_empty())
    }
}

/// A round of an asynchronous buffered run (FedBuff), on the round topic (retained) in place of
/// a [`RoundAnnounce`]. There is no round barrier: the aggregator makes a new global adapter
/// from every `buffer` updates it accepts and announces the next round at once, so a client
/// that finishes training after the round moved on still sends its update, up to
/// `max_staleness` rounds late; the aggregator weighs it down by its staleness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AsyncRoundAnnounce {
    /// The round (the global adapter version being built), its deadline, who takes part and
    /// how to train.
    pub announce: RoundAnnounce,
    /// Updates trained for up to this many rounds before `announce.round` are still accepted.
    pub max_staleness: u32,
}

/// The aggregated adapter after `round` (published retained); round 0 is the initial one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GlobalAdapter {
    /// The round that produced it.
    pub round: u32,
    /// Full adapter weights (not deltas).
    pub tensors: Vec<Tensor>,
}

/// Local training metrics sent with an update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainMetrics {
    /// Mean training loss over the last local epoch.
    pub loss: f32,
    /// Training accuracy over the last local epoch, in `[0, 1]`.
    pub accuracy: f32,
    /// Optimizer steps taken.
    pub steps: u32,
    /// Wall time of local training, ms.
    pub elapsed_ms: u32,
    /// Privacy spent so far (epsilon at the run's delta), when DP-SGD is on.
    pub epsilon: Option<f32>,
}

/// A client's update: `local - global` for every trainable tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// Who.
    pub client: ClientId,
    /// The round trained (the global adapter it started from is `round - 1`'s).
    pub round: u32,
    /// Per-client counter, increasing across rounds: a redelivered duplicate has the same
    /// `(client, round, sequence)` and is dropped; an older one is stale.
    pub sequence: u32,
    /// Examples used (the FedAvg weight).
    pub num_examples: u64,
    /// Training metrics.
    pub metrics: TrainMetrics,
    /// Deltas.
    pub tensors: Vec<Tensor>,
}

/// A client's evaluation of the global adapter on its local held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Who.
    pub client: ClientId,
    /// The global adapter's round.
    pub round: u32,
    /// Examples evaluated.
    pub num_examples: u64,
    /// Mean loss.
    pub loss: f32,
    /// Accuracy in `[0, 1]`.
    pub accuracy: f32,
}

/// A client's state, published retained on its status topic; the `Offline` status is also the
/// MQTT last will registered at connect time, so the broker publishes it if the client vanishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClientState {
    /// Connected, not yet joined to a round.
    Online,
    /// Joined, waiting for a round.
    Idle,
    /// Training for the envelope's round.
    Training,
    /// Gone (graceful disconnect or last will).
    Offline,
}

/// A client's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Who.
    pub client: ClientId,
    /// State.
    pub state: ClientState,
}

/// One piece of a payload too large for one MQTT packet; see [`crate::chunk`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Identifies the chunked payload among the sender's in-flight ones.
    pub message_id: u32,
    /// Position, `0..count`.
    pub index: u32,
    /// Number of chunks.
    pub count: u32,
    /// Length of the reassembled payload, bytes.
    pub total_len: u32,
    /// CRC-32 (ISO-HDLC) of the reassembled payload.
    pub crc32: u32,
    /// This chunk's bytes.
    #[serde(with = "crate::bytes::field")]
    pub data: Vec<u8>,
}

/// Message kind codes: the byte after the envelope header fields. 0 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MessageKind {
    /// [`Join`].
    Join = 1,
    /// [`RoundAnnounce`].
    RoundAnnounce = 2,
    /// [`GlobalAdapter`].
    GlobalAdapter = 3,
    /// [`ClientUpdate`].
    ClientUpdate = 4,
    /// [`EvalResult`].
    EvalResult = 5,
    /// [`Status`].
    Status = 6,
    /// [`Chunk`].
    Chunk = 7,
    /// [`SecureRoundAnnounce`].
    SecureRoundAnnounce = 8,
    /// [`SecAggKeys`].
    SecAggKeys = 9,
    /// [`SecAggRoster`].
    SecAggRoster = 10,
    /// [`SecAggShares`].
    SecAggShares = 11,
    /// [`SecAggRelay`].
    SecAggRelay = 12,
    /// [`SecAggMasked`].
    SecAggMasked = 13,
    /// [`SecAggUnmask`].
    SecAggUnmask = 14,
    /// [`SecAggReveal`].
    SecAggReveal = 15,
    /// [`SiteAggregate`].
    SiteAggregate = 16,
    /// [`AsyncRoundAnnounce`].
    AsyncRoundAnnounce = 17,
}

impl MessageKind {
    /// All kinds, in code order.
    pub const ALL: [MessageKind; 17] = [
        MessageKind::Join,
        MessageKind::RoundAnnounce,
        MessageKind::GlobalAdapter,
        MessageKind::ClientUpdate,
        MessageKind::EvalResult,
        MessageKind::Status,
        MessageKind::Chunk,
        MessageKind::SecureRoundAnnounce,
        MessageKind::SecAggKeys,
        MessageKind::SecAggRoster,
        MessageKind::SecAggShares,
        MessageKind::SecAggRelay,
        MessageKind::SecAggMasked,
        MessageKind::SecAggUnmask,
        MessageKind::SecAggReveal,
        MessageKind::SiteAggregate,
        MessageKind::AsyncRoundAnnounce,
    ];

    /// The kind with wire code `code`, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == code)
    }

    /// snake_case name, as printed by tools.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Join => "join",
            MessageKind::RoundAnnounce => "round_announce",
            MessageKind::GlobalAdapter => "global_adapter",
            MessageKind::ClientUpdate => "client_update",
            MessageKind::EvalResult => "eval_result",
            MessageKind::Status => "status",
            MessageKind::Chunk => "chunk",
            MessageKind::SecureRoundAnnounce => "secure_round_announce",
            MessageKind::SecAggKeys => "secagg_keys",
            MessageKind::SecAggRoster => "secagg_roster",
            MessageKind::SecAggShares => "secagg_shares",
            MessageKind::SecAggRelay => "secagg_relay",
            MessageKind::SecAggMasked => "secagg_masked",
            MessageKind::SecAggUnmask => "secagg_unmask",
            MessageKind::SecAggReveal => "secagg_reveal",
            MessageKind::SiteAggregate => "site_aggregate",
            MessageKind::AsyncRoundAnnounce => "async_round_announce",
        }
    }
}

impl core::fmt::Display for MessageKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Any message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`Join`].
    Join(Join),
    /// See [`RoundAnnounce`].
    RoundAnnounce(RoundAnnounce),
    /// See [`GlobalAdapter`].
    GlobalAdapter(GlobalAdapter),
    /// See [`ClientUpdate`].
    ClientUpdate(ClientUpdate),
    /// See [`EvalResult`].
    EvalResult(EvalResult),
    /// See [`Status`].
    Status(Status),
    /// See [`Chunk`].
    Chunk(Chunk),
    /// See [`SecureRoundAnnounce`].
    SecureRoundAnnounce(SecureRoundAnnounce),
    /// See [`SecAggKeys`].
    SecAggKeys(SecAggKeys),
    /// See [`SecAggRoster`].
    SecAggRoster(SecAggRoster),
    /// See [`SecAggShares`].
    SecAggShares(SecAggShares),
    /// See [`SecAggRelay`].
    SecAggRelay(SecAggRelay),
    /// See [`SecAggMasked`].
    SecAggMasked(SecAggMasked),
    /// See [`SecAggUnmask`].
    SecAggUnmask(SecAggUnmask),
    /// See [`SecAggReveal`].
    SecAggReveal(SecAggReveal),
    /// See [`SiteAggregate`].
    SiteAggregate(SiteAggregate),
    /// See [`AsyncRoundAnnounce`].
    AsyncRoundAnnounce(AsyncRoundAnnounce),
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Join(_) => MessageKind::Join,
            Message::RoundAnnounce(_) => MessageKind::RoundAnnounce,
            Message::GlobalAdapter(_) => MessageKind::GlobalAdapter,
            Message::ClientUpdate(_) => MessageKind::ClientUpdate,
            Message::EvalResult(_) => MessageKind::EvalResult,
            Message::Status(_) => MessageKind::Status,
            Message::Chunk(_) => MessageKind::Chunk,
            Message::SecureRoundAnnounce(_) => MessageKind::SecureRoundAnnounce,
            Message::SecAggKeys(_) => MessageKind::SecAggKeys,
            Message::SecAggRoster(_) => MessageKind::SecAggRoster,
            Message::SecAggShares(_) => MessageKind::SecAggShares,
            Message::SecAggRelay(_) => MessageKind::SecAggRelay,
            Message::SecAggMasked(_) => MessageKind::SecAggMasked,
            Message::SecAggUnmask(_) => MessageKind::SecAggUnmask,
            Message::SecAggReveal(_) => MessageKind::SecAggReveal,
            Message::SiteAggregate(_) => MessageKind::SiteAggregate,
            Message::AsyncRoundAnnounce(_) => MessageKind::AsyncRoundAnnounce,
        }
    }

    /// The round named inside the body, for the kinds that carry one.
    pub fn body_round(&self) -> Option<u32> {
        match self {
            Message::RoundAnnounce(m) => Some(m.round),
            Message::GlobalAdapter(m) => Some(m.round),
            Message::ClientUpdate(m) => Some(m.round),
            Message::EvalResult(m) => Some(m.round),
            Message::SecureRoundAnnounce(m) => Some(m.announce.round),
            Message::SecAggKeys(m) => Some(m.round),
            Message::SecAggRoster(m) => Some(m.round),
            Message::SecAggShares(m) => Some(m.round),
            Message::SecAggRelay(m) => Some(m.round),
            Message::SecAggMasked(m) => Some(m.round),
            Message::SecAggUnmask(m) => Some(m.round),
            Message::SecAggReveal(m) => Some(m.round),
            Message::SiteAggregate(m) => Some(m.round),
            Message::AsyncRoundAnnounce(m) => Some(m.announce.round),
            Message::Join(_) | Message::Status(_) | Message::Chunk(_) => None,
        }
    }

    /// The sending client, for the kinds that name one.
    pub fn client(&self) -> Option<&ClientId> {
        match self {
            Message::Join(m) => Some(&m.client),
            Message::ClientUpdate(m) => Some(&m.client),
            Message::EvalResult(m) => Some(&m.client),
            Message::Status(m) => Some(&m.client),
            Message::SecAggKeys(m) => Some(&m.client),
            Message::SecAggShares(m) => Some(&m.client),
            Message::SecAggMasked(m) => Some(&m.client),
            Message::SecAggReveal(m) => Some(&m.client),
            Message::SiteAggregate(m) => Some(&m.site),
            Message::RoundAnnounce(_)
            | Message::GlobalAdapter(_)
            | Message::Chunk(_)
            | Message::SecureRoundAnnounce(_)
            | Message::SecAggRoster(_)
            | Message::SecAggRelay(_)
            | Message::SecAggUnmask(_)
            | Message::AsyncRoundAnnounce(_) => None,
        }
    }

    /// The tensors carried, if any.
    pub fn tensors(&self) -> &[Tensor] {
        match self {
            Message::GlobalAdapter(m) => &m.tensors,
            Message::ClientUpdate(m) => &m.tensors,
            _ => &[],
        }
    }

    /// Structural checks beyond what the serde layer sees: every tensor consistent, tensor
    /// names unique within the message.
    pub(crate) fn check(&self) -> Result<(), TensorError> {
        if let Message::SiteAggregate(m) = self {
            return m.check();
        }
        let tensors = self.tensors();
        for (i, t) in tensors.iter().enumerate() {
            t.check_structure()?;
            if tensors[..i].iter().any(|u| u.name() == t.name()) {
                return Err(TensorError::DuplicateName {
                    name: t.name().into(),
                });
            }
        }
        Ok(())
    }

    /// Reports the first NaN or infinity in any tensor, naming it. Aggregators call this and
    /// reject the update; decoding alone keeps such values so they can be inspected.
    pub fn validate(&self) -> Result<(), crate::tensor::NonFinite> {
        self.tensors().iter().try_for_each(Tensor::validate)
    }
}

impl ClientUpdate {
    /// See [`Message::validate`].
    pub fn validate(&self) -> Result<(), crate::tensor::NonFinite> {
        self.tensors.iter().try_for_each(Tensor::validate)
    }
}

impl GlobalAdapter {
    /// See [`Message::validate`].
    pub fn validate(&self) -> Result<(), crate::tensor::NonFinite> {
        self.tensors.iter().try_for_each(Tensor::validate)
    }
}

macro_rules! from_body {
    ($($t:ident),*) => {$(
        impl From<$t> for Message {
            fn from(m: $t) -> Message {
                Message::$t(m)
            }
        }
    )*};
}
from_body!(
    Join,
    RoundAnnounce,
    GlobalAdapter,
    ClientUpdate,
    EvalResult,
    Status,
    Chunk,
    SecureRoundAnnounce,
    SecAggKeys,
    SecAggRoster,
    SecAggShares,
    SecAggRelay,
    SecAggMasked,
    SecAggUnmask,
    SecAggReveal,
    SiteAggregate,
    AsyncRoundAnnounce
);

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;

    fn announce(deadline_unix_ms: u64, sampling: Sampling) -> RoundAnnounce {
        RoundAnnounce {
            round: 9,
            deadline_unix_ms,
            sampling,
            config: LocalConfig {
                epochs: 1,
                batch_size: 8,
                learning_rate: 0.1,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                fedprox_mu: 0.0,
                dp_sgd: None,
                update_dtype: DType::F32,
                top_k_fraction: None,
                seed: 1,
            },
        }
    }

    #[test]
    fn no_deadline_and_nobody_sampled_is_the_run_done_marker() {
        assert!(announce(0, Sampling::Clients(vec![])).is_run_done());
        // Nobody sampled with a real deadline is a round everyone sits out.
        assert!(!announce(5, Sampling::Clients(vec![])).is_run_done());
        let one = vec![ClientId::new("c1").unwrap()];
        assert!(!announce(0, Sampling::Clients(one)).is_run_done());
        assert!(!announce(0, Sampling::All).is_run_done());
        assert!(!announce(0, Sampling::Rate(0.0)).is_run_done());
    }
}
