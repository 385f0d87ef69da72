//! The report schema (moved here from the aggregator).
