//! Membership: the alliance charter, institution and node certificates,
//! revocation lists, and verification of a node's chain.
//!
//! ```text
//! root key ──signs──▶ Charter (self-signed: name, root, bootstrap, defaults)
//!    │
//!    └──signs──▶ InstitutionCert (institution key, roles, validity)
//!                    │
//!                    └──signs──▶ NodeCert (node key = PeerId, roles, validity)
//! ```
//!
//! Every certificate names the charter it belongs to by the charter's id (the
//! hash of its signed bytes), so a certificate from another alliance is
//! refused even if the same root key were reused. The root revokes
//! institutions or nodes; an institution revokes its own nodes. Verification
//! takes `now` from the caller.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::keys::{KeyError, PublicKey};
use crate::signed::{Record, RecordError, Signed};
use crate::time::Timestamp;
use libp2p_identity::PeerId;

/// Longest institution or alliance name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// What a member may do, as a set of roles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Roles(u8);

impl Roles {
    /// Run other members' tasks on local GPUs.
    pub const WORK: Roles = Roles(1);
    /// Submit jobs to the alliance.
    pub const SUBMIT: Roles = Roles(2);
    /// Run a bootstrap (and relay) node.
    pub const BOOTSTRAP: Roles = Roles(4);
    /// No role.
    pub const NONE: Roles = Roles(0);
    /// Every role.
    pub const ALL: Roles = Roles(7);

    const NAMES: [(Roles, &'static str); 3] = [
        (Roles::WORK, "work"),
        (Roles::SUBMIT, "submit"),
        (Roles::BOOTSTRAP, "bootstrap"),
    ];

    /// Whether every role in `other` is in `self`.
    pub const fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    /// The roles of `other` that `self` lacks.
    pub const fn missing(self, other: Roles) -> Roles {
        Roles(other.0 & !self.0)
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Roles in both sets.
    pub const fn intersection(self, other: Roles) -> Roles {
        Roles(self.0 & other.0)
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;
    fn bitor(self, rhs: Roles) -> Roles {
        Roles(self.0 | rhs.0)
    }
}

impl From<Roles> for u8 {
    fn from(r: Roles) -> u8 {
        r.0
    }
}

/// A role byte with bits no role uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role bits {0:#04x}")]
pub struct UnknownRoles(u8);

impl TryFrom<u8> for Roles {
    type Error = UnknownRoles;
    fn try_from(v: u8) -> Result<Self, UnknownRoles> {
        if v & !Roles::ALL.0 != 0 {
            Err(UnknownRoles(v))
        } else {
            Ok(Roles(v))
        }
    }
}

impl fmt::Display for Roles {
    /// `work,submit`; `none` for the empty set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = Self::NAMES
            .iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

/// A role list that names an unknown role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: roles are work, submit and bootstrap, separated by commas")]
pub struct ParseRolesError(String);

impl std::str::FromStr for Roles {
    type Err = ParseRolesError;
    /// Parses `work,submit` (case-insensitive; `all` for every role).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = Roles::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let lower = part.to_ascii_lowercase();
            if lower == "all" {
                roles = Roles::ALL;
                continue;
            }
            let role = Self::NAMES
                .iter()
                .find(|(_, n)| *n == lower)
                .map(|(r, _)| *r)
                .ok_or_else(|| ParseRolesError(part.to_owned()))?;
            roles = roles | role;
        }
        Ok(roles)
    }
}

/// Network-wide defaults the charter fixes for every member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CharterDefaults {
    /// How long a GPU advert stays valid after it is issued, in seconds.
    pub advert_ttl_secs: u32,
    /// Replicas per task when a job does not say.
    pub default_redundancy: u8,
    /// Longest validity an institution may give a node certificate, in days.
    pub max_node_cert_days: u32,
}

impl Default for CharterDefaults {
    fn default() -> Self {
        Self {
            advert_ttl_secs: 120,
            default_redundancy: 2,
            max_node_cert_days: 90,
        }
    }
}

/// The founding record of an alliance, signed by its own root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charter {
    /// Human-readable name, e.g. "Alliance of Northern Universities".
    pub name: String,
    /// The root key: admits institutions and signs network-wide revocations.
    pub root: PublicKey,
    /// Multiaddresses of the bootstrap nodes the alliance runs.
    pub bootstrap: Vec<String>,
    /// Network-wide defaults.
    pub defaults: CharterDefaults,
    /// When the charter was made.
    pub created_at: Timestamp,
}

impl Charter {
    /// A charter for `root`.
    pub fn new(
        name: impl Into<String>,
        root: PublicKey,
        bootstrap: Vec<String>,
        defaults: CharterDefaults,
        created_at: Timestamp,
    ) -> Self {
        Self {
            name: name.into(),
            root,
            bootstrap,
            defaults,
            created_at,
        }
    }
}

