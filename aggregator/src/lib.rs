//! fedpeft's aggregator: runs federated rounds beside an MQTT broker.
//!
//! # Map
//! - [`round`]: the pure round state machine ([`round::RoundMachine::on_event`] → actions):
//!   sampling, deadline and quorum, validation and rejection counting, last wills.
//! - [`strategy`]: FedAvg, FedAdam, FedYogi, coordinate-wise median, trimmed mean behind the
//!   [`strategy::Strategy`] trait, norm bounding, and client-level DP ([`strategy::DpFedAvg`]
//!   wrapping an averaging strategy, with its RDP accountant); pure arithmetic with
//!   hand-computed tests. One file a concern: `accumulator`, `averaging`, `order`, `norm`, `dp`;
//!   the `[strategy]` table itself ([`strategy::StrategyKind`]) is spelled in `fedpeft-config`.
//! - [`adapter`]: the dense f32 named tensors strategies work on.
//! - [`accounting`]: MQTT wire sizes, per-client / per-round ledgers, full-model comparison.
//! - [`checkpoint`]: atomic, hashed checkpoints of the machine state.
//! - [`config`]: TOML + flags, validated into a typed [`config::Config`].
//! - [`wire`]: incoming MQTT publishes → machine events (topics, chunks, decode errors);
//!   [`outbox`]: the machine's outgoing messages → sealed, signed, chunked MQTT packets on their
//!   topics, and the byte ledger.
//! - [`host`]: the [`host::ModelHost`] trait (initial adapter, held-out evaluation);
//!   [`model`]: its real implementation on a split backbone + PEFT tail, evaluating on the
//!   [`held_out`] data the config names (a named set, or the user's own files).
//! - [`report`]: JSON / CSV report and the summary table.
//! - [`keys`]: the enrolment file (client id → Ed25519 public key) and `keygen`; [`tls`]: the
//!   rustls configuration for an `mqtts://` broker.
//! - [`monitor`]: `[monitor]`'s Prometheus metrics and live dashboard over HTTP, fed
//!   snapshots of the run through a channel that keeps only the newest.
//! - [`broker`]: the embedded rumqttd; [`shell`]: the async loop (tokio + rumqttc) that moves
//!   bytes between MQTT and the machine.
//!
//! The machine never touches a socket, a file or a clock: the shell feeds it events and the
//! current time and carries out what it returns, so every protocol rule is unit-tested.

pub mod accounting;
pub mod adapter;
pub mod broker;
pub mod checkpoint;
pub mod config;
pub mod globals;
pub mod held_out;
pub mod host;
pub mod keys;
pub mod model;
pub mod monitor;
pub mod outbox;
pub mod report;
pub mod round;
pub mod shell;
pub mod strategy;
pub use fedpeft_tls as tls;
pub mod wire;
