//! A decoded, uncompressed copy of an IDX image set in a cache folder, memory-mapped.
//!
//! Every client of a fleet needs only its shard of Fashion-MNIST, but finding the shard takes
//! the labels of the whole set, and the gzip'd IDX files can only be read from the start: each
//! process used to decode all 60 000 images (47 MB) to keep ~1 000. [`DecodedImages::open`]
//! decodes the pair once into `<cache dir>/datasets/<images file>-<tag>.fpimg` and maps that
//! file; later processes (and the fleet's other clients, at the same time) map it too, read the
//! labels (60 kB) to partition, and touch only their own images. The pages are the page
//! cache's, shared by every process that maps the file.
//!
//! The file (little-endian):
//!
//! | bytes | what |
//! | --- | --- |
//! | 8 | magic `FPIMGSET` |
//! | 4 | format version ([`DECODED_VERSION`]) |
//! | 4 | channels |
//! | 8 | images `n` |
//! | 4, 4 | height, width |
//! | 8, 8, 4 | images file: size, mtime (seconds, nanoseconds since the epoch) |
//! | 8, 8, 4 | labels file: size, mtime |
//! | 32 | sha256 of every image in order, as [`crate::cache::hash_image_selection`] computes it |
//! | 32 | sha256 of everything above and of the labels and checksums below |
//! | `n` | labels, one byte each |
//! | `4n` | CRC-32C of each image |
//! | `n·h·w·c` | the images, row-major, 8-bit |
//!
//! A copy whose source files' size or modification time differ is stale; one that is short,
//! long, or fails its header digest is corrupt; an image that fails its CRC when read is
//! corrupt. Each is rebuilt from the source with a log line, never used. The copy is written to
//! a name no other process uses and renamed into place, so processes racing to build it each
//! write a whole file and the last rename wins; a reader never sees a partial file. Nothing
//! writes into a published file (a rebuild renames a new one over it), which is what makes
//! mapping it sound; a file truncated by hand under a running client can still stop that
//! client (SIGBUS), as with any mapped file. No fsync: a copy torn by a crash fails its checks
//! and is rebuilt.
//!
//! Without a usable cache folder (cannot be created, read-only) the set is decoded into memory
//! as before, with a warning.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::ImageDataset;
use super::idx::load_idx_pair;
use crate::error::{BackboneError, Result};

/// Version of the decoded file's layout; part of its name, so builds of another layout never
/// fight over one file.
pub const DECODED_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"FPIMGSET";
/// Offsets in the header.
const STAMPS_AT: usize = 32;
const STAMP_LEN: usize = 20;
const HASH_AT: usize = STAMPS_AT + 2 * STAMP_LEN;
const DIGEST_AT: usize = HASH_AT + 32;
const HEADER_LEN: usize = DIGEST_AT + 32;

/// CRC-32C (Castagnoli), slice-by-16 (a static: its tables are 16 kB).
static CRC: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// What a source file was when the copy was made: size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    secs: i64,
    nanos: u32,
}

impl Stamp {
    fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| BackboneError::io(path, e))?;
        // A file system without modification times leaves the size alone to tell.
        let (secs, nanos) = match meta.modified().map(|t| t.duration_since(UNIX_EPOCH)) {
            Ok(Ok(d)) => (d.as_secs() as i64, d.subsec_nanos()),
            Ok(Err(before)) => (-(before.duration().as_secs() as i64), 0),
            Err(_) => (0, 0),
        };
        Ok(Self {
            size: meta.len(),
            secs,
            nanos,
        })
    }

    fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..16].copy_from_slice(&self.secs.to_le_bytes());
        out[16..20].copy_from_slice(&self.nanos.to_le_bytes());
    }

    fn read(b: &[u8]) -> Self {
        Self {
            size: le_u64(&b[..8]),
            secs: le_u64(&b[8..16]) as i64,
            nanos: le_u32(&b[16..20]),
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap_or_default())
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or_default())
}

