//! A user's own labelled files, as an edge client reads its local data and the aggregator its
//! held-out set: an image folder, an IDX pair, a CSV or a JSONL file, labelled with the fleet's
//! class list so every device gives a class the same id.
//!
//! The class list is part of what a global adapter means (the classifier's row `i` is class
//! `i`), so [`model_id`] puts a digest of it ([`class_list_tag`]) into the backbone id a client
//! joins with: the aggregator refuses a client whose list differs as `incompatible`, with no
//! change to the wire format.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{
    ImageDataset, TextColumns, TextDataset, image_folder_classes, load_csv, load_idx_pair,
    load_image_folder, load_jsonl,
};
use crate::error::{BackboneError, Result};

/// Where a user's data is and how to read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnData {
    /// `root/<class>/**/*.{png,jpg,jpeg}`.
    ImageFolder { root: PathBuf },
    /// An IDX images file (`[N, H, W]`, grey) and its labels file (`[N]`, ids into the class
    /// list); gzip or not.
    Idx { images: PathBuf, labels: PathBuf },
    /// A CSV file with a header row.
    Csv { path: PathBuf, columns: TextColumns },
    /// One JSON object per line.
    Jsonl { path: PathBuf, columns: TextColumns },
}

impl OwnData {
    /// The data set's name in the config files.
    pub fn name(&self) -> &'static str {
        match self {
            OwnData::ImageFolder { .. } => "image-folder",
            OwnData::Idx { .. } => "idx",
            OwnData::Csv { .. } => "csv",
            OwnData::Jsonl { .. } => "jsonl",
        }
    }

    /// Texts (a transformer backbone's), not images.
    pub fn is_text(&self) -> bool {
        matches!(self, OwnData::Csv { .. } | OwnData::Jsonl { .. })
    }

    /// The folder or file the data is read from (an IDX pair: its images file).
    pub fn path(&self) -> &Path {
        match self {
            OwnData::ImageFolder { root } => root,
            OwnData::Idx { images, .. } => images,
            OwnData::Csv { path, .. } | OwnData::Jsonl { path, .. } => path,
        }
    }

    /// Every image, labelled by its position in `classes`. An image folder's images are
    /// resized to `side × side` as they are read (its photos may be any size); an IDX set keeps
    /// its size (the trunk's preprocessing resizes it). An empty set is an error.
    pub fn load_images(&self, classes: &[String], side: usize) -> Result<ImageDataset> {
        let ds = match self {
            OwnData::ImageFolder { root } => {
                let side = side as u32;
                load_image_folder(root, Some(classes), Some((side, side)))?
            }
            OwnData::Idx { images, labels } => {
                load_idx_pair(images, labels, Some(classes.to_vec()))?
            }
            OwnData::Csv { path, .. } | OwnData::Jsonl { path, .. } => {
                return Err(BackboneError::data(
                    path,
                    None,
                    format!("{} holds texts, not images", self.name()),
                ));
            }
        };
        if ds.is_empty() {
            return Err(BackboneError::data(self.path(), None, "no images"));
        }
        Ok(ds)
    }

    /// Every text, labelled by its position in `classes`.
    pub fn load_texts(&self, classes: &[String]) -> Result<TextDataset> {
        match self {
            OwnData::Csv { path, columns } => load_csv(path, Some(classes), columns),
            OwnData::Jsonl { path, columns } => load_jsonl(path, Some(classes), columns),
            OwnData::ImageFolder { .. } | OwnData::Idx { .. } => Err(BackboneError::data(
                self.path(),
                None,
                format!("{} holds images, not texts", self.name()),
            )),
        }
    }

    /// The class list this data implies when none is configured: an image folder's sub-folder
    /// names, sorted. The other formats cannot say which labels exist or in which order, so
    /// their list must be configured.
    pub fn default_classes(&self) -> Result<Vec<String>> {
        match self {
            OwnData::ImageFolder { root } => image_folder_classes(root),
            _ => Err(BackboneError::data(
                self.path(),
                None,
                format!(
                    "{} data cannot name its classes: configure the class list",
                    self.name()
                ),
            )),
        }
    }
}

/// A short digest of a class list (names and order): 12 hex digits of the SHA-256 of each
/// name's byte length (u32, little-endian) followed by its bytes.
pub fn class_list_tag(classes: &[String]) -> String {
    let mut h = Sha256::new();
    for c in classes {
        h.update((c.len() as u32).to_le_bytes());
        h.update(c.as_bytes());
    }
    hex::encode(&h.finalize()[..6])
}

/// The id a client joins with and the aggregator requires: the backbone's manifest id, and for
/// a fleet on its own data the class list's tag (`efficientnet-lite0#classes-1a2b3c4d5e6f`).
/// The named data sets keep the bare id (their classes are fixed).
pub fn model_id(backbone_id: &str, classes: Option<&[String]>) -> String {
    match classes {
        Some(list) => format!("{backbone_id}#classes-{}", class_list_tag(list)),
        None => backbone_id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_tag_depends_on_names_and_order_and_cannot_be_fooled_by_joining() {
        let a = class_list_tag(&names(&["cat", "dog"]));
        assert_eq!(a.len(), 12);
        assert_eq!(a, class_list_tag(&names(&["cat", "dog"])));
        assert_ne!(a, class_list_tag(&names(&["dog", "cat"])));
        assert_ne!(a, class_list_tag(&names(&["ca", "tdog"])));
        assert_ne!(a, class_list_tag(&names(&["cat", "dog", "bird"])));
        assert_eq!(model_id("m", None), "m");
        assert_eq!(
            model_id("efficientnet-lite0", Some(&names(&["cat", "dog"]))),
            format!("efficientnet-lite0#classes-{a}")
        );
    }

    #[test]
    fn an_idx_pair_labels_by_the_fleet_list_and_an_out_of_range_label_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let idx = |dims: &[u32], data: &[u8]| {
            let mut v = vec![0, 0, 8, dims.len() as u8];
            for d in dims {
                v.extend_from_slice(&d.to_be_bytes());
            }
            v.extend_from_slice(data);
            v
        };
        let images = dir.path().join("my-images-idx3-ubyte");
        std::fs::write(&images, idx(&[2, 3, 3], &[9; 18])).unwrap();
        let labels = dir.path().join("my-labels-idx1-ubyte");
        std::fs::write(&labels, idx(&[2], &[2, 0])).unwrap();
        let data = OwnData::Idx {
            images: images.clone(),
            labels: labels.clone(),
        };
        let ds = data.load_images(&names(&["a", "b", "c"]), 96).unwrap();
        assert_eq!(
            (ds.labels.clone(), ds.channels, ds.height),
            (vec![2, 0], 1, 3)
        );
        let e = data.load_images(&names(&["a", "b"]), 96).unwrap_err();
        assert!(
            e.to_string().contains("my-labels-idx1-ubyte") && e.to_string().contains("label 2"),
            "{e}"
        );
        assert!(data.default_classes().is_err());
        assert!(data.load_texts(&names(&["a", "b"])).is_err());
    }
}
