//! fedpeft-backbone: the frozen half of a split backbone and the data it runs on.
//!
//! Module map:
//! - [`manifest`]: `manifest.json` of a built backbone ([`Manifest`]) and [`Backbone`], which
//!   resolves and checksums its files (`trunk.onnx`, `tail.safetensors`, `vocab.txt`).
//! - [`trunk`]: the [`Trunk`] trait and its runtimes — tract (pure Rust, always built) and
//!   onnxruntime via `ort` (feature `ort`, library loaded at run time) — chosen by [`Runtime`].
//! - [`preprocess`]: image resize / channel / normalisation, and text tokenization at a fixed
//!   sequence length, as the manifest prescribes.
//! - [`tokenizer`]: BERT WordPiece for the text backbone.
//! - [`data`]: Fashion-MNIST, SpamAssassin, and a user's IDX / image-folder / CSV / JSONL data.
//! - [`partition`]: IID, Dirichlet(alpha), shards and natural client splits with summaries.
//! - [`cache`]: the per-client trunk-activation cache (memory budget, spill to file).
//! - [`method`]: where the wire meets the tail, for the edge client and the aggregator alike:
//!   [`peft_method`], the protocol's PEFT method name as the tail's method to build, and
//!   [`dense`], a wire tensor as the tail's dense tensor.
//!
//! The tail itself (frozen layers + PEFT parameters) lives in `fedpeft-peft`; it reads the
//! `tail.safetensors` named by the manifest.

pub mod cache;
pub mod data;
pub mod error;
pub mod hf_peft;
pub mod manifest;
pub mod method;
pub mod partition;
pub mod preprocess;
pub mod tokenizer;
pub mod trunk;

pub use cache::{
    ActivationCache, CacheConfig, CacheKey, Features, TextActivations, text_activations,
};
pub use error::{BackboneError, Result};
pub use manifest::{Backbone, Family, InputSpec, Manifest, default_models_dir};
pub use method::{dense, peft_method};
pub use partition::{ClientSummary, Partition, Partitioner, held_out_split, partition};
pub use preprocess::{ImagePreprocess, TextPreprocess};
pub use tokenizer::{Encoding, WordPiece};
pub use trunk::{
    ExecutionProvider, Runtime, RuntimeKind, Trunk, TrunkConfig, TrunkInput, open_trunk,
};
