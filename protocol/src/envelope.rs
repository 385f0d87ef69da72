//! The envelope every payload travels in, and its encoder/decoder.
//!
//! Layout (postcard varints unless noted):
//! ```text
//! version: varint u16 | run_id: varint u64 | round: varint u32 | kind: u8 (raw byte)
//! | body: postcard of the kind's struct | crc32: u32 little-endian (4 raw bytes)
//! ```
//! The CRC-32 (ISO-HDLC, as in zlib/Ethernet) covers every byte before it. The version comes
//! first and is checked before anything else is interpreted, so a future version may change
//! everything after it. Version 2 is the same layout with a 64-byte Ed25519 signature between
//! the body and the CRC ([`crate::sign`]).

use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};

pub use crate::checksum::{CRC_LEN, crc32};
use crate::ids::FleetName;
use crate::message::{
    Chunk, ClientUpdate, EvalResult, GlobalAdapter, Join, Message, MessageKind, RoundAnnounce,
    Status,
};
use crate::sign::{SIGNATURE_LEN, SIGNED_VERSION, SigningKey};
use crate::tensor::TensorError;

/// The protocol version of unsigned envelopes. Also the `v1` in topic names. Signed envelopes
/// are version [`SIGNED_VERSION`] (2): the same layout plus a signature trailer.
pub const PROTOCOL_VERSION: u16 = 1;

fn known_version(v: u16) -> bool {
    v == PROTOCOL_VERSION || v == SIGNED_VERSION
}

/// The header fields, readable without decoding (or checksumming) the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version: 1 unsigned, 2 signed.
    pub version: u16,
    /// Run the message belongs to.
    pub run_id: u64,
    /// Round the message belongs to.
    pub round: u32,
    /// Body kind.
    pub kind: MessageKind,
}

/// Why a payload could not be decoded. Every variant says where decoding stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Fewer bytes than the smallest possible envelope.
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// A header field is malformed (truncated or bad varint).
    Header {
        /// The field.
        field: &'static str,
        /// postcard's diagnosis.
        error: postcard::Error,
    },
    /// The version is not one this crate speaks.
    UnsupportedVersion {
        /// Version found.
        found: u16,
        /// Highest version supported (this crate speaks 1 and 2).
        supported: u16,
    },
    /// The checksum does not match the bytes (corruption or truncation).
    CrcMismatch {
        /// CRC computed over the bytes.
        computed: u32,
        /// CRC carried in the payload.
        carried: u32,
    },
    /// The kind byte names no known message.
    UnknownKind {
        /// The code found.
        code: u8,
    },
    /// The body does not decode as its kind's struct (truncated, bad enum tag, bad UTF-8, a
    /// client id with a forbidden character, ...).
    Body {
        /// The kind being decoded.
        kind: MessageKind,
        /// postcard's diagnosis (`SerdeDeCustom` means a field failed validation).
        error: postcard::Error,
    },
    /// Bytes left over after the body.
    TrailingBytes {
        /// The kind decoded.
        kind: MessageKind,
        /// How many bytes were left.
        count: usize,
    },
    /// A tensor is structurally inconsistent.
    Tensor {
        /// The kind decoded.
        kind: MessageKind,
        /// What is wrong, naming the tensor.
        error: TensorError,
    },
    /// The header's round and the body's round differ.
    RoundMismatch {
        /// The kind decoded.
        kind: MessageKind,
        /// Round in the header.
        header: u32,
        /// Round in the body.
        body: u32,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort { len } => {
                write!(
                    f,
                    "payload of {len} bytes is too short to be a fedpeft envelope"
                )
            }
            DecodeError::Header { field, error } => {
                write!(f, "envelope header field `{field}` is malformed: {error}")
            }
            DecodeError::UnsupportedVersion { found, supported } => write!(
                f,
                "unsupported protocol version {found} (this build speaks versions 1 to {supported})"
            ),
            DecodeError::CrcMismatch { computed, carried } => write!(
                f,
                "checksum mismatch: payload carries {carried:#010x}, bytes hash to {computed:#010x}"
            ),
            DecodeError::UnknownKind { code } => write!(f, "unknown message kind code {code}"),
            DecodeError::Body { kind, error } => write!(f, "{kind} body is malformed: {error}"),
            DecodeError::TrailingBytes { kind, count } => {
                write!(f, "{count} unexpected bytes after the {kind} body")
            }
            DecodeError::Tensor { kind, error } => write!(f, "{kind}: {error}"),
            DecodeError::RoundMismatch { kind, header, body } => write!(
                f,
                "{kind}: header says round {header} but the body says round {body}"
            ),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodeError {
    /// The envelope's round and the body's round differ.
    RoundMismatch {
        /// The kind.
        kind: MessageKind,
        /// Round in the envelope.
        header: u32,
        /// Round in the body.
        body: u32,
    },
    /// A tensor is inconsistent (e.g. two tensors with the same name).
    Tensor(TensorError),
    /// postcard refused a value.
    Postcard(postcard::Error),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::RoundMismatch { kind, header, body } => write!(
                f,
                "{kind}: envelope round {header} differs from body round {body}"
            ),
            EncodeError::Tensor(e) => write!(f, "{e}"),
            EncodeError::Postcard(e) => write!(f, "encoding failed: {e}"),
        }
    }
}