impl Record for Charter {
    const NAME: &'static str = "charter";
    const CONTEXT: &'static str = "charter/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 8 * 1024;
}

/// The root admits an institution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstitutionCert {
    /// Id of the charter this certificate belongs to.
    pub alliance: Hash,
    /// The institution's name, e.g. "University of Example".
    pub name: String,
    /// The institution's key: signs its nodes' certificates.
    pub key: PublicKey,
    /// Roles its nodes may hold.
    pub roles: Roles,
    /// Valid from (inclusive).
    pub not_before: Timestamp,
    /// Valid until (exclusive).
    pub not_after: Timestamp,
}

impl InstitutionCert {
    /// A certificate valid from `now` for `days` days.
    pub fn new(
        charter: &TrustedCharter,
        name: impl Into<String>,
        key: PublicKey,
        roles: Roles,
        now: Timestamp,
        days: u64,
    ) -> Self {
        Self {
            alliance: charter.id,
            name: name.into(),
            key,
            roles,
            not_before: now,
            not_after: now.saturating_add_days(days),
        }
    }
}

impl Record for InstitutionCert {
    const NAME: &'static str = "institution certificate";
    const CONTEXT: &'static str = "institution-cert/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 1024;
}

/// An institution admits one of its nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCert {
    /// Id of the charter this certificate belongs to.
    pub alliance: Hash,
    /// The institution key that signs this certificate.
    pub institution: PublicKey,
    /// The node's key (its PeerId).
    pub node: PublicKey,
    /// Roles of this node: a subset of the institution's.
    pub roles: Roles,
    /// Valid from (inclusive).
    pub not_before: Timestamp,
    /// Valid until (exclusive).
    pub not_after: Timestamp,
}

impl NodeCert {
    /// A certificate valid from `now` for `days` days.
    pub fn new(
        charter: &TrustedCharter,
        institution: PublicKey,
        node: PublicKey,
        roles: Roles,
        now: Timestamp,
        days: u64,
    ) -> Self {
        Self {
            alliance: charter.id,
            institution,
            node,
            roles,
            not_before: now,
            not_after: now.saturating_add_days(days),
        }
    }
}

impl Record for NodeCert {
    const NAME: &'static str = "node certificate";
    const CONTEXT: &'static str = "node-cert/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 512;
}

/// One revoked key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The institution or node key no longer trusted.
    pub key: PublicKey,
    /// Why, for the logs.
    pub reason: String,
    /// When it was revoked.
    pub at: Timestamp,
}

/// A revocation list. The root's list may name any key; an institution's
/// list counts only for node certificates that institution signed. Each list
/// is complete: a newer sequence number from the same signer replaces the
/// older list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    /// Id of the charter this list belongs to.
    pub alliance: Hash,
    /// Increases with every list the signer issues.
    pub sequence: u64,
    /// When this list was issued.
    pub issued_at: Timestamp,
    /// The revoked keys.
    pub revoked: Vec<Revoked>,
}

impl Record for Revocations {
    const NAME: &'static str = "revocation list";
    const CONTEXT: &'static str = "revocations/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 256 * 1024;
}

/// A charter whose self-signature has been checked: the trust anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedCharter {
    /// The charter's id: the hash of its signed bytes.
    pub id: Hash,
    /// The charter.
    pub charter: Charter,
    /// The signed form, to pass on to others.
    pub signed: Signed<Charter>,
}

impl Signed<Charter> {
    /// Checks that the charter is signed by the root key it names.
    pub fn verify_charter(&self) -> Result<TrustedCharter, ChainError> {
        let charter = self.verify().map_err(ChainError::Record)?;
        if self.signer() != charter.root {
            return Err(ChainError::CharterNotSelfSigned {
                signer: self.signer(),
                root: charter.root,
            });
        }
        check_name("charter", &charter.name)?;
        Ok(TrustedCharter {
            id: self.payload_hash(),
            charter,
            signed: self.clone(),
        })
    }
}

