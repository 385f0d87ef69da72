//! The crate's error type.

use thiserror::Error;

/// Everything that can go wrong building, loading, training or updating a tail.
#[derive(Debug, Error)]
pub enum PeftError {
    /// A required frozen weight is absent from the weight file or map.
    #[error("weight `{name}` is missing from {source_desc}")]
    MissingWeight { name: String, source_desc: String },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A flat tensor's element count does not match its declared shape.
    #[error("tensor `{name}` has {got} values, its shape {shape:?} needs {expected}")]
    Length {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },
    /// A weight file stores a dtype other than f32.
    #[error("weight `{name}` has dtype {dtype}, only F32 is supported")]
    Dtype { name: String, dtype: String },
    /// A trainable tensor name that this tail does not have.
    #[error("unknown trainable tensor `{name}` (this tail trains: {known})")]
    UnknownTensor { name: String, known: String },
    /// `set_trainable` was given a map that misses some trainable tensor.
    #[error("trainable tensor `{name}` is missing from the update")]
    MissingTensor { name: String },
    /// The PEFT method cannot be applied to this tail family.
    #[error("PEFT method `{method}` is not supported on the `{family}` family: {why}")]
    Unsupported {
        method: String,
        family: String,
        why: String,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration `{field}`: {why}")]
    Config { field: String, why: String },
    /// The batch does not fit the tail (shape, mask, labels).
    #[error("bad batch: {0}")]
    Batch(String),
    /// A label is outside `0..num_classes`.
    #[error("label {label} at position {index} is outside 0..{num_classes}")]
    Label {
        index: usize,
        label: usize,
        num_classes: usize,
    },
    /// The safetensors file could not be parsed.
    #[error("safetensors file {path}: {why}")]
    SafeTensors { path: String, why: String },
    /// Reading a weight file failed.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A non-finite loss or gradient appeared (diverged training).
    #[error("non-finite {what} at step {step}")]
    NonFinite { what: String, step: u64 },
}

/// Result alias for this crate.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;
