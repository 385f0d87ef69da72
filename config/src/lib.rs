//! fedpeft's file formats, in one place: what an operator writes and what a run reports.
//!
//! Every binary and the fleet runner share these types, so a setting has one spelling and one
//! documented default, and a report is read back as the type it was written from.
//!
//! # Map
//! - [`error`]: [`ConfigError`], naming the file and the key.
//! - [`broker`]: the `[broker]` table (aggregator and edge client).
//! - [`security`]: the `[security]` table (aggregator and edge client).
//! - [`data`]: [`DatasetKind`], the data sets the files name, and the defaults of how to read
//!   a user's own files.
//! - [`strategy`]: the aggregator's `[strategy]` table ([`StrategyKind`], with the server
//!   optimizers' [`strategy::ServerOptParams`]).
//! - [`aggregator`]: the aggregator's config file, as written (every field optional).
//! - [`edge`]: the edge client's config file, as written.
//! - [`report`]: `report.json`: the run, its rounds, traffic, and the refusal reasons.
//!
//! Nothing here validates ranges or reads the files a setting names: each binary turns these
//! raw forms into its own validated config. Only the spelling, the nesting and unknown-key
//! refusal live here.

pub mod aggregator;
pub mod broker;
pub mod data;
pub mod edge;
pub mod error;
pub mod report;
pub mod security;
pub mod strategy;

pub use broker::BrokerTable;
pub use data::DatasetKind;
pub use error::{ConfigError, invalid};
pub use security::SecurityTable;
pub use strategy::StrategyKind;
