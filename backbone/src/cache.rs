//! Trunk-activation cache. The trunk is frozen, so a client's activations are computed once and
//! reused by every later epoch and round; the tail then runs on cached rows only.
//!
//! Entries are keyed by the hashes of the trunk file, the exact data selection and the
//! preprocessing ([`CacheKey`]): change any of them and the key changes. Entries live in memory
//! up to a byte budget; past it they are written to (and read back from) a file in the spill
//! directory, which a later process with the same key reuses.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How often a trunk pass over many samples logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Most bytes of consecutive rows read from a cache file at once.
const READ_CHUNK: usize = 1 << 20;

use ndarray::{ArrayD, IxDyn};
use sha2::{Digest, Sha256};

use crate::data::{ImageDataset, TextDataset};
use crate::error::{BackboneError, Result};

const MAGIC: &[u8; 8] = b"FPACT001";

/// Identity of a set of activations: sha256 over model, data and preprocessing hashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn new(model_sha256: &str, data_hash: &str, preprocessing: &str) -> Self {
        let mut h = Sha256::new();
        for part in [model_sha256, data_hash, preprocessing] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Self(hex::encode(h.finalize()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// sha256 of the selected images' pixels, in selection order.
pub fn hash_image_selection(ds: &ImageDataset, indices: &[usize]) -> String {
    let mut h = Sha256::new();
    h.update(format!("{}x{}x{}", ds.height, ds.width, ds.channels));
    for &i in indices {
        h.update(ds.image(i));
    }
    hex::encode(h.finalize())
}

/// sha256 of the selected texts, in selection order.
pub fn hash_text_selection(ds: &TextDataset, indices: &[usize]) -> String {
    let mut h = Sha256::new();
    for &i in indices {
        h.update((ds.texts[i].len() as u64).to_le_bytes());
        h.update(ds.texts[i].as_bytes());
    }
    hex::encode(h.finalize())
}

#[derive(Debug)]
enum Store {
    Memory(Vec<f32>),
    File {
        path: PathBuf,
        file: Mutex<File>,
        offset: u64,
    },
}

/// Cached activations of `n` samples, each of shape `row_shape`.
#[derive(Debug)]
pub struct Features {
    n: usize,
    row_shape: Vec<usize>,
    store: Store,
}

impl Features {
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn row_shape(&self) -> &[usize] {
        &self.row_shape
    }
    fn row_len(&self) -> usize {
        self.row_shape.iter().product()
    }
    pub fn in_memory(&self) -> bool {
        matches!(self.store, Store::Memory(_))
    }

    /// The rows at `indices` (positions within the cached selection), as `[len, row_shape..]`.
    pub fn rows(&self, indices: &[usize]) -> Result<ArrayD<f32>> {
        let mut out = Vec::with_capacity(indices.len() * self.row_len());
        self.read_rows(indices, &mut out)?;
        let mut shape = vec![indices.len()];
        shape.extend_from_slice(&self.row_shape);
        ArrayD::from_shape_vec(IxDyn(&shape), out).map_err(|e| cache_err(Path::new("(rows)"), e))
    }

    /// Appends the rows at `indices` to `out`. From a file, a run of consecutive rows is one
    /// read (at most [`READ_CHUNK`] bytes at a time).
    fn read_rows(&self, indices: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let r = self.row_len();
        match &self.store {
            Store::Memory(v) => {
                for &i in indices {
                    let row = v
                        .get(i * r..(i + 1) * r)
                        .ok_or_else(|| self.oob(i, Path::new("(memory)")))?;
                    out.extend_from_slice(row);
                }
            }
            Store::File { path, file, offset } => {
                let mut f = file
                    .lock()
                    .map_err(|_| cache_err(path, "file mutex poisoned"))?;
                let per_read = (READ_CHUNK / (r * 4).max(1)).max(1);
                let mut buf = Vec::new();
                let mut k = 0;
                while k < indices.len() {
                    let first = indices[k];
                    if first >= self.n {
                        return Err(self.oob(first, path));
                    }
                    // The run of rows first, first + 1, ... that follows in `indices`.
                    let mut run = 1;
                    while run < per_read
                        && k + run < indices.len()
                        && indices[k + run] == first + run
                        && first + run < self.n
                    {
                        run += 1;
                    }
                    buf.resize(run * r * 4, 0);
                    f.seek(SeekFrom::Start(offset + (first * r * 4) as u64))
                        .map_err(|e| BackboneError::io(path, e))?;
                    f.read_exact(&mut buf)
                        .map_err(|e| BackboneError::io(path, e))?;
                    out.extend(
                        buf.chunks_exact(4)
                            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                    );
                    k += run;
                }
            }
        }
        Ok(())
    }

    /// The rows at `indices` as a new in-memory entry: a fleet client's own rows out of an entry
    /// that holds the whole data set (which may stay in its file, shared through the page cache).
    pub fn select(&self, indices: &[usize]) -> Result<Features> {
        let r = self.row_len();
        let mut rows = Vec::with_capacity(indices.len() * r);
        if indices.is_sorted() {
            // A shard (always ascending): straight into the new entry, one pass forward.
            self.read_rows(indices, &mut rows)?;
        } else {
            // Read in file order (one pass forward), then put the rows back in the caller's
            // order.
            let mut sorted: Vec<(usize, usize)> = indices.iter().copied().enumerate().collect();
            sorted.sort_unstable_by_key(|&(_, i)| i);
            let mut data = Vec::with_capacity(indices.len() * r);
            self.read_rows(
                &sorted.iter().map(|&(_, i)| i).collect::<Vec<_>>(),
                &mut data,
            )?;
            let mut at = vec![0usize; indices.len()];
            for (k, &(pos, _)) in sorted.iter().enumerate() {
                at[pos] = k;
            }
            for &k in &at {
                rows.extend_from_slice(&data[k * r..(k + 1) * r]);
            }
        }
        Ok(Features {
            n: indices.len(),
            row_shape: self.row_shape.clone(),
            store: Store::Memory(rows),
        })
    }

    fn oob(&self, i: usize, path: &Path) -> BackboneError {
        cache_err(path, format!("row {i} outside the {} cached rows", self.n))
    }
}

fn cache_err(path: &Path, e: impl std::fmt::Display) -> BackboneError {
    BackboneError::Cache {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Where activations are kept, and how much memory they may use.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bytes of activations kept in memory before spilling to files.
    pub memory_budget: usize,
    /// Directory for spill files (created on demand).
    pub spill_dir: PathBuf,
    /// Also write entries that fit in memory to `spill_dir`, so the next process that asks for
    /// the same key (same trunk, same samples, same preprocessing) reads them instead of running
    /// the trunk. Files are written atomically and checked on reading; a stale or torn file is
    /// recomputed.
    pub persist: bool,
}

/// The per-client cache.
#[derive(Debug)]
pub struct ActivationCache {
    cfg: CacheConfig,
    used: usize,
    entries: HashMap<CacheKey, Arc<Features>>,
    /// How many times a trunk ran to fill an entry (for tests and reports).
    computed: usize,
}

impl ActivationCache {
    pub fn new(cfg: CacheConfig) -> Self {
        Self {
            cfg,
            used: 0,
            entries: HashMap::new(),
            computed: 0,
        }
    }

    /// Bytes held in memory.
    pub fn memory_used(&self) -> usize {
        self.used
    }

    /// Number of entries filled by running the trunk (not served from memory or a file).
    pub fn computed(&self) -> usize {
        self.computed
    }

    fn spill_path(&self, key: &CacheKey) -> PathBuf {
        self.cfg.spill_dir.join(format!("{}.fpact", key.as_str()))
    }

    /// Returns the activations for `key`, computing them in batches of `batch` samples with
    /// `compute(range)` (which must return `[range.len(), row_shape..]`) on a miss.
    pub fn get_or_compute<F>(
        &mut self,
        key: &CacheKey,
        n: usize,
        batch: usize,
        mut compute: F,
    ) -> Result<Arc<Features>>
    where
        F: FnMut(Range<usize>) -> Result<ArrayD<f32>>,
    {
        if let Some(f) = self.entries.get(key) {
            return Ok(f.clone());
        }
        let spill = self.spill_path(key);
        if let Some(mut f) = open_spill(&spill, n)? {
            // A file from an earlier run: into memory when it fits, read in place otherwise.
            let bytes = n * f.row_len() * 4;
            if self.used + bytes <= self.cfg.memory_budget {
                f.store = Store::Memory(read_whole(&f.store, bytes)?);
                self.used += bytes;
            }
            let f = Arc::new(f);
            self.entries.insert(key.clone(), f.clone());
            return Ok(f);
        }
        let batch = batch.max(1);
        let mut row_shape: Option<Vec<usize>> = None;
        let mut mem: Vec<f32> = Vec::new();
        let mut writer: Option<BufWriter<File>> = None;
        let tmp = partial_path(&spill);
        // A long trunk pass (minutes on a board) logs how far it is every PROGRESS_EVERY, so
        // `journalctl -f` shows it moving.
        let began = std::time::Instant::now();
        let mut noted = began;
        for start in (0..n).step_by(batch) {
            let range = start..(start + batch).min(n);
            let len = range.len();
            let out = compute(range)?;
            if noted.elapsed() >= PROGRESS_EVERY && start + len < n {
                noted = std::time::Instant::now();
                let done = start + len;
                let rate = done as f64 / began.elapsed().as_secs_f64().max(1e-9);
                tracing::info!(
                    done,
                    total = n,
                    per_s = format!("{rate:.1}"),
                    eta_s = ((n - done) as f64 / rate.max(1e-9)).round() as u64,
                    "trunk pass"
                );
            }
            if out.shape().first() != Some(&len) {
                return Err(cache_err(
                    &spill,
                    format!("batch of {len} gave activations {:?}", out.shape()),
                ));
            }
            let rs = out.shape()[1..].to_vec();
            match &row_shape {
                None => {
                    let bytes = n * rs.iter().product::<usize>() * 4;
                    if self.used + bytes > self.cfg.memory_budget {
                        writer = Some(create_spill(&tmp, n, &rs)?);
                    } else {
                        mem.reserve_exact(bytes / 4);
                    }
                    row_shape = Some(rs);
                }
                Some(prev) if *prev != rs => {
                    return Err(cache_err(
                        &spill,
                        format!("row shape changed from {prev:?} to {rs:?}"),
                    ));
                }
                Some(_) => {}
            }
            let out = out.as_standard_layout();
            let data = out.as_slice().unwrap_or_default();
            match writer.as_mut() {
                Some(w) => {
                    for v in data {
                        w.write_all(&v.to_le_bytes())
                            .map_err(|e| BackboneError::io(&tmp, e))?;
                    }
                }
                None => mem.extend_from_slice(data),
            }
        }
        self.computed += 1;
        let row_shape = row_shape.unwrap_or_default();
        let features = match writer {
            Some(mut w) => {
                w.flush().map_err(|e| BackboneError::io(&tmp, e))?;
                drop(w);
                std::fs::rename(&tmp, &spill).map_err(|e| BackboneError::io(&spill, e))?;
                open_spill(&spill, n)?
                    .ok_or_else(|| cache_err(&spill, "spill file unreadable after writing"))?
            }
            None => {
                if self.cfg.persist {
                    write_spill(&tmp, &spill, n, &row_shape, &mem)?;
                }
                self.used += mem.len() * 4;
                Features {
                    n,
                    row_shape,
                    store: Store::Memory(mem),
                }
            }
        };
        let f = Arc::new(features);
        self.entries.insert(key.clone(), f.clone());
        Ok(f)
    }

    /// Drops an entry from memory (its spill file, if any, stays for later reuse).
    pub fn evict(&mut self, key: &CacheKey) {
        if let Some(f) = self.entries.remove(key)
            && let Store::Memory(v) = &f.store
        {
            self.used -= v.len() * 4;
        }
    }
}

fn create_spill(path: &Path, n: usize, row_shape: &[usize]) -> Result<BufWriter<File>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| BackboneError::io(dir, e))?;
    }
    let f = File::create(path).map_err(|e| BackboneError::io(path, e))?;
    let mut w = BufWriter::new(f);
    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(n as u64).to_le_bytes());
    header.extend_from_slice(&(row_shape.len() as u64).to_le_bytes());
    for d in row_shape {
        header.extend_from_slice(&(*d as u64).to_le_bytes());
    }
    w.write_all(&header)
        .map_err(|e| BackboneError::io(path, e))?;
    Ok(w)
}

