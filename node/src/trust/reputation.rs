//! What a submitting node has learnt of each worker, and of each
//! institution, from results it verified itself.
//!
//! Reputation is earned only from verified outcomes, never from what peers
//! say of each other: a result that agrees with its quorum (or a spot
//! check) counts for the worker; a result that is outvoted, or a report
//! that breaks the protocol, counts against it ten times as much; an
//! accepted task that is lost or fails counts against it a little. Counts
//! decay with a half-life, so old deeds fade. A new identity starts with
//! nothing and is replicated like any stranger: a banned worker gains
//! nothing by returning under a new key.
//!
//! A worker with [`TRUST_AFTER`] agreeing results in a row since its last
//! wrong one is trusted to run tasks of `redundancy = "auto"` jobs alone;
//! each of those results is still checked by another worker with
//! probability [`Record::spot_check`], which falls as the streak grows.
//! One wrong result resets the streak, and trust with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use alliance_protocol::Timestamp;
use serde::{Deserialize, Serialize};

/// Agreeing results in a row before a worker runs tasks alone.
pub const TRUST_AFTER: u32 = 10;
/// How much a wrong result weighs against one that agreed.
const WRONG_WEIGHT: f64 = 10.0;
/// Counts halve over this time.
const HALF_LIFE_SECS: f64 = 30.0 * 24.0 * 3600.0;
/// Trusted workers' results are still spot-checked at least this often.
const MIN_SPOT_CHECK: f64 = 0.05;

/// What happened to one result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Agreed with the quorum or a spot check.
    Agreed,
    /// Agreed, about a result the worker returned before its last wrong
    /// one (a recheck of what it ran alone): it counts as agreement, but
    /// does not rebuild the streak that the wrong result ended.
    AgreedBeforeWrong,
    /// Outvoted, caught by a spot check, or a report that broke the
    /// protocol (bad signature, outputs that do not match their hashes).
    Wrong,
    /// Accepted, then lost, timed out or failed.
    Lapsed,
}

/// A worker's or an institution's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Record {
    /// Results that agreed (decayed).
    pub agreed: f64,
    /// Results that were wrong (decayed).
    pub wrong: f64,
    /// Accepted tasks lost or failed (decayed).
    pub lapses: f64,
    /// Agreeing results since the last wrong one.
    pub streak: u32,
    /// Seconds since the Unix epoch.
    #[schema(value_type = Option<u64>)]
    pub last_wrong: Option<Timestamp>,
    #[schema(value_type = Option<u64>)]
    pub updated_at: Option<Timestamp>,
}

impl Record {
    fn decay_to(&mut self, now: Timestamp) {
        if let Some(then) = self.updated_at {
            #[allow(clippy::cast_precision_loss)]
            let dt = now.as_secs().saturating_sub(then.as_secs()) as f64;
            let f = 0.5f64.powf(dt / HALF_LIFE_SECS);
            self.agreed *= f;
            self.wrong *= f;
            self.lapses *= f;
        }
        self.updated_at = Some(now);
    }

    /// Counts `event`, after decaying the counts to `now`.
    pub fn apply(&mut self, event: Event, now: Timestamp) {
        self.decay_to(now);
        match event {
            Event::Agreed => {
                self.agreed += 1.0;
                self.streak = self.streak.saturating_add(1);
            }
            Event::Wrong => {
                self.wrong += 1.0;
                self.streak = 0;
                self.last_wrong = Some(now);
            }
            Event::AgreedBeforeWrong => self.agreed += 1.0,
            Event::Lapsed => self.lapses += 1.0,
        }
    }

    /// From -1 (only wrong) through 0 (nothing known) to 1 (only right).
    pub fn score(&self) -> f64 {
        let good = self.agreed;
        let bad = WRONG_WEIGHT * self.wrong + self.lapses;
        (good - bad) / (good + bad + 1.0)
    }

    /// Whether tasks of `redundancy = "auto"` jobs may run on this worker
    /// alone.
    pub fn trusted(&self) -> bool {
        self.streak >= TRUST_AFTER
    }

    /// The probability that a result this worker returned alone is checked
    /// by another worker: 1 while it is not trusted, then falling with its
    /// streak (half at [`TRUST_AFTER`], a tenth at ten times that), never
    /// below 5 %.
    pub fn spot_check(&self) -> f64 {
        if !self.trusted() {
            return 1.0;
        }
        (f64::from(TRUST_AFTER) / (2.0 * f64::from(self.streak))).clamp(MIN_SPOT_CHECK, 1.0)
    }

