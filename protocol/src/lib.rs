//! Alliance protocol: the records nodes exchange and how they are signed.
//!
//! This crate is pure data. It holds no sockets, no runtime, no database and
//! no GPU, so anything can depend on it and its tests run in milliseconds
//! (a test in `alliance-tests` fails if tokio, the libp2p swarm, sled or wgpu
//! ever enter its dependency tree).
//!
//! # Layout
//!
//! - [`keys`]: a node's ed25519 [`Identity`](keys::Identity), which is both its
//!   libp2p `PeerId` and the key that signs its records; [`PublicKey`](keys::PublicKey)
//!   with strict validation; key files of mode 0600.
//! - [`hash`]: the blake3 content [`Hash`](hash::Hash) of kernels, inputs and outputs.
//! - [`encoding`]: the one canonical encoding every record and message uses.
//! - [`signed`]: the generic [`Signed<T>`](signed::Signed) wrapper with a
//!   domain-separation context per record type.
//! - [`cert`]: the [`Charter`](cert::Charter), institution and node
//!   certificates, revocation lists, and chain verification.
//! - [`advert`]: signed GPU adverts.
//! - [`task`]: task specifications and offers, receipts, checkpoints and credits.
//! - [`wire`]: the messages of the node protocols, each with a size cap
//!   enforced before allocation.
//! - [`armor`]: the text form of records kept in files (charters, certificates).
//!
//! # Example
//!
//! ```
//! use alliance_protocol::cert::{Charter, CharterDefaults, InstitutionCert, NodeCert, Roles, Chain, RevocationSet};
//! use alliance_protocol::keys::Identity;
//! use alliance_protocol::signed::Signed;
//! use alliance_protocol::time::Timestamp;
//!
//! let root = Identity::generate();
//! let now = Timestamp::from_secs(1_800_000_000);
//! let charter = Charter::new("Example Alliance", root.public(), vec![], CharterDefaults::default(), now);
//! let charter = Signed::sign(&charter, &root).unwrap();
//! let trusted = charter.verify_charter().unwrap();
//!
//! let university = Identity::generate();
//! let inst = InstitutionCert::new(&trusted, "University A", university.public(), Roles::WORK | Roles::SUBMIT, now, 365);
//! let inst = Signed::sign(&inst, &root).unwrap();
//!
//! let node = Identity::generate();
//! let cert = NodeCert::new(&trusted, university.public(), node.public(), Roles::WORK, now, 30);
//! let cert = Signed::sign(&cert, &university).unwrap();
//!
//! let member = Chain::new(inst, cert)
//!     .verify(&trusted, &RevocationSet::new(&trusted), now, Roles::WORK)
//!     .unwrap();
//! assert_eq!(member.institution_name, "University A");
//! assert_eq!(member.peer_id, node.peer_id());
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod advert;
pub mod armor;
pub mod cert;
pub mod encoding;
pub mod hash;
pub mod keys;
pub mod signed;
pub mod task;
pub mod time;
pub mod wire;

pub use hash::Hash;
pub use keys::{Identity, PublicKey};
pub use libp2p_identity::PeerId;
pub use signed::{Record, Signed};
pub use time::Timestamp;