/// Why a membership chain was refused. Each variant names the failed check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error(transparent)]
    Record(RecordError),
    #[error("the charter is signed by {signer}, not by the root key {root} it names")]
    CharterNotSelfSigned { signer: PublicKey, root: PublicKey },
    #[error(
        "{what} belongs to alliance {found}, not to this charter ({expected}): it was issued by another alliance"
    )]
    CharterMismatch {
        what: &'static str,
        expected: Hash,
        found: Hash,
    },
    #[error(
        "the institution certificate is signed by {signer}, which is not this alliance's root key {root}"
    )]
    WrongRoot { signer: PublicKey, root: PublicKey },
    #[error(
        "the node certificate is signed by {signer}, but the institution certificate is for {institution:?} ({institution_key})"
    )]
    WrongInstitution {
        signer: PublicKey,
        institution: String,
        institution_key: PublicKey,
    },
    #[error("{what} is not valid until {not_before} (now {now})")]
    NotYetValid {
        what: &'static str,
        not_before: Timestamp,
        now: Timestamp,
    },
    #[error("{what} expired at {not_after} (now {now}); ask its issuer for a new one")]
    Expired {
        what: &'static str,
        not_after: Timestamp,
        now: Timestamp,
    },
    #[error("{what} of {subject} was revoked at {at} by {by}: {reason}")]
    Revoked {
        what: &'static str,
        /// Who was revoked: the node's PeerId, or the institution's name and key.
        subject: String,
        /// Who revoked: the alliance root or the institution.
        by: String,
        at: Timestamp,
        reason: String,
    },
    #[error(
        "the node certificate grants {missing}, which institution {institution:?} was not admitted for"
    )]
    RolesExceedInstitution { institution: String, missing: Roles },
    #[error("the certificate chain lacks the role {missing} (it grants {granted})")]
    MissingRole { missing: Roles, granted: Roles },
    #[error("{what} has an unusable name: {why}")]
    BadName {
        what: &'static str,
        why: &'static str,
    },
    #[error("node key: {0}")]
    Key(#[from] KeyError),
    #[error(
        "the revocation list is signed by {signer}, which is neither the root nor an institution of this alliance"
    )]
    UnknownRevoker { signer: PublicKey },
    #[error(
        "revocation list {sequence} from {signer} is not newer than the list already held ({held})"
    )]
    StaleRevocations {
        signer: PublicKey,
        sequence: u64,
        held: u64,
    },
}

fn check_name(what: &'static str, name: &str) -> Result<(), ChainError> {
    let why = if name.trim().is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 128 bytes"
    } else if name.chars().any(char::is_control) {
        "it contains control characters"
    } else {
        return Ok(());
    };
    Err(ChainError::BadName { what, why })
}

fn check_window(
    what: &'static str,
    not_before: Timestamp,
    not_after: Timestamp,
    now: Timestamp,
) -> Result<(), ChainError> {
    if now < not_before {
        return Err(ChainError::NotYetValid {
            what,
            not_before,
            now,
        });
    }
    if now >= not_after {
        return Err(ChainError::Expired {
            what,
            not_after,
            now,
        });
    }
    Ok(())
}

fn check_alliance(
    what: &'static str,
    charter: &TrustedCharter,
    found: Hash,
) -> Result<(), ChainError> {
    if found != charter.id {
        return Err(ChainError::CharterMismatch {
            what,
            expected: charter.id,
            found,
        });
    }
    Ok(())
}

/// An institution certificate whose root signature, alliance and name hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Institution {
    /// The verified certificate.
    pub cert: InstitutionCert,
}

impl Signed<InstitutionCert> {
    /// Checks signature, root, alliance, validity window and revocation.
    pub fn verify_institution(
        &self,
        charter: &TrustedCharter,
        revocations: &RevocationSet,
        now: Timestamp,
    ) -> Result<Institution, ChainError> {
        const WHAT: &str = "the institution certificate";
        let cert = self.verify().map_err(ChainError::Record)?;
        if self.signer() != charter.charter.root {
            return Err(ChainError::WrongRoot {
                signer: self.signer(),
                root: charter.charter.root,
            });
        }
        check_alliance(WHAT, charter, cert.alliance)?;
        check_name(WHAT, &cert.name)?;
        check_window(WHAT, cert.not_before, cert.not_after, now)?;
        if let Some((_, r)) = revocations.revoked(&cert.key, None) {
            return Err(ChainError::Revoked {
                what: WHAT,
                subject: format!("{:?} ({})", cert.name, cert.key),
                by: "the alliance root".into(),
                at: r.at,
                reason: r.reason.clone(),
            });
        }
        Ok(Institution { cert })
    }
}

/// The certificates a node presents: its institution's and its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chain {
    /// Root → institution.
    pub institution: Signed<InstitutionCert>,
    /// Institution → node.
    pub node: Signed<NodeCert>,
}

/// A member whose chain verified: who it is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node's key.
    pub node_key: PublicKey,
    /// The node's libp2p identity.
    pub peer_id: PeerId,
    /// The institution's name.
    pub institution_name: String,
    /// The institution's key.
    pub institution_key: PublicKey,
    /// Roles the node holds (the node certificate's, within the institution's).
    pub roles: Roles,
    /// When the chain stops being valid (the earlier of the two expiries).
    pub valid_until: Timestamp,
}

