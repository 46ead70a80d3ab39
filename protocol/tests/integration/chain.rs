//! Membership chain verification: every check, with the clock moved by hand.

use alliance_protocol::advert::{AdvertError, GpuAdvert};
use alliance_protocol::cert::{
    Chain, ChainError, Charter, CharterDefaults, InstitutionCert, NodeCert, RevocationSet,
    Revocations, Revoked, Roles, TrustedCharter,
};
use alliance_protocol::time::DAY_SECS;
use alliance_protocol::{Identity, Signed, Timestamp};

const T0: u64 = 1_800_000_000;

fn at(days: u64) -> Timestamp {
    Timestamp::from_secs(T0 + days * DAY_SECS)
}

struct Alliance {
    root: Identity,
    charter: TrustedCharter,
}

impl Alliance {
    fn new(name: &str) -> Self {
        let root = Identity::generate();
        let charter = Charter::new(
            name,
            root.public(),
            vec![],
            CharterDefaults::default(),
            at(0),
        );
        let charter = Signed::sign(&charter, &root)
            .unwrap()
            .verify_charter()
            .unwrap();
        Self { root, charter }
    }

    fn admit(
        &self,
        name: &str,
        key: &Identity,
        roles: Roles,
        days: u64,
    ) -> Signed<InstitutionCert> {
        let cert = InstitutionCert::new(&self.charter, name, key.public(), roles, at(0), days);
        Signed::sign(&cert, &self.root).unwrap()
    }

    fn issue(&self, inst: &Identity, node: &Identity, roles: Roles, days: u64) -> Signed<NodeCert> {
        let cert = NodeCert::new(
            &self.charter,
            inst.public(),
            node.public(),
            roles,
            at(0),
            days,
        );
        Signed::sign(&cert, inst).unwrap()
    }

    fn revocations(&self, signer: &Identity, seq: u64, keys: &[&Identity]) -> Signed<Revocations> {
        let list = Revocations {
            alliance: self.charter.id,
            sequence: seq,
            issued_at: at(1),
            revoked: keys
                .iter()
                .map(|k| Revoked {
                    key: k.public(),
                    reason: "key lost".into(),
                    at: at(1),
                })
                .collect(),
        };
        Signed::sign(&list, signer).unwrap()
    }

    fn none(&self) -> RevocationSet {
        RevocationSet::new(&self.charter)
    }
}

struct Fixture {
    alliance: Alliance,
    inst_key: Identity,
    node_key: Identity,
    chain: Chain,
}

fn fixture() -> Fixture {
    let alliance = Alliance::new("Test Alliance");
    let inst_key = Identity::generate();
    let node_key = Identity::generate();
    let inst = alliance.admit("University A", &inst_key, Roles::WORK | Roles::SUBMIT, 365);
    let node = alliance.issue(&inst_key, &node_key, Roles::WORK, 30);
    Fixture {
        chain: Chain::new(inst, node),
        alliance,
        inst_key,
        node_key,
    }
}

#[test]
fn valid_chain_names_the_member() {
    let f = fixture();
    let m = f
        .chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap();
    assert_eq!(m.peer_id, f.node_key.peer_id());
    assert_eq!(m.institution_name, "University A");
    assert_eq!(m.institution_key, f.inst_key.public());
    assert_eq!(m.roles, Roles::WORK);
    assert_eq!(m.valid_until, at(30));
}

#[test]
fn expired_and_not_yet_valid() {
    let f = fixture();
    let c = &f.alliance.charter;
    let r = f.alliance.none();
    // The node certificate lapses after 30 days, the institution's after 365.
    let err = f.chain.verify(c, &r, at(30), Roles::WORK).unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Expired {
                what: "the node certificate",
                ..
            }
        ),
        "{err}"
    );
    let err = f.chain.verify(c, &r, at(400), Roles::WORK).unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Expired {
                what: "the institution certificate",
                ..
            }
        ),
        "{err}"
    );
    let err = f
        .chain
        .verify(c, &r, Timestamp::from_secs(T0 - 1), Roles::WORK)
        .unwrap_err();
    assert!(matches!(err, ChainError::NotYetValid { .. }), "{err}");
    assert!(err.to_string().contains("not valid until"));
}