/// A temporary name beside `spill` that no other filler uses: processes, and caches within one
/// process (two hosts opened on one cache folder), filling the same key never share a file; the
/// last complete one renamed into place wins, and every one is the same.
fn partial_path(spill: &Path) -> PathBuf {
    static FILLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let fill = FILLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    spill.with_extension(format!("{}-{fill}.partial", std::process::id()))
}

/// Writes a whole entry to `spill` by way of `tmp` (renamed into place when complete).
fn write_spill(
    tmp: &Path,
    spill: &Path,
    n: usize,
    row_shape: &[usize],
    data: &[f32],
) -> Result<()> {
    let mut w = create_spill(tmp, n, row_shape)?;
    for v in data {
        w.write_all(&v.to_le_bytes())
            .map_err(|e| BackboneError::io(tmp, e))?;
    }
    w.flush().map_err(|e| BackboneError::io(tmp, e))?;
    drop(w);
    std::fs::rename(tmp, spill).map_err(|e| BackboneError::io(spill, e))
}

/// All `bytes` of a file store's values in one read (a memory store is returned as is).
fn read_whole(store: &Store, bytes: usize) -> Result<Vec<f32>> {
    match store {
        Store::Memory(v) => Ok(v.clone()),
        Store::File { path, file, offset } => {
            let mut f = file
                .lock()
                .map_err(|_| cache_err(path, "file mutex poisoned"))?;
            let mut buf = vec![0u8; bytes];
            f.seek(SeekFrom::Start(*offset))
                .map_err(|e| BackboneError::io(path, e))?;
            f.read_exact(&mut buf)
                .map_err(|e| BackboneError::io(path, e))?;
            Ok(buf
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
    }
}

/// Opens a complete spill file for `n` rows; `None` if there is none (or it is stale/broken,
/// in which case it is recomputed).
fn open_spill(path: &Path, n: usize) -> Result<Option<Features>> {
    let Ok(mut f) = File::open(path) else {
        return Ok(None);
    };
    let mut head = [0u8; 24];
    if f.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        return Ok(None);
    }
    let u = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize;
    let (rows, ndim) = (u(&head[8..16]), u(&head[16..24]));
    if rows != n || ndim > 8 {
        return Ok(None);
    }
    let mut dims = vec![0u8; ndim * 8];
    if f.read_exact(&mut dims).is_err() {
        return Ok(None);
    }
    let row_shape: Vec<usize> = dims.chunks_exact(8).map(u).collect();
    let offset = (24 + ndim * 8) as u64;
    let want = offset + (n * row_shape.iter().product::<usize>() * 4) as u64;
    let len = f.metadata().map_err(|e| BackboneError::io(path, e))?.len();
    if len != want {
        return Ok(None);
    }
    Ok(Some(Features {
        n,
        row_shape,
        store: Store::File {
            path: path.to_path_buf(),
            file: Mutex::new(f),
            offset,
        },
    }))
}

/// Trunk activations and attention masks of some texts, as the tail consumes them.
#[derive(Debug, Clone)]
pub struct TextActivations {
    /// `[n, max_len, hidden]`.
    pub features: Arc<Features>,
    /// `[n, max_len]`, 1.0 for real tokens and 0.0 for padding.
    pub masks: Arc<Features>,
}

/// The activations and masks of `selection` (positions in `ds`), from the cache or computed in
/// batches of `batch`. The trunk is asked for (`open`) only on a miss, so a process whose
/// activations are cached never loads it. Both entries are keyed by the trunk, the exact texts
/// and [`TextPreprocess::fingerprint`] (vocabulary, tokenizer settings, sequence length).
pub fn text_activations(
    cache: &mut ActivationCache,
    trunk_sha256: &str,
    pre: &crate::preprocess::TextPreprocess,
    ds: &TextDataset,
    selection: &[usize],
    batch: usize,
    mut trunk: impl FnMut() -> Result<Arc<dyn crate::trunk::Trunk>>,
) -> Result<TextActivations> {
    let data = hash_text_selection(ds, selection);
    let fingerprint = pre.fingerprint();
    let key = CacheKey::new(trunk_sha256, &data, &fingerprint);
    let features = cache.get_or_compute(&key, selection.len(), batch, |range| {
        let (ids, mask) = pre.batch(ds, &selection[range])?;
        trunk()?.run(&crate::trunk::TrunkInput::Tokens { ids, mask })
    })?;
    let mask_key = CacheKey::new(
        trunk_sha256,
        &data,
        &format!("{fingerprint} attention-mask"),
    );
    let masks = cache.get_or_compute(&mask_key, selection.len(), batch, |range| {
        let (_, mask) = pre.batch(ds, &selection[range])?;
        Ok(mask.mapv(|m| m as f32).into_dyn())
    })?;
    Ok(TextActivations { features, masks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(range: Range<usize>) -> Result<ArrayD<f32>> {
        let len = range.len();
        let data: Vec<f32> = range.flat_map(|i| [i as f32, -(i as f32), 0.5]).collect();
        Ok(ArrayD::from_shape_vec(IxDyn(&[len, 3]), data).unwrap())
    }

    /// A cache that keeps nothing in memory and persists its files in `dir`.
    fn on_file(dir: &Path) -> ActivationCache {
        ActivationCache::new(CacheConfig {
            memory_budget: 0,
            spill_dir: dir.to_path_buf(),
            persist: true,
        })
    }

    #[test]
    fn a_whole_data_set_entry_on_file_serves_each_clients_rows_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey::new("m", "whole", "p");
        // The first client fills the entry; it does not fit its budget, so it stays in the file.
        let mut first = on_file(dir.path());
        let whole = first.get_or_compute(&key, 40, 7, fake).unwrap();
        assert!(!whole.in_memory());
        assert_eq!(first.computed(), 1);
        // Another client (another cache, as in another process) reads the same file.
        let mut second = on_file(dir.path());
        let whole = second
            .get_or_compute(&key, 40, 7, |_| panic!("the trunk ran for a cached entry"))
            .unwrap();
        assert_eq!(second.computed(), 0);
        let mine = whole.select(&[31, 2, 17, 2]).unwrap();
        assert!(mine.in_memory());
        assert_eq!(mine.len(), 4);
        let got = mine.rows(&[0, 1, 2, 3]).unwrap();
        let want: Vec<f32> = [31.0f32, 2.0, 17.0, 2.0]
            .iter()
            .flat_map(|&i| [i, -i, 0.5])
            .collect();
        assert_eq!(got.as_slice().unwrap(), want.as_slice());
        assert!(whole.select(&[40]).is_err());
        assert!(whole.select(&[38, 39, 40]).is_err());
        // An ascending shard (runs of consecutive rows read at once, a repeat) gives the same
        // rows as one row at a time.
        let shard = [0, 1, 2, 3, 9, 10, 10, 11, 39];
        let got = whole.select(&shard).unwrap();
        let want: Vec<f32> = shard
            .iter()
            .flat_map(|&i| [i as f32, -(i as f32), 0.5])
            .collect();
        assert_eq!(
            got.rows(&(0..shard.len()).collect::<Vec<_>>())
                .unwrap()
                .as_slice()
                .unwrap(),
            want.as_slice()
        );
    }

    /// Two caches of one process (two hosts on one cache folder) fill the same entry at the
    /// same time: each gets the whole entry, and the file left behind is a complete one.
    #[test]
    fn caches_of_one_process_filling_one_entry_at_once_do_not_share_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey::new("m", "race", "p");
        let fill = || {
            let mut c = on_file(dir.path());
            // Slow batches, so the two fills overlap.
            let f = c
                .get_or_compute(&key, 64, 4, |r| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    fake(r)
                })
                .unwrap();
            f.rows(&(0..64).collect::<Vec<_>>()).unwrap()
        };
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(fill);
            let b = s.spawn(fill);
            (a.join().unwrap(), b.join().unwrap())
        });
        let want = fake(0..64).unwrap();
        assert_eq!(a, want);
        assert_eq!(b, want);
        let mut later = on_file(dir.path());
        let kept = later
            .get_or_compute(&key, 64, 4, |_| panic!("the entry was not left complete"))
            .unwrap();
        assert_eq!(kept.rows(&(0..64).collect::<Vec<_>>()).unwrap(), want);
        let partials: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(partials.is_empty(), "left behind: {partials:?}");
    }

    #[test]
    fn second_lookup_is_served_without_running_the_trunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ActivationCache::new(CacheConfig {
            memory_budget: 1 << 20,
            spill_dir: dir.path().into(),
            persist: false,
        });
        let key = CacheKey::new("m", "d", "p");
        let a = c.get_or_compute(&key, 10, 4, fake).unwrap();
        assert!(a.in_memory());
        let mut calls = 0;
        let b = c
            .get_or_compute(&key, 10, 4, |r| {
                calls += 1;
                fake(r)
            })
            .unwrap();
        assert_eq!(calls, 0);
        assert_eq!(c.computed(), 1);
        assert_eq!(
            b.rows(&[7, 2]).unwrap().as_slice().unwrap(),
            &[7.0, -7.0, 0.5, 2.0, -2.0, 0.5]
        );
        assert_eq!(c.memory_used(), 10 * 3 * 4);
    }

    #[test]
    fn over_budget_entries_spill_to_a_file_that_a_new_cache_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            memory_budget: 16,
            spill_dir: dir.path().into(),
            persist: false,
        };
        let key = CacheKey::new("m", "d", "p");
        let mut c = ActivationCache::new(cfg.clone());
        let a = c.get_or_compute(&key, 10, 3, fake).unwrap();
        assert!(!a.in_memory());
        assert_eq!(c.memory_used(), 0);
        assert_eq!(a.rows(&[9]).unwrap().as_slice().unwrap(), &[9.0, -9.0, 0.5]);
        let mut c2 = ActivationCache::new(cfg);
        let b = c2
            .get_or_compute(&key, 10, 3, |_| {
                Err(BackboneError::Input("must not run".into()))
            })
            .unwrap();
        assert_eq!(b.rows(&[0, 9]).unwrap(), a.rows(&[0, 9]).unwrap());
        assert!(b.rows(&[10]).is_err());
    }

    #[test]
    fn persisted_entries_are_read_back_into_memory_by_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig {
            memory_budget: 1 << 20,
            spill_dir: dir.path().into(),
            persist: true,
        };
        let key = CacheKey::new("m", "d", "p");
        let a = ActivationCache::new(cfg.clone())
            .get_or_compute(&key, 10, 4, fake)
            .unwrap();
        assert!(a.in_memory());
        let mut c2 = ActivationCache::new(cfg.clone());
        let b = c2
            .get_or_compute(&key, 10, 4, |_| {
                Err(BackboneError::Input("must not run".into()))
            })
            .unwrap();
        assert!(b.in_memory());
        assert_eq!(c2.computed(), 0);
        assert_eq!(c2.memory_used(), 10 * 3 * 4);
        assert_eq!(b.rows(&[0, 3, 9]).unwrap(), a.rows(&[0, 3, 9]).unwrap());
        // A torn file (cut short) is not trusted: the trunk runs again.
        let path = dir.path().join(format!("{}.fpact", key.as_str()));
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let mut c3 = ActivationCache::new(cfg);
        c3.get_or_compute(&key, 10, 4, fake).unwrap();
        assert_eq!(c3.computed(), 1);
    }

    #[test]
    fn a_change_in_model_data_or_preprocessing_changes_the_key() {
        let k = CacheKey::new("m", "d", "p");
        assert_ne!(k, CacheKey::new("m2", "d", "p"));
        assert_ne!(k, CacheKey::new("m", "d2", "p"));
        assert_ne!(k, CacheKey::new("m", "d", "p2"));
        // length-prefixed parts: moving a character across a boundary is a different key
        assert_ne!(CacheKey::new("ab", "c", "p"), CacheKey::new("a", "bc", "p"));
    }
}