    /// How `redundancy = "auto"` treats this worker, in words.
    pub fn replication(&self) -> String {
        if self.trusted() {
            format!(
                "alone, {:.0} % spot-checked",
                (self.spot_check() * 100.0).round()
            )
        } else {
            format!(
                "replicated ({} of {TRUST_AFTER} clean results)",
                self.streak
            )
        }
    }
}

/// One worker's standing, as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub peer_id: String,
    pub institution: String,
    #[serde(flatten)]
    pub record: Record,
    pub score: f64,
    pub trusted: bool,
    pub replication: String,
}

/// One institution's standing: the sum of its workers' deeds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstitutionView {
    pub institution: String,
    pub workers: u32,
    #[serde(flatten)]
    pub record: Record,
    pub score: f64,
}

/// The records, in the node's database. Records in use are kept in memory
/// too: counting an event changes them there, and [`Reputation::write_back`]
/// stores the changed ones, once each, before the database is flushed.
#[derive(Debug, Clone)]
pub struct Reputation {
    tree: sled::Tree,
    cache: Arc<Mutex<Cache>>,
}

#[derive(Debug, Default)]
struct Cache {
    records: HashMap<Vec<u8>, Stored>,
    changed: HashSet<Vec<u8>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    institution: String,
    record: Record,
}

fn worker_key(peer: &str) -> Vec<u8> {
    format!("w/{peer}").into_bytes()
}

fn institution_key(name: &str) -> Vec<u8> {
    format!("i/{name}").into_bytes()
}

