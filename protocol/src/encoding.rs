//! The canonical encoding of records and messages.
//!
//! Every value is encoded with the [postcard] wire format (version 1, a
//! stable, documented format): fields in declaration order, integers as
//! LEB128 varints (signed ones zig-zag first), byte strings and sequences as a
//! varint length and then the items, enums as a varint variant index and then
//! the fields, `Option` as one byte 0 or 1, fixed arrays without a length.
//! Records contain no maps and no floats outside tolerances, so one value has
//! exactly one encoding.
//!
//! Postcard's decoder is lenient (it accepts, for example, over-long
//! varints), so [`decode`] re-encodes what it read and compares it with the
//! input without allocating: bytes that are not the canonical encoding of the
//! value they decode to are refused. The same record therefore always has the
//! same bytes, and a signature over those bytes covers exactly one value.
//!
//! Size caps are checked before any decoding, so no allocation depends on a
//! length a peer declared beyond the cap.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("{what} is {size} bytes, more than the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("{what} is truncated: the bytes end before the value does")]
    Truncated { what: &'static str },
    #[error("{what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("{what} has {extra} bytes after the end of the value")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} is not in canonical form (the same value has a different encoding)")]
    NonCanonical { what: &'static str },
    #[error(
        "{what} has version {found}, but this build understands version {supported}; upgrade alliance"
    )]
    UnsupportedVersion {
        what: &'static str,
        found: u16,
        supported: u16,
    },
}

/// Why a value could not be encoded (only when it exceeds its cap).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{what} would be {size} bytes, more than the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("{what} cannot be encoded: {detail}")]
    Serialize { what: &'static str, detail: String },
}

/// The canonical bytes of `value`, refused if longer than `max`.
pub fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
    max: usize,
) -> Result<Vec<u8>, EncodeError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| EncodeError::Serialize {
        what,
        detail: e.to_string(),
    })?;
    if bytes.len() > max {
        return Err(EncodeError::TooLarge {
            what,
            size: bytes.len(),
            max,
        });
    }
    Ok(bytes)
}

/// Decodes `bytes` as a `T`, checking the cap first and canonical form after.
pub fn decode<T: Serialize + DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            size: bytes.len(),
            max,
        });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated { what },
        other => DecodeError::Malformed {
            what,
            detail: other.to_string(),
        },
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    if !is_encoding_of(&value, bytes) {
        return Err(DecodeError::NonCanonical { what });
    }
    Ok(value)
}

/// Whether `bytes` is exactly the canonical encoding of `value`.
fn is_encoding_of<T: Serialize>(value: &T, bytes: &[u8]) -> bool {
    postcard::serialize_with_flavor(
        value,
        Compare {
            expected: bytes,
            pos: 0,
        },
    )
    .unwrap_or(false)
}

/// A postcard output that compares the bytes it is given with an expected
/// slice instead of storing them.
struct Compare<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl postcard::ser_flavors::Flavor for Compare<'_> {
    type Output = bool;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        match self.expected.get(self.pos) {
            Some(&b) if b == data => {
                self.pos += 1;
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.pos.checked_add(data.len());
        match end.and_then(|end| self.expected.get(self.pos..end)) {
            Some(slice) if slice == data => {
                self.pos += data.len();
                Ok(())
            }
            _ => Err(postcard::Error::SerializeBufferFull),
        }
    }

    fn finalize(self) -> postcard::Result<bool> {
        Ok(self.pos == self.expected.len())
    }
}

/// Serde helper for `Vec<u8>` fields: encodes them as a byte string, which
/// postcard writes exactly like a sequence of `u8` (varint length, then the
/// bytes) but copies in one go instead of byte by byte.
///
/// Use with `#[serde(with = "crate::encoding::bytes")]`.
pub mod bytes {
    use std::fmt;

    use serde::{Deserializer, Serializer, de};

    /// Writes the bytes as one byte string.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    /// Reads one byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                // Self-describing formats (JSON) hand bytes over as a sequence.
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        n: u64,
        flag: bool,
        name: String,
        data: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            n: 300,
            flag: true,
            name: "gpu".into(),
            data: vec![1, 2, 3],
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode("sample", &sample(), 1024).unwrap();
        assert_eq!(decode::<Sample>("sample", &bytes, 1024).unwrap(), sample());
    }

    #[test]
    fn over_long_varint_is_non_canonical() {
        let bytes = encode("sample", &sample(), 1024).unwrap();
        // 300 = ac 02; the over-long form ac 82 00 decodes to the same number.
        assert_eq!(&bytes[..2], &[0xac, 0x02]);
        let mut long = vec![0xac, 0x82, 0x00];
        long.extend_from_slice(&bytes[2..]);
        assert_eq!(
            decode::<Sample>("sample", &long, 1024),
            Err(DecodeError::NonCanonical { what: "sample" })
        );
    }

    #[test]
    fn caps_and_trailing_bytes() {
        let bytes = encode("sample", &sample(), 1024).unwrap();
        assert!(matches!(
            decode::<Sample>("sample", &bytes, bytes.len() - 1),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            encode("sample", &sample(), 3),
            Err(EncodeError::TooLarge { .. })
        ));
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(
            decode::<Sample>("sample", &extra, 1024),
            Err(DecodeError::TrailingBytes {
                what: "sample",
                extra: 1
            })
        );
        assert_eq!(
            decode::<Sample>("sample", &bytes[..bytes.len() - 1], 1024),
            Err(DecodeError::Truncated { what: "sample" })
        );
    }

    #[test]
    fn byte_strings_encode_like_sequences_of_u8() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Fast(#[serde(with = "super::bytes")] Vec<u8>);
        let data: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let slow = encode("slow", &data, 1024).unwrap();
        let fast = encode("fast", &Fast(data.clone()), 1024).unwrap();
        assert_eq!(slow, fast);
        assert_eq!(decode::<Fast>("fast", &slow, 1024).unwrap(), Fast(data));
    }

    #[test]
    fn bad_bool_is_malformed() {
        let mut bytes = encode("sample", &sample(), 1024).unwrap();
        bytes[2] = 2; // the bool
        assert!(matches!(
            decode::<Sample>("sample", &bytes, 1024),
            Err(DecodeError::Malformed { .. })
        ));
    }
}