/// The bytes of a decoded copy: the mapped file, or the same layout in memory when the file
/// could not be written.
enum Store {
    Mapped(memmap2::Mmap),
    Memory(Vec<u8>),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Mapped(m) => write!(f, "Mapped({} bytes)", m.len()),
            Store::Memory(v) => write!(f, "Memory({} bytes)", v.len()),
        }
    }
}

impl Store {
    fn bytes(&self) -> &[u8] {
        match self {
            Store::Mapped(m) => m,
            Store::Memory(v) => v,
        }
    }
}

/// Why an existing copy is not used.
enum Unusable {
    Missing,
    Unreadable(String),
    Stale(String),
    Corrupt(String),
}

/// Where the pair came from and where its copy goes.
#[derive(Debug, Clone)]
struct Origin {
    images: PathBuf,
    labels: PathBuf,
    classes: Option<Vec<String>>,
    /// The copy; `None` when decoding in memory only.
    copy: Option<PathBuf>,
}

/// An IDX images + labels pair decoded once into a cache folder and memory-mapped
/// (the module's documentation has the file's layout and checks).
#[derive(Debug)]
pub struct DecodedImages {
    origin: Origin,
    store: Store,
    n: usize,
    height: usize,
    width: usize,
    channels: usize,
    classes: Vec<String>,
}

impl DecodedImages {
    /// The pair `images` + `labels` (gzip'd or raw IDX, as [`load_idx_pair`] reads them) from
    /// its decoded copy in `cache_dir/datasets/`, made first if missing, stale or corrupt.
    /// `classes` names the labels (else `0..=max`); a label outside them is an error naming the
    /// labels file. Without a usable `cache_dir` the pair is decoded into memory, with a
    /// warning. Errors of the source files (missing, broken gzip, bad IDX) are returned as
    /// [`load_idx_pair`] returns them.
    pub fn open(
        cache_dir: &Path,
        images: &Path,
        labels: &Path,
        classes: Option<Vec<String>>,
    ) -> Result<Self> {
        let origin = Origin {
            images: images.to_path_buf(),
            labels: labels.to_path_buf(),
            classes,
            copy: Some(copy_path_for(cache_dir, images, labels)),
        };
        Self::open_origin(origin)
    }

    /// The pair decoded into memory, with no copy on disk (what [`DecodedImages::open`] falls
    /// back to).
    pub fn in_memory(images: &Path, labels: &Path, classes: Option<Vec<String>>) -> Result<Self> {
        Self::build(Origin {
            images: images.to_path_buf(),
            labels: labels.to_path_buf(),
            classes,
            copy: None,
        })
    }

    fn open_origin(origin: Origin) -> Result<Self> {
        let Some(copy) = origin.copy.clone() else {
            return Self::build(origin);
        };
        let stamps = [Stamp::of(&origin.images)?, Stamp::of(&origin.labels)?];
        match map_copy(&copy, &stamps) {
            // Its layout is checked: what is left to refuse is a label outside the classes,
            // which the source has as well.
            Ok(store) => return Self::from_store(origin, store),
            Err(Unusable::Missing) => {}
            Err(Unusable::Unreadable(why)) => {
                tracing::warn!(copy = %copy.display(), why, "decoded data set cannot be read; rebuilding it")
            }
            Err(Unusable::Stale(why)) => {
                tracing::info!(copy = %copy.display(), why, "decoded data set is stale; rebuilding it")
            }
            Err(Unusable::Corrupt(why)) => {
                tracing::warn!(copy = %copy.display(), why, "decoded data set is corrupt; rebuilding it")
            }
        }
        Self::build(origin)
    }