impl core::error::Error for EncodeError {}

/// A message with its header. `version` is implied: encoding writes [`PROTOCOL_VERSION`] and
/// decoding rejects anything else.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Run identifier (one training run of a fleet); lets clients drop stale retained messages.
    pub run_id: u64,
    /// Round number. For kinds whose body names a round it must be the same.
    pub round: u32,
    /// The message.
    pub message: Message,
}

#[derive(Serialize, Deserialize)]
struct RestOfHeader {
    run_id: u64,
    round: u32,
    kind: u8,
}

impl Envelope {
    /// Wraps `message`; for kinds that carry a round in their body, the envelope round is
    /// taken from it, otherwise it is `round`.
    pub fn new(run_id: u64, round: u32, message: impl Into<Message>) -> Self {
        let message = message.into();
        let round = message.body_round().unwrap_or(round);
        Self {
            run_id,
            round,
            message,
        }
    }

    /// The message kind.
    pub fn kind(&self) -> MessageKind {
        self.message.kind()
    }

    /// Encodes to bytes, checksum included: an unsigned, version-1 envelope.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        self.encode_with(None)
    }

    /// Encodes a signed, version-2 envelope: signed by `key` for `fleet` (see [`crate::sign`]),
    /// [`SIGNATURE_LEN`] bytes longer than [`Envelope::encode`]'s.
    pub fn encode_signed(
        &self,
        fleet: &FleetName,
        key: &SigningKey,
    ) -> Result<Vec<u8>, EncodeError> {
        self.encode_with(Some((fleet, key)))
    }

    fn encode_with(
        &self,
        signer: Option<(&FleetName, &SigningKey)>,
    ) -> Result<Vec<u8>, EncodeError> {
        let kind = self.kind();
        if let Some(body) = self.message.body_round()
            && body != self.round
        {
            return Err(EncodeError::RoundMismatch {
                kind,
                header: self.round,
                body,
            });
        }
        self.message.check().map_err(EncodeError::Tensor)?;
        let version = if signer.is_some() {
            SIGNED_VERSION
        } else {
            PROTOCOL_VERSION
        };
        let mut out = Vec::new();
        out = postcard::to_extend(&version, out).map_err(EncodeError::Postcard)?;
        let rest = RestOfHeader {
            run_id: self.run_id,
            round: self.round,
            kind: kind as u8,
        };
        out = postcard::to_extend(&rest, out).map_err(EncodeError::Postcard)?;
        out = match &self.message {
            Message::Join(m) => postcard::to_extend(m, out),
            Message::RoundAnnounce(m) => postcard::to_extend(m, out),
            Message::GlobalAdapter(m) => postcard::to_extend(m, out),
            Message::ClientUpdate(m) => postcard::to_extend(m, out),
            Message::EvalResult(m) => postcard::to_extend(m, out),
            Message::Status(m) => postcard::to_extend(m, out),
            Message::Chunk(m) => postcard::to_extend(m, out),
            Message::SecureRoundAnnounce(m) => postcard::to_extend(m, out),
            Message::SecAggKeys(m) => postcard::to_extend(m, out),
            Message::SecAggRoster(m) => postcard::to_extend(m, out),
            Message::SecAggShares(m) => postcard::to_extend(m, out),
            Message::SecAggRelay(m) => postcard::to_extend(m, out),
            Message::SecAggMasked(m) => postcard::to_extend(m, out),
            Message::SecAggUnmask(m) => postcard::to_extend(m, out),
            Message::SecAggReveal(m) => postcard::to_extend(m, out),
            Message::SiteAggregate(m) => postcard::to_extend(m, out),
            Message::AsyncRoundAnnounce(m) => postcard::to_extend(m, out),
        }
        .map_err(EncodeError::Postcard)?;
        if let Some((fleet, key)) = signer {
            let signature = crate::sign::sign(fleet, key, &out);
            out.extend_from_slice(&signature);
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes and verifies a payload: version, checksum, kind, body, structure.
    /// Never panics; allocates at most in proportion to `bytes.len()`. Reads signed (version 2)
    /// envelopes too, without checking the signature: that is [`crate::sign::verify`]'s job.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (header, body) = split_checked(bytes)?;
        let kind = header.kind;
        let message = match kind {
            MessageKind::Join => Message::Join(body_of::<Join>(kind, body)?),
            MessageKind::RoundAnnounce => {
                Message::RoundAnnounce(body_of::<RoundAnnounce>(kind, body)?)
            }
            MessageKind::GlobalAdapter => {
                Message::GlobalAdapter(body_of::<GlobalAdapter>(kind, body)?)
            }
            MessageKind::ClientUpdate => {
                Message::ClientUpdate(body_of::<ClientUpdate>(kind, body)?)
            }
            MessageKind::EvalResult => Message::EvalResult(body_of::<EvalResult>(kind, body)?),
            MessageKind::Status => Message::Status(body_of::<Status>(kind, body)?),
            MessageKind::Chunk => Message::Chunk(body_of::<Chunk>(kind, body)?),
            MessageKind::SecureRoundAnnounce => Message::SecureRoundAnnounce(body_of(kind, body)?),
            MessageKind::SecAggKeys => Message::SecAggKeys(body_of(kind, body)?),
            MessageKind::SecAggRoster => Message::SecAggRoster(body_of(kind, body)?),
            MessageKind::SecAggShares => Message::SecAggShares(body_of(kind, body)?),
            MessageKind::SecAggRelay => Message::SecAggRelay(body_of(kind, body)?),
            MessageKind::SecAggMasked => Message::SecAggMasked(body_of(kind, body)?),
            MessageKind::SecAggUnmask => Message::SecAggUnmask(body_of(kind, body)?),
            MessageKind::SecAggReveal => Message::SecAggReveal(body_of(kind, body)?),
            MessageKind::SiteAggregate => Message::SiteAggregate(body_of(kind, body)?),
            MessageKind::AsyncRoundAnnounce => Message::AsyncRoundAnnounce(body_of(kind, body)?),
        };
        if let Some(b) = message.body_round()
            && b != header.round
        {
            return Err(DecodeError::RoundMismatch {
                kind,
                header: header.round,
                body: b,
            });
        }
        message
            .check()
            .map_err(|error| DecodeError::Tensor { kind, error })?;
        Ok(Envelope {
            run_id: header.run_id,
            round: header.round,
            message,
        })
    }
}

