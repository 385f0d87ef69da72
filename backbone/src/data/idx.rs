//! IDX files (MNIST / Fashion-MNIST format), raw or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{FASHION_MNIST_CLASSES, ImageDataset};
use crate::error::{BackboneError, Result};

/// Where Fashion-MNIST's IDX files are when no config names a folder: `$FEDPEFT_FASHION_MNIST`
/// if set, else where Debian's `dataset-fashion-mnist` installs them.
pub fn fashion_mnist_dir() -> PathBuf {
    std::env::var_os("FEDPEFT_FASHION_MNIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/datasets/fashion-mnist"))
}

/// Fashion-MNIST's training (60,000) or test (10,000) split, from [`fashion_mnist_dir`].
pub fn fashion_mnist(train: bool) -> Result<ImageDataset> {
    fashion_mnist_at(&fashion_mnist_dir(), train)
}

/// Fashion-MNIST's training split (`train-*-ubyte.gz`) or test split (`t10k-*-ubyte.gz`) from
/// the folder `dir`.
pub fn fashion_mnist_at(dir: &Path, train: bool) -> Result<ImageDataset> {
    let (images, labels) = fashion_mnist_files(dir, train);
    load_idx_pair(&images, &labels, Some(fashion_mnist_classes()))
}

/// The images and labels files of Fashion-MNIST's training or test split in `dir`.
pub(crate) fn fashion_mnist_files(dir: &Path, train: bool) -> (PathBuf, PathBuf) {
    let prefix = if train { "train" } else { "t10k" };
    (
        dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
    )
}

pub(crate) fn fashion_mnist_classes() -> Vec<String> {
    FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| BackboneError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| BackboneError::data(path, None, format!("broken gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX header: checks the magic (unsigned bytes) and rank, returns the dims and
/// the offset of the data.
fn header(path: &Path, bytes: &[u8], rank: u8) -> Result<(Vec<usize>, usize)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(BackboneError::data(
            path,
            None,
            "not an IDX file (bad magic)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(BackboneError::data(
            path,
            None,
            format!(
                "IDX element type 0x{:02x}, expected 0x08 (unsigned byte)",
                bytes[2]
            ),
        ));
    }
    if bytes[3] != rank {
        return Err(BackboneError::data(
            path,
            None,
            format!("IDX rank {}, expected {rank}", bytes[3]),
        ));
    }
    let off = 4 + 4 * rank as usize;
    if bytes.len() < off {
        return Err(BackboneError::data(path, None, "truncated IDX header"));
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap_or_default()) as usize
        })
        .collect();
    let want = off + dims.iter().product::<usize>();
    if bytes.len() != want {
        return Err(BackboneError::data(
            path,
            None,
            format!(
                "IDX dims {dims:?} need {want} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    Ok((dims, off))
}

/// Reads `[N, H, W]` grey images from an IDX3 file.
pub fn load_idx_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let bytes = read_all(path)?;
    let (dims, off) = header(path, &bytes, 3)?;
    Ok((dims[0], dims[1], dims[2], bytes[off..].to_vec()))
}

/// Reads `[N]` labels from an IDX1 file.
pub fn load_idx_labels(path: &Path) -> Result<Vec<u32>> {
    let bytes = read_all(path)?;
    let (_, off) = header(path, &bytes, 1)?;
    Ok(bytes[off..].iter().map(|&b| b as u32).collect())
}

/// Loads an images + labels pair; `classes` names the labels (else `0..=max`). A label outside
/// the classes is an error naming the label file and the record.
pub fn load_idx_pair(
    images: &Path,
    labels: &Path,
    classes: Option<Vec<String>>,
) -> Result<ImageDataset> {
    let (n, h, w, pixels) = load_idx_images(images)?;
    let labels_v = load_idx_labels(labels)?;
    if labels_v.len() != n {
        return Err(BackboneError::data(
            labels,
            None,
            format!(
                "{} labels for {n} images in {}",
                labels_v.len(),
                images.display()
            ),
        ));
    }
    let classes = classes.unwrap_or_else(|| {
        let max = labels_v.iter().copied().max().unwrap_or(0);
        (0..=max).map(|c| c.to_string()).collect()
    });
    if let Some(bad) = labels_v.iter().position(|&l| l as usize >= classes.len()) {
        return Err(BackboneError::data(
            labels,
            Some(bad),
            format!(
                "label {} (of image {bad}, counting from 0) is outside the {} classes {classes:?}",
                labels_v[bad],
                classes.len()
            ),
        ));
    }
    Ok(ImageDataset {
        height: h,
        width: w,
        channels: 1,
        pixels,
        labels: labels_v,
        classes,
        source: images.to_path_buf(),
    })
}