    /// Decodes the source pair, writes the copy (when there is a place for it) and maps it;
    /// if the copy cannot be written, keeps the same bytes in memory.
    fn build(mut origin: Origin) -> Result<Self> {
        let start = std::time::Instant::now();
        // Stamps taken before reading: a source changed while it is read leaves a copy that is
        // stale at the next start, never one that looks fresh.
        let stamps = [Stamp::of(&origin.images)?, Stamp::of(&origin.labels)?];
        let ds = load_idx_pair(&origin.images, &origin.labels, origin.classes.clone())?;
        let bytes = layout(&ds, &stamps);
        drop(ds);
        let store = match origin.copy.clone() {
            None => Store::Memory(bytes),
            Some(copy) => match publish(&copy, &bytes).and_then(|()| {
                map_copy(&copy, &stamps).map_err(|u| {
                    let why = match u {
                        Unusable::Missing => "gone after writing".to_string(),
                        Unusable::Unreadable(w) | Unusable::Stale(w) | Unusable::Corrupt(w) => w,
                    };
                    BackboneError::Cache {
                        path: copy.clone(),
                        reason: why,
                    }
                })
            }) {
                Ok(store) => {
                    tracing::info!(
                        source = %origin.images.display(),
                        copy = %copy.display(),
                        bytes = bytes.len(),
                        ms = start.elapsed().as_millis() as u64,
                        "data set decoded once into the cache folder"
                    );
                    store
                }
                Err(e) => {
                    tracing::warn!(
                        source = %origin.images.display(),
                        error = %e,
                        "decoded data set not written; decoding in memory (every start \
                         decodes the source again)"
                    );
                    origin.copy = None;
                    Store::Memory(bytes)
                }
            },
        };
        Self::from_store(origin, store)
    }

    /// Checks the header and labels of `store` and takes the set's shape from it.
    fn from_store(origin: Origin, store: Store) -> Result<Self> {
        let path = origin.copy.clone().unwrap_or_else(|| origin.images.clone());
        let corrupt = |why: String| BackboneError::Cache {
            path: path.clone(),
            reason: why,
        };
        let b = store.bytes();
        let (n, height, width, channels) = check_layout(b).map_err(corrupt)?;
        let labels = &b[HEADER_LEN..HEADER_LEN + n];
        let classes = origin.classes.clone().unwrap_or_else(|| {
            let max = labels.iter().copied().max().unwrap_or(0);
            (0..=max).map(|c| c.to_string()).collect()
        });
        if let Some(bad) = labels.iter().position(|&l| l as usize >= classes.len()) {
            return Err(BackboneError::data(
                &origin.labels,
                Some(bad),
                format!(
                    "label {} (of image {bad}, counting from 0) is outside the {} classes {classes:?}",
                    labels[bad],
                    classes.len()
                ),
            ));
        }
        Ok(Self {
            origin,
            store,
            n,
            height,
            width,
            channels,
            classes,
        })
    }

    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn height(&self) -> usize {
        self.height
    }
    pub fn width(&self) -> usize {
        self.width
    }
    pub fn channels(&self) -> usize {
        self.channels
    }
    pub fn image_len(&self) -> usize {
        self.height * self.width * self.channels
    }
    /// The class names, in label order.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// The source's images file (what a decoded [`ImageDataset`] names as its source).
    pub fn source(&self) -> &Path {
        &self.origin.images
    }
    /// The decoded copy this set reads, or `None` when it lives in memory only.
    pub fn copy_path(&self) -> Option<&Path> {
        self.origin.copy.as_deref()
    }
    /// Whether the images are read from the mapped copy (not from memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Mapped(_))
    }

    /// Every label, one byte each (checked against the classes and the header digest).
    pub fn labels(&self) -> &[u8] {
        &self.store.bytes()[HEADER_LEN..HEADER_LEN + self.n]
    }

    /// Every label as the `u32`s an [`ImageDataset`] holds.
    pub fn labels_u32(&self) -> Vec<u32> {
        self.labels().iter().map(|&l| l as u32).collect()
    }

    /// sha256 of every image in order: [`crate::cache::hash_image_selection`] of the whole set,
    /// computed once when the copy was made (a cache key over the whole set without reading it).
    pub fn hash_all(&self) -> String {
        hex::encode(&self.store.bytes()[HASH_AT..HASH_AT + 32])
    }

    /// Image `i` (HWC), checked against its CRC.
    fn image_checked(&self, i: usize) -> Result<&[u8]> {
        let path = self.copy_path().unwrap_or(&self.origin.images);
        if i >= self.n {
            return Err(BackboneError::data(
                path,
                Some(i),
                format!("index outside the {} images", self.n),
            ));
        }
        let b = self.store.bytes();
        let len = self.image_len();
        let crcs = HEADER_LEN + self.n;
        let pixels = crcs + 4 * self.n;
        let want = le_u32(&b[crcs + 4 * i..]);
        let image = &b[pixels + i * len..pixels + (i + 1) * len];
        if CRC.checksum(image) != want {
            return Err(BackboneError::Cache {
                path: path.to_path_buf(),
                reason: format!("image {i} fails its checksum"),
            });
        }
        Ok(image)
    }

    fn select_checked(&self, indices: &[usize]) -> Result<ImageDataset> {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image_checked(i)?);
        }
        let labels = self.labels();
        Ok(ImageDataset {
            height: self.height,
            width: self.width,
            channels: self.channels,
            pixels,
            labels: indices.iter().map(|&i| labels[i] as u32).collect(),
            classes: self.classes.clone(),
            source: self.origin.images.clone(),
        })
    }

    /// The images at `indices`, in that order, as an owned set: the same bytes, labels,
    /// classes and source as [`ImageDataset::select`] on the decoded source. Only those images
    /// are read. If one fails its checksum, the copy is rebuilt from the source (with a log
    /// line) and read again; a source whose labels changed meanwhile is an error.
    pub fn select(&mut self, indices: &[usize]) -> Result<ImageDataset> {
        match self.select_checked(indices) {
            Ok(ds) => Ok(ds),
            Err(BackboneError::Cache { path, reason }) if self.origin.copy.is_some() => {
                tracing::warn!(copy = %path.display(), why = reason, "decoded data set is corrupt; rebuilding it");
                let labels = self.labels().to_vec();
                let rebuilt = Self::build(self.origin.clone())?;
                if rebuilt.labels() != labels.as_slice() {
                    return Err(BackboneError::data(
                        &self.origin.labels,
                        None,
                        "the source changed while it was read; start again",
                    ));
                }
                *self = rebuilt;
                self.select_checked(indices)
            }
            Err(e) => Err(e),
        }
    }

    /// The whole set as an owned [`ImageDataset`] (what decoding the source gives).
    pub fn to_dataset(&mut self) -> Result<ImageDataset> {
        let all: Vec<usize> = (0..self.n).collect();
        self.select(&all)
    }
}

