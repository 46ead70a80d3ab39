//! Node identities and public keys.
//!
//! A node has exactly one ed25519 key. It is the node's libp2p identity (its
//! [`PeerId`] is derived from the public half) and the key that signs every
//! record the node makes. Roots and institutions use the same key type.
//!
//! Secret keys live in a key file of mode 0600 (see [`Identity::load`]).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

/// The first line of a key file: names the format and its version.
pub const KEY_FILE_HEADER: &str = "alliance-ed25519-secret-key-v1";

/// An ed25519 public key as it appears in records: 32 bytes, shown as hex.
///
/// Holding a `PublicKey` says nothing about its validity; [`PublicKey::verifying_key`]
/// applies the strict checks (canonical encoding, on the curve, not of small
/// order) before any signature is checked against it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(#[serde(with = "crate::hash::bytes32")] [u8; 32]);

/// Why a public key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("public key {0} is not canonically encoded (its y coordinate is not reduced)")]
    NonCanonical(String),
    #[error("public key {0} is not a point on the ed25519 curve")]
    NotOnCurve(String),
    #[error("public key {0} has small order: it would accept forged signatures")]
    SmallOrder(String),
    #[error("not a public key: expected 64 hex digits, got {0:?}")]
    BadHex(String),
    #[error("peer id {0} does not carry an ed25519 key (alliance nodes use ed25519 identities)")]
    NotEd25519PeerId(String),
}

impl PublicKey {
    /// Wraps raw key bytes without checking them.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key for signature checks, after the strict checks: the encoding
    /// is canonical, the point is on the curve and is not of small order.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        if !is_canonical_point_encoding(&self.0) {
            return Err(KeyError::NonCanonical(self.to_string()));
        }
        let key = VerifyingKey::from_bytes(&self.0)
            .map_err(|_| KeyError::NotOnCurve(self.to_string()))?;
        if key.is_weak() {
            return Err(KeyError::SmallOrder(self.to_string()));
        }
        Ok(key)
    }

    /// The libp2p peer id of the node with this key.
    pub fn peer_id(&self) -> Result<PeerId, KeyError> {
        let key = libp2p_identity::ed25519::PublicKey::try_from_bytes(&self.0)
            .map_err(|_| KeyError::NotOnCurve(self.to_string()))?;
        Ok(libp2p_identity::PublicKey::from(key).to_peer_id())
    }

    /// The ed25519 key inside a peer id (ed25519 peer ids embed the key).
    pub fn from_peer_id(peer: &PeerId) -> Result<Self, KeyError> {
        let not_ed = || KeyError::NotEd25519PeerId(peer.to_string());
        // A peer id is a multihash: varint code, varint length, digest. Code 0
        // is the identity hash, whose digest is the protobuf-encoded key; an
        // ed25519 key is 36 bytes, so both varints are one byte.
        let bytes = peer.to_bytes();
        let digest = match bytes.as_slice() {
            [0, len, digest @ ..] if usize::from(*len) == digest.len() => digest,
            _ => return Err(not_ed()),
        };
        // The protobuf of an ed25519 key: field 1 (key type) = 1, field 2
        // (data) = 32 bytes. Read directly, without the curve-point
        // decompression a full decode costs (this runs several times per
        // task); `verifying_key` checks the point before any signature is
        // checked against it.
        match digest {
            [0x08, 0x01, 0x12, 0x20, key @ ..] => {
                <[u8; 32]>::try_from(key).map(Self).map_err(|_| not_ed())
            }
            _ => Err(not_ed()),
        }
    }
}

