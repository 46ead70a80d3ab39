//! The alliance operator's commands: `alliance charter new|show|admit|revoke|psk`,
//! and revocation lists, which lab admins write too (`alliance member revoke`).

use std::path::{Path, PathBuf};

use alliance_protocol::armor::Label;
use alliance_protocol::cert::{
    Charter, CharterDefaults, InstitutionCert, RevocationSet, Revocations, Revoked, TrustedCharter,
};
use alliance_protocol::keys::Identity;
use alliance_protocol::{Signed, Timestamp};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::config::{self};
use crate::trust::{self, Bundle};

use super::{check_days, create_dir, load_key, parse_key, parse_roles, print_json, single};

#[derive(Debug, Subcommand)]
pub enum CharterCommand {
    /// Create a new alliance: its root key (root.key) and signed charter (charter.alliance).
    New(CharterNewArgs),
    /// Show a charter and check its signature.
    Show {
        /// The charter file.
        #[arg(long, default_value = "charter.alliance")]
        charter: PathBuf,
    },
    /// Admit an institution: sign its certificate with the root key.
    Admit(AdmitArgs),
    /// Revoke an institution or a node network-wide (root-signed list).
    Revoke(RevokeArgs),
    /// Make a pre-shared key for a private alliance network. Give the file
    /// to every node (`[network] psk_file`); nodes without it cannot connect.
    Psk {
        /// Where to write the key (mode 0600; it must not exist yet).
        #[arg(long, default_value = "swarm.key")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct CharterNewArgs {
    /// The alliance's name, e.g. "Alliance of Northern Universities".
    #[arg(long)]
    pub name: String,
    /// Multiaddress of a bootstrap node (repeat for several), e.g.
    /// /dns4/boot.example.edu/tcp/4001/p2p/12D3Koo…
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Directory to write root.key and charter.alliance into.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Seconds a GPU advert stays valid.
    #[arg(long, default_value_t = CharterDefaults::default().advert_ttl_secs)]
    pub advert_ttl: u32,
    /// Replicas per task when a job does not say.
    #[arg(long, default_value_t = CharterDefaults::default().default_redundancy)]
    pub redundancy: u8,
    /// Longest validity, in days, of a node certificate.
    #[arg(long, default_value_t = CharterDefaults::default().max_node_cert_days)]
    pub max_node_cert_days: u32,
}

#[derive(Debug, Args)]
pub struct AdmitArgs {
    /// The institution's name, e.g. "University of Example".
    #[arg(long)]
    pub institution: String,
    /// The institution's public key (64 hex digits), as `alliance member new` printed it.
    #[arg(long)]
    pub key: String,
    /// Roles its nodes may hold: work, submit, bootstrap (comma-separated).
    #[arg(long, default_value = "work,submit")]
    pub roles: String,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    #[command(flatten)]
    pub root: RootFiles,
    /// Where to write the certificate [default: <institution>.institution.cert].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RootFiles {
    /// The alliance root key.
    #[arg(long, default_value = "root.key")]
    pub root_key: PathBuf,
    /// The charter file.
    #[arg(long, default_value = "charter.alliance")]
    pub charter: PathBuf,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The institution key or node PeerId to revoke.
    #[arg(long)]
    pub key: String,
    /// Why, recorded in the list and shown to peers.
    #[arg(long)]
    pub reason: String,
    /// The signer's key file [default: root.key for `charter revoke`,
    /// institution.key for `member revoke`].
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// The charter file.
    #[arg(long, default_value = "charter.alliance")]
    pub charter: PathBuf,
    /// The revocation list to extend; created when missing.
    #[arg(long, default_value = "revocations.alliance")]
    pub list: PathBuf,
}

pub(super) fn charter_new(a: CharterNewArgs, json: bool) -> Result<()> {
    for addr in &a.bootstrap {
        config::check_multiaddr(addr)
            .map_err(|why| anyhow!("--bootstrap {addr:?} is not a multiaddress: {why}"))?;
    }
    if a.redundancy == 0 {
        bail!("--redundancy 0: a task needs at least one replica");
    }
    create_dir(&a.out_dir)?;
    let key_path = a.out_dir.join("root.key");
    let charter_path = a.out_dir.join("charter.alliance");
    if charter_path.exists() {
        bail!(
            "{} already exists; choose another --out-dir",
            charter_path.display()
        );
    }
    let root = Identity::generate();
    let defaults = CharterDefaults {
        advert_ttl_secs: a.advert_ttl,
        default_redundancy: a.redundancy,
        max_node_cert_days: a.max_node_cert_days,
    };
    let charter = Charter::new(
        a.name,
        root.public(),
        a.bootstrap,
        defaults,
        Timestamp::now(),
    );
    let signed = Signed::sign(&charter, &root)?;
    let trusted = signed.verify_charter()?;
    root.save(&key_path)?;
    trust::write_new(&charter_path, &trust::armored(Label::Charter, &signed))?;
    if json {
        charter_show(&charter_path, true)?;
    } else {
        println!("alliance {:?} created", trusted.charter.name);
        println!("charter id: {}", trusted.id);
        println!(
            "root key:   {} (secret in {}, mode 0600: keep it offline)",
            root.public(),
            key_path.display()
        );
        println!(
            "charter:    {} (publish this to every member)",
            charter_path.display()
        );
    }
    Ok(())
}

pub(super) fn psk_new(out: &Path, json: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(|e| anyhow!("no randomness from the system: {e}"))?;
    let psk = libp2p::pnet::PreSharedKey::new(key);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("cannot create {} (does it exist already?)", out.display()))?;
    file.write_all(psk.to_key_file().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    if json {
        print_json(&json!({ "file": out, "fingerprint": psk.fingerprint().to_string() }));
    } else {
        println!(
            "pre-shared key written to {} (fingerprint {})",
            out.display(),
            psk.fingerprint()
        );
        println!("give it to every node and set [network] psk_file; keep it secret");
    }
    Ok(())
}

pub(super) fn charter_json(t: &TrustedCharter) -> serde_json::Value {
    json!({
        "id": t.id.to_string(),
        "name": t.charter.name,
        "root": t.charter.root.to_string(),
        "bootstrap": t.charter.bootstrap,
        "created_at": t.charter.created_at.to_string(),
        "defaults": {
            "advert_ttl_secs": t.charter.defaults.advert_ttl_secs,
            "default_redundancy": t.charter.defaults.default_redundancy,
            "max_node_cert_days": t.charter.defaults.max_node_cert_days,
        },
    })
}

pub(super) fn charter_show(path: &Path, json: bool) -> Result<()> {
    let t = trust::read_charter(path)?;
    if json {
        print_json(&charter_json(&t));
    } else {
        let c = &t.charter;
        println!("alliance   {}", c.name);
        println!("id         {}", t.id);
        println!("root key   {}", c.root);
        println!("created    {}", c.created_at);
        println!(
            "bootstrap  {}",
            if c.bootstrap.is_empty() {
                "(none)".into()
            } else {
                c.bootstrap.join(", ")
            }
        );
        println!(
            "defaults   advert ttl {}s, redundancy {}, node certificates up to {} days",
            c.defaults.advert_ttl_secs,
            c.defaults.default_redundancy,
            c.defaults.max_node_cert_days
        );
        println!("signature  valid (self-signed by the root key)");
    }
    Ok(())
}

pub(super) fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    if s.is_empty() {
        "institution".into()
    } else {
        s
    }
}

