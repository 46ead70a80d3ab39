//! Content hashes (blake3) of kernels, inputs, outputs and records.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A 32-byte blake3 hash, shown as 64 lowercase hex digits (in JSON too).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hash(#[serde(with = "bytes32")] [u8; 32]);

/// Serde for 32-byte values (hashes, keys): 64 hex digits in
/// human-readable formats (the API's JSON, the job records), the 32 raw
/// bytes in the others (postcard, so signed records keep their bytes).
/// JSON written as an array of 32 numbers, as it once was, still reads.
pub(crate) mod bytes32 {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(crate) fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&hex::encode(bytes))
        } else {
            bytes.serialize(s)
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        struct Hex;
        impl<'de> Visitor<'de> for Hex {
            type Value = [u8; 32];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 hex digits")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<[u8; 32], E> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(v, &mut out)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))?;
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 32], A::Error> {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(de::Error::invalid_length(33, &self));
                }
                Ok(out)
            }
        }
        if d.is_human_readable() {
            d.deserialize_any(Hex)
        } else {
            <[u8; 32]>::deserialize(d)
        }
    }
}

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps raw hash bytes (for example read back from storage).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a content hash: expected 64 hex digits, got {got:?}")]
pub struct ParseHashError {
    got: String,
}

impl FromStr for Hash {
    type Err = ParseHashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseHashError {
            got: s.chars().take(80).collect(),
        })?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shows_hex_postcard_keeps_the_bytes_and_old_json_reads() {
        let h = Hash::of(b"kernel");
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{h}\""));
        assert_eq!(serde_json::from_str::<Hash>(&json).unwrap(), h);
        let old = serde_json::to_string(h.as_bytes()).unwrap();
        assert_eq!(serde_json::from_str::<Hash>(&old).unwrap(), h);
        assert!(serde_json::from_str::<Hash>("\"abc\"").is_err());
        assert!(serde_json::from_str::<Hash>("[1, 2]").is_err());
        let wire = postcard::to_stdvec(&h).unwrap();
        assert_eq!(wire, h.as_bytes());
        assert_eq!(postcard::from_bytes::<Hash>(&wire).unwrap(), h);
    }

    #[test]
    fn hex_round_trip() {
        let h = Hash::of(b"kernel");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<Hash>().unwrap(), h);
        assert_eq!(h, Hash::from(blake3::hash(b"kernel")));
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("abc".parse::<Hash>().is_err());
        assert!("zz".repeat(32).parse::<Hash>().is_err());
    }
}
