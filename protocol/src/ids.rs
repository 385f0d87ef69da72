//! Validated identifiers that end up inside MQTT topic names: client ids and fleet names.
//!
//! Both live in a `heapless::String` so a microcontroller client never allocates for them, and
//! both are checked on construction *and* on decode, because a `/`, `+` or `#` smuggled into a
//! client id would let one client publish on (or subscribe to) another client's topic.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest client id or fleet name, in bytes.
pub const MAX_ID_LEN: usize = 32;

/// Why a string is not a valid client id or fleet name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdError {
    /// The string is empty.
    Empty,
    /// The string is longer than [`MAX_ID_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The string contains a character outside `[A-Za-z0-9_.-]` (for example `/`, `+`, `#`).
    BadChar {
        /// The offending character.
        ch: char,
        /// Its byte offset.
        at: usize,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdError::Empty => write!(f, "identifier is empty"),
            IdError::TooLong { len } => {
                write!(
                    f,
                    "identifier is {len} bytes long, at most {MAX_ID_LEN} allowed"
                )
            }
            IdError::BadChar { ch, at } => write!(
                f,
                "identifier has {ch:?} at byte {at}; only ASCII letters, digits, '_', '.' and '-' are allowed"
            ),
        }
    }
}

impl core::error::Error for IdError {}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { len: s.len() });
    }
    // A whitelist rather than a blacklist of MQTT wildcards: it also keeps `$` (broker-internal
    // topics), spaces and control characters out of topic names.
    for (at, ch) in s.char_indices() {
        if !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '.' || ch == '-') {
            return Err(IdError::BadChar { ch, at });
        }
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(heapless::String<MAX_ID_LEN>);

        impl $name {
            /// Checks `s` and wraps it.
            pub fn new(s: &str) -> Result<Self, IdError> {
                check_id(s)?;
                let mut inner = heapless::String::new();
                // Cannot fail: the length was checked above.
                inner.push_str(s).map_err(|_| IdError::TooLong { len: s.len() })?;
                Ok(Self(inner))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl core::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = heapless::String::<MAX_ID_LEN>::deserialize(d)?;
                check_id(&raw).map_err(|e| {
                    serde::de::Error::custom(format_args!(concat!("invalid ", $what, ": {}"), e))
                })?;
                Ok(Self(raw))
            }
        }
    };
}

validated_id!(
    /// A client's identity: unique within a fleet, used in its topics.
    ClientId,
    "client id"
);
validated_id!(
    /// A fleet: one federation (one aggregator and its clients) under `fedpeft/v1/{fleet}/`.
    FleetName,
    "fleet name"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_mqtt_wildcards_and_separators() {
        for bad in ["a/b", "a+b", "a#", "$sys", "a b", ""] {
            assert!(ClientId::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            ClientId::new("a/b"),
            Err(IdError::BadChar { ch: '/', at: 1 })
        );
    }

    #[test]
    fn ids_accept_the_documented_charset_up_to_the_limit() {
        assert!(ClientId::new("pi-4.kitchen_01").is_ok());
        let long = "x".repeat(MAX_ID_LEN);
        assert!(FleetName::new(&long).is_ok());
        let too_long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            FleetName::new(&too_long),
            Err(IdError::TooLong {
                len: MAX_ID_LEN + 1
            })
        );
    }
}