/// Reads the header without verifying the checksum or decoding the body: cheap routing (e.g.
/// to drop a stale run's retained message before paying for its tensors).
pub fn peek_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    read_header(bytes).map(|(h, _)| h)
}

fn read_header(bytes: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    let (version, rest) =
        postcard::take_from_bytes::<u16>(bytes).map_err(|error| DecodeError::Header {
            field: "version",
            error,
        })?;
    if !known_version(version) {
        return Err(DecodeError::UnsupportedVersion {
            found: version,
            supported: SIGNED_VERSION,
        });
    }
    let (run_id, rest) =
        postcard::take_from_bytes::<u64>(rest).map_err(|error| DecodeError::Header {
            field: "run_id",
            error,
        })?;
    let (round, rest) =
        postcard::take_from_bytes::<u32>(rest).map_err(|error| DecodeError::Header {
            field: "round",
            error,
        })?;
    let (&code, rest) = rest.split_first().ok_or(DecodeError::Header {
        field: "kind",
        error: postcard::Error::DeserializeUnexpectedEnd,
    })?;
    let kind = MessageKind::from_code(code).ok_or(DecodeError::UnknownKind { code })?;
    Ok((
        Header {
            version,
            run_id,
            round,
            kind,
        },
        rest,
    ))
}

/// Checks version and CRC, then parses the header; returns the body bytes (CRC and, in a
/// signed envelope, the signature stripped).
fn split_checked(bytes: &[u8]) -> Result<(Header, &[u8]), DecodeError> {
    // The version is looked at before the length and CRC so a peer speaking another version
    // gets that diagnosis rather than a confusing checksum error.
    let mut trailer = CRC_LEN;
    if let Ok((version, _)) = postcard::take_from_bytes::<u16>(bytes) {
        if !known_version(version) {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: SIGNED_VERSION,
            });
        }
        if version == SIGNED_VERSION {
            trailer += SIGNATURE_LEN;
        }
    }
    // version (1) + run_id (1) + round (1) + kind (1) + [signature (64)] + crc (4).
    if bytes.len() < 4 + trailer {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let (covered, tail) = bytes.split_at(bytes.len() - CRC_LEN);
    let carried = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    let computed = crc32(covered);
    if carried != computed {
        return Err(DecodeError::CrcMismatch { computed, carried });
    }
    let (header, rest) = read_header(covered)?;
    let signature = trailer - CRC_LEN;
    if rest.len() < signature {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    Ok((header, &rest[..rest.len() - signature]))
}

fn body_of<'a, T: Deserialize<'a>>(kind: MessageKind, body: &'a [u8]) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|error| DecodeError::Body { kind, error })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind,
            count: rest.len(),
        });
    }
    Ok(value)
}