pub(super) fn admit(a: AdmitArgs, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.root.charter)?;
    let root = load_key(&a.root.root_key, "root")?;
    if root.public() != charter.charter.root {
        bail!(
            "{} is not the root key of the charter {} (root {}); pass the matching --root-key",
            a.root.root_key.display(),
            a.root.charter.display(),
            charter.charter.root
        );
    }
    let key = parse_key("--key", &a.key)?;
    let roles = parse_roles(&a.roles)?;
    if roles.is_empty() {
        bail!("--roles: give at least one of work, submit, bootstrap");
    }
    check_days(a.days, 3650)?;
    let now = Timestamp::now();
    let cert = InstitutionCert::new(&charter, a.institution.clone(), key, roles, now, a.days);
    let signed = Signed::sign(&cert, &root)?;
    let inst = signed
        .verify_institution(&charter, &RevocationSet::new(&charter), now)
        .context("the new certificate does not verify")?;
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("{}.institution.cert", slug(&a.institution))));
    trust::write_new(
        &out,
        &trust::armored(Label::InstitutionCertificate, &signed),
    )?;
    if json {
        print_json(&json!({
            "file": out, "institution": inst.cert.name, "key": key.to_string(),
            "roles": roles.to_string(), "valid_until": inst.cert.not_after.to_string(),
        }));
    } else {
        println!(
            "admitted {:?} with roles {roles} until {}",
            inst.cert.name, inst.cert.not_after
        );
        println!(
            "certificate: {} (send it to the institution's admin)",
            out.display()
        );
    }
    Ok(())
}

pub(super) fn revoke(a: RevokeArgs, default_key: &str, json: bool) -> Result<()> {
    let charter = trust::read_charter(&a.charter)?;
    let key_path = a
        .signing_key
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_key));
    let signer = load_key(&key_path, "signing")?;
    let target = parse_key("--key", &a.key)?;
    let mut list = Revocations {
        alliance: charter.id,
        sequence: 1,
        issued_at: Timestamp::now(),
        revoked: Vec::new(),
    };
    if a.list.exists() {
        let old = single(
            &a.list,
            Bundle::read(std::slice::from_ref(&a.list))?.revocations,
            "revocation list",
        )?;
        if old.signer() != signer.public() {
            bail!(
                "{} was signed by {}, not by {}; pass another --list",
                a.list.display(),
                old.signer(),
                key_path.display()
            );
        }
        let old = old
            .verify()
            .with_context(|| format!("{}: revocation list refused", a.list.display()))?;
        list.sequence = old.sequence.saturating_add(1);
        list.revoked = old.revoked;
    }
    if !list.revoked.iter().any(|r| r.key == target) {
        list.revoked.push(Revoked {
            key: target,
            reason: a.reason.clone(),
            at: list.issued_at,
        });
    }
    let signed = Signed::sign(&list, &signer)?;
    let text = trust::armored(Label::Revocations, &signed);
    let tmp = a.list.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    trust::write_new(&tmp, &text)?;
    std::fs::rename(&tmp, &a.list)
        .with_context(|| format!("cannot replace {}", a.list.display()))?;
    let seq = signed.verify()?.sequence;
    if json {
        print_json(&json!({ "file": a.list, "revoked": target.to_string(), "sequence": seq }));
    } else {
        println!(
            "revoked {target} in {} (list {seq}); publish it to the alliance",
            a.list.display()
        );
    }
    Ok(())
}
