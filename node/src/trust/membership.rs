//! Membership files: reading and writing charters, certificates and
//! revocation lists, and checking a set of them the way a node will.
//!
//! The command line (`alliance charter …`, `alliance member …`, `alliance
//! cert verify`) is a thin layer over these functions.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use alliance_protocol::armor::{self, Label};
use alliance_protocol::cert::{
    Chain, ChainError, Charter, Institution, InstitutionCert, Member, NodeCert, RevocationSet,
    Revocations, Roles, TrustedCharter,
};
use alliance_protocol::{Record, Signed, Timestamp};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

/// The records found in a set of files.
#[derive(Debug, Default)]
pub struct Bundle {
    pub charters: Vec<(PathBuf, Signed<Charter>)>,
    pub institutions: Vec<(PathBuf, Signed<InstitutionCert>)>,
    pub nodes: Vec<(PathBuf, Signed<NodeCert>)>,
    pub revocations: Vec<(PathBuf, Signed<Revocations>)>,
}

fn envelope<T: Record>(path: &Path, index: usize, bytes: &[u8]) -> Result<Signed<T>> {
    Signed::<T>::from_bytes(bytes).with_context(|| {
        format!(
            "{}: block {}: damaged {}",
            path.display(),
            index + 1,
            T::NAME
        )
    })
}

impl Bundle {
    /// Reads every block of every file.
    pub fn read(paths: &[PathBuf]) -> Result<Self> {
        let mut bundle = Bundle::default();
        for path in paths {
            bundle.add_file(path)?;
        }
        Ok(bundle)
    }

    /// Reads every block of one file.
    pub fn add_file(&mut self, path: &Path) -> Result<()> {
        let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        if meta.len() > armor::MAX_ARMOR_BYTES as u64 {
            bail!(
                "{}: {} bytes is too large for a certificate or charter file",
                path.display(),
                meta.len()
            );
        }
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow!(
                "{}: not a text file; charters and certificates are text blocks starting with -----BEGIN ALLIANCE",
                path.display()
            )
        })?;
        let blocks = armor::decode(&text)
            .with_context(|| format!("{}: not a valid record file", path.display()))?;
        for (i, (label, bytes)) in blocks.into_iter().enumerate() {
            let p = path.to_owned();
            match label {
                Label::Charter => self.charters.push((p, envelope(path, i, &bytes)?)),
                Label::InstitutionCertificate => {
                    self.institutions.push((p, envelope(path, i, &bytes)?))
                }
                Label::NodeCertificate => self.nodes.push((p, envelope(path, i, &bytes)?)),
                Label::Revocations => self.revocations.push((p, envelope(path, i, &bytes)?)),
            }
        }
        Ok(())
    }
}

/// Reads and checks a charter file: one charter, signed by its own root.
pub fn read_charter(path: &Path) -> Result<TrustedCharter> {
    let mut bundle = Bundle::default();
    bundle.add_file(path)?;
    let mut charters = bundle.charters.into_iter();
    let (_, charter) = charters.next().ok_or_else(|| {
        anyhow!(
            "{}: holds no charter (-----BEGIN ALLIANCE CHARTER-----)",
            path.display()
        )
    })?;
    if charters.next().is_some() {
        bail!(
            "{}: holds more than one charter; keep one charter per file",
            path.display()
        );
    }
    charter
        .verify_charter()
        .with_context(|| format!("{}: the charter does not verify", path.display()))
}

/// One record as an armored block.
pub fn armored<T: Record>(label: Label, record: &Signed<T>) -> String {
    armor::encode(label, &record.to_bytes())
}

/// Writes `text` to a new file, refusing to overwrite one.
pub fn write_new(path: &Path, text: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists; choose another --out or move it away",
                    path.display()
                )
            } else {
                format!("cannot create {}", path.display())
            }
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What `alliance cert verify` reports for each certificate it checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Verified {
    Institution {
        file: PathBuf,
        name: String,
        key: String,
        roles: String,
        valid_until: String,
    },
    Node {
        file: PathBuf,
        peer_id: String,
        institution: String,
        institution_key: String,
        roles: String,
        valid_until: String,
    },
}

fn institution_summary(file: &Path, inst: &Institution) -> Verified {
    Verified::Institution {
        file: file.to_owned(),
        name: inst.cert.name.clone(),
        key: inst.cert.key.to_string(),
        roles: inst.cert.roles.to_string(),
        valid_until: inst.cert.not_after.to_string(),
    }
}

