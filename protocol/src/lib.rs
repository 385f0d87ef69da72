//! fedpeft's wire format, shared by the aggregator, edge clients and tools. `no_std` + `alloc`
//! so a microcontroller client can speak it; depends only on serde, postcard, heapless, crc and
//! ed25519-dalek.
//!
//! # Map
//! - [`envelope`]: [`Envelope`] `{ version, run_id, round, kind, body }` + trailing CRC-32;
//!   [`Envelope::encode`] / [`Envelope::decode`] (typed [`DecodeError`], never panics, allocation
//!   bounded by input length), [`peek_header`] for cheap routing.
//! - [`message`]: the lifecycle messages — [`Join`] (with [`Capabilities`]), [`RoundAnnounce`]
//!   (with [`Sampling`], [`LocalConfig`]), [`GlobalAdapter`], [`ClientUpdate`] (with
//!   [`TrainMetrics`]), [`EvalResult`], [`Status`] ([`ClientState`], also the MQTT last will),
//!   [`Chunk`] — wrapped in [`Message`].
//! - [`secagg`]: the secure-aggregation (SecAgg+) stages' messages, [`SecureRoundAnnounce`]
//!   to [`SecAggReveal`].
//! - [`site`]: [`SiteAggregate`], a site aggregator's exact partial sum for its root.
//! - [`tensor`]: named [`Tensor`]s in f32 / f16 / int8 ([`Values`]), dense or top-k sparse.
//!   [`Tensor::encode`] (f32 slice -> tensor with a [`Codec`]), [`Tensor::encode_with_feedback`]
//!   (error feedback, caller keeps the residual), [`Tensor::to_f32`],
//!   [`Tensor::accumulate_into`] (streaming weighted sum), [`Tensor::for_each_dense`],
//!   [`Tensor::validate`] (NaN/Inf).
//! - [`chunk`]: [`chunk::split`] a payload above a packet limit into chunk envelopes;
//!   [`Reassembler`] puts them back with bounded memory and a caller-supplied clock.
//! - [`topic`]: [`Topic`] / [`TopicKind`] build and parse `fedpeft/v1/{fleet}/…`, with the QoS
//!   and retain flag of each; [`topic::filter`] for subscriptions.
//! - [`sign`]: Ed25519-signed envelopes (version 2): [`Envelope::encode_signed`],
//!   [`sign::verify`], key parsing (and, with `std`, key files).
//! - [`ids`]: [`ClientId`], [`FleetName`] (`heapless::String<32>`, charset `[A-Za-z0-9_.-]`).
//! - [`mqtt`]: [`mqtt::publish_wire_size`], bytes of a PUBLISH including framing.
//! - [`mod@f16`], [`rng`]: hand-written f16 conversion and the SplitMix64 generator used for
//!   stochastic rounding.
//!
//! The byte-level specification, with a worked example, is `docs/protocol.md`.
//!
//! ```
//! use fedpeft_protocol::{ClientId, ClientUpdate, Codec, DType, Envelope, Message, SplitMix64,
//!     Tensor, TrainMetrics};
//! let mut rng = SplitMix64::new(42);
//! let delta = [0.5f32, -0.25, 0.125, 0.0];
//! let t = Tensor::encode("head.bias", &[4], &delta, Codec::dense(DType::F16), &mut rng).unwrap();
//! let update = ClientUpdate {
//!     client: ClientId::new("pi-01").unwrap(), round: 3, sequence: 3, num_examples: 120,
//!     metrics: TrainMetrics { loss: 0.7, accuracy: 0.8, steps: 10, elapsed_ms: 900, epsilon: None },
//!     tensors: vec![t],
//! };
//! let bytes = Envelope::new(7, 3, update).encode().unwrap();
//! let back = Envelope::decode(&bytes).unwrap();
//! let Message::ClientUpdate(u) = back.message else { panic!() };
//! u.validate().unwrap();
//! assert_eq!(u.tensors[0].to_f32(), delta);
//! ```
#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod bytes;
pub mod checksum;
pub mod chunk;
pub mod envelope;
pub mod f16;
pub mod ids;
pub mod message;
pub mod mqtt;
pub mod rng;
pub mod secagg;
pub mod sign;
pub mod site;
pub mod tensor;
pub mod topic;

pub use chunk::{Reassembler, ReassemblyError, ReassemblyLimits, SplitError};
pub use envelope::{
    DecodeError, EncodeError, Envelope, Header, PROTOCOL_VERSION, crc32, peek_header,
};
pub use ids::{ClientId, FleetName, IdError};
pub use message::{
    AsyncRoundAnnounce, Capabilities, Chunk, ClientState, ClientUpdate, DpSgd, EvalResult,
    GlobalAdapter, Join, LocalConfig, Message, MessageKind, Optimizer, PeftFields, PeftMethod,
    RoundAnnounce, Sampling, Status, TrainMetrics,
};
pub use rng::{SplitMix64, keyed_unit};
pub use secagg::{
    PeerBytes, RevealKind, RevealedShare, RosterEntry, SecAggDp, SecAggKeys, SecAggMasked,
    SecAggRelay, SecAggReveal, SecAggRoster, SecAggSetup, SecAggShares, SecAggUnmask,
    SecureRoundAnnounce,
};
pub use sign::{SIGNED_VERSION, SignatureError, SigningKey, VerifyingKey};
pub use site::{ExactSum, SiteAggregate};
pub use tensor::{Codec, DType, NonFinite, Tensor, TensorError, Values};
pub use topic::{QoS, Topic, TopicError, TopicKind};