/// Fashion-MNIST's training split (or test split) from the folder `dir`, as
/// [`super::fashion_mnist_at`] reads it, by way of its decoded copy in `cache_dir`.
pub fn fashion_mnist_decoded(cache_dir: &Path, dir: &Path, train: bool) -> Result<DecodedImages> {
    let (images, labels) = super::idx::fashion_mnist_files(dir, train);
    DecodedImages::open(
        cache_dir,
        &images,
        &labels,
        Some(super::idx::fashion_mnist_classes()),
    )
}

/// `cache_dir/datasets/<images file without .gz>-<tag>.fpimg`; the tag hashes the layout
/// version and both source paths (made absolute), so other sources get other files.
fn copy_path_for(cache_dir: &Path, images: &Path, labels: &Path) -> PathBuf {
    let mut h = Sha256::new();
    h.update(DECODED_VERSION.to_le_bytes());
    for p in [images, labels] {
        let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let s = abs.to_string_lossy();
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let tag = hex::encode(&h.finalize()[..8]);
    let name = images
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gz").to_string())
        .unwrap_or_else(|| "images".to_string());
    cache_dir
        .join("datasets")
        .join(format!("{name}-{tag}.fpimg"))
}

/// The file's bytes for `ds` (one channel or more, at most 256 classes: IDX labels are bytes).
fn layout(ds: &ImageDataset, stamps: &[Stamp; 2]) -> Vec<u8> {
    let n = ds.len();
    let mut b = Vec::with_capacity(HEADER_LEN + 5 * n + ds.pixels.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&DECODED_VERSION.to_le_bytes());
    b.extend_from_slice(&(ds.channels as u32).to_le_bytes());
    b.extend_from_slice(&(n as u64).to_le_bytes());
    b.extend_from_slice(&(ds.height as u32).to_le_bytes());
    b.extend_from_slice(&(ds.width as u32).to_le_bytes());
    let mut st = [0u8; 2 * STAMP_LEN];
    stamps[0].write(&mut st[..STAMP_LEN]);
    stamps[1].write(&mut st[STAMP_LEN..]);
    b.extend_from_slice(&st);
    let all: Vec<usize> = (0..n).collect();
    let hash = hex::decode(crate::cache::hash_image_selection(ds, &all)).unwrap_or_default();
    b.extend_from_slice(&hash);
    b.extend_from_slice(&[0u8; 32]);
    // IDX labels are single bytes, so every label fits.
    b.extend(ds.labels.iter().map(|&l| l as u8));
    for i in 0..n {
        b.extend_from_slice(&CRC.checksum(ds.image(i)).to_le_bytes());
    }
    b.extend_from_slice(&ds.pixels);
    let digest = header_digest(&b, n);
    b[DIGEST_AT..HEADER_LEN].copy_from_slice(&digest);
    b
}

/// sha256 over the header before the digest, the labels and the image checksums.
fn header_digest(b: &[u8], n: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&b[..DIGEST_AT]);
    h.update(&b[HEADER_LEN..HEADER_LEN + 5 * n]);
    h.finalize().into()
}

