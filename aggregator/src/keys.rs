//! Keys: the enrolment file (client id → Ed25519 public key) the aggregator checks signed
//! messages against, and key generation for `aggregator keygen`.
//!
//! The enrolment file is TOML, one entry per client, the public key as `edge-client keygen`
//! prints it (64 hex digits):
//!
//! ```toml
//! [clients]
//! pi-01 = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
//! pi-02 = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedpeft_protocol::sign::{self, KeyFileError};
use fedpeft_protocol::{ClientId, SigningKey, VerifyingKey};
use serde::Deserialize;

/// The enrolment file or a key file cannot be used. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("enrolment file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("enrolment file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("enrolment file {path}: client `{client}`: {reason}")]
    Entry {
        path: PathBuf,
        client: String,
        reason: String,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrolment {
    #[serde(default)]
    clients: BTreeMap<String, String>,
}

/// Enrolled clients and their public keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Enrolment {
    keys: BTreeMap<String, VerifyingKey>,
}

impl Enrolment {
    /// Parses an enrolment file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Enrolment, KeysError> {
        let raw: RawEnrolment = toml::from_str(text).map_err(|e| KeysError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut keys = BTreeMap::new();
        for (client, hex) in raw.clients {
            let entry = |reason: String| KeysError::Entry {
                path: path.to_path_buf(),
                client: client.clone(),
                reason,
            };
            ClientId::new(&client).map_err(|e| entry(format!("not a client id: {e}")))?;
            let key = sign::parse_public_key(&hex).map_err(|e| entry(e.to_string()))?;
            keys.insert(client, key);
        }
        Ok(Enrolment { keys })
    }

    /// Reads an enrolment file.
    pub fn read(path: &Path) -> Result<Enrolment, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Enrolment::parse(&text, path)
    }

    /// An enrolment from (client id, key) pairs.
    pub fn from_keys(keys: impl IntoIterator<Item = (String, VerifyingKey)>) -> Enrolment {
        Enrolment {
            keys: keys.into_iter().collect(),
        }
    }

    /// The public key of `client`, if enrolled.
    pub fn key(&self, client: &str) -> Option<&VerifyingKey> {
        self.keys.get(client)
    }

    /// Number of enrolled clients.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A new signing key from the operating system's randomness.
pub fn generate() -> Result<SigningKey, KeysError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeysError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// `keygen`: writes a new secret key to `out` (a new file, owner-only) and returns its public
/// key.
pub fn keygen(out: &Path) -> Result<VerifyingKey, KeysError> {
    let key = generate()?;
    sign::write_signing_key(out, &key)?;
    Ok(key.verifying_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_file_maps_clients_to_keys_and_bad_entries_name_the_client() {
        let k1 = SigningKey::from_bytes(&[1; 32]).verifying_key();
        let text = format!("[clients]\npi-01 = \"{}\"\n", sign::public_key_hex(&k1));
        let e = Enrolment::parse(&text, Path::new("enrolled.toml")).unwrap();
        assert_eq!(e.key("pi-01"), Some(&k1));
        assert_eq!(e.key("pi-02"), None);
        let err = Enrolment::parse("[clients]\npi-02 = \"00ff\"\n", Path::new("enrolled.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("enrolled.toml") && err.contains("pi-02"),
            "{err}"
        );
        let err = Enrolment::parse(
            &format!("[clients]\n\"a/b\" = \"{}\"\n", sign::public_key_hex(&k1)),
            Path::new("enrolled.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a/b"), "{err}");
        assert!(Enrolment::parse("[client]\n", Path::new("e.toml")).is_err());
    }

    #[test]
    fn keygen_writes_an_owner_only_key_that_reads_back_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agg.key");
        let public = keygen(&path).unwrap();
        assert_eq!(
            sign::read_signing_key(&path).unwrap().verifying_key(),
            public
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        let err = keygen(&path).unwrap_err().to_string();
        assert!(err.contains("agg.key"), "{err}");
        assert_ne!(keygen(&dir.path().join("other.key")).unwrap(), public);
    }
}