#[test]
fn missing_role_and_roles_beyond_the_institution() {
    let f = fixture();
    let err = f
        .chain
        .verify(
            &f.alliance.charter,
            &f.alliance.none(),
            at(1),
            Roles::SUBMIT,
        )
        .unwrap_err();
    assert_eq!(
        err,
        ChainError::MissingRole {
            missing: Roles::SUBMIT,
            granted: Roles::WORK
        }
    );
    // The institution may not grant a role it was not admitted for.
    let node = f
        .alliance
        .issue(&f.inst_key, &f.node_key, Roles::WORK | Roles::BOOTSTRAP, 30);
    let chain = Chain::new(f.chain.institution.clone(), node);
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::NONE)
        .unwrap_err();
    assert!(
        matches!(err, ChainError::RolesExceedInstitution { missing, .. } if missing == Roles::BOOTSTRAP),
        "{err}"
    );
}

#[test]
fn wrong_root_and_other_alliance() {
    let f = fixture();
    let other = Alliance::new("Other Alliance");
    // Our institution certificate checked against another alliance's charter.
    let err = f
        .chain
        .verify(&other.charter, &other.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(matches!(err, ChainError::WrongRoot { .. }), "{err}");
    // A certificate signed by our root but naming another charter.
    let mut cert = InstitutionCert::new(
        &other.charter,
        "Sneaky U",
        f.inst_key.public(),
        Roles::WORK,
        at(0),
        10,
    );
    cert.alliance = other.charter.id;
    let foreign = Signed::sign(&cert, &f.alliance.root).unwrap();
    let chain = Chain::new(foreign, f.chain.node.clone());
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(matches!(err, ChainError::CharterMismatch { .. }), "{err}");
    assert!(err.to_string().contains("another alliance"));
    // A node certificate from another alliance under a genuine institution cert.
    let node = NodeCert::new(
        &other.charter,
        f.inst_key.public(),
        f.node_key.public(),
        Roles::WORK,
        at(0),
        10,
    );
    let chain = Chain::new(
        f.chain.institution.clone(),
        Signed::sign(&node, &f.inst_key).unwrap(),
    );
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::CharterMismatch {
                what: "the node certificate",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn charter_must_be_self_signed() {
    let root = Identity::generate();
    let other = Identity::generate();
    let charter = Charter::new(
        "X",
        root.public(),
        vec![],
        CharterDefaults::default(),
        at(0),
    );
    let err = Signed::sign(&charter, &other)
        .unwrap()
        .verify_charter()
        .unwrap_err();
    assert!(
        matches!(err, ChainError::CharterNotSelfSigned { .. }),
        "{err}"
    );
}

#[test]
fn node_cert_signed_by_another_institution() {
    let f = fixture();
    let other_inst = Identity::generate();
    // Another (even admitted) institution signs a certificate for our node,
    // presented under our institution's certificate.
    let node = f.alliance.issue(&other_inst, &f.node_key, Roles::WORK, 30);
    let chain = Chain::new(f.chain.institution.clone(), node);
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(matches!(err, ChainError::WrongInstitution { .. }), "{err}");
    // A node certificate that names our institution but is signed by another.
    let cert = NodeCert::new(
        &f.alliance.charter,
        f.inst_key.public(),
        f.node_key.public(),
        Roles::WORK,
        at(0),
        30,
    );
    let chain = Chain::new(
        f.chain.institution.clone(),
        Signed::sign(&cert, &other_inst).unwrap(),
    );
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(matches!(err, ChainError::WrongInstitution { .. }), "{err}");
}

#[test]
fn revoked_by_root_or_by_institution() {
    let f = fixture();
    let a = &f.alliance;
    // The root revokes the institution.
    let mut set = a.none();
    set.insert(&a.revocations(&a.root, 1, &[&f.inst_key]), None)
        .unwrap();
    let err = f
        .chain
        .verify(&a.charter, &set, at(2), Roles::WORK)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Revoked {
                what: "the institution certificate",
                ..
            }
        ),
        "{err}"
    );
    // The institution revokes its node.
    let inst = f
        .chain
        .institution
        .verify_institution(&a.charter, &a.none(), at(1))
        .unwrap();
    let mut set = a.none();
    set.insert(&a.revocations(&f.inst_key, 1, &[&f.node_key]), Some(&inst))
        .unwrap();
    let err = f
        .chain
        .verify(&a.charter, &set, at(2), Roles::WORK)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Revoked {
                what: "the node certificate",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("key lost"));
}

#[test]
fn an_institution_cannot_revoke_another_institutions_node() {
    let f = fixture();
    let a = &f.alliance;
    let rival = Identity::generate();
    let rival_cert = a.admit("University B", &rival, Roles::WORK, 365);
    let rival_inst = rival_cert
        .verify_institution(&a.charter, &a.none(), at(1))
        .unwrap();
    let mut set = a.none();
    set.insert(
        &a.revocations(&rival, 1, &[&f.node_key, &f.inst_key]),
        Some(&rival_inst),
    )
    .unwrap();
    f.chain
        .verify(&a.charter, &set, at(2), Roles::WORK)
        .unwrap();
    // And a stranger's list is refused outright.
    let stranger = Identity::generate();
    let err = a
        .none()
        .insert(&a.revocations(&stranger, 1, &[&f.node_key]), None)
        .unwrap_err();
    assert!(matches!(err, ChainError::UnknownRevoker { .. }), "{err}");
}

#[test]
fn older_revocation_list_loses() {
    let f = fixture();
    let a = &f.alliance;
    let mut set = a.none();
    set.insert(&a.revocations(&a.root, 5, &[&f.inst_key]), None)
        .unwrap();
    let err = set
        .insert(&a.revocations(&a.root, 4, &[]), None)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::StaleRevocations {
                sequence: 4,
                held: 5,
                ..
            }
        ),
        "{err}"
    );
    let err = set
        .insert(&a.revocations(&a.root, 5, &[]), None)
        .unwrap_err();
    assert!(
        matches!(err, ChainError::StaleRevocations { .. }),
        "a replay loses too: {err}"
    );
    assert!(
        f.chain
            .verify(&a.charter, &set, at(2), Roles::WORK)
            .is_err()
    );
    // A newer list that no longer names the key reinstates it.
    set.insert(&a.revocations(&a.root, 6, &[]), None).unwrap();
    f.chain
        .verify(&a.charter, &set, at(2), Roles::WORK)
        .unwrap();
    assert_eq!(set.sequence(&a.root.public()), Some(6));
}

