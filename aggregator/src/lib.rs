//! fedpeft's aggregator: runs federated rounds beside an MQTT broker.
//!
//! # Map
//! - [`round`]: the pure round state machine ([`round::RoundMachine::on_event`] → actions):
//!   sampling, deadline and quorum, validation and rejection counting, last wills.
//! - [`strategy`]: FedAvg, FedAdam, FedYogi, coordinate-wise median, trimmed mean behind the
//!   [`strategy::Strategy`] trait; pure arithmetic with hand-computed tests.
//! - [`adapter`]: the dense f32 named tensors strategies work on.
//! - [`accounting`]: MQTT wire sizes, per-client / per-round ledgers, full-model comparison.
//! - [`checkpoint`]: atomic, hashed checkpoints of the machine state.
//!
//! The machine never touches a socket, a file or a clock: the shell feeds it events and the
//! current time and carries out what it returns, so every protocol rule is unit-tested.

pub mod accounting;
pub mod adapter;
pub mod checkpoint;
pub mod config;
pub mod round;
pub mod strategy;
