//! The submitter: the jobs this node's researchers submit, matched to the
//! alliance's idle GPUs, offered, checked when they come back, and paid
//! for in credits.
//!
//! A job passes through the files of this room in the order of its life:
//!
//! - [`spec`]: the job file a researcher writes, checked before anything
//!   leaves the machine; [`npy`] for its arrays.
//! - [`intake`]: a checked job becomes a [`JobRecord`] and its tasks,
//!   written to sled before its id is handed out; listing, cancelling,
//!   waiting for the end.
//! - [`records`]: the persisted job, task and replica records and the
//!   submitter's tables; [`durable`]: writes and the group commit that puts
//!   them on disk before anything is acknowledged.
//! - [`schedule`]: the scheduler's pass: leases that ran out, workers that
//!   left, tasks given up; [`matching`] picks the worker for each replica
//!   from the live adverts, or says in words why a task waits; [`offers`]
//!   sends them signed, in batches, and records the answers.
//! - [`reports`]: a worker's signed receipts and failures, checked against
//!   the attempt it was offered and every output hash; [`checkpoints`]:
//!   the state a long task resumes from elsewhere.
//! - [`verify`]: replicas compared under the job's comparison, a quorum of
//!   institutions, adaptive replication and spot checks.
//! - [`settle`]: reputation events for what was verified, and the signed
//!   credits that pay the workers' institutions.
//! - [`export`]: verified outputs as `.npy` files.
//!
//! [`Jobs`] is the room's one handle: the API and the daemon call its
//! public methods; the network actor hands it answers, reports and
//! progress. Every state change is persisted, so a restarted node resumes
//! its jobs: leases it handed out still stand and results arriving for
//! them count.

mod checkpoints;
mod durable;
mod export;
mod intake;
mod matching;
pub mod npy;
mod offers;
pub mod records;
mod reports;
mod schedule;
mod settle;
pub mod spec;
mod verify;

use checkpoints::{CheckpointRefs, held_checkpoints};
pub use export::{OutputBody, Segment};
use records::task_key;
pub use records::{
    Checkpoint, InputRecord, JobDetail, JobRecord, JobState, JobSummary, Progress, Replica,
    ReplicaState, SentCheckpoint, Tables, TaskRecord, TaskState,
};
use settle::{Owed, OwedGroup};
pub use spec::{FIX, Job, JobError};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alliance_protocol::{Hash, Identity, PublicKey};
use tracing::info;

use crate::metrics::Metrics;
use crate::store::blobs::Blobs;

use crate::net::actor::Client;
use crate::trust::reputation::Reputation;

/// Inputs up to this size ride inside the offer; larger ones are blobs.
const INLINE_INPUT: usize = 64 * 1024;

/// A running task's lease: renewed by every progress report (workers send
/// one every [`crate::work::PROGRESS_EVERY`]), lost without.
pub const LEASE: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Live {
    job: JobRecord,
    tasks: Vec<TaskRecord>,
    /// Workers that accepted a task of this job, and so hold its inputs.
    warm: HashSet<String>,
    /// Every task before this index has ended (verified or failed): a
    /// pass starts here, so its cost follows the tasks still open rather
    /// than the size of the job.
    open_from: usize,
    /// The highest index of a task that was ever offered. Replicas are
    /// never taken away, so every task past it has none.
    last_placed: Option<usize>,
    /// The reason every task that was never offered now gives for waiting,
    /// once a pass has written it to all of them.
    blank_why: Option<String>,
}

impl Live {
    fn new(job: JobRecord, tasks: Vec<TaskRecord>) -> Self {
        let warm = tasks
            .iter()
            .flat_map(|t| &t.replicas)
            .filter(|r| r.in_flight() || r.returned())
            .map(|r| r.worker.clone())
            .collect();
        let open_from = tasks
            .iter()
            .position(|t| t.state == TaskState::Waiting)
            .unwrap_or(tasks.len());
        let last_placed = tasks.iter().rposition(|t| !t.replicas.is_empty());
        Self {
            job,
            tasks,
            warm,
            open_from,
            last_placed,
            blank_why: None,
        }
    }

    /// Moves `open_from` past the tasks that have ended.
    fn advance(&mut self) {
        while self
            .tasks
            .get(self.open_from)
            .is_some_and(|t| t.state != TaskState::Waiting)
        {
            self.open_from += 1;
        }
    }
}