impl Reputation {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            cache: Arc::default(),
        }
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // The cache holds plain counts: one a panic left half-updated is
        // still a cache of counts.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stored(&self, key: &[u8]) -> Stored {
        self.tree
            .get(key)
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default()
    }

    /// Applies `event` to the record at `key` in `cache`; the record after.
    fn apply(&self, cache: &mut Cache, key: Vec<u8>, institution: &str, event: Event) -> Record {
        let now = Timestamp::now();
        let s = cache
            .records
            .entry(key.clone())
            .or_insert_with(|| self.stored(&key));
        institution.clone_into(&mut s.institution);
        s.record.apply(event, now);
        let record = s.record.clone();
        cache.changed.insert(key);
        record
    }

    /// Counts `event` for `worker` of `institution` and for the
    /// institution; the worker's record after it. Durable once
    /// [`Reputation::write_back`] and a flush of the database have run.
    pub fn record(
        &self,
        worker: &str,
        institution: &str,
        event: Event,
    ) -> Result<Record, sled::Error> {
        let mut cache = self.cache();
        let w = self.apply(&mut cache, worker_key(worker), institution, event);
        self.apply(&mut cache, institution_key(institution), institution, event);
        Ok(w)
    }

    /// Stores every record changed since the last call (the caller
    /// flushes the database). A record that cannot be stored stays
    /// changed, for the next call.
    pub fn write_back(&self) -> Result<(), sled::Error> {
        let mut cache = self.cache();
        let Cache { records, changed } = &mut *cache;
        for key in changed.iter() {
            if let Some(s) = records.get(key) {
                let v =
                    serde_json::to_vec(s).map_err(|e| sled::Error::Unsupported(e.to_string()))?;
                self.tree.insert(key.as_slice(), v)?;
            }
        }
        changed.clear();
        Ok(())
    }

    fn load(&self, key: &[u8]) -> Stored {
        let cached = self.cache().records.get(key).cloned();
        cached.unwrap_or_else(|| self.stored(key))
    }

    /// The worker's record (empty for a worker never seen).
    pub fn worker(&self, peer: &str) -> Record {
        let mut r = self.load(&worker_key(peer)).record;
        r.decay_to(Timestamp::now());
        r
    }

    /// Every worker's and institution's standing, best first.
    pub fn table(&self) -> (Vec<WorkerView>, Vec<InstitutionView>) {
        // Counts not yet stored are read with the rest.
        if let Err(e) = self.write_back() {
            tracing::warn!("cannot store reputation records: {e}");
        }
        let now = Timestamp::now();
        let mut workers = Vec::new();
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for (k, v) in self.tree.scan_prefix(b"w/").flatten() {
            let Ok(mut s) = serde_json::from_slice::<Stored>(&v) else {
                continue;
            };
            s.record.decay_to(now);
            *counts.entry(s.institution.clone()).or_default() += 1;
            workers.push(WorkerView {
                peer_id: String::from_utf8_lossy(&k[2..]).into_owned(),
                institution: s.institution,
                score: s.record.score(),
                trusted: s.record.trusted(),
                replication: s.record.replication(),
                record: s.record,
            });
        }
        let mut institutions = Vec::new();
        for (_, v) in self.tree.scan_prefix(b"i/").flatten() {
            let Ok(mut s) = serde_json::from_slice::<Stored>(&v) else {
                continue;
            };
            s.record.decay_to(now);
            institutions.push(InstitutionView {
                workers: counts.get(&s.institution).copied().unwrap_or(0),
                institution: s.institution,
                score: s.record.score(),
                record: s.record,
            });
        }
        workers.sort_by(|a, b| b.score.total_cmp(&a.score));
        institutions.sort_by(|a, b| b.score.total_cmp(&a.score));
        (workers, institutions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_is_earned_slowly_and_lost_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let rep = Reputation::new(db.open_tree("reputation").unwrap());
        assert!(!rep.worker("a").trusted());
        assert!((rep.worker("a").spot_check() - 1.0).abs() < f64::EPSILON);
        for _ in 0..TRUST_AFTER - 1 {
            rep.record("a", "North", Event::Agreed).unwrap();
        }
        assert!(!rep.worker("a").trusted());
        let r = rep.record("a", "North", Event::Agreed).unwrap();
        assert!(r.trusted());
        assert!((r.spot_check() - 0.5).abs() < 1e-9);
        for _ in 0..90 {
            rep.record("a", "North", Event::Agreed).unwrap();
        }
        let r = rep.worker("a");
        assert!((r.spot_check() - 0.05).abs() < 1e-9, "{}", r.spot_check());
        assert!(r.score() > 0.9);
        // One lie: trust gone, and it weighs ten agreements.
        let r = rep.record("a", "North", Event::Wrong).unwrap();
        assert!(!r.trusted() && r.streak == 0);
        // Old results confirmed after the lie do not restore trust.
        let r = rep.record("a", "North", Event::AgreedBeforeWrong).unwrap();
        assert!(!r.trusted() && r.streak == 0 && r.agreed > 0.0);
        assert!(r.score() < 0.9);
        rep.record("b", "North", Event::Lapsed).unwrap();
        rep.record("c", "South", Event::Agreed).unwrap();
        let (workers, institutions) = rep.table();
        assert_eq!(workers.len(), 3);
        assert_eq!(workers[0].peer_id, "a");
        let north = institutions
            .iter()
            .find(|i| i.institution == "North")
            .unwrap();
        assert_eq!(north.workers, 2);
        assert!((north.record.agreed - 101.0).abs() < 1e-3);
        assert!((north.record.wrong - 1.0).abs() < 1e-3);
        assert!((north.record.lapses - 1.0).abs() < 1e-3);
    }

    #[test]
    fn counts_are_stored_when_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let rep = Reputation::new(db.open_tree("reputation").unwrap());
        // Another view of the same tree reads only what is stored.
        let stored = || Reputation::new(db.open_tree("reputation").unwrap());
        rep.record("a", "North", Event::Agreed).unwrap();
        rep.record("a", "North", Event::Agreed).unwrap();
        assert!((rep.worker("a").agreed - 2.0).abs() < 1e-6);
        assert!(stored().worker("a").agreed.abs() < 1e-6);
        rep.write_back().unwrap();
        assert!((stored().worker("a").agreed - 2.0).abs() < 1e-6);
        // The table counts what is not stored yet.
        rep.record("b", "South", Event::Lapsed).unwrap();
        let (workers, institutions) = rep.table();
        assert_eq!(workers.len(), 2);
        assert_eq!(institutions.len(), 2);
        assert!((stored().worker("b").lapses - 1.0).abs() < 1e-6);
    }

    #[test]
    fn counts_decay_with_their_half_life() {
        let mut r = Record::default();
        let t0 = Timestamp::from_secs(1_000_000);
        r.apply(Event::Agreed, t0);
        r.apply(Event::Wrong, t0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let later = Timestamp::from_secs(1_000_000 + HALF_LIFE_SECS as u64);
        r.decay_to(later);
        assert!((r.agreed - 0.5).abs() < 1e-9);
        assert!((r.wrong - 0.5).abs() < 1e-9);
    }
}
