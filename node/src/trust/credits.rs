//! Credits: a submitter's signed grant of verified GPU time to the worker
//! that did the work. Every node keeps every credit it receives by gossip
//! (after checking the signature and the issuer's chain), so every node
//! can tell how much GPU time each institution gave and took. Old work
//! fades with a half-life, as user priority does in HTCondor, so an
//! institution cannot live forever on what it gave long ago.
//!
//! The balance (given minus taken) is zero-sum: credits between two
//! colluding institutions raise one exactly as much as they lower the
//! other, and credits within one institution change nothing.

use std::collections::HashMap;

use alliance_protocol::cert::{Chain, Member};
use alliance_protocol::encoding;
use alliance_protocol::signed::Record;
use alliance_protocol::task::{Credit, MAX_CREDIT_TASKS};
use alliance_protocol::wire::{CreditsPage, MAX_PAGE_CREDITS, MAX_PAGE_ISSUERS};
use alliance_protocol::{Hash, PublicKey, Signed, Timestamp};
use serde::{Deserialize, Serialize};

/// Given and taken GPU time halve over this time.
pub const HALF_LIFE_SECS: f64 = 7.0 * 24.0 * 3600.0;
/// How far ahead of this node's clock a credit may be dated.
const MAX_AHEAD_SECS: u64 = 600;
/// Longest GPU time one credit may grant per task it pays for.
pub const MAX_GPU_TIME_US: u64 = 24 * 3600 * 1_000_000;

/// The most GPU time `c` may grant: [`MAX_GPU_TIME_US`] per task.
fn max_gpu_time(c: &Credit) -> u64 {
    MAX_GPU_TIME_US.saturating_mul(c.tasks.len() as u64)
}

/// One institution's account.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Balance {
    /// The institution's name where this node knows it, else its key.
    pub institution: String,
    pub key: String,
    /// GPU seconds its workers ran for others (decayed).
    pub given_s: f64,
    /// GPU seconds its submitters had run (decayed).
    pub taken_s: f64,
    /// Given minus taken.
    pub balance_s: f64,
    /// Credits counted, either way.
    pub credits: u64,
}

/// A credit this node will not keep.
#[derive(Debug, thiserror::Error)]
pub enum CreditError {
    #[error("a bad credit: {0}")]
    Bad(String),
    #[error("the credit store: {0}")]
    Db(#[from] sled::Error),
}

/// Largest issuer chain kept, encoded.
const MAX_CHAIN: usize = 64 * 1024;

/// A stored credit: its signed bytes, and the record inside (whose
/// signature was checked when it was stored).
fn stored(bytes: &[u8]) -> Option<(Signed<Credit>, Credit)> {
    let signed = Signed::<Credit>::from_bytes(bytes).ok()?;
    let credit = encoding::decode(Credit::NAME, signed.payload(), Credit::MAX_SIZE).ok()?;
    Some((signed, credit))
}

/// An institution's decayed sums at `at`.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    given_s: f64,
    taken_s: f64,
    credits: u64,
    at: u64,
}

impl Totals {
    /// The sums decayed to `now` (seconds).
    fn at(self, now: u64) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let f = 0.5f64.powf(now.saturating_sub(self.at) as f64 / HALF_LIFE_SECS);
        Self {
            given_s: self.given_s * f,
            taken_s: self.taken_s * f,
            credits: self.credits,
            at: now.max(self.at),
        }
    }
}

/// The credits this node holds, in its database, and each institution's
/// decayed sums, kept up to date as credits arrive (a balance costs a
/// lookup, not a scan).
#[derive(Debug, Clone)]
pub struct Credits {
    tree: sled::Tree,
    /// The chain of each submitter whose credits are here, by node key, to
    /// hand on with them.
    issuers: sled::Tree,
    totals: std::sync::Arc<std::sync::Mutex<HashMap<PublicKey, Totals>>>,
}

impl Credits {
    /// Opens the tables and sums the credits in them.
    pub fn new(tree: sled::Tree, issuers: sled::Tree) -> Self {
        let me = Self {
            tree,
            issuers,
            totals: std::sync::Arc::default(),
        };
        let now = Timestamp::now().as_secs();
        for (_, v) in me.tree.iter().flatten() {
            if let Some((_, credit)) = stored(&v) {
                me.count(&credit, now);
            }
        }
        me
    }

