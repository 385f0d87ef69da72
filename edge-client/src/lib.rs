//! fedpeft edge client: trains a PEFT tail on local data and publishes compact updates over MQTT.
//!
//! Module map (pure logic first, I/O last):
//! - [`config`]: the TOML file (`fedpeft_config::edge::EdgeFile`) + CLI flags ([`config::Cli`]),
//!   validated table by table into an [`config::EdgeConfig`]; reconnect backoff.
//! - [`types`]: the client's view of a round: f32 tensors, training plan, trained update.
//! - [`session`]: the round protocol as a pure state machine (`on_event -> Vec<Action>`).
//! - [`wire`]: topics and the client's codec state; [`wire::decode`]: incoming publishes to
//!   session events (chunk reassembly, run and signature checks); [`wire::encode`]: outgoing
//!   messages to sealed, chunked packets (update dtype, top-k with error feedback). Pure as well.
//! - [`trainer`]: the [`trainer::LocalTrainer`] trait and [`trainer::TailTrainer`], a PEFT tail
//!   trained on cached trunk activations.
//! - [`setup`]: config -> backbone, data shard, cached trunk activations, PEFT tail (the method
//!   from `fedpeft_backbone::peft_method`, shared with the aggregator).
//! - [`accounting`]: bytes up and down per round, MQTT framing included.
//! - [`tls`]: the rustls configuration for an `mqtts://` broker (CA file, optional client
//!   certificate); signing keys and the aggregator's public key come from [`config`] and are
//!   used by [`wire`] (signed envelopes, `docs/protocol.md`).
//! - [`client`]: the async shell (tokio + rumqttc) that runs a session: [`client::run`] drives
//!   an event-loop struct with one method per kind of event; the MQTT event loop is polled in a
//!   task of its own (reconnect backoff, emulated dropout).
//! - [`model`], [`predict`], [`export`], [`serve`]: the federation's model put to use (a kept
//!   global adapter on the trunk: predictions, a merged deployable model, an HTTP server).

pub mod accounting;
pub mod client;
pub mod config;
pub mod export;
pub mod model;
pub mod observe;
pub mod predict;
pub mod secure;
pub mod serve;
pub mod session;
pub mod setup;
pub use fedpeft_tls as tls;
pub mod trainer;
pub mod types;
pub mod wire;
