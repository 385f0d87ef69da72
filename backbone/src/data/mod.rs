//! Labelled data sets: images (IDX files, a folder per class) and text (CSV, JSONL,
//! SpamAssassin). Loaders return owned, validated in-memory sets ([`DecodedImages`]: an IDX
//! pair decoded once into a cache folder and memory-mapped, so a fleet's processes each read
//! only their shard); a broken or mislabelled
//! file is a [`BackboneError::Data`] (or [`BackboneError::DataLine`]) naming the file and,
//! where it applies, the record or line. [`OwnData`] is a user's files as a device or the
//! aggregator reads them, labelled with the fleet's class list ([`class_list_tag`] makes the
//! list part of the model's identity).

mod decoded;
mod folder;
mod idx;
mod own;
mod spam;
mod text;

use std::path::PathBuf;

pub use decoded::{DECODED_VERSION, DecodedImages, fashion_mnist_decoded};
pub use folder::{
    IMAGE_EXTENSIONS, decode_image_bytes, image_folder_classes, load_image_files, load_image_folder,
};
pub use idx::{
    fashion_mnist, fashion_mnist_at, fashion_mnist_dir, load_idx_images, load_idx_labels,
    load_idx_pair,
};
pub use own::{OwnData, class_list_tag, model_id};
pub use spam::{
    SPAM_ASSASSIN_CLASSES, SPAM_ASSASSIN_SPLIT_SEED, SPAM_ASSASSIN_TEST_FRACTION,
    SPAM_ASSASSIN_VERSION, load_spam_assassin, spam_assassin_dir, spam_assassin_split,
};
pub use text::{TextColumns, load_csv, load_jsonl, load_texts_unlabelled};

use crate::error::{BackboneError, Result};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Images of one size, 8-bit, row-major `[N, H, W, C]` with C = 1 (grey) or 3 (RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
    /// Where the set came from (for error messages and cache keys).
    pub source: PathBuf,
}

impl ImageDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }
    /// The pixels of image `i` (HWC).
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    /// A new set with the given samples, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Self {
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..self.clone_meta()
        }
    }
    fn clone_meta(&self) -> Self {
        Self {
            height: self.height,
            width: self.width,
            channels: self.channels,
            pixels: Vec::new(),
            labels: Vec::new(),
            classes: self.classes.clone(),
            source: self.source.clone(),
        }
    }
}

/// Labelled texts, with an optional natural client key per sample (e.g. a mailing list).
#[derive(Debug, Clone, PartialEq)]
pub struct TextDataset {
    pub texts: Vec<String>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
    pub keys: Vec<Option<String>>,
    pub source: PathBuf,
}

impl TextDataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// Maps label names to dense ids in first-seen order, or checks them against a fixed list.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelMap {
    fixed: bool,
    names: Vec<String>,
}

impl LabelMap {
    pub(crate) fn fixed(names: &[String]) -> Self {
        Self {
            fixed: true,
            names: names.to_vec(),
        }
    }

    /// The id of label `name` on line `line` of `path`.
    pub(crate) fn id(&mut self, name: &str, path: &std::path::Path, line: u64) -> Result<u32> {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return Ok(i as u32);
        }
        if self.fixed {
            return Err(BackboneError::line(
                path,
                line,
                format!(
                    "label `{name}` is not one of the fleet's classes {:?}",
                    self.names
                ),
            ));
        }
        self.names.push(name.to_string());
        Ok((self.names.len() - 1) as u32)
    }

    pub(crate) fn into_names(self) -> Vec<String> {
        self.names
    }
}

/// Seed of the held-out subset of the user's own data when it holds more than the examples
/// evaluated: fixed, so every run of a fleet (and `edge-client predict --evaluate`) takes the
/// same examples.
pub const HELD_OUT_SUBSET_SEED: u64 = 0x00e7_a1d5;

/// At most `n` of `0..len`: all, or a seeded ([`HELD_OUT_SUBSET_SEED`]) random subset in
/// ascending order. The aggregator's held-out examples of the user's own data.
pub fn held_out_subset(len: usize, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if n < len {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut rng = rand::rngs::StdRng::seed_from_u64(HELD_OUT_SUBSET_SEED);
        idx.shuffle(&mut rng);
        idx.truncate(n);
        idx.sort_unstable();
    }
    idx
}