    /// Adds `c` to the sums, decayed to `now` from when it was issued.
    fn count(&self, c: &Credit, now: u64) {
        let Ok(mut totals) = self.totals.lock() else {
            return;
        };
        #[allow(clippy::cast_precision_loss)]
        let secs = c.gpu_time_us.min(max_gpu_time(c)) as f64 / 1e6
            * 0.5f64.powf(now.saturating_sub(c.issued_at.as_secs()) as f64 / HALF_LIFE_SECS);
        let mut add = |key: PublicKey, given: f64, taken: f64, credits: u64| {
            let t = totals.entry(key).or_default();
            *t = t.at(now);
            t.given_s += given;
            t.taken_s += taken;
            t.credits += credits;
        };
        // Counted per task paid for, as the alliance's members see them.
        let tasks = c.tasks.len() as u64;
        add(c.worker_institution, secs, 0.0, tasks);
        let other = if c.submitter_institution != c.worker_institution {
            tasks
        } else {
            0
        };
        add(c.submitter_institution, 0.0, secs, other);
    }

    /// Keeps a credit: its signature is checked, and, given its issuer
    /// (a member whose chain was checked, and that chain, kept to hand the
    /// credit on), that the issuer signed it for its own institution and
    /// did not date it ahead. False if it was here already.
    pub fn add(
        &self,
        signed: &Signed<Credit>,
        issuer: Option<(&Member, &Chain)>,
    ) -> Result<bool, CreditError> {
        let credit = signed
            .verify()
            .map_err(|e| CreditError::Bad(e.to_string()))?;
        self.keep(signed, &credit, issuer)
    }

    /// Keeps a credit this node issued (`own` signed it, `issuer` is this
    /// node's member and chain): its signature, made here, is not checked
    /// again.
    pub fn add_own(
        &self,
        signed: &Signed<Credit>,
        own: &alliance_protocol::Identity,
        issuer: (&Member, &Chain),
    ) -> Result<bool, CreditError> {
        let credit = signed
            .open_own(own)
            .map_err(|e| CreditError::Bad(e.to_string()))?;
        self.keep(signed, &credit, Some(issuer))
    }

    fn keep(
        &self,
        signed: &Signed<Credit>,
        credit: &Credit,
        issuer: Option<(&Member, &Chain)>,
    ) -> Result<bool, CreditError> {
        if let Some((member, _)) = issuer {
            if signed.signer() != member.node_key
                || credit.submitter_institution != member.institution_key
            {
                return Err(CreditError::Bad(
                    "it names another issuer than its chain".into(),
                ));
            }
            if credit.issued_at.as_secs() > Timestamp::now().as_secs() + MAX_AHEAD_SECS {
                return Err(CreditError::Bad("it is dated in the future".into()));
            }
        }
        if credit.tasks.is_empty() || credit.tasks.len() > MAX_CREDIT_TASKS {
            return Err(CreditError::Bad(format!(
                "it pays for {} tasks; a credit pays for 1 to {MAX_CREDIT_TASKS}",
                credit.tasks.len()
            )));
        }
        if credit.gpu_time_us > max_gpu_time(credit) {
            return Err(CreditError::Bad(format!(
                "it grants {} s of GPU time for {} task(s)",
                credit.gpu_time_us / 1_000_000,
                credit.tasks.len()
            )));
        }
        let bytes = signed.to_bytes();
        let key = Hash::of(&bytes);
        if self.tree.contains_key(key.as_bytes())? {
            return Ok(false);
        }
        let signer = signed.signer();
        if let Some((_, chain)) = issuer
            && !self.issuers.contains_key(signer.as_bytes())?
        {
            let c = encoding::encode("chain", chain, MAX_CHAIN)
                .map_err(|e| CreditError::Bad(e.to_string()))?;
            self.issuers.insert(signer.as_bytes(), c)?;
        }
        self.tree.insert(key.as_bytes(), bytes)?;
        self.count(credit, Timestamp::now().as_secs());
        Ok(true)
    }