fn node_summary(file: &Path, m: &Member) -> Verified {
    Verified::Node {
        file: file.to_owned(),
        peer_id: m.peer_id.to_string(),
        institution: m.institution_name.clone(),
        institution_key: m.institution_key.to_string(),
        roles: m.roles.to_string(),
        valid_until: m.valid_until.to_string(),
    }
}

/// Checks every certificate in `bundle` against `charter` at `now`: each
/// node certificate as a full chain with its institution's certificate,
/// and each institution certificate on its own. Revocation lists in the
/// bundle are applied first. Fails on the first certificate that does not
/// verify, naming its file and the check that failed.
pub fn verify_bundle(
    charter: &TrustedCharter,
    bundle: &Bundle,
    now: Timestamp,
    required: Roles,
) -> Result<Vec<Verified>> {
    if bundle.institutions.is_empty() && bundle.nodes.is_empty() {
        bail!("no certificate given: pass institution certificate or node chain files");
    }
    let mut revocations = RevocationSet::new(charter);
    // Institution certificates verified without revocations, to accept their
    // revocation lists; then everything is checked again with the lists.
    let plain = RevocationSet::new(charter);
    for (file, list) in &bundle.revocations {
        let signer_inst = bundle
            .institutions
            .iter()
            .filter(|(_, c)| c.signer() == charter.charter.root)
            .find_map(|(_, c)| {
                c.verify_institution(charter, &plain, now)
                    .ok()
                    .filter(|i| i.cert.key == list.signer())
            });
        revocations
            .insert(list, signer_inst.as_ref())
            .with_context(|| format!("{}: revocation list refused", file.display()))?;
    }
    let mut out = Vec::new();
    for (file, cert) in &bundle.institutions {
        let inst = cert
            .verify_institution(charter, &revocations, now)
            .with_context(|| format!("{}: institution certificate refused", file.display()))?;
        if bundle.nodes.is_empty() && !inst.cert.roles.contains(required) {
            return Err(ChainError::MissingRole {
                missing: inst.cert.roles.missing(required),
                granted: inst.cert.roles,
            })
            .with_context(|| format!("{}: institution certificate refused", file.display()));
        }
        out.push(institution_summary(file, &inst));
    }
    for (file, node) in &bundle.nodes {
        let (_, inst) = bundle
            .institutions
            .iter()
            .find(|(_, i)| i.verify().is_ok_and(|c| c.key == node.signer()))
            .ok_or_else(|| {
                anyhow!(
                    "{}: node certificate is signed by {}, but no institution certificate for that key was given; pass the institution's certificate too",
                    file.display(),
                    node.signer()
                )
            })?;
        let member = Chain::new(inst.clone(), node.clone())
            .verify(charter, &revocations, now, required)
            .with_context(|| format!("{}: node certificate refused", file.display()))?;
        out.push(node_summary(file, &member));
    }
    Ok(out)
}

/// Parses a time given on the command line: seconds since the epoch, or
/// `YYYY-MM-DD` / `YYYY-MM-DDTHH:MM:SSZ` in UTC.
pub fn parse_time(text: &str) -> Result<Timestamp> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Timestamp::from_secs(secs));
    }
    let bad = || {
        anyhow!(
            "{text:?} is not a time: write seconds since 1970, 2027-01-31 or 2027-01-31T12:00:00Z"
        )
    };
    let (date, clock) = match text.split_once('T') {
        Some((d, c)) => (d, Some(c.strip_suffix('Z').ok_or_else(bad)?)),
        None => (text, None),
    };
    let nums = |s: &str, sep: char, n: usize| -> Result<Vec<u64>> {
        let v: Vec<u64> = s
            .split(sep)
            .map(|p| p.parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if v.len() == n { Ok(v) } else { Err(bad()) }
    };
    let d = nums(date, '-', 3)?;
    let c = match clock {
        Some(c) => nums(c, ':', 3)?,
        None => vec![0, 0, 0],
    };
    let (y, m, day) = (d[0], d[1], d[2]);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || c[0] > 23
        || c[1] > 59
        || c[2] > 60
    {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(Timestamp::from_secs(
        days * 86_400 + c[0] * 3600 + c[1] * 60 + c[2],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_time_round_trips_display() {
        for secs in [0u64, 1_709_210_096, 1_800_000_000, 4_102_444_800] {
            let t = Timestamp::from_secs(secs);
            assert_eq!(parse_time(&t.to_string()).unwrap(), t);
            assert_eq!(parse_time(&secs.to_string()).unwrap(), t);
        }
        assert_eq!(
            parse_time("2024-02-29").unwrap().to_string(),
            "2024-02-29T00:00:00Z"
        );
        for bad in ["yesterday", "2024-13-01", "2024-02-29T12:00:00", "2024-02"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