/// The submitter; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    /// What this node counts of its jobs, for `GET /metrics`.
    metrics: Metrics,
    identity: Arc<Identity>,
    client: Client,
    blobs: Blobs,
    /// Checkpoint state buffers, content-addressed; a buffer is deleted
    /// when no task holds it any more.
    checkpoints: Blobs,
    /// The checkpoint buffers each task holds, and how many tasks hold
    /// each buffer.
    held: Mutex<CheckpointRefs>,
    jobs: sled::Tree,
    tasks: sled::Tree,
    /// Small outputs by hash: durable with the same flush as the task
    /// record that names them, without a file (and its sync) each.
    outputs: sled::Tree,
    /// What this node verified of each worker.
    reputation: Reputation,
    /// Workers caught with a wrong result since the last pass: the tasks
    /// they ran alone are checked again.
    caught: Mutex<HashSet<String>>,
    /// This node's institution, which credits it issues charge.
    institution: PublicKey,
    /// Its name, which owners' allow and deny lists use.
    institution_name: String,
    /// Credits signed for verified work, written with the verification
    /// that earned them, gossiped after the flush and then removed (a
    /// restarted node sends what is left).
    unsent_credits: sled::Tree,
    /// Verified results not yet in a signed credit, written with the
    /// verification; [`Jobs::durable`] seals them into credits (up to
    /// [`MAX_CREDIT_TASKS`] tasks each) before it flushes.
    owed_credits: sled::Tree,
    /// How many results of each group `owed_credits` holds, and when they
    /// are due to be sealed even if fewer than a full credit's worth.
    owed: Mutex<HashMap<OwedGroup, (usize, Instant)>>,
    live: Mutex<BTreeMap<String, Live>>,
    /// Writes made, and writes known to be on disk: anything between the
    /// two awaits a flush (shared by concurrent callers: group commit).
    writes: std::sync::atomic::AtomicU64,
    flushed: std::sync::atomic::AtomicU64,
    flushing: tokio::sync::Mutex<()>,
    declined: Mutex<HashMap<String, Instant>>,
    gone_since: Mutex<HashMap<String, Instant>>,
    wake: tokio::sync::Notify,
    /// Counts jobs that ended (on disk), for those waiting on one.
    ended: tokio::sync::watch::Sender<u64>,
    /// When this node started: after a restart, workers get time to
    /// reconnect before their tasks count as lost.
    started: Instant,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

/// Why a request about jobs failed.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("{0}")]
    Refused(String),
    #[error("no job {0} on this node (see `alliance job list`)")]
    NotFound(String),
    /// Something of a job that does not exist (an output binding, a task).
    #[error("{0}")]
    Missing(String),
    /// Asked for too early: the job has not got that far.
    #[error("{0}")]
    NotReady(String),
    #[error("the job database failed: {0}")]
    Db(String),
}

fn db<E: std::fmt::Display>(e: E) -> JobsError {
    JobsError::Db(e.to_string())
}

impl Jobs {
    /// Opens the job tables and loads every job not yet finished.
    /// `institution` is this node's, which the credits it issues charge.
    pub fn open(
        identity: Arc<Identity>,
        client: Client,
        blobs: Blobs,
        checkpoints: Blobs,
        tables: Tables,
        institution: (PublicKey, String),
        metrics: Metrics,
    ) -> Result<Self, JobsError> {
        let (institution, institution_name) = institution;
        let Tables {
            jobs,
            tasks,
            outputs,
            reputation,
            unsent_credits,
            owed_credits,
        } = tables;
        let mut held: HashMap<(String, u32), Vec<Hash>> = HashMap::new();
        let mut refs: HashMap<Hash, u32> = HashMap::new();
        let mut live = BTreeMap::new();
        for item in jobs.iter() {
            let (_, v) = item.map_err(db)?;
            let job: JobRecord = serde_json::from_slice(&v).map_err(db)?;
            let mut list = Vec::with_capacity(job.tasks as usize);
            for i in 0..job.tasks {
                let t = match tasks.get(task_key(&job.id, i)).map_err(db)? {
                    Some(v) => serde_json::from_slice::<TaskRecord>(&v).map_err(db)?,
                    None => TaskRecord::new(i),
                };
                let h = held_checkpoints(&t);
                for hash in &h {
                    *refs.entry(*hash).or_default() += 1;
                }
                if !h.is_empty() {
                    held.insert((job.id.clone(), i), h);
                }
                list.push(t);
            }
            live.insert(job.id.clone(), Live::new(job, list));
        }
        if !live.is_empty() {
            info!(jobs = live.len(), "jobs loaded from the database");
        }
        // Results owed from before a restart are sealed at the first flush.
        let mut owed: HashMap<OwedGroup, (usize, Instant)> = HashMap::new();
        for (_, v) in owed_credits.iter().flatten() {
            if let Ok(o) = serde_json::from_slice::<Owed>(&v) {
                owed.entry(o.group()).or_insert((0, Instant::now())).0 += 1;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                identity,
                client,
                blobs,
                checkpoints,
                held: Mutex::new((held, refs)),
                jobs,
                tasks,
                outputs,
                reputation: Reputation::new(reputation),
                caught: Mutex::new(HashSet::new()),
                institution,
                institution_name,
                unsent_credits,
                owed_credits,
                owed: Mutex::new(owed),
                live: Mutex::new(live),
                writes: std::sync::atomic::AtomicU64::new(0),
                flushed: std::sync::atomic::AtomicU64::new(0),
                flushing: tokio::sync::Mutex::new(()),
                declined: Mutex::new(HashMap::new()),
                gone_since: Mutex::new(HashMap::new()),
                wake: tokio::sync::Notify::new(),
                ended: tokio::sync::watch::Sender::new(0),
                started: Instant::now(),
                metrics,
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Live>>, JobsError> {
        self.inner
            .live
            .lock()
            .map_err(|_| JobsError::Db("job state poisoned".into()))
    }
}
