//! fedpeft fleet trials: one command starts an aggregator and N edge-client processes that talk
//! over a real MQTT broker, each client training on its own shard of a real data set.
//!
//! - [`trial`]: the trial file (TOML) and its validation into a [`Trial`].
//! - [`runner`]: starts the processes (aggregator first, its embedded broker on a free loopback
//!   port, then the clients), logs each to `<out>/logs/`, waits for the end of the run, and
//!   stops whatever is left.
//!
//! - [`links`]: link profiles (presets for NB-IoT, LTE-M, 3G, Wi-Fi; custom ones) and the
//!   trial's `[links]` table, which gives every client one.
//! - [`shaper`]: the user-space link model (token bucket, delay, jitter, loss) on a caller's
//!   clock; [`relay`]: a TCP relay per client that applies it and accounts every MQTT packet.
//! - [`netns`]: kernel links, a network namespace and veth pair per client shaped by `tc`.
//! - [`report`]: the link measurements added to the trial's results.
//! - [`rounds`]: who took part in each round: sampled, accepted, dropped (vanished mid-round),
//!   late (stragglers the deadline passed by).
//! - [`plot`]: accuracy by round, accuracy by cumulative bytes and round time per link preset,
//!   as SVG and PNG, for a trial or a sweep.
//! - [`sweep`]: many trials from one sweep file, run in turn, and their results table.
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
pub mod sweep;
pub mod table;
pub mod trial;

pub use runner::{Binaries, Outcome, run};
pub use trial::{Broker, Trial, TrialError};
