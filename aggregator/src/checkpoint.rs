//! Checkpoints: the whole [`MachineState`] (global adapter, round, strategy state, accepted
//! (client, round, sequence) set, counters, report rows) with the outbox's state (byte ledger,
//! message ids) as a [`Saved`], written atomically. The functions take any serializable state,
//! so the round machine's tests checkpoint a bare [`MachineState`].
//!
//! File layout: `FPCK` magic, format version (u32 LE), SHA-256 of the body (32 bytes), body
//! (postcard). postcard keeps every f32 bit-exact; the hash turns a torn or corrupted file into a
//! clear error instead of a wrong resume. Writing goes to `<file>.tmp`, fsync, then rename over
//! the old file (and fsync of the directory), so a crash leaves either the previous checkpoint or
//! the new one, never a mix; a corrupt new file never replaces a good old one because the rename
//! only happens after the complete write.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::outbox::OutboxState;
use crate::round::MachineState;

/// What the aggregator's checkpoint file holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub machine: MachineState,
    pub outbox: OutboxState,
}

/// [`Saved`] by reference, written without copying the state: the same bytes (postcard
/// encodes a reference as the value).
#[derive(Debug, serde::Serialize)]
pub struct SavedRef<'a> {
    pub machine: &'a MachineState,
    pub outbox: &'a OutboxState,
}

const MAGIC: &[u8; 4] = b"FPCK";
/// 2: norm-bound counts, the adaptive bound's reference, per-round robust records and the DP
/// accountant joined the state. 3: the open round and each round record keep the DP-SGD ε
/// each client stated. 4: the byte ledger (by round) and message ids moved beside the machine
/// state ([`Saved`]); refusal and failure reasons are enums. 5: adapter tensors are
/// fedpeft-peft's `NamedTensor` (`usize` shape, `values`). 6: the machine state
/// carries a site's view of its root (`upstream`). An older file is refused by name
/// rather than misread.
const FORMAT_VERSION: u32 = 6;
const HEADER_LEN: usize = 4 + 4 + 32;

/// Why a checkpoint could not be written or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path}: cannot encode state: {reason}")]
    Encode { path: PathBuf, reason: String },
    /// Writing a new checkpoint failed (a full or read-only disk, say). The file at `path` is
    /// whatever the last successful write left: the new state goes to a temporary file first.
    #[error(
        "cannot write checkpoint {path}: {step} failed: {source}; the previous checkpoint is unchanged"
    )]
    Write {
        path: PathBuf,
        step: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Serializes a state to checkpoint bytes.
pub fn to_bytes<T: Serialize>(state: &T, path: &Path) -> Result<Vec<u8>, CheckpointError> {
    let body = postcard::to_stdvec(state).map_err(|e| CheckpointError::Encode {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(with_header(&body))
}

/// A checkpoint file's bytes for an encoded `body`: magic, format version, SHA-256 of the body,
/// body.
pub fn with_header(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// Parses checkpoint bytes read from `path` (named in errors).
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    if &bytes[..4] != MAGIC {
        return Err(corrupt("does not start with FPCK".into()));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version}, this build reads {FORMAT_VERSION}"
        )));
    }
    let body = &bytes[HEADER_LEN..];
    if Sha256::digest(body).as_slice() != &bytes[8..40] {
        return Err(corrupt(
            "SHA-256 of the body does not match the header (truncated or modified)".into(),
        ));
    }
    postcard::from_bytes(body).map_err(|e| corrupt(format!("body does not decode: {e}")))
}

/// Writes `bytes` to `path` through a temp file and a rename: readers see the old file or the
/// new one. A failed write (full or read-only disk) leaves the old file whole and no temp file
/// behind; the error names the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
        })
}

/// Writes `state` to `path` atomically (temp file, fsync, rename, fsync directory). On failure
/// the temporary file is removed (on a full disk it would hold space the next attempt needs)
/// and the file at `path` is untouched.
pub fn save<T: Serialize>(state: &T, path: &Path) -> Result<(), CheckpointError> {
    let bytes = to_bytes(state, path)?;
    let tmp = tmp_path(path);
    let failed = |step: String| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Write { path, step, source }
    };
    let written = File::create(&tmp)
        .map_err(failed(format!("creating {}", tmp.display())))
        .and_then(|mut f| {
            f.write_all(&bytes).map_err(failed(format!(
                "writing {} bytes to {}",
                bytes.len(),
                tmp.display()
            )))?;
            f.sync_all()
                .map_err(failed(format!("syncing {}", tmp.display())))
        })
        .and_then(|()| {
            fs::rename(&tmp, path).map_err(failed(format!("renaming {} over it", tmp.display())))
        });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Make the rename itself durable. Some filesystems refuse to open a directory for
        // syncing; the data is already safe in the file, so that is not an error.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a checkpoint; `Ok(None)` if the file does not exist.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, CheckpointError> {
    match fs::read(path) {
        Ok(bytes) => from_bytes(&bytes, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