/// Checks magic, version, length and digest; returns (n, height, width, channels).
fn check_layout(b: &[u8]) -> std::result::Result<(usize, usize, usize, usize), String> {
    if b.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than its {HEADER_LEN}-byte header",
            b.len()
        ));
    }
    if &b[..8] != MAGIC {
        return Err("not a decoded data set (bad magic)".into());
    }
    let version = le_u32(&b[8..]);
    if version != DECODED_VERSION {
        return Err(format!(
            "layout version {version}, this build reads {DECODED_VERSION}"
        ));
    }
    let channels = le_u32(&b[12..]) as usize;
    let n = le_u64(&b[16..]);
    let height = le_u32(&b[24..]) as usize;
    let width = le_u32(&b[28..]) as usize;
    let want = usize::try_from(n)
        .ok()
        .and_then(|n| {
            height
                .checked_mul(width)?
                .checked_mul(channels)?
                .checked_add(5)?
                .checked_mul(n)?
                .checked_add(HEADER_LEN)
        })
        .ok_or_else(|| format!("header gives {n} images of {height}x{width}x{channels}"))?;
    if b.len() != want {
        return Err(format!(
            "{} bytes, its header needs {want} (truncated or torn)",
            b.len()
        ));
    }
    let n = n as usize;
    if header_digest(b, n)[..] != b[DIGEST_AT..HEADER_LEN] {
        return Err("header, labels or checksums fail the header digest".into());
    }
    Ok((n, height, width, channels))
}

/// The copy at `path`, mapped, if it exists, was made from sources stamped `stamps`, and
/// passes the header checks.
fn map_copy(path: &Path, stamps: &[Stamp; 2]) -> std::result::Result<Store, Unusable> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Unusable::Missing),
        Err(e) => return Err(Unusable::Unreadable(format!("cannot open it: {e}"))),
    };
    let len = file
        .metadata()
        .map_err(|e| Unusable::Unreadable(format!("cannot stat it: {e}")))?
        .len();
    if len < HEADER_LEN as u64 {
        return Err(Unusable::Corrupt(format!(
            "{len} bytes, shorter than its {HEADER_LEN}-byte header"
        )));
    }
    let map = map_file(&file).map_err(|e| Unusable::Unreadable(format!("cannot map it: {e}")))?;
    if map.len() >= HEADER_LEN && &map[..8] == MAGIC && le_u32(&map[8..]) == DECODED_VERSION {
        let had = [
            Stamp::read(&map[STAMPS_AT..STAMPS_AT + STAMP_LEN]),
            Stamp::read(&map[STAMPS_AT + STAMP_LEN..HASH_AT]),
        ];
        if had != *stamps {
            return Err(Unusable::Stale(format!(
                "made from sources {had:?}, they are now {stamps:?}"
            )));
        }
    }
    check_layout(&map).map_err(Unusable::Corrupt)?;
    Ok(Store::Mapped(map))
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map_file(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and the file is never written in place: every copy is
    // written under a private name and renamed over the published one, so a mapped inode keeps
    // its bytes for as long as it is mapped. Only another program truncating the file by hand
    // could change them (the module's documentation says so).
    unsafe { memmap2::Mmap::map(file) }
}

