//! The aggregator config file as written (moved here from the aggregator).
