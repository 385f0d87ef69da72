//! fedpeft fleet trials: one command starts an aggregator and N edge-client processes that talk
//! over a real MQTT broker, each client training on its own shard of a real data set.
//!
//! - [`trial`]: the trial file (TOML) and its validation into a [`Trial`].
//! - [`runner`]: starts the processes (aggregator first, its embedded broker on a free loopback
//!   port, then the clients), logs each to `<out>/logs/`, waits for the end of the run, and
//!   stops whatever is left.
//!
//! The aggregator writes the run's report (`report.json`, `report.csv`) into the same folder.

pub mod runner;
pub mod trial;

pub use runner::{Binaries, Outcome, run};
pub use trial::{Broker, Trial, TrialError};
