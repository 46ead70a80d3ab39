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
///
/// On the wire it is the envelope `version: u16, payload: bytes, signer:
/// [u8; 32], signature: [u8; 64]`. In memory it keeps the whole signed
/// message (domain, context, payload) in one buffer, so neither signing nor
/// verifying copies the payload again.
pub struct Signed<T> {
    version: u16,
    /// `SIGNING_DOMAIN 0x00 T::CONTEXT 0x00 payload`.
    message: Vec<u8>,
    signer: PublicKey,
    signature: SignatureBytes,
    _record: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            version: self.version,
            message: self.message.clone(),
            signer: self.signer,
            signature: self.signature,
            _record: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.version == other.version
            && self.message == other.message
            && self.signer == other.signer
            && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T: Record> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("record", &T::NAME)
            .field("payload_bytes", &self.payload().len())
            .field("signer", &self.signer)
            .finish()
    }
}

/// The start of the signed message of a `T`: domain and context.
fn message_prefix<T: Record>(capacity: usize) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_DOMAIN.len() + T::CONTEXT.len() + 2 + capacity);
    msg.extend_from_slice(SIGNING_DOMAIN);
    msg.push(0);
    msg.extend_from_slice(T::CONTEXT.as_bytes());
    msg.push(0);
    msg
}

const fn prefix_len<T: Record>() -> usize {
    SIGNING_DOMAIN.len() + T::CONTEXT.len() + 2
}

impl<T: Record> Signed<T> {
    /// Encodes `record` canonically and signs it with `key`.
    pub fn sign(record: &T, key: &Identity) -> Result<Self, EncodeError> {
        let serialize = |e: postcard::Error| EncodeError::Serialize {
            what: T::NAME,
            detail: e.to_string(),
        };
        let message = postcard::to_extend(record, message_prefix::<T>(256)).map_err(serialize)?;
        let size = message.len() - prefix_len::<T>();
        if size > T::MAX_SIZE {
            return Err(EncodeError::TooLarge {
                what: T::NAME,
                size,
                max: T::MAX_SIZE,
            });
        }
        let signature = key.sign_raw(&message);
        Ok(Self {
            version: T::VERSION,
            message,
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
        Ok(encoding::decode(T::NAME, self.payload(), T::MAX_SIZE)?)
    }

    /// Decodes a record that `own` signed itself, read back from the node's
    /// own store, without checking the signature a second time. A record
    /// that names another signer is refused as a bad signature.
    pub fn open_own(&self, own: &Identity) -> Result<T, RecordError> {
        if self.signer != own.public() || self.version != T::VERSION {
            return Err(RecordError::BadSignature {
                what: T::NAME,
                signer: self.signer,
            });
        }
        Ok(encoding::decode(T::NAME, self.payload(), T::MAX_SIZE)?)
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
        key.verify_strict(&self.message, &signature)
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
        self.message.get(prefix_len::<T>()..).unwrap_or_default()
    }

    /// The content hash of the record bytes: names this record.
    pub fn payload_hash(&self) -> Hash {
        Hash::of(self.payload())
    }

    /// The envelope's canonical bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing into a Vec cannot fail.
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

/// The envelope as serialized, borrowing the payload.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    version: u16,
    #[serde(with = "crate::encoding::bytes")]
    payload: &'a [u8],
    signer: PublicKey,
    signature: SignatureBytes,
}

impl<T: Record> Serialize for Signed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        EnvelopeRef {
            version: self.version,
            payload: self.payload(),
            signer: self.signer,
            signature: self.signature,
        }
        .serialize(s)
    }
}

/// A payload read straight into a buffer that starts with `T`'s signing prefix.
struct Message<T>(Vec<u8>, PhantomData<fn() -> T>);

impl<'de, T: Record> Deserialize<'de> for Message<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<fn() -> T>);
        impl<'de, T: Record> de::Visitor<'de> for V<T> {
            type Value = Message<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "the bytes of a {}", T::NAME)
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                if v.len() > T::MAX_SIZE {
                    return Err(E::invalid_length(v.len(), &self));
                }
                let mut msg = message_prefix::<T>(v.len());
                msg.extend_from_slice(v);
                Ok(Message(msg, PhantomData))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut msg = message_prefix::<T>(0);
                while let Some(b) = seq.next_element()? {
                    if msg.len() - prefix_len::<T>() >= T::MAX_SIZE {
                        return Err(de::Error::invalid_length(msg.len(), &self));
                    }
                    msg.push(b);
                }
                Ok(Message(msg, PhantomData))
            }
        }
        d.deserialize_byte_buf(V(PhantomData))
    }
}

/// The envelope as deserialized.
#[derive(Deserialize)]
#[serde(bound = "")]
struct EnvelopeOwned<T: Record> {
    version: u16,
    message: Message<T>,
    signer: PublicKey,
    signature: SignatureBytes,
}

impl<'de, T: Record> Deserialize<'de> for Signed<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let e = EnvelopeOwned::<T>::deserialize(d)?;
        Ok(Self {
            version: e.version,
            message: e.message.0,
            signer: e.signer,
            signature: e.signature,
            _record: PhantomData,
        })
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
        let signed = Signed::sign(&note(), &key).unwrap();
        assert_eq!(signed.verify().unwrap(), note());
        let back = Signed::<Note>::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.signer(), key.public());
    }

    #[test]
    fn a_node_opens_only_its_own_records_unchecked() {
        let (key, other) = (Identity::generate(), Identity::generate());
        let signed = Signed::sign(&note(), &key).unwrap();
        assert_eq!(signed.open_own(&key).unwrap(), note());
        assert!(matches!(
            signed.open_own(&other),
            Err(RecordError::BadSignature { .. })
        ));
    }

    #[test]
    fn wrong_domain_is_refused() {
        let key = Identity::generate();
        let signed = Signed::sign(&note(), &key).unwrap();
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
            Signed::sign(&big, &key),
            Err(EncodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_version_is_named() {
        let key = Identity::generate();
        let mut signed = Signed::sign(&note(), &key).unwrap();
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