/// Rejects the encodings that decompress to a valid point but are not the
/// encoding that point compresses to: `y >= p`, and a set sign bit when
/// `x = 0` (y = 1 or y = p - 1).
fn is_canonical_point_encoding(bytes: &[u8; 32]) -> bool {
    // p = 2^255 - 19, little-endian: ed ff .. ff 7f.
    let top = bytes[31] & 0x7f;
    let middle_all_ff = bytes[1..31].iter().all(|&b| b == 0xff);
    if top == 0x7f && middle_all_ff && bytes[0] >= 0xed {
        return false; // y >= p
    }
    let sign = bytes[31] & 0x80 != 0;
    if sign {
        let y_is_one = bytes[0] == 1 && bytes[1..31].iter().all(|&b| b == 0) && top == 0;
        let y_is_minus_one = bytes[0] == 0xec && middle_all_ff && top == 0x7f;
        if y_is_one || y_is_minus_one {
            return false; // x = 0 has no negative
        }
    }
    true
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", hex::encode(&self.0[..6]))
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Parses 64 hex digits, or a peer id (`12D3Koo…`) of an ed25519 node.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let mut out = [0u8; 32];
        if hex::decode_to_slice(s, &mut out).is_ok() {
            return Ok(Self(out));
        }
        match s.parse::<PeerId>() {
            Ok(peer) => Self::from_peer_id(&peer),
            Err(_) => Err(KeyError::BadHex(s.chars().take(80).collect())),
        }
    }
}