#[test]
fn tampered_certificate_fails_signature() {
    let f = fixture();
    let mut bytes = f.chain.node.to_bytes();
    // Flip a bit inside the payload (after the version and length bytes).
    bytes[10] ^= 0x80;
    let node = Signed::<NodeCert>::from_bytes(&bytes).unwrap();
    let chain = Chain::new(f.chain.institution.clone(), node);
    let err = chain
        .verify(&f.alliance.charter, &f.alliance.none(), at(1), Roles::WORK)
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn names_with_control_characters_are_refused() {
    let a = Alliance::new("Test");
    let key = Identity::generate();
    let cert = a.admit("Evil\x1b[2J U", &key, Roles::WORK, 10);
    let err = cert
        .verify_institution(&a.charter, &a.none(), at(1))
        .unwrap_err();
    assert!(matches!(err, ChainError::BadName { .. }), "{err}");
}

#[test]
fn adverts_check_signer_clock_and_sequence() {
    let node = Identity::generate();
    let advert = GpuAdvert {
        peer: node.public(),
        institution: Identity::generate().public(),
        gpus: vec![],
        sequence: 7,
        issued_at: at(0),
        expires_at: at(0).saturating_add_secs(120),
    };
    let signed = Signed::sign(&advert, &node).unwrap();
    let got = signed.verify().unwrap();
    got.check(signed.signer(), at(0), None).unwrap();
    got.check(signed.signer(), at(0), Some(6)).unwrap();
    assert!(matches!(
        got.check(signed.signer(), at(0), Some(7)),
        Err(AdvertError::Stale { .. })
    ));
    assert!(matches!(
        got.check(signed.signer(), at(1), None),
        Err(AdvertError::Expired { .. })
    ));
    let other = Identity::generate();
    let forged = Signed::sign(&advert, &other).unwrap();
    assert!(matches!(
        forged.verify().unwrap().check(forged.signer(), at(0), None),
        Err(AdvertError::SignerMismatch { .. })
    ));
    let mut long = advert;
    long.expires_at = at(2);
    assert!(matches!(
        long.check(node.public(), at(0), None),
        Err(AdvertError::TooLong { .. })
    ));
}
