//! fedpeft fleet trials: one command starts an aggregator and N edge-client processes that talk
//! over a real MQTT broker, each client training on its own shard of a real data set.
//!
//! # Map
//! Each module uses only modules above it in this list.
//!
//! The trial and its links:
//! - [`links`]: link profiles (presets for NB-IoT, LTE-M, 3G, Wi-Fi; custom ones) and the
//!   trial's `[links]` table, which gives every client one.
//! - [`shaper`]: the user-space link model (token bucket, delay, jitter, loss) on a caller's
//!   clock; [`relay`]: a TCP relay per client that applies it and accounts every MQTT packet.
//! - [`netns`]: kernel links, a network namespace and veth pair per client shaped by `tc`.
//! - [`trial`]: the trial file (TOML) and its validation into a [`Trial`]: the file as written,
//!   one validator per table, preflight checks against this machine.
//!
//! What a trial reports (read from the aggregator's `report.json` as `fedpeft_config`'s
//! `Report`, never as untyped JSON):
//! - [`rounds`]: who took part in each round: sampled, accepted, dropped (vanished mid-round),
//!   late (stragglers the deadline passed by).
//! - [`summary`]: the trial's results row ([`summary::Row`]): accuracy, bytes against
//!   full-model FedAvg, round times computed per link preset.
//! - [`link_report`]: the link measurements per round and client.
//! - [`report`]: the trial's `report.json` as a type, [`report::TrialReport`]: the aggregator's
//!   report with the fleet's `participation`, `summary` and `links` sections beside it.
//! - [`table`]: a sweep's results table (`results.json`, `.csv`, `.md`), one row per trial.
//! - [`plot`]: accuracy by round, accuracy by cumulative bytes and round time per link preset,
//!   as SVG and PNG, for a trial or a sweep.
//!
//! Running:
//! - [`runner`]: runs a trial as a `TrialRun`: writes the aggregator's config (an
//!   `AggregatorFile`), starts it (its embedded broker on a free loopback port) and waits until
//!   it is ready, makes the links, starts the clients, waits for the end of the run, records the
//!   results and stops whatever is left. Every process logs to `<out>/logs/`.
//! - [`sweep`]: many trials from one sweep file, run in turn, and their results table.
//! - [`swarm`]: a load generator, N virtual MQTT clients in one process against a running
//!   aggregator, with an exact check of every global adapter it publishes.
//!
//! The aggregator writes the run's report (`report.json`, `report.csv`) into the same folder.

pub mod link_report;
pub mod links;
pub mod netns;
pub mod plot;
pub mod relay;
pub mod report;
pub mod rounds;
pub mod runner;
pub mod shaper;
pub mod summary;
pub mod swarm;
pub mod sweep;
pub mod table;
pub mod trial;

pub use runner::{Binaries, Outcome, run};
pub use trial::{Broker, Trial, TrialError};