impl Chain {
    /// A chain from its two certificates.
    pub fn new(institution: Signed<InstitutionCert>, node: Signed<NodeCert>) -> Self {
        Self { institution, node }
    }

    /// Checks the whole chain for `charter` at `now`, and that the node
    /// holds every role in `required`.
    pub fn verify(
        &self,
        charter: &TrustedCharter,
        revocations: &RevocationSet,
        now: Timestamp,
        required: Roles,
    ) -> Result<Member, ChainError> {
        const WHAT: &str = "the node certificate";
        let inst = self
            .institution
            .verify_institution(charter, revocations, now)?
            .cert;
        let node = self.node.verify().map_err(ChainError::Record)?;
        if self.node.signer() != inst.key || node.institution != inst.key {
            return Err(ChainError::WrongInstitution {
                signer: self.node.signer(),
                institution: inst.name,
                institution_key: inst.key,
            });
        }
        check_alliance(WHAT, charter, node.alliance)?;
        check_window(WHAT, node.not_before, node.not_after, now)?;
        if let Some((by, r)) = revocations.revoked(&node.node, Some(&inst.key)) {
            return Err(ChainError::Revoked {
                what: WHAT,
                subject: node
                    .node
                    .peer_id()
                    .map_or_else(|_| node.node.to_string(), |p| format!("node {p}")),
                by: if by == charter.charter.root {
                    "the alliance root".into()
                } else {
                    format!("institution {:?}", inst.name)
                },
                at: r.at,
                reason: r.reason.clone(),
            });
        }
        let beyond = inst.roles.missing(node.roles);
        if !beyond.is_empty() {
            return Err(ChainError::RolesExceedInstitution {
                institution: inst.name,
                missing: beyond,
            });
        }
        if !node.roles.contains(required) {
            return Err(ChainError::MissingRole {
                missing: node.roles.missing(required),
                granted: node.roles,
            });
        }
        node.node.verifying_key()?;
        Ok(Member {
            node_key: node.node,
            peer_id: node.node.peer_id()?,
            institution_name: inst.name,
            institution_key: inst.key,
            roles: node.roles,
            valid_until: inst.not_after.min(node.not_after),
        })
    }
}

/// The revocation lists a node holds: the newest list of each signer.
#[derive(Debug, Clone)]
pub struct RevocationSet {
    alliance: Hash,
    root: PublicKey,
    lists: BTreeMap<PublicKey, (u64, Vec<Revoked>)>,
}

impl RevocationSet {
    /// An empty set for `charter`.
    pub fn new(charter: &TrustedCharter) -> Self {
        Self {
            alliance: charter.id,
            root: charter.charter.root,
            lists: BTreeMap::new(),
        }
    }

    /// Verifies `list` and keeps it if it is newer than the one held from
    /// the same signer. `institution` is the signer's verified institution
    /// certificate, needed for every signer but the root.
    pub fn insert(
        &mut self,
        list: &Signed<Revocations>,
        institution: Option<&Institution>,
    ) -> Result<(), ChainError> {
        let record = list.verify().map_err(ChainError::Record)?;
        let signer = list.signer();
        let known_institution = institution.is_some_and(|i| i.cert.key == signer);
        if signer != self.root && !known_institution {
            return Err(ChainError::UnknownRevoker { signer });
        }
        if record.alliance != self.alliance {
            return Err(ChainError::CharterMismatch {
                what: "the revocation list",
                expected: self.alliance,
                found: record.alliance,
            });
        }
        if let Some((held, _)) = self.lists.get(&signer)
            && *held >= record.sequence
        {
            return Err(ChainError::StaleRevocations {
                signer,
                sequence: record.sequence,
                held: *held,
            });
        }
        self.lists.insert(signer, (record.sequence, record.revoked));
        Ok(())
    }

    /// Every signer whose list is held, with the list's sequence number.
    pub fn held(&self) -> Vec<(PublicKey, u64)> {
        self.lists.iter().map(|(k, (seq, _))| (*k, *seq)).collect()
    }

    /// The sequence number held for `signer`, if any.
    pub fn sequence(&self, signer: &PublicKey) -> Option<u64> {
        self.lists.get(signer).map(|(seq, _)| *seq)
    }

    /// Whether `key` is revoked: by the root, or (for a node key) by the
    /// institution `certified_by` that signed its certificate.
    pub fn revoked(
        &self,
        key: &PublicKey,
        certified_by: Option<&PublicKey>,
    ) -> Option<(PublicKey, &Revoked)> {
        let in_list = |signer: &PublicKey| {
            self.lists
                .get(signer)
                .and_then(|(_, list)| list.iter().find(|r| r.key == *key))
                .map(|r| (*signer, r))
        };
        in_list(&self.root).or_else(|| certified_by.and_then(in_list))
    }
}
