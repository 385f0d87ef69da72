//! Ed25519 signatures on envelopes: enrolment of clients and authentication of the aggregator.
//!
//! A *signed* envelope is protocol version 2: the version-1 layout with a 64-byte Ed25519
//! signature between the body and the CRC-32 (see `docs/protocol.md`, "Signed envelopes"):
//!
//! ```text
//! version = 2 | run_id | round | kind | body | signature: 64 bytes | crc32
//! ```
//!
//! The signature covers [`DOMAIN`], the fleet name (length byte, then its bytes) and every
//! envelope byte before the signature (version, header and body), so a signed message cannot be
//! moved to another fleet, run, round or kind, nor have any field changed. Unsigned envelopes
//! stay version 1, byte for byte: a fleet without enrolment is unaffected.
//!
//! [`Envelope::encode_signed`](crate::Envelope::encode_signed) signs;
//! [`Envelope::decode`](crate::Envelope::decode) reads both versions (it does not check the
//! signature: it cannot know whose key applies); [`verify`] checks a payload's signature
//! against the key of whoever must have sent it. Chunks are never signed: a chunked payload is
//! a signed envelope cut into pieces, verified once reassembled.
//!
//! Keys travel as 64 hex digits (32 bytes): [`public_key_hex`], [`parse_public_key`],
//! [`parse_signing_key`]; with `std`, [`read_signing_key`], [`read_public_key`] and
//! [`write_signing_key`] read and write key files.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

pub use ed25519_dalek::{Signature, SigningKey, VerifyingKey};

use crate::checksum::CRC_LEN;
use crate::ids::FleetName;

/// The envelope version of a signed envelope.
pub const SIGNED_VERSION: u16 = 2;

/// Length of the signature trailer.
pub const SIGNATURE_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;

/// Length of a public or secret key, in bytes (64 hex digits).
pub const KEY_LEN: usize = 32;

/// Domain separation: prefixed to everything fedpeft signs, so a fedpeft signature can never
/// be mistaken for one over some other protocol's bytes.
pub const DOMAIN: &[u8] = b"fedpeft signed envelope v2\0";

/// Why a payload's signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    /// The payload is an unsigned (version 1) envelope.
    Unsigned,
    /// The payload is not a signed envelope at all (too short, or another version).
    NotAnEnvelope {
        /// What is wrong.
        reason: &'static str,
    },
    /// The signature does not verify with the expected key: another signer, or altered bytes.
    Invalid,
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Unsigned => f.write_str("the envelope is not signed (version 1)"),
            SignatureError::NotAnEnvelope { reason } => {
                write!(f, "not a signed envelope: {reason}")
            }
            SignatureError::Invalid => f.write_str(
                "the signature does not verify with the expected key (another signer, or altered bytes)",
            ),
        }
    }
}

impl core::error::Error for SignatureError {}

/// The bytes an envelope's signature covers: [`DOMAIN`], fleet length, fleet, and the envelope
/// up to (not including) the signature.
pub fn signed_message(fleet: &FleetName, envelope_head: &[u8]) -> Vec<u8> {
    let fleet = fleet.as_str().as_bytes();
    let mut m = Vec::with_capacity(DOMAIN.len() + 1 + fleet.len() + envelope_head.len());
    m.extend_from_slice(DOMAIN);
    // Fleet names are at most 32 bytes (checked by `FleetName`).
    m.push(fleet.len() as u8);
    m.extend_from_slice(fleet);
    m.extend_from_slice(envelope_head);
    m
}

/// Whether `payload` is a signed (version 2) envelope. Reads only the version varint.
pub fn is_signed(payload: &[u8]) -> bool {
    matches!(
        postcard::take_from_bytes::<u16>(payload),
        Ok((SIGNED_VERSION, _))
    )
}

/// Checks the signature of a signed envelope `payload` (as received, CRC included) published
/// in `fleet`, against `key`. Only the signature is checked here: the CRC, header and body are
/// [`Envelope::decode`](crate::Envelope::decode)'s job.
pub fn verify(payload: &[u8], fleet: &FleetName, key: &VerifyingKey) -> Result<(), SignatureError> {
    match postcard::take_from_bytes::<u16>(payload) {
        Ok((SIGNED_VERSION, _)) => {}
        Ok((1, _)) => return Err(SignatureError::Unsigned),
        Ok(_) => {
            return Err(SignatureError::NotAnEnvelope {
                reason: "unknown version",
            });
        }
        Err(_) => {
            return Err(SignatureError::NotAnEnvelope {
                reason: "no version field",
            });
        }
    }
    // version, run_id, round, kind: at least one byte each.
    if payload.len() < 4 + SIGNATURE_LEN + CRC_LEN {
        return Err(SignatureError::NotAnEnvelope {
            reason: "shorter than a header, a signature and a checksum",
        });
    }
    let sig_start = payload.len() - CRC_LEN - SIGNATURE_LEN;
    let mut sig = [0u8; SIGNATURE_LEN];
    sig.copy_from_slice(&payload[sig_start..sig_start + SIGNATURE_LEN]);
    let signature = Signature::from_bytes(&sig);
    key.verify_strict(&signed_message(fleet, &payload[..sig_start]), &signature)
        .map_err(|_| SignatureError::Invalid)
}

