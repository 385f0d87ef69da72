//! One error type for the crate; every variant names the file (and record) it is about.

use std::path::PathBuf;

/// Errors from loading backbones, running trunks, reading data sets and caching activations.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path}: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: sha256 is {actual}, manifest says {expected} (rebuild with `make models`)")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("runtime `{runtime}` is not available: {reason}")]
    RuntimeUnavailable {
        runtime: &'static str,
        reason: String,
    },
    #[error("trunk {path} ({runtime}): {reason}")]
    Trunk {
        path: PathBuf,
        runtime: &'static str,
        reason: String,
    },
    #[error("wrong trunk input: {0}")]
    Input(String),
    #[error("data set {path}{}: {reason}", record.map(|r| format!(" (record {r})")).unwrap_or_default())]
    Data {
        path: PathBuf,
        record: Option<usize>,
        reason: String,
    },
    /// A line of a text file (CSV, JSONL) that cannot be used; lines count from 1.
    #[error("data set {path}, line {line}: {reason}")]
    DataLine {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("partition: {0}")]
    Partition(String),
    #[error("activation cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
}

/// Shorthand for results in this crate.
pub type Result<T, E = BackboneError> = std::result::Result<T, E>;

impl BackboneError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn line(path: impl Into<PathBuf>, line: u64, reason: impl Into<String>) -> Self {
        Self::DataLine {
            path: path.into(),
            line,
            reason: reason.into(),
        }
    }

    pub(crate) fn data(
        path: impl Into<PathBuf>,
        record: Option<usize>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Data {
            path: path.into(),
            record,
            reason: reason.into(),
        }
    }
}
