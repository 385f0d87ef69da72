//! Mosquitto's password file (`password_file`) as `mosquitto_passwd` (Mosquitto 2.0) writes it,
//! so one file serves Mosquitto and the embedded broker:
//!
//! ```text
//! username:$7$ITERATIONS$SALT$HASH
//! ```
//!
//! `$7$` is PBKDF2-HMAC-SHA512 over the password with the salt, ITERATIONS rounds (101 by
//! default), a 64-byte result; SALT and HASH are standard base64. Verification is the RustCrypto
//! `pbkdf2` crate and a constant-time comparison (`subtle`). Mosquitto 1.6's salted SHA-512
//! (`$6$`) and plain-text lines are refused, naming the file and the line, with the command
//! that re-hashes them.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use subtle::ConstantTimeEq;

use super::AccessError;

/// Most PBKDF2 rounds accepted: a login costs one hash, and a file asking for more would let
/// anyone who can connect keep the broker busy.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// Bytes of a `$7$` hash (SHA-512's output).
const HASH_LEN: usize = 64;

/// One user's stored hash.
#[derive(Clone, PartialEq, Eq)]
struct Entry {
    iterations: u32,
    salt: Vec<u8>,
    hash: [u8; HASH_LEN],
}

/// A parsed password file: username → hash.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: HashMap<String, Entry>,
}

impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut users: Vec<&String> = self.users.keys().collect();
        users.sort();
        f.debug_struct("PasswordFile")
            .field("users", &users)
            .finish()
    }
}

impl PasswordFile {
    /// Reads and parses a password file.
    pub fn read(path: &Path) -> Result<PasswordFile, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PasswordFile::parse(&text, path)
    }

    /// Parses password-file text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<PasswordFile, AccessError> {
        let mut users = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let bad = |message: String| AccessError::Line {
                path: path.to_path_buf(),
                line: n + 1,
                message,
            };
            let line = raw.trim_end_matches(['\r', '\n']);
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(bad("expected `username:hash`".into()));
            };
            if user.is_empty() {
                return Err(bad("empty username".into()));
            }
            let entry = parse_hash(hash, &path.display().to_string())
                .map_err(|m| bad(format!("user `{user}`: {m}")))?;
            if users.insert(user.to_string(), entry).is_some() {
                return Err(bad(format!("user `{user}` is listed twice")));
            }
        }
        Ok(PasswordFile { users })
    }

    /// Whether `user` is in the file and `password` is theirs.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        let mut derived = [0u8; HASH_LEN];
        let Some(entry) = self.users.get(user) else {
            // As long as a known user's check (at mosquitto_passwd's default cost), so the time
            // a refusal takes does not tell which usernames exist.
            pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, b"no such user", 101, &mut derived);
            return false;
        };
        pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, &entry.salt, entry.iterations, &mut derived);
        derived.ct_eq(&entry.hash).into()
    }

    /// Whether `user` has an entry.
    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// How many users the file lists.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether the file lists nobody.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// `$7$ITERATIONS$SALT$HASH`.
fn parse_hash(text: &str, file: &str) -> Result<Entry, String> {
    let rehash = format!("hash it with `mosquitto_passwd -U {file}` (Mosquitto 2.0)");
    let Some(rest) = text.strip_prefix("$7$") else {
        return Err(if text.starts_with("$6$") {
            format!(
                "a salted SHA-512 (`$6$`, Mosquitto 1.6) hash is too weak to accept: re-{rehash}"
            )
        } else if text.starts_with('$') {
            format!("unknown hash type: expected PBKDF2-SHA512 (`$7$`); {rehash}")
        } else {
            format!("the password is not hashed: {rehash}")
        });
    };
    let parts: Vec<&str> = rest.split('$').collect();
    let [iterations, salt, hash] = parts[..] else {
        return Err("expected `$7$ITERATIONS$SALT$HASH`".into());
    };
    let iterations: u32 = iterations
        .parse()
        .map_err(|_| format!("`{iterations}` is not a number of iterations"))?;
    if !(1..=MAX_ITERATIONS).contains(&iterations) {
        return Err(format!(
            "{iterations} iterations: expected 1 to {MAX_ITERATIONS}"
        ));
    }
    let salt = BASE64
        .decode(salt)
        .map_err(|e| format!("the salt is not base64: {e}"))?;
    if salt.is_empty() {
        return Err("empty salt".into());
    }
    let hash: [u8; HASH_LEN] = BASE64
        .decode(hash)
        .map_err(|e| format!("the hash is not base64: {e}"))?
        .try_into()
        .map_err(|h: Vec<u8>| format!("the hash has {} bytes, not {HASH_LEN}", h.len()))?;
    Ok(Entry {
        iterations,
        salt,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by `mosquitto_passwd -U` (Mosquitto 2.0.11, Debian 12) from `client-a:secret-a`
    /// and `fedpeft-aggregator:agg`.
    const MOSQUITTO: &str = "\
client-a:$7$101$eItNE6prXpKNGCGP$+16ZBVMkkh3lcK1FG/scSPuA1kcwl74C9snaDNJQWs/NBzgR+yOfuEKWqE8+R6FHyRaS/VgGI1mJ1lB28oSWcQ==
fedpeft-aggregator:$7$101$/kuz7+Sc5zUghDRP$G/4AeYJrfwTC+42gvRPhUaa/qr4gpnc4E5xMOsLOmh+MhsEg2zzz+o5PNDfGF8Fgi2fhn2vokoper8E7IdTE7A==
";

    #[test]
    fn a_mosquitto_passwd_file_verifies_its_passwords_and_nothing_else() {
        let file = PasswordFile::parse(MOSQUITTO, Path::new("passwd")).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.verify("client-a", b"secret-a"));
        assert!(file.verify("fedpeft-aggregator", b"agg"));
        assert!(!file.verify("client-a", b"agg"));
        assert!(!file.verify("client-a", b"secret-a "));
        assert!(!file.verify("client-b", b"secret-a"));
        assert!(!file.verify("", b""));
        // The Debug form lists users, never hashes.
        let shown = format!("{file:?}");
        assert!(
            shown.contains("client-a") && !shown.contains("eItNE6"),
            "{shown}"
        );
    }

    #[test]
    fn a_line_that_is_not_a_pbkdf2_hash_is_refused_naming_file_and_line() {
        for (text, line, words) in [
            ("a:secret\n", 1, "mosquitto_passwd -U"),
            ("# c\n\nb:$6$c2FsdA==$aGFzaA==\n", 3, "$6$"),
            ("a:$7$101$c2FsdA==\n", 1, "ITERATIONS"),
            ("a:$7$x$c2FsdA==$aGFzaA==\n", 1, "iterations"),
            ("a:$7$0$c2FsdA==$aGFzaA==\n", 1, "iterations"),
            ("a:$7$101$!!$aGFzaA==\n", 1, "salt"),
            ("a:$7$101$c2FsdA==$aGFzaA==\n", 1, "bytes"),
            ("just-a-name\n", 1, "username:hash"),
        ] {
            let err = PasswordFile::parse(text, Path::new("etc/passwd"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("etc/passwd:{line}:")) && err.contains(words),
                "{text:?}: {err}"
            );
        }
        let twice = format!("{}{}", MOSQUITTO, MOSQUITTO.lines().next().unwrap());
        let err = PasswordFile::parse(&twice, Path::new("p")).unwrap_err();
        assert!(
            err.to_string()
                .contains("p:3: user `client-a` is listed twice"),
            "{err}"
        );
    }
}