    /// The credits after `after` in this table's order, at most
    /// [`MAX_PAGE_CREDITS`] from at most [`MAX_PAGE_ISSUERS`] issuers, with
    /// the issuers' chains and where the next page starts.
    pub fn page(&self, after: Option<Hash>) -> CreditsPage {
        use std::ops::Bound;
        let from = match after {
            Some(h) => Bound::Excluded(h.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut page = CreditsPage {
            issuers: Vec::new(),
            credits: Vec::new(),
            next: None,
        };
        let mut signers: Vec<PublicKey> = Vec::new();
        let mut last: Option<Hash> = None;
        for (k, v) in self
            .tree
            .range::<Vec<u8>, _>((from, Bound::Unbounded))
            .flatten()
        {
            let Some((signed, _)) = stored(&v) else {
                continue;
            };
            let signer = signed.signer();
            if !signers.contains(&signer) {
                let chain = self
                    .issuers
                    .get(signer.as_bytes())
                    .ok()
                    .flatten()
                    .and_then(|c| encoding::decode::<Chain>("chain", &c, MAX_CHAIN).ok());
                let Some(chain) = chain else {
                    continue;
                };
                if signers.len() == MAX_PAGE_ISSUERS {
                    page.next = last;
                    break;
                }
                signers.push(signer);
                page.issuers.push(chain);
            }
            page.credits.push(signed);
            last = <[u8; 32]>::try_from(&k[..]).ok().map(Hash::from_bytes);
            if page.credits.len() == MAX_PAGE_CREDITS {
                page.next = last;
                break;
            }
        }
        page
    }

    /// Every institution's account at `now`, names from `names` where
    /// known, highest balance first.
    pub fn table(&self, names: &HashMap<PublicKey, String>, now: Timestamp) -> Vec<Balance> {
        let Ok(totals) = self.totals.lock() else {
            return Vec::new();
        };
        let mut out: Vec<Balance> = totals
            .iter()
            .map(|(key, t)| {
                let t = t.at(now.as_secs());
                Balance {
                    institution: names.get(key).cloned().unwrap_or_else(|| key.to_string()),
                    key: key.to_string(),
                    given_s: t.given_s,
                    taken_s: t.taken_s,
                    balance_s: t.given_s - t.taken_s,
                    credits: t.credits,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.balance_s
                .total_cmp(&a.balance_s)
                .then_with(|| a.key.cmp(&b.key))
        });
        out
    }

    /// One institution's balance in GPU seconds at `now` (0 when unknown).
    pub fn balance(&self, institution: &PublicKey, now: Timestamp) -> f64 {
        self.totals
            .lock()
            .ok()
            .and_then(|t| t.get(institution).copied())
            .map_or(0.0, |t| {
                let t = t.at(now.as_secs());
                t.given_s - t.taken_s
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alliance_protocol::Identity;
    use alliance_protocol::task::{CreditedTask, JobId};

    #[test]
    fn balances_are_zero_sum_and_fade() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let credits = Credits::new(
            db.open_tree("credits").unwrap(),
            db.open_tree("issuers").unwrap(),
        );
        let (a, b) = (Identity::generate(), Identity::generate());
        let submitter = Identity::generate();
        let t0 = Timestamp::now();
        let credit = |task: u32, worker: &Identity, from: &Identity, us: u64| {
            let c = Credit {
                job: JobId([1; 16]),
                tasks: vec![CreditedTask {
                    task,
                    receipt: Hash::of(&task.to_le_bytes()),
                }],
                worker: Identity::generate().public(),
                worker_institution: worker.public(),
                submitter_institution: from.public(),
                gpu_time_us: us,
                issued_at: t0,
            };
            Signed::sign(&c, &submitter).unwrap()
        };
        // A's workers ran 3 s for B, 1 s for A itself.
        assert!(credits.add(&credit(0, &a, &b, 2_000_000), None).unwrap());
        let one = credit(1, &a, &b, 1_000_000);
        assert!(credits.add(&one, None).unwrap());
        assert!(credits.add(&credit(2, &a, &a, 1_000_000), None).unwrap());
        assert!(!credits.add(&one, None).unwrap(), "a duplicate");
        assert!(
            credits
                .add(&credit(3, &a, &b, MAX_GPU_TIME_US + 1), None)
                .is_err()
        );
        let names = HashMap::from([(a.public(), "A".to_owned())]);
        let table = credits.table(&names, t0);
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].institution, "A");
        assert!((table[0].given_s - 4.0).abs() < 1e-5);
        assert!((table[0].taken_s - 1.0).abs() < 1e-5);
        assert!((table[0].balance_s - 3.0).abs() < 1e-5);
        assert_eq!(table[1].key, b.public().to_string());
        assert!((table[1].balance_s + 3.0).abs() < 1e-5);
        let sum: f64 = table.iter().map(|b| b.balance_s).sum();
        assert!(sum.abs() < 1e-9, "zero-sum");
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let later = Timestamp::from_secs(t0.as_secs() + HALF_LIFE_SECS as u64);
        // Counts are decayed from when they were added (this second, or
        // the next): allow for one second of decay.
        assert!((credits.balance(&a.public(), later) - 1.5).abs() < 1e-5);
        // Reopened, the table sums the same credits again.
        let again = Credits::new(
            db.open_tree("credits").unwrap(),
            db.open_tree("issuers").unwrap(),
        );
        let t = again.table(&names, t0);
        assert!(
            (t[0].balance_s - 3.0).abs() < 1e-5 && t[0].credits == 3,
            "{t:?}"
        );
    }
}