/// Writes `bytes` to `path` by way of a private temporary name beside it, renamed into place.
fn publish(path: &Path, bytes: &[u8]) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| BackboneError::io(dir, e))?;
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}-{write}.partial", std::process::id()));
    let result = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| BackboneError::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| BackboneError::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    remove_abandoned(path);
    result
}

/// Removes the temporary files of `path` that a killed process left more than an hour ago
/// (a process still writing one touches it far more often).
fn remove_abandoned(path: &Path) {
    let (Some(dir), Some(stem)) = (path.parent(), path.file_stem()) else {
        return;
    };
    let prefix = format!("{}.", stem.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if old && name.starts_with(&prefix) && name.ends_with(".partial") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small IDX pair (gzip'd images, raw labels) of `n` images of 3x2.
    fn write_pair(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
        let images = dir.join("img-idx3-ubyte.gz");
        let labels = dir.join("lbl-idx1-ubyte");
        let mut raw = vec![0, 0, 8, 3];
        for d in [n as u32, 3, 2] {
            raw.extend_from_slice(&d.to_be_bytes());
        }
        raw.extend((0..n * 6).map(|i| (i * 7 % 251) as u8));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        std::fs::write(&images, gz.finish().unwrap()).unwrap();
        let mut l = vec![0, 0, 8, 1];
        l.extend_from_slice(&(n as u32).to_be_bytes());
        l.extend((0..n).map(|i| (i % 4) as u8));
        std::fs::write(&labels, l).unwrap();
        (images, labels)
    }

    #[test]
    fn a_copy_is_made_once_then_mapped_and_gives_the_decoded_sets_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = write_pair(dir.path(), 10);
        let cache = dir.path().join("cache");
        let decoded = load_idx_pair(&images, &labels, None).unwrap();
        let mut first = DecodedImages::open(&cache, &images, &labels, None).unwrap();
        assert!(first.is_mapped());
        let copy = first.copy_path().unwrap().to_path_buf();
        assert!(
            copy.starts_with(cache.join("datasets")),
            "{}",
            copy.display()
        );
        let modified = std::fs::metadata(&copy).unwrap().modified().unwrap();
        let mut again = DecodedImages::open(&cache, &images, &labels, None).unwrap();
        assert_eq!(
            std::fs::metadata(&copy).unwrap().modified().unwrap(),
            modified
        );
        for set in [&mut first, &mut again] {
            assert_eq!(set.labels_u32(), decoded.labels);
            assert_eq!(set.classes(), decoded.classes.as_slice());
            let picked = [7, 2, 2, 9];
            assert_eq!(set.select(&picked).unwrap(), decoded.select(&picked));
            assert_eq!(set.to_dataset().unwrap(), decoded);
            let all: Vec<usize> = (0..10).collect();
            assert_eq!(
                set.hash_all(),
                crate::cache::hash_image_selection(&decoded, &all)
            );
        }
        // No temporary file is left beside the copy.
        let names: Vec<_> = std::fs::read_dir(cache.join("datasets"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;

    #[test]
    fn a_truncated_torn_or_corrupt_copy_is_rebuilt_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = write_pair(dir.path(), 12);
        let cache = dir.path().join("cache");
        let decoded = load_idx_pair(&images, &labels, None).unwrap();
        let copy = DecodedImages::open(&cache, &images, &labels, None)
            .unwrap()
            .copy_path()
            .unwrap()
            .to_path_buf();
        let good = std::fs::read(&copy).unwrap();
        let len = good.len();
        let damage: Vec<(&str, Damage)> = vec![
            ("empty", Box::new(|b: &mut Vec<u8>| b.clear())),
            ("half a header", Box::new(|b: &mut Vec<u8>| b.truncate(40))),
            (
                "truncated",
                Box::new(move |b: &mut Vec<u8>| b.truncate(len - 1)),
            ),
            ("too long", Box::new(|b: &mut Vec<u8>| b.push(0))),
            ("bad magic", Box::new(|b: &mut Vec<u8>| b[0] ^= 1)),
            ("other version", Box::new(|b: &mut Vec<u8>| b[8] = 9)),
            ("huge n", Box::new(|b: &mut Vec<u8>| b[23] = 0xff)),
            (
                "label flipped",
                Box::new(|b: &mut Vec<u8>| b[HEADER_LEN + 3] ^= 1),
            ),
        ];
        for (what, damage) in damage {
            let mut bad = good.clone();
            damage(&mut bad);
            std::fs::write(&copy, &bad).unwrap();
            let mut set = DecodedImages::open(&cache, &images, &labels, None).unwrap();
            assert!(set.is_mapped(), "{what}");
            assert_eq!(set.to_dataset().unwrap(), decoded, "{what}");
            assert_eq!(std::fs::read(&copy).unwrap(), good, "{what}: rebuilt");
        }
        // An image's bytes are checked when it is read: the copy is rebuilt then.
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        std::fs::write(&copy, &bad).unwrap();
        let mut set = DecodedImages::open(&cache, &images, &labels, None).unwrap();
        assert_eq!(set.select(&[0, 1]).unwrap(), decoded.select(&[0, 1]));
        assert_eq!(set.select(&[11, 0]).unwrap(), decoded.select(&[11, 0]));
        assert_eq!(std::fs::read(&copy).unwrap(), good);
    }

    #[test]
    fn a_changed_source_makes_the_copy_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = write_pair(dir.path(), 8);
        let cache = dir.path().join("cache");
        let first = DecodedImages::open(&cache, &images, &labels, None).unwrap();
        assert_eq!(first.len(), 8);
        drop(first);
        // Another set under the same names: more images, other labels.
        let (images, labels) = write_pair(dir.path(), 9);
        let mut set = DecodedImages::open(&cache, &images, &labels, None).unwrap();
        assert_eq!(set.len(), 9);
        assert_eq!(
            set.to_dataset().unwrap(),
            load_idx_pair(&images, &labels, None).unwrap()
        );
    }

    #[test]
    fn without_a_usable_cache_folder_the_set_is_decoded_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = write_pair(dir.path(), 5);
        // A file where the cache folder should be: nothing can be created under it.
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, b"x").unwrap();
        let mut set = DecodedImages::open(&blocked, &images, &labels, None).unwrap();
        assert!(!set.is_mapped());
        assert_eq!(set.copy_path(), None);
        assert_eq!(
            set.to_dataset().unwrap(),
            load_idx_pair(&images, &labels, None).unwrap()
        );
    }

    #[test]
    fn bad_sources_and_labels_outside_the_classes_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let (images, labels) = write_pair(dir.path(), 6);
        let cache = dir.path().join("cache");
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let err = DecodedImages::open(&cache, &images, &labels, Some(two))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lbl-idx1-ubyte") && err.contains("label 2"),
            "{err}"
        );
        // Labels are checked against the classes on every open, of the source or of the copy.
        let four: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let mut set = DecodedImages::open(&cache, &images, &labels, Some(four.clone())).unwrap();
        assert_eq!(set.classes(), four.as_slice());
        let err = set.select(&[6]).unwrap_err().to_string();
        assert!(err.contains("record 6") && err.contains("outside"), "{err}");
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let err = DecodedImages::open(&cache, &images, &labels, Some(two))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lbl-idx1-ubyte") && err.contains("label 2"),
            "{err}"
        );
        std::fs::write(&images, b"\x1f\x8bnot gzip").unwrap();
        let err = DecodedImages::open(&cache, &images, &labels, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gzip"), "{err}");
        let err = DecodedImages::open(&cache, &dir.path().join("nope.gz"), &labels, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.gz"), "{err}");
    }
}