/// Signs `head` (an envelope up to its signature) for `fleet`.
pub(crate) fn sign(fleet: &FleetName, key: &SigningKey, head: &[u8]) -> [u8; SIGNATURE_LEN] {
    use ed25519_dalek::Signer;
    key.sign(&signed_message(fleet, head)).to_bytes()
}

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// Not 64 hex digits.
    Format {
        /// What was found.
        reason: &'static str,
    },
    /// 32 bytes, but not a valid Ed25519 public key (not a curve point, or a weak one).
    NotAPoint,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Format { reason } => write!(f, "expected 64 hex digits (32 bytes): {reason}"),
            KeyError::NotAPoint => f.write_str("not a valid Ed25519 public key"),
        }
    }
}

impl core::error::Error for KeyError {}

fn unhex32(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let text = text.trim();
    if text.len() != 2 * KEY_LEN {
        return Err(KeyError::Format {
            reason: "wrong length",
        });
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(KeyError::Format {
                reason: "a character that is not a hex digit",
            }),
        };
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

/// A public key as 64 lowercase hex digits.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// A secret key (its 32-byte seed) as 64 lowercase hex digits.
pub fn signing_key_hex(key: &SigningKey) -> String {
    hex(key.as_bytes())
}

/// Parses a public key from 64 hex digits (surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = unhex32(text)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::NotAPoint)?;
    // A small-order key would accept signatures anybody can forge.
    if key.is_weak() {
        return Err(KeyError::NotAPoint);
    }
    Ok(key)
}

/// Parses a secret key (its 32-byte seed) from 64 hex digits.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, KeyError> {
    unhex32(text).map(|seed| SigningKey::from_bytes(&seed))
}

#[cfg(feature = "std")]
mod files {
    use std::path::{Path, PathBuf};

    use super::*;

    /// A key file could not be read or written. Names the file.
    #[derive(Debug)]
    pub enum KeyFileError {
        /// Reading or creating the file failed.
        Io {
            /// The file.
            path: PathBuf,
            /// Why.
            source: std::io::Error,
        },
        /// The file does not hold a key.
        Key {
            /// The file.
            path: PathBuf,
            /// Why.
            source: KeyError,
        },
    }

    impl fmt::Display for KeyFileError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                KeyFileError::Io { path, source } => {
                    write!(f, "key file {}: {source}", path.display())
                }
                KeyFileError::Key { path, source } => {
                    write!(f, "key file {}: {source}", path.display())
                }
            }
        }
    }

    impl std::error::Error for KeyFileError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            match self {
                KeyFileError::Io { source, .. } => Some(source),
                KeyFileError::Key { source, .. } => Some(source),
            }
        }
    }

    fn read(path: &Path) -> Result<String, KeyFileError> {
        std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a secret key file (64 hex digits, as [`write_signing_key`] writes).
    pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyFileError> {
        parse_signing_key(&read(path)?).map_err(|source| KeyFileError::Key {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a public key file (64 hex digits).
    pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyFileError> {
        parse_public_key(&read(path)?).map_err(|source| KeyFileError::Key {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes `key` to a new file `path` (an existing file is never overwritten), readable by
    /// its owner only.
    pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), KeyFileError> {
        use std::io::Write;
        let io = |source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        let mut text = signing_key_hex(key);
        text.push('\n');
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

#[cfg(feature = "std")]
pub use files::{KeyFileError, read_public_key, read_signing_key, write_signing_key};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientId, ClientState, Envelope, Status};

    fn fleet(s: &str) -> FleetName {
        FleetName::new(s).unwrap()
    }

    fn status() -> Envelope {
        Envelope::new(
            7,
            0,
            Status {
                client: ClientId::new("pi-01").unwrap(),
                state: ClientState::Online,
            },
        )
    }

    #[test]
    fn a_signed_envelope_verifies_with_its_key_only_and_decodes_like_the_unsigned_one() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let signed = status().encode_signed(&fleet("lab"), &key).unwrap();
        let plain = status().encode().unwrap();
        assert_eq!(signed.len(), plain.len() + SIGNATURE_LEN);
        assert!(is_signed(&signed) && !is_signed(&plain));
        assert_eq!(Envelope::decode(&signed).unwrap(), status());
        assert_eq!(verify(&signed, &fleet("lab"), &key.verifying_key()), Ok(()));
        assert_eq!(
            verify(&signed, &fleet("lab"), &other.verifying_key()),
            Err(SignatureError::Invalid)
        );
        // Another fleet's signature does not carry over.
        assert_eq!(
            verify(&signed, &fleet("lab2"), &key.verifying_key()),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(&plain, &fleet("lab"), &key.verifying_key()),
            Err(SignatureError::Unsigned)
        );
    }

    #[test]
    fn every_flipped_bit_before_the_checksum_breaks_the_signature() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let signed = status().encode_signed(&fleet("lab"), &key).unwrap();
        for i in 1..signed.len() - CRC_LEN {
            let mut bad = signed.clone();
            bad[i] ^= 0x04;
            assert!(
                verify(&bad, &fleet("lab"), &key.verifying_key()).is_err(),
                "flip at byte {i} verified"
            );
        }
    }

    #[test]
    fn keys_round_trip_through_hex_and_bad_text_is_refused() {
        let key = SigningKey::from_bytes(&[0xab; 32]);
        let public = key.verifying_key();
        assert_eq!(parse_public_key(&public_key_hex(&public)).unwrap(), public);
        let again = parse_signing_key(&alloc::format!(" {}\n", signing_key_hex(&key))).unwrap();
        assert_eq!(again.verifying_key(), public);
        assert!(matches!(
            parse_public_key("abc"),
            Err(KeyError::Format { .. })
        ));
        assert!(matches!(
            parse_public_key(&"zz".repeat(32)),
            Err(KeyError::Format { .. })
        ));
        // The identity point has small order: refused.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(parse_public_key(&hex(&identity)), Err(KeyError::NotAPoint));
    }
}
