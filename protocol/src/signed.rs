//! The one signed-record wrapper every record type travels in.
//!
//! A [`Signed<T>`] holds the canonical bytes of a record (see
//! [`crate::encoding`]), the signer's public key and an ed25519 signature.
//! The signed message is
//!
//! ```text
//! "alliance-signed-record" 0x00 <T::CONTEXT> 0x00 <canonical payload bytes>
//! ```
//!
//! so a signature made for one record type (context `charter/v1`, say) can
//! never be replayed as another (`node-cert/v1`). Signatures are checked
//! with `verify_strict` after the signer key passes the strict key checks of
//! [`PublicKey::verifying_key`].
//!
//! The record is decoded only after its signature has been checked; decoding
//! applies the record's size cap and refuses non-canonical bytes.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned};
use serde::{Deserialize, Serialize};

use crate::encoding::{self, DecodeError, EncodeError};
use crate::hash::Hash;
use crate::keys::{Identity, KeyError, PublicKey};

/// The prefix of every signed message.
pub const SIGNING_DOMAIN: &[u8] = b"alliance-signed-record";

/// Bytes an envelope adds around a payload: version, length prefix, key, signature.
pub const ENVELOPE_OVERHEAD: usize = 3 + 5 + 32 + 64;

/// A record type that can be signed.
pub trait Record: Serialize + DeserializeOwned {
    /// Name used in error messages, e.g. `"institution certificate"`.
    const NAME: &'static str;
    /// Domain-separation context, unique per record type and version,
    /// e.g. `"institution-cert/v1"`.
    const CONTEXT: &'static str;
    /// The record format version this build writes and reads.
    const VERSION: u16;
    /// Largest accepted payload, in bytes.
    const MAX_SIZE: usize;
}

/// Why a signed record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error("{what}: the signer's key is unusable: {source}")]
    Key {
        what: &'static str,
        source: KeyError,
    },
    #[error(
        "{what}: the signature by {signer} does not match the record (it was altered, or signed for another purpose)"
    )]
    BadSignature {
        what: &'static str,
        signer: PublicKey,
    },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// 64 signature bytes, encoded as a fixed-size tuple (no length prefix).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureBytes(pub [u8; 64]);

impl Serialize for SignatureBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(64)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = SignatureBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(SignatureBytes(out))
            }
        }
        d.deserialize_tuple(64, V)
    }
}

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..6]))
    }
}

/// A record of type `T` with its signer and signature, as it travels.
///
/// The record inside is only reachable through [`Signed::verify`], so no
/// code can act on a record whose signature it has not checked.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    version: u16,
    payload: Vec<u8>,
    signer: PublicKey,
    signature: SignatureBytes,
    #[serde(skip)]
    _record: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            version: self.version,
            payload: self.payload.clone(),
            signer: self.signer,
            signature: self.signature,
            _record: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.payload == other.payload
            && self.signer == other.signer
            && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T: Record> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("record", &T::NAME)
            .field("payload_bytes", &self.payload.len())
            .field("signer", &self.signer)
            .finish()
    }
}

/// The message the signature covers: domain, context, payload.
fn signing_message(context: &str, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + context.len() + 2 + payload.len());
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.push(0);
    msg.extend_from_slice(context.as_bytes());
    msg.push(0);
    msg.extend_from_slice(payload);
    msg
}

impl<T: Record> Signed<T> {
    /// Encodes `record` canonically and signs it with `key`.
    pub fn sign(record: T, key: &Identity) -> Result<Self, EncodeError> {
        let payload = encoding::encode(T::NAME, &record, T::MAX_SIZE)?;
        let signature = key.sign_raw(&signing_message(T::CONTEXT, &payload));
        Ok(Self {
            version: T::VERSION,
            payload,
            signer: key.public(),
            signature: SignatureBytes(signature.to_bytes()),
            _record: PhantomData,
        })
    }

    /// Checks the signature (strictly) and decodes the record (canonically).
    ///
    /// This proves only that [`Signed::signer`] signed the record; whether
    /// that signer may make such a record is the caller's check (see
    /// [`crate::cert`]).
    pub fn verify(&self) -> Result<T, RecordError> {
        self.check_signature()?;
        Ok(encoding::decode(T::NAME, &self.payload, T::MAX_SIZE)?)
    }

    /// Checks the envelope version, the signer key and the signature.
    fn check_signature(&self) -> Result<(), RecordError> {
        if self.version != T::VERSION {
            return Err(DecodeError::UnsupportedVersion {
                what: T::NAME,
                found: self.version,
                supported: T::VERSION,
            }
            .into());
        }
        let key = self
            .signer
            .verifying_key()
            .map_err(|source| RecordError::Key {
                what: T::NAME,
                source,
            })?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature.0);
        key.verify_strict(&signing_message(T::CONTEXT, &self.payload), &signature)
            .map_err(|_| RecordError::BadSignature {
                what: T::NAME,
                signer: self.signer,
            })
    }

    /// The key that signed this record (not yet checked).
    pub fn signer(&self) -> PublicKey {
        self.signer
    }

    /// The canonical record bytes the signature covers.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The content hash of the record bytes: names this record.
    pub fn payload_hash(&self) -> Hash {
        Hash::of(&self.payload)
    }

    /// The envelope's canonical bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding a Vec-backed struct cannot fail and the payload was capped
        // when it was signed or decoded.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Largest accepted envelope, in bytes.
    pub const fn max_envelope_size() -> usize {
        T::MAX_SIZE + ENVELOPE_OVERHEAD
    }

    /// Decodes an envelope (cap first, canonical form after). The record
    /// inside is decoded by [`Signed::verify`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        encoding::decode(T::NAME, bytes, Self::max_envelope_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Note {
        text: String,
    }
    impl Record for Note {
        const NAME: &'static str = "note";
        const CONTEXT: &'static str = "test-note/v1";
        const VERSION: u16 = 1;
        const MAX_SIZE: usize = 64;
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Other {
        text: String,
    }
    impl Record for Other {
        const NAME: &'static str = "other";
        const CONTEXT: &'static str = "test-other/v1";
        const VERSION: u16 = 1;
        const MAX_SIZE: usize = 64;
    }

    fn note() -> Note {
        Note {
            text: "hello".into(),
        }
    }

    #[test]
    fn sign_verify_round_trip() {
        let key = Identity::generate();
        let signed = Signed::sign(note(), &key).unwrap();
        assert_eq!(signed.verify().unwrap(), note());
        let back = Signed::<Note>::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.signer(), key.public());
    }

    #[test]
    fn wrong_domain_is_refused() {
        let key = Identity::generate();
        let signed = Signed::sign(note(), &key).unwrap();
        // The same bytes read as another record type carry the wrong context.
        let as_other = Signed::<Other>::from_bytes(&signed.to_bytes()).unwrap();
        assert!(matches!(
            as_other.verify(),
            Err(RecordError::BadSignature { what: "other", .. })
        ));
    }

    #[test]
    fn oversized_record_cannot_be_signed() {
        let key = Identity::generate();
        let big = Note {
            text: "x".repeat(100),
        };
        assert!(matches!(
            Signed::sign(big, &key),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_version_is_named() {
        let key = Identity::generate();
        let mut signed = Signed::sign(note(), &key).unwrap();
        signed.version = 2;
        assert!(matches!(
            signed.verify(),
            Err(RecordError::Decode(DecodeError::UnsupportedVersion {
                found: 2,
                ..
            }))
        ));
    }
}