/// A secret signing key: a node's, an institution's or an alliance root's.
pub struct Identity {
    key: SigningKey,
}

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} already exists; refusing to overwrite a key (move it away first if you really mean to replace it)"
    )]
    Exists { path: PathBuf },
    #[error(
        "key file {path} has mode {mode:04o}, so others can read it; make it private with `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "key file {path} is not an alliance key file: {why} (expected a line `{KEY_FILE_HEADER}` followed by 64 hex digits)"
    )]
    Format { path: PathBuf, why: &'static str },
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

impl Identity {
    /// A fresh key from the operating system's random source.
    ///
    /// # Panics
    /// Never in practice: only if the OS has no random source at all, when
    /// no key can be made safely. Use [`Identity::try_generate`] to handle that.
    #[allow(clippy::expect_used)]
    pub fn generate() -> Self {
        Self::try_generate().expect("the operating system random source failed")
    }

    /// A fresh key, or the error from the operating system's random source.
    pub fn try_generate() -> Result<Self, KeyFileError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyFileError::Random(e.to_string()))?;
        let id = Self::from_secret_bytes(seed);
        seed.fill(0);
        Ok(id)
    }

    /// The identity with this 32-byte secret seed.
    pub fn from_secret_bytes(seed: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.to_libp2p_keypair().public().to_peer_id()
    }

    /// The same key as a libp2p keypair, for the swarm's identity.
    #[allow(clippy::expect_used)]
    pub fn to_libp2p_keypair(&self) -> libp2p_identity::Keypair {
        let secret = libp2p_identity::ed25519::SecretKey::try_from_bytes(self.key.to_bytes())
            .expect("a 32-byte ed25519 seed is always a valid libp2p secret key");
        libp2p_identity::Keypair::from(libp2p_identity::ed25519::Keypair::from(secret))
    }

    /// A raw ed25519 signature over `message`. Records use [`crate::Signed`],
    /// which adds domain separation; this is for callers that need the bare
    /// primitive (benchmarks, foreign formats).
    pub fn sign_raw(&self, message: &[u8]) -> ed25519_dalek::Signature {
        self.key.sign(message)
    }

    /// The text of a key file holding this key.
    fn to_file_text(&self) -> String {
        format!(
            "{KEY_FILE_HEADER}\n{}\n# public key {}\n# peer id {}\n",
            hex::encode(self.key.to_bytes()),
            self.public(),
            self.peer_id()
        )
    }

    /// Writes a new key file with mode 0600. Refuses to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: path.to_owned(),
                }
            } else {
                KeyFileError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let write = |source| KeyFileError::Write {
            path: path.to_owned(),
            source,
        };
        file.write_all(self.to_file_text().as_bytes())
            .map_err(write)?;
        file.sync_all().map_err(write)
    }

    /// Reads a key file, refusing one that others can read or that is not in
    /// the key file format.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let read = |source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyFileError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let format = |why| KeyFileError::Format {
            path: path.to_owned(),
            why,
        };
        if meta.len() > 4096 {
            return Err(format("the file is far too large"));
        }
        let text = fs::read(path).map_err(read)?;
        let text = std::str::from_utf8(&text).map_err(|_| format("it is not text"))?;
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(format("the first line is not the format header"));
        }
        let secret = lines
            .next()
            .ok_or(format("the secret key line is missing"))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(secret, &mut seed)
            .map_err(|_| format("the secret key is not 64 hex digits"))?;
        if lines.next().is_some() {
            return Err(format("there is text after the secret key"));
        }
        let id = Self::from_secret_bytes(seed);
        seed.fill(0);
        Ok(id)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_round_trips_through_public_key() {
        let id = Identity::generate();
        let peer = id.peer_id();
        assert_eq!(id.public().peer_id().unwrap(), peer);
        assert_eq!(PublicKey::from_peer_id(&peer).unwrap(), id.public());
        assert_eq!(
            peer.to_string().parse::<PublicKey>().unwrap(),
            id.public(),
            "a peer id is accepted wherever a public key is asked for"
        );
        assert_eq!(
            id.public().to_string().parse::<PublicKey>().unwrap(),
            id.public()
        );
    }

    #[test]
    fn peer_ids_without_an_ed25519_key_are_refused() {
        // Identity multihashes (code 0, length, digest) of 32 bytes that
        // are no key, and of a key of another type than ed25519.
        let mut random = vec![0, 32];
        random.extend_from_slice(&[7; 32]);
        let mut other = vec![0, 36, 0x08, 0x02, 0x12, 0x20];
        other.extend_from_slice(&[7; 32]);
        for bytes in [random, other] {
            let peer = PeerId::from_bytes(&bytes).unwrap();
            assert!(PublicKey::from_peer_id(&peer).is_err(), "{peer}");
        }
    }

    #[test]
    fn generated_keys_pass_strict_checks() {
        for _ in 0..32 {
            Identity::generate().public().verifying_key().unwrap();
        }
    }

    #[test]
    fn small_order_keys_are_refused() {
        // The identity point (y = 1) and the point of order 2 (y = -1).
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            PublicKey::from_bytes(identity).verifying_key(),
            Err(KeyError::SmallOrder(_))
        ));
        let mut minus_one = [0xffu8; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        assert!(matches!(
            PublicKey::from_bytes(minus_one).verifying_key(),
            Err(KeyError::SmallOrder(_))
        ));
    }

    #[test]
    fn non_canonical_encodings_are_refused() {
        // Every y in [p, 2^255) with either sign, plus negative zero x.
        let mut refused = 0;
        for low in 0xedu8..=0xff {
            for sign in [0u8, 0x80] {
                let mut b = [0xffu8; 32];
                b[0] = low;
                b[31] = 0x7f | sign;
                assert!(!is_canonical_point_encoding(&b));
                assert!(PublicKey::from_bytes(b).verifying_key().is_err());
                refused += 1;
            }
        }
        assert_eq!(refused, 19 * 2);
        let mut neg_zero = [0u8; 32];
        neg_zero[0] = 1;
        neg_zero[31] = 0x80;
        assert!(matches!(
            PublicKey::from_bytes(neg_zero).verifying_key(),
            Err(KeyError::NonCanonical(_))
        ));
    }

    #[test]
    fn key_file_round_trip_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let id = Identity::generate();
        id.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert_eq!(Identity::load(&path).unwrap().public(), id.public());
        assert!(matches!(id.save(&path), Err(KeyFileError::Exists { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        Identity::generate().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Permissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn key_file_in_wrong_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (text, why) in [
            ("hello\n", "header"),
            ("alliance-ed25519-secret-key-v1\nnothex\n", "64 hex"),
            ("alliance-ed25519-secret-key-v1\n", "missing"),
            (
                "alliance-ed25519-secret-key-v1\n0000000000000000000000000000000000000000000000000000000000000000\nmore\n",
                "after",
            ),
        ] {
            let path = dir.path().join("bad.key");
            let _ = fs::remove_file(&path);
            let mut options = fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            options
                .open(&path)
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let err = Identity::load(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::Format { .. }), "{err}");
            assert!(err.to_string().contains(why), "{err} should mention {why}");
        }
    }
}
