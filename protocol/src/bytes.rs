//! Deserializing a length-prefixed byte string into an owned `Vec<u8>`.
//!
//! postcard hands out borrowed slices only after checking the bytes are really there, so the
//! allocation is bounded by the input's size whatever the length prefix claims.

use alloc::vec::Vec;
use core::fmt;

use serde::Deserializer;
use serde::de::{Error, SeqAccess, Visitor};

/// Visits a byte string and converts it with `convert` straight from the input slice, so the
/// bytes are copied once (into the final typed vector), not twice.
struct ConvertVisitor<F>(F);

impl<'de, T, F: FnOnce(&[u8]) -> Result<T, &'static str>> Visitor<'de> for ConvertVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<T, E> {
        (self.0)(v).map_err(E::custom)
    }

    // Self-describing formats (e.g. JSON in tools) may present bytes as a sequence.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        (self.0)(&out).map_err(A::Error::custom)
    }
}

/// Deserializes a byte string and converts it with `convert`.
pub(crate) fn deserialize_with<'de, D, T, F>(d: D, convert: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&[u8]) -> Result<T, &'static str>,
{
    d.deserialize_bytes(ConvertVisitor(convert))
}

pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    deserialize_with(d, |b| Ok(b.to_vec()))
}

/// `#[serde(with = "crate::bytes::field")]` for `Vec<u8>` fields.
pub(crate) mod field {
    use super::*;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        super::deserialize(d)
    }
}
