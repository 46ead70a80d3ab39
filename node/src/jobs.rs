//! The submitter: jobs this node submitted, their scheduling across the
//! alliance's idle GPUs, and the checking of what comes back.
//!
//! - A job is loaded from its file ([`crate::job::Job`]), its large inputs
//!   go into the blob store, and the job and one record per task are
//!   written to sled before the job id is handed out.
//! - The scheduler matches waiting tasks to live adverts (requirements,
//!   state, free slots, no two replicas of a task on one worker, preferred
//!   institutions first, then the least loaded and fastest GPU), offers
//!   them signed, and re-offers a task whose worker declines, fails, lets
//!   its lease run out or leaves the network, with backoff, up to a retry
//!   limit. When nothing matches, the task says why.
//! - A report is checked (signature by the worker that holds the task, the
//!   attempt it was offered, the kernel, the submitter, every output
//!   against its hash and declared size), outputs are kept as blobs, and a
//!   task is verified when a quorum of replicas agrees under the job's
//!   comparison. The acknowledgement is sent only after the database write
//!   is flushed, so an acknowledged result is never lost.
//! - Every state change is persisted, so a restarted node resumes its jobs:
//!   leases it handed out still stand and results arriving for them count.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alliance_kernels::compare::{self, Tolerance};
use alliance_kernels::intake::Limits;
use alliance_protocol::advert::GpuState;
use alliance_protocol::cert::Member;
use alliance_protocol::task::{
    Binding, BindingKind, Comparison, Credit, CreditedTask, Data, ElemType, JobId,
    MAX_CREDIT_TASKS, Outcome, OutputDigest, TaskOffer, TaskOffers, TaskSpec,
};
use alliance_protocol::wire::{
    Ack, Acks, MAX_BATCH, OFFER_BATCH_BYTES, OfferAnswer, OfferRequest, Reports, short_reason,
};
use alliance_protocol::{Hash, Identity, PublicKey, Signed, Timestamp};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::blobs::{self, Blobs};
use crate::job::spec::{InputKind, Output, Requirements};
use crate::job::{Job, npy};
use crate::net::actor::{AdvertView, Client};
use crate::reputation::{Event, InstitutionView, Reputation, WorkerView};

/// Inputs up to this size ride inside the offer; larger ones are blobs.
const INLINE_INPUT: usize = 64 * 1024;
/// Offers a task may receive: this many per replica it needs, and as
/// many again for settling disagreements.
const ATTEMPTS_PER_REPLICA: u32 = 5;
/// An offer not answered in this time counts as lost.
const OFFER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker that declined is left alone.
const DECLINE_BACKOFF: Duration = Duration::from_secs(5);
/// A worker gone from the network this long loses its tasks.
const GONE_GRACE: Duration = Duration::from_secs(5);
/// A running task's lease: renewed by every progress report (workers send
/// one every [`crate::worker::PROGRESS_EVERY`]), lost without.
pub const LEASE: Duration = Duration::from_secs(30);
/// After a restart, how long workers have to reconnect.
const RECONNECT_GRACE: Duration = Duration::from_secs(30);
/// Scheduler passes woken by events, at least this far apart.
const COALESCE: Duration = Duration::from_millis(2);
/// Scheduler passes, at most this far apart.
const TICK: Duration = Duration::from_millis(250);
/// How long verified results wait for more of their job and worker before
/// a credit pays for fewer than [`MAX_CREDIT_TASKS`] of them: every member
/// checks and stores every credit, so a credit per report batch would cost
/// the alliance many times what a full one does.
const CREDIT_DELAY: Duration = Duration::from_secs(1);

/// The results one credit may pay for: one job's, done by one worker of one
/// institution.
type OwedGroup = (JobId, PublicKey, PublicKey);

/// A job input as stored: shared by every task, or one part per task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    pub binding: u32,
    pub kind: InputKind,
    pub elem: ElemType,
    pub parts: Vec<Data>,
    pub split: bool,
}

/// A job's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Active,
    Done,
    Failed,
    Cancelled,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub submitted_at: Timestamp,
    pub kernel: String,
    pub kernel_hash: Hash,
    pub entry_point: String,
    pub dispatch: [u32; 3],
    pub tasks: u32,
    pub steps: u32,
    pub checkpoint_every: Option<u32>,
    pub timeout_ms: u64,
    pub redundancy: u32,
    /// `redundancy = "auto"`: trusted workers run tasks alone.
    #[serde(default)]
    pub adaptive: bool,
    pub comparison: Comparison,
    pub info_binding: Option<u32>,
    pub inputs: Vec<InputRecord>,
    pub outputs: Vec<Output>,
    pub requirements: Requirements,
    pub state: JobState,
    pub finished_at: Option<Timestamp>,
}

/// One try of a task on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    Offered,
    Running {
        lease_until: Timestamp,
    },
    Returned,
    /// Agreed with the quorum.
    Verified,
    /// Disagreed with the quorum.
    Outvoted,
    /// Ran on another GPU model than the quorum, in a job that compares
    /// replicas only on the same model: not compared, not counted.
    Unmatched,
    Declined {
        reason: String,
    },
    Failed {
        reason: String,
    },
    Lost {
        reason: String,
    },
    /// The worker's owner took the GPU back; the task goes elsewhere, from
    /// its last checkpoint. Not held against the worker.
    HandedBack {
        reason: String,
    },
}

/// A replica of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub attempt: u32,
    pub worker: String,
    pub institution: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    pub offered_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub gpu_time_us: u64,
    pub adapter: String,
    pub outputs: Vec<OutputDigest>,
    /// Hash of the signed receipt's payload, which a credit pays for.
    #[serde(default)]
    pub receipt: Option<Hash>,
    /// The worker's institution, whose account a credit fills.
    #[serde(default)]
    pub institution_key: Option<PublicKey>,
    /// The step this attempt started from (non-zero when it resumed from a
    /// checkpoint).
    #[serde(default)]
    pub start_step: u32,
    /// The last step this attempt sent a checkpoint of.
    #[serde(default)]
    pub checkpoint: Option<u32>,
}

impl Replica {
    fn in_flight(&self) -> bool {
        matches!(
            self.state,
            ReplicaState::Offered | ReplicaState::Running { .. }
        )
    }
    fn returned(&self) -> bool {
        matches!(
            self.state,
            ReplicaState::Returned
                | ReplicaState::Verified
                | ReplicaState::Outvoted
                | ReplicaState::Unmatched
        )
    }
}

/// A task's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Waiting,
    Verified,
    Failed,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub index: u32,
    pub state: TaskState,
    pub replicas: Vec<Replica>,
    pub next_attempt: u32,
    /// Why the task is not running now, when it waits.
    pub waiting: Option<String>,
    /// The verified outputs.
    pub result: Option<Vec<OutputDigest>>,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// A spot check was drawn (or its lone worker was caught lying since):
    /// it needs the job's full redundancy.
    #[serde(default)]
    pub spot_check: bool,
    /// Its result was checked again because the worker that ran it alone
    /// was later caught with a wrong result.
    #[serde(default)]
    pub rechecked: bool,
    /// The checkpoint a new attempt resumes from: the latest one that as
    /// many institutions vouch for as a result would need.
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// Checkpoints the attempts sent, newest last (a few per attempt).
    #[serde(default)]
    pub checkpoints: Vec<SentCheckpoint>,
}

impl TaskRecord {
    /// Task `index` of a job, before anything happened to it.
    fn new(index: u32) -> Self {
        Self {
            index,
            state: TaskState::Waiting,
            replicas: Vec::new(),
            next_attempt: 0,
            waiting: Some("not scheduled yet".into()),
            result: None,
            failure: None,
            spot_check: false,
            rechecked: false,
            checkpoint: None,
            checkpoints: Vec::new(),
        }
    }

    /// Nothing happened to it yet but, perhaps, a reason to wait: it was
    /// never offered (replicas are never taken away).
    fn untouched(&self) -> bool {
        self.replicas.is_empty()
            && self.next_attempt == 0
            && self.state == TaskState::Waiting
            && self.result.is_none()
            && self.failure.is_none()
            && !self.spot_check
            && !self.rechecked
            && self.checkpoint.is_none()
            && self.checkpoints.is_empty()
    }
}

/// A task's state after `step` steps, kept until the task is verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u32,
    /// The state buffers, by binding, in the checkpoint store.
    pub state: Vec<OutputDigest>,
    /// The workers whose checkpoints at this step agree.
    pub workers: Vec<String>,
}

/// A checkpoint one attempt sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentCheckpoint {
    pub attempt: u32,
    pub worker: String,
    pub institution: String,
    pub step: u32,
    pub state: Vec<OutputDigest>,
}

/// Checkpoints remembered per attempt (the newest one's buffers are kept).
const CHECKPOINTS_PER_ATTEMPT: usize = 8;

/// Counts of tasks by state, for progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub queued: u32,
    pub running: u32,
    pub verified: u32,
    pub failed: u32,
}

/// What `GET /v1/jobs` lists.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    pub state: JobState,
    pub tasks: u32,
    pub redundancy: u32,
    pub progress: Progress,
    pub submitted_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    /// Why tasks wait, most common first, with how many.
    pub waiting: Vec<(String, u32)>,
}

/// What `GET /v1/jobs/ID` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDetail {
    pub summary: JobSummary,
    pub outputs: Vec<Output>,
    pub tasks: Vec<TaskRecord>,
}

#[derive(Debug)]
struct Live {
    job: JobRecord,
    tasks: Vec<TaskRecord>,
    /// Workers that accepted a task of this job, and so hold its inputs.
    warm: std::collections::HashSet<String>,
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
    caught: Mutex<std::collections::HashSet<String>>,
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
    #[error("the job database failed: {0}")]
    Db(String),
}

type CheckpointRefs = (HashMap<(String, u32), Vec<Hash>>, HashMap<Hash, u32>);

/// The checkpoint buffers a task keeps: none once it is finished; else
/// those of the checkpoint it would resume from and the newest of each
/// attempt still running.
fn held_checkpoints(t: &TaskRecord) -> Vec<Hash> {
    if t.state != TaskState::Waiting {
        return Vec::new();
    }
    let mut held: Vec<Hash> = t
        .checkpoint
        .iter()
        .flat_map(|c| c.state.iter().map(|d| d.hash))
        .collect();
    for r in t.replicas.iter().filter(|r| r.in_flight()) {
        if let Some(c) = t
            .checkpoints
            .iter()
            .rev()
            .find(|c| c.attempt == r.attempt && c.worker == r.worker)
        {
            held.extend(c.state.iter().map(|d| d.hash));
        }
    }
    held.sort_unstable_by_key(|h| *h.as_bytes());
    held.dedup();
    held
}

fn task_key(id: &str, index: u32) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn db<E: std::fmt::Display>(e: E) -> JobsError {
    JobsError::Db(e.to_string())
}

/// The submitter's tables in the node's database.
#[derive(Debug, Clone)]
pub struct Tables {
    pub jobs: sled::Tree,
    pub tasks: sled::Tree,
    pub outputs: sled::Tree,
    pub reputation: sled::Tree,
    /// Credits signed and not yet handed to the network.
    pub unsent_credits: sled::Tree,
    /// Verified results not yet paid for by a signed credit.
    pub owed_credits: sled::Tree,
}

impl Tables {
    pub fn open(store: &crate::store::Store) -> Result<Self, sled::Error> {
        Ok(Self {
            jobs: store.tree("jobs")?,
            tasks: store.tree("tasks")?,
            outputs: store.tree("outputs")?,
            reputation: store.tree("reputation")?,
            unsent_credits: store.tree("unsent_credits")?,
            owed_credits: store.tree("owed_credits")?,
        })
    }
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
                caught: Mutex::new(std::collections::HashSet::new()),
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
            }),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Live>>, JobsError> {
        self.inner
            .live
            .lock()
            .map_err(|_| JobsError::Db("job state poisoned".into()))
    }

    fn save_job(&self, job: &JobRecord) -> Result<(), JobsError> {
        let v = serde_json::to_vec(job).map_err(db)?;
        self.inner.jobs.insert(job.id.as_bytes(), v).map_err(db)?;
        self.wrote();
        Ok(())
    }

    /// Counts a write that the next flush must cover.
    fn wrote(&self) {
        self.inner
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn save_task(&self, id: &str, task: &TaskRecord) -> Result<(), JobsError> {
        // A task never offered is as [`TaskRecord::new`] makes it on load
        // (only why it waits differs, and the next pass says that again).
        if task.untouched() {
            return Ok(());
        }
        let v = serde_json::to_vec(task).map_err(db)?;
        self.inner
            .tasks
            .insert(task_key(id, task.index), v)
            .map_err(db)?;
        self.wrote();
        self.hold_checkpoints(id, task);
        Ok(())
    }

    /// Keeps the checkpoint buffers `task` needs and deletes those no task
    /// needs any more. A buffer deleted before the record that dropped it
    /// is on disk costs, after a crash, a restart from an older point.
    fn hold_checkpoints(&self, id: &str, task: &TaskRecord) {
        // Every save passes here: a task that never sent a checkpoint
        // (checkpoints are never forgotten to none) holds nothing.
        if task.checkpoint.is_none() && task.checkpoints.is_empty() {
            return;
        }
        let now = held_checkpoints(task);
        let Ok(mut guard) = self.inner.held.lock() else {
            return;
        };
        let (held, refs) = &mut *guard;
        let key = (id.to_owned(), task.index);
        let before = held.get(&key).cloned().unwrap_or_default();
        if before == now {
            return;
        }
        for h in &now {
            *refs.entry(*h).or_default() += 1;
        }
        for h in &before {
            if let Some(n) = refs.get_mut(h) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    refs.remove(h);
                    let _ = std::fs::remove_file(self.inner.checkpoints.path(h));
                }
            }
        }
        if now.is_empty() {
            held.remove(&key);
        } else {
            held.insert(key, now);
        }
    }

    /// Makes every write so far durable. The trees share one database
    /// log, so one flush covers them all.
    fn flush(&self) -> Result<(), JobsError> {
        use std::sync::atomic::Ordering;
        let upto = self.inner.writes.load(Ordering::Acquire);
        self.inner.reputation.write_back().map_err(db)?;
        self.inner.tasks.flush().map_err(db)?;
        self.inner.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// An output's bytes, small (in the database) or large (a blob).
    fn read_output(&self, hash: &Hash) -> Result<Vec<u8>, JobsError> {
        match self.inner.outputs.get(hash.as_bytes()).map_err(db)? {
            Some(v) => Ok(v.to_vec()),
            None => self.inner.blobs.read(hash).map_err(db),
        }
    }

    /// Loads, checks and stores the job file at `path`; returns its
    /// summary, which holds its id.
    pub fn submit(&self, path: &Path, limits: &Limits) -> Result<JobSummary, JobsError> {
        let job = Job::load(path, limits).map_err(|e| JobsError::Refused(e.to_string()))?;
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(db)?;
        let id = JobId(raw).to_string();
        let mut inputs = Vec::new();
        for i in &job.inputs {
            let parts: Vec<&[u8]> = match &i.parts {
                crate::job::spec::Parts::Shared(b) => vec![b.as_slice()],
                crate::job::spec::Parts::Split(p) => p.iter().map(Vec::as_slice).collect(),
            };
            let mut stored = Vec::new();
            for p in parts {
                stored.push(if p.len() <= INLINE_INPUT {
                    Data::Inline(p.to_vec())
                } else {
                    let hash = self.inner.blobs.put(p).map_err(db)?;
                    Data::Blob {
                        hash,
                        len: p.len() as u64,
                    }
                });
            }
            inputs.push(InputRecord {
                binding: i.binding,
                kind: i.kind,
                elem: i.elem,
                split: matches!(i.parts, crate::job::spec::Parts::Split(_)),
                parts: stored,
            });
        }
        let record = JobRecord {
            id: id.clone(),
            name: job.name.clone(),
            submitted_at: Timestamp::now(),
            kernel_hash: Hash::of(job.kernel.as_bytes()),
            kernel: job.kernel,
            entry_point: job.entry_point,
            dispatch: job.dispatch,
            tasks: job.tasks,
            steps: job.steps,
            checkpoint_every: job.checkpoint_every,
            timeout_ms: u64::try_from(job.timeout.as_millis()).unwrap_or(u64::MAX),
            redundancy: job.redundancy,
            adaptive: job.adaptive,
            comparison: job.comparison,
            info_binding: job.info_binding,
            inputs,
            outputs: job.outputs,
            requirements: job.requirements,
            state: JobState::Active,
            finished_at: None,
        };
        // Tasks are stored once they are first offered: the job record
        // alone stands for all its tasks until then, so a job of any size
        // costs one write to submit.
        let tasks: Vec<TaskRecord> = (0..record.tasks).map(TaskRecord::new).collect();
        self.save_job(&record)?;
        self.flush()?;
        info!(job = %id, name = %record.name, tasks = record.tasks, "job submitted");
        let live = Live::new(record, tasks);
        let submitted = summary(&live);
        self.lock()?.insert(id, live);
        self.inner.wake.notify_one();
        Ok(submitted)
    }

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<JobSummary>, JobsError> {
        let live = self.lock()?;
        let mut out: Vec<JobSummary> = live.values().map(summary).collect();
        out.sort_by(|a, b| b.submitted_at.cmp(&a.submitted_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One job with its tasks.
    pub fn detail(&self, id: &str) -> Result<JobDetail, JobsError> {
        let live = self.lock()?;
        let l = live
            .get(id)
            .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        Ok(JobDetail {
            summary: summary(l),
            outputs: l.job.outputs.clone(),
            tasks: l.tasks.clone(),
        })
    }

    /// Stops offering a job's tasks; results still on their way are refused.
    pub fn cancel(&self, id: &str) -> Result<JobSummary, JobsError> {
        let mut live = self.lock()?;
        let l = live
            .get_mut(id)
            .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        if l.job.state == JobState::Active {
            l.job.state = JobState::Cancelled;
            l.job.finished_at = Some(Timestamp::now());
            let job = l.job.clone();
            self.save_job(&job)?;
            self.flush()?;
            self.inner.ended.send_modify(|n| *n += 1);
        }
        Ok(summary(l))
    }

    /// The job's summary once it has ended (done, failed or cancelled), or
    /// after `patience`, whichever comes first.
    pub async fn wait_end(&self, id: &str, patience: Duration) -> Result<JobSummary, JobsError> {
        let mut ended = self.inner.ended.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let now = {
                let live = self.lock()?;
                let l = live
                    .get(id)
                    .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
                summary(l)
            };
            if now.state != JobState::Active {
                return Ok(now);
            }
            match tokio::time::timeout_at(deadline, ended.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(now),
            }
        }
    }

    /// Writes a job's verified outputs to `out` as `.npy` files: one per
    /// output and task (`out<B>-task<N>.npy`), or with `concat` one per
    /// output holding every task's part in task order (`out<B>.npy`).
    pub fn export(&self, id: &str, out: &Path, concat: bool) -> Result<Vec<String>, JobsError> {
        let (job, tasks) = {
            let live = self.lock()?;
            let l = live
                .get(id)
                .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
            (l.job.clone(), l.tasks.clone())
        };
        std::fs::create_dir_all(out)
            .map_err(|e| JobsError::Refused(format!("cannot create {}: {e}", out.display())))?;
        let mut written = Vec::new();
        for o in &job.outputs {
            let mut all = Vec::new();
            let mut complete = true;
            for t in &tasks {
                let Some(d) = t
                    .result
                    .as_ref()
                    .and_then(|r| r.iter().find(|d| d.binding == o.binding))
                else {
                    complete = false;
                    continue;
                };
                let bytes = self.read_output(&d.hash)?;
                if concat {
                    all.extend_from_slice(&bytes);
                } else {
                    let name = format!("out{}-task{}.npy", o.binding, t.index);
                    write_npy(out, &name, o.elem, &[o.len], &bytes)?;
                    written.push(name);
                }
            }
            if concat {
                if !complete {
                    return Err(JobsError::Refused(format!(
                        "not every task of job {id} is verified yet; export them one per task, or wait"
                    )));
                }
                let name = format!("out{}.npy", o.binding);
                write_npy(out, &name, o.elem, &[u64::from(job.tasks), o.len], &all)?;
                written.push(name);
            }
        }
        Ok(written)
    }

    /// Runs the scheduler until the process ends.
    pub async fn run(self) {
        loop {
            let pass = Instant::now();
            if let Err(e) = self.schedule().await {
                warn!("scheduling pass failed: {e}");
            }
            if tokio::time::timeout(TICK, self.inner.wake.notified())
                .await
                .is_ok()
            {
                // Woken by a submission, an answer or a report. Alone, it
                // is acted on at once; in a burst, passes come at most
                // every COALESCE, each for all that arrived since the last.
                if let Some(rest) = COALESCE.checked_sub(pass.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
        }
    }

    async fn schedule(&self) -> Result<(), JobsError> {
        let Ok(adverts) = self.inner.client.gpus().await else {
            return Ok(());
        };
        let Ok(peers) = self.inner.client.peers().await else {
            return Ok(());
        };
        let connected: std::collections::HashSet<String> =
            peers.into_iter().map(|p| p.peer_id).collect();
        let now = Instant::now();
        {
            let mut gone = self
                .inner
                .gone_since
                .lock()
                .map_err(|_| JobsError::Db("poisoned".into()))?;
            gone.retain(|w, _| !connected.contains(w));
        }
        let mut offers: Vec<(String, u32, u32, PeerId, TaskOffer)> = Vec::new();
        let mut kernels: HashMap<String, String> = HashMap::new();
        let mut ended = 0;
        {
            let mut live = self.lock()?;
            let caught: Vec<String> = self
                .inner
                .caught
                .lock()
                .map(|mut c| c.drain().collect())
                .unwrap_or_default();
            if !caught.is_empty() {
                self.recheck(&mut live, &caught)?;
            }
            let in_flight = in_flight_by_worker(&live);
            let mut planned: HashMap<String, u32> = HashMap::new();
            for l in live.values_mut() {
                if l.job.state != JobState::Active {
                    continue;
                }
                // Read the job, write its tasks: no copy of the job's
                // kernel and inputs on every pass.
                let Live {
                    job,
                    tasks,
                    warm,
                    open_from,
                    last_placed,
                    blank_why,
                } = l;
                // Tasks with no replica yet look alike to `choose`, and the
                // market only fills up during a pass: once one of them
                // cannot be placed, the rest wait for the same reason.
                let mut blank_waits: Option<String> = None;
                for t in tasks.iter_mut().skip(*open_from) {
                    if t.state != TaskState::Waiting {
                        continue;
                    }
                    // Past the last task ever offered, every task is one
                    // that cannot be placed now either; once they all say
                    // so, there is nothing to write.
                    if blank_waits.is_some()
                        && *blank_why == blank_waits
                        && last_placed.is_none_or(|p| t.index as usize > p)
                    {
                        break;
                    }
                    let mut changed = self.expire(t, &connected, now);
                    if let Some(wait) = backoff(t) {
                        let why = format!("offered again in {wait} s, after a failed attempt");
                        if t.waiting.as_deref() != Some(why.as_str()) {
                            t.waiting = Some(why);
                            self.save_task(&job.id, t)?;
                        }
                        continue;
                    }
                    let active = count(t.replicas.iter().filter(|r| r.in_flight()));
                    // Attempts handed back by owners who took their GPU
                    // back are nobody's failure and do not count.
                    let handed_back = count(
                        t.replicas
                            .iter()
                            .filter(|r| matches!(r.state, ReplicaState::HandedBack { .. })),
                    );
                    if t.next_attempt.saturating_sub(handed_back)
                        >= ATTEMPTS_PER_REPLICA * (job.redundancy + 1)
                        && active == 0
                    {
                        t.state = TaskState::Failed;
                        let reasons: Vec<String> = t
                            .replicas
                            .iter()
                            .filter_map(|r| match &r.state {
                                ReplicaState::Declined { reason }
                                | ReplicaState::Failed { reason }
                                | ReplicaState::Lost { reason } => {
                                    Some(format!("{}: {reason}", short(&r.worker)))
                                }
                                _ => None,
                            })
                            .collect();
                        t.failure = Some(format!(
                            "gave up after {} offers: {}",
                            t.next_attempt,
                            reasons.join("; ")
                        ));
                        t.waiting = None;
                        self.save_task(&job.id, t)?;
                        continue;
                    }
                    // The replicas a task needs can grow as they are
                    // placed: an adaptive job's task that goes to an
                    // untrusted worker needs a second opinion at once.
                    for _ in 0..MAX_REPLICAS {
                        let target = target_replicas(self.required(job, t), t);
                        let have =
                            count(t.replicas.iter().filter(|r| r.in_flight() || r.returned()));
                        if have >= target {
                            break;
                        }
                        if t.replicas.is_empty()
                            && let Some(why) = &blank_waits
                        {
                            if t.waiting.as_ref() != Some(why) {
                                t.waiting = Some(why.clone());
                                changed = true;
                            }
                            break;
                        }
                        match self.choose(
                            job,
                            t,
                            &Market {
                                adverts: &adverts,
                                connected: &connected,
                                in_flight: &in_flight,
                                planned: &planned,
                                warm,
                            },
                        ) {
                            Ok(advert) => {
                                let Ok(peer) = advert.peer_id.parse::<PeerId>() else {
                                    continue;
                                };
                                let Ok(worker_key) = PublicKey::from_peer_id(&peer) else {
                                    continue;
                                };
                                let attempt = t.next_attempt;
                                t.next_attempt += 1;
                                let spec = self.resume_spec(job, t);
                                let start_step = spec.start_step;
                                let offer = TaskOffer {
                                    spec,
                                    worker: worker_key,
                                    attempt,
                                    expires_at: Timestamp::now().saturating_add_secs(60),
                                };
                                t.replicas.push(Replica {
                                    attempt,
                                    worker: advert.peer_id.clone(),
                                    institution: advert.institution.clone(),
                                    state: ReplicaState::Offered,
                                    offered_at: Timestamp::now(),
                                    finished_at: None,
                                    gpu_time_us: 0,
                                    adapter: String::new(),
                                    outputs: Vec::new(),
                                    receipt: None,
                                    institution_key: None,
                                    start_step,
                                    checkpoint: None,
                                });
                                t.waiting = None;
                                *last_placed = (*last_placed).max(Some(t.index as usize));
                                let chosen = advert.peer_id.clone();
                                warm.insert(chosen.clone());
                                *planned.entry(chosen).or_default() += 1;
                                if !kernels.contains_key(&job.id) {
                                    kernels.insert(job.id.clone(), job.kernel.clone());
                                }
                                offers.push((job.id.clone(), t.index, attempt, peer, offer));
                                changed = true;
                            }
                            Err(Unplaced::Exhausted(why)) if active == 0 => {
                                // Disagreement, and nobody left to ask:
                                // the task fails with the evidence.
                                t.state = TaskState::Failed;
                                t.failure = Some(why);
                                t.waiting = None;
                                changed = true;
                                break;
                            }
                            Err(Unplaced::Exhausted(why) | Unplaced::Waits(why)) => {
                                if t.replicas.is_empty() {
                                    blank_waits = Some(why.clone());
                                }
                                if t.waiting.as_deref() != Some(why.as_str()) {
                                    t.waiting = Some(why);
                                    changed = true;
                                }
                                break;
                            }
                        }
                    }
                    if changed {
                        self.save_task(&job.id, t)?;
                    }
                }
                // Every task that was never offered waits for this reason
                // now (those before the first that could not be placed
                // were placed).
                *blank_why = blank_waits;
                l.advance();
                if l.open_from >= l.tasks.len() {
                    let failed = l.tasks.iter().any(|t| t.state == TaskState::Failed);
                    let job = &mut l.job;
                    job.state = if failed {
                        JobState::Failed
                    } else {
                        JobState::Done
                    };
                    job.finished_at = Some(Timestamp::now());
                    info!(job = %job.id, state = ?job.state, "job finished");
                    self.save_job(job)?;
                    ended += 1;
                }
            }
        }
        // Credits read before the flush are durable after it, with the
        // verifications that earned them.
        let (keys, credits): (Vec<_>, Vec<_>) = self
            .inner
            .unsent_credits
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k, Signed::<Credit>::from_bytes(&v).ok()?)))
            .unzip();
        self.durable().await?;
        if ended > 0 {
            self.inner.ended.send_modify(|n| *n += ended);
        }
        if !credits.is_empty() && self.inner.client.publish_credits(credits).await.is_ok() {
            for k in keys {
                let _ = self.inner.unsent_credits.remove(k);
            }
        }
        // One request per worker and job, up to a batch: a pass that
        // places many small tasks on a worker sends them, and the kernel,
        // once.
        let mut batches: Vec<OfferBatch> = Vec::new();
        for (id, index, attempt, peer, offer) in offers {
            let size = offer_size(&offer);
            let open = batches.iter_mut().rev().find(|b| {
                b.peer == peer
                    && b.job == id
                    && b.offers.len() < MAX_BATCH
                    && b.bytes + size <= OFFER_BATCH_BYTES
            });
            match open {
                Some(b) => {
                    b.bytes += size;
                    b.tasks.push((index, attempt));
                    b.offers.push(offer);
                }
                None => batches.push(OfferBatch {
                    peer,
                    kernel: kernels.get(&id).cloned().unwrap_or_default(),
                    job: id,
                    bytes: size,
                    tasks: vec![(index, attempt)],
                    offers: vec![offer],
                }),
            }
        }
        for b in batches {
            let me = self.clone();
            tokio::spawn(async move {
                // One signature for the batch.
                let answers = match Signed::sign(&TaskOffers(b.offers), &me.inner.identity) {
                    Ok(offers) => me
                        .inner
                        .client
                        .offer(
                            b.peer,
                            OfferRequest {
                                offers,
                                kernel_source: Some(b.kernel),
                            },
                        )
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|a| a),
                    Err(e) => Err(format!("the offers cannot be signed: {e}")),
                };
                let mut answers = match answers {
                    Ok(a) if a.0.len() == b.tasks.len() => a.0.into_iter().map(Ok).collect(),
                    // A request the worker could not read at all is
                    // declined with one answer for every offer.
                    Ok(a) if a.0.len() == 1 => vec![Ok(a.0[0].clone()); b.tasks.len()],
                    Ok(a) => vec![
                        Err(format!(
                            "the worker answered {} of {} offers",
                            a.0.len(),
                            b.tasks.len()
                        ));
                        b.tasks.len()
                    ],
                    Err(e) => vec![Err(e); b.tasks.len()],
                }
                .into_iter();
                me.on_answers(&b.job, b.peer, b.tasks.iter().copied().zip(&mut answers));
            });
        }
        Ok(())
    }

    /// Tasks of `redundancy = "auto"` jobs that a worker since caught with
    /// a wrong result verified alone go to other workers again; their jobs
    /// become active again until that is done.
    fn recheck(
        &self,
        live: &mut BTreeMap<String, Live>,
        caught: &[String],
    ) -> Result<(), JobsError> {
        for l in live.values_mut() {
            if !l.job.adaptive || l.job.state == JobState::Cancelled {
                continue;
            }
            let mut reopened = 0u32;
            for t in &mut l.tasks {
                if t.state != TaskState::Verified {
                    continue;
                }
                let verified: Vec<usize> = (0..t.replicas.len())
                    .filter(|&i| t.replicas[i].state == ReplicaState::Verified)
                    .collect();
                let [alone] = verified[..] else {
                    continue;
                };
                if !caught.contains(&t.replicas[alone].worker) {
                    continue;
                }
                t.replicas[alone].state = ReplicaState::Returned;
                t.state = TaskState::Waiting;
                t.result = None;
                t.spot_check = true;
                t.rechecked = true;
                t.waiting = Some(
                    "checked again: the worker that ran it alone was since caught with a wrong result"
                        .into(),
                );
                self.save_task(&l.job.id, t)?;
                reopened += 1;
            }
            if reopened > 0 {
                // Tasks anywhere in the job are open again.
                l.open_from = 0;
                warn!(job = %l.job.id, tasks = reopened, "checking again what a worker caught lying ran alone");
                if l.job.state != JobState::Active {
                    l.job.state = JobState::Active;
                    l.job.finished_at = None;
                    self.save_job(&l.job)?;
                }
            }
        }
        Ok(())
    }

    /// Ends replicas whose lease ran out, whose offer went unanswered, or
    /// whose worker left. Returns whether anything changed.
    fn expire(
        &self,
        t: &mut TaskRecord,
        connected: &std::collections::HashSet<String>,
        now: Instant,
    ) -> bool {
        let wall = Timestamp::now();
        let mut changed = false;
        let Ok(mut gone) = self.inner.gone_since.lock() else {
            return false;
        };
        for r in &mut t.replicas {
            let reason = match &r.state {
                ReplicaState::Running { lease_until }
                    if *lease_until <= wall
                        && now.duration_since(self.inner.started) >= RECONNECT_GRACE =>
                {
                    Some("no result before the lease ended".to_owned())
                }
                ReplicaState::Offered
                    if r.offered_at.saturating_add_secs(OFFER_TIMEOUT.as_secs()) <= wall =>
                {
                    Some("no answer to the offer".to_owned())
                }
                ReplicaState::Offered | ReplicaState::Running { .. }
                    if !connected.contains(&r.worker)
                        && now.duration_since(self.inner.started) >= RECONNECT_GRACE =>
                {
                    let since = *gone.entry(r.worker.clone()).or_insert(now);
                    (now.duration_since(since) >= GONE_GRACE)
                        .then(|| "the worker left the network".to_owned())
                }
                _ => None,
            };
            if let Some(reason) = reason {
                info!(worker = %short(&r.worker), task = t.index, %reason, "task replica lost; offering it again");
                // Only a task the worker accepted counts against it.
                if matches!(r.state, ReplicaState::Running { .. }) {
                    self.count_against(&r.worker, &r.institution, Event::Lapsed);
                }
                r.state = ReplicaState::Lost { reason };
                r.finished_at = Some(wall);
                changed = true;
            }
        }
        changed
    }

    /// The best worker for another replica of `t`, or why there is none.
    fn choose<'a>(
        &self,
        job: &JobRecord,
        t: &TaskRecord,
        market: &Market<'a>,
    ) -> Result<&'a AdvertView, Unplaced> {
        let Market {
            adverts,
            connected,
            in_flight,
            planned,
            warm,
        } = *market;
        let req = &job.requirements;
        let remote: Vec<&AdvertView> = adverts.iter().filter(|a| !a.local).collect();
        if remote.is_empty() {
            return Err(Unplaced::Waits("no other member advertises a GPU".into()));
        }
        let needed_bytes = job_buffer_bytes(job);
        let capable: Vec<&AdvertView> = remote
            .iter()
            .copied()
            .filter(|a| !req.avoid_institutions.contains(&a.institution))
            .filter(|a| {
                a.gpus.iter().any(|g| {
                    (req.backends.is_empty()
                        || req
                            .backends
                            .iter()
                            .any(|b| b.eq_ignore_ascii_case(&format!("{:?}", g.backend))))
                        && (!req.hardware_only
                            || g.device_type != alliance_protocol::advert::DeviceType::Cpu)
                        && g.limits.max_buffer_size >= (req.min_memory_mib << 20).max(needed_bytes)
                })
            })
            .collect();
        // The owners' terms: who may use a GPU, for how long, with how
        // much memory.
        let me = self.inner.institution_name.as_str();
        let timeout_secs = job.timeout_ms.div_ceil(1000);
        let fits = |g: &alliance_protocol::advert::GpuInfo| {
            g.terms.check(me, job.timeout_ms, needed_bytes).is_ok()
        };
        let refused: Vec<&AdvertView> = capable
            .iter()
            .copied()
            .filter(|a| !a.gpus.iter().any(fits))
            .collect();
        if !capable.is_empty() && refused.len() == capable.len() {
            let mut why: Vec<String> = Vec::new();
            let gpus = || refused.iter().flat_map(|a| &a.gpus);
            let denied = gpus().filter(|g| !g.terms.admits(me)).count();
            if denied > 0 {
                why.push(format!(
                    "{denied} refuse{} {me} (their owners' allow or deny lists)",
                    if denied == 1 { "s" } else { "" }
                ));
            }
            if let Some(max) = gpus()
                .filter(|g| g.terms.admits(me) && g.terms.max_task_secs > 0)
                .map(|g| g.terms.max_task_secs)
                .max()
                .filter(|max| timeout_secs > *max)
            {
                why.push(format!(
                    "owners allow tasks of at most {max} s and this job's timeout_secs is {timeout_secs}"
                ));
            }
            if let Some(max) = gpus()
                .filter(|g| g.terms.admits(me) && g.terms.max_task_bytes > 0)
                .map(|g| g.terms.max_task_bytes)
                .max()
                .filter(|max| needed_bytes > *max)
            {
                why.push(format!(
                    "owners allow at most {} MiB per task and this job needs {} MiB",
                    max >> 20,
                    needed_bytes.div_ceil(1 << 20)
                ));
            }
            return Err(Unplaced::Waits(format!(
                "the {} matching GPU{} will not take this job: {}",
                refused.len(),
                if refused.len() == 1 { "" } else { "s" },
                why.join("; ")
            )));
        }
        let capable: Vec<&AdvertView> = capable
            .into_iter()
            .filter(|a| a.gpus.iter().any(fits))
            .collect();
        if capable.is_empty() {
            let mut what = Vec::new();
            if req.min_memory_mib > 0 {
                what.push(format!("{} MiB buffers", req.min_memory_mib));
            }
            if !req.backends.is_empty() {
                what.push(format!("the {} backend", req.backends.join(" or ")));
            }
            if req.hardware_only {
                what.push("a hardware GPU".into());
            }
            if what.is_empty() {
                what.push(format!("buffers of {needed_bytes} bytes"));
            }
            return Err(Unplaced::Waits(format!(
                "no member advertises a GPU with {} ({} advertise{} GPUs{})",
                what.join(", "),
                remote.len(),
                if remote.len() == 1 { "s" } else { "" },
                if req.avoid_institutions.is_empty() {
                    String::new()
                } else {
                    format!(", avoiding {}", req.avoid_institutions.join(", "))
                }
            )));
        }
        let holders: std::collections::HashSet<&str> = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .map(|r| r.worker.as_str())
            .collect();
        let fresh: Vec<&AdvertView> = capable
            .iter()
            .copied()
            .filter(|a| !holders.contains(a.peer_id.as_str()))
            .collect();
        // Never two replicas of a task to one institution while another
        // can take it: colleagues who share a bug, a build or a motive
        // must not form a quorum between themselves.
        let used_institutions: std::collections::HashSet<&str> = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .map(|r| r.institution.as_str())
            .collect();
        let other_institution =
            |a: &&AdvertView| !used_institutions.contains(a.institution.as_str());
        let fresh: Vec<&AdvertView> = if fresh
            .iter()
            .any(|a| other_institution(a) && connected.contains(&a.peer_id))
        {
            fresh.into_iter().filter(other_institution).collect()
        } else {
            fresh
        };
        if fresh.is_empty() {
            let returned = count(t.replicas.iter().filter(|r| r.returned()));
            if returned >= self.required(job, t) {
                return Err(Unplaced::Exhausted(format!(
                    "{EXHAUSTED}: {}",
                    disagreement(t)
                )));
            }
            return Err(Unplaced::Waits(format!(
                "the {} matching worker{} already hold{} a replica of this task; redundancy {} needs more workers",
                capable.len(),
                if capable.len() == 1 { "" } else { "s" },
                if capable.len() == 1 { "s" } else { "" },
                job.redundancy
            )));
        }
        let declined = self
            .inner
            .declined
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let free: Vec<&AdvertView> = fresh
            .iter()
            .copied()
            .filter(|a| connected.contains(&a.peer_id))
            .filter(|a| {
                declined
                    .get(&a.peer_id)
                    .is_none_or(|at| at.elapsed() >= DECLINE_BACKOFF)
            })
            .filter(|a| {
                let slots: u32 = a
                    .gpus
                    .iter()
                    .filter(|g| g.state == GpuState::Idle || g.state == GpuState::Busy)
                    .filter(|g| fits(g))
                    .map(|g| u32::from(g.free_slots))
                    .sum();
                let used = in_flight.get(&a.peer_id).copied().unwrap_or(0)
                    + planned.get(&a.peer_id).copied().unwrap_or(0);
                slots > used
            })
            .collect();
        if free.is_empty() {
            let paused = fresh
                .iter()
                .filter(|a| a.gpus.iter().all(|g| g.state == GpuState::Paused))
                .count();
            let recent: Vec<String> = t
                .replicas
                .iter()
                .rev()
                .filter_map(|r| match &r.state {
                    ReplicaState::Declined { reason } => {
                        Some(format!("{} declined: {reason}", short(&r.worker)))
                    }
                    _ => None,
                })
                .take(2)
                .collect();
            let mut why = format!(
                "all {} matching GPU{} are busy or paused ({paused} paused)",
                fresh.len(),
                if fresh.len() == 1 { "" } else { "s" }
            );
            let mut owners: Vec<String> = fresh
                .iter()
                .flat_map(|a| {
                    a.gpus
                        .iter()
                        .filter(|g| !g.reason.is_empty())
                        .map(|g| format!("{}: {}", short(&a.peer_id), g.reason))
                })
                .collect();
            owners.sort();
            owners.dedup();
            if !owners.is_empty() {
                let more = owners.len().saturating_sub(3);
                owners.truncate(3);
                why.push_str(&format!(": {}", owners.join("; ")));
                if more > 0 {
                    why.push_str(&format!("; and {more} more"));
                }
            }
            if !recent.is_empty() {
                why.push_str(&format!("; {}", recent.join("; ")));
            }
            return Err(Unplaced::Waits(why));
        }
        // A second opinion on an adaptive job's task comes from a trusted
        // worker where one is free: a check by a stranger catches a liar
        // only as often as the stranger is honest.
        let checking = job.adaptive && !used_institutions.is_empty();
        // With `group_by_gpu`, a GPU of a model that already returned a
        // replica of this task can complete its quorum.
        let models: Vec<&str> = if job.requirements.group_by_gpu {
            t.replicas
                .iter()
                .filter(|r| r.returned())
                .map(|r| r.adapter.as_str())
                .collect()
        } else {
            Vec::new()
        };
        // Preferred institutions first, then institutions that hold no
        // replica of this task yet, then trusted checkers, then the least
        // loaded, then among those workers that already hold the job's
        // inputs, then the fastest. Load comes before warm inputs: a GPU
        // holds many tasks at once, and warmth first would pile a job on
        // the worker that took its first task.
        let best = free
            .iter()
            .copied()
            .min_by_key(|x| {
                let preferred = job
                    .requirements
                    .prefer_institutions
                    .contains(&x.institution);
                let spread = used_institutions.contains(x.institution.as_str());
                let load = in_flight.get(&x.peer_id).copied().unwrap_or(0)
                    + planned.get(&x.peer_id).copied().unwrap_or(0);
                let speed = x
                    .gpus
                    .iter()
                    .filter_map(|g| g.bench.as_ref().map(|b| b.fma_mflops))
                    .max()
                    .unwrap_or(0);
                let untrusted_checker =
                    checking && !self.inner.reputation.worker(&x.peer_id).trusted();
                let other_model = !models.is_empty()
                    && !x.gpus.iter().any(|g| {
                        models
                            .iter()
                            .any(|m| m.starts_with(&format!("{} (", g.name)))
                    });
                (
                    !preferred,
                    spread,
                    other_model,
                    untrusted_checker,
                    load,
                    !warm.contains(&x.peer_id),
                    std::cmp::Reverse(speed),
                    x.peer_id.clone(),
                )
            })
            .ok_or_else(|| Unplaced::Waits("no worker".into()))?;
        Ok(best)
    }

    /// Records a worker's answers to offers of tasks of job `id`, given as
    /// ((task, attempt), answer).
    fn on_answers(
        &self,
        id: &str,
        peer: PeerId,
        answers: impl Iterator<Item = ((u32, u32), Result<OfferAnswer, String>)>,
    ) {
        let worker = peer.to_string();
        let Ok(mut live) = self.lock() else {
            return;
        };
        let Some(l) = live.get_mut(id) else {
            return;
        };
        for ((index, attempt), answer) in answers {
            let Some(t) = l.tasks.get_mut(index as usize) else {
                continue;
            };
            let Some(r) = t
                .replicas
                .iter_mut()
                .find(|r| r.attempt == attempt && r.worker == worker)
            else {
                continue;
            };
            if r.state != ReplicaState::Offered {
                continue;
            }
            r.state = match answer {
                // The lease runs on this node's clock; progress reports
                // renew it.
                Ok(OfferAnswer::Accept { .. }) => ReplicaState::Running {
                    lease_until: lease_from_now(),
                },
                Ok(OfferAnswer::Decline(reason)) => {
                    if let Ok(mut d) = self.inner.declined.lock() {
                        d.insert(worker.clone(), Instant::now());
                    }
                    ReplicaState::Declined {
                        reason: describe_decline(&reason),
                    }
                }
                Err(e) => ReplicaState::Lost {
                    reason: format!("the offer did not arrive: {e}"),
                },
            };
            // An acceptance is written with the task's next change (its
            // result, most often), not on its own: after a crash the replica
            // reads as offered, which a progress report or the result turns
            // back into running, and which an offer's timeout ends if the
            // worker never speaks again, as a lease would. Like the leases
            // that progress reports renew, it lives in memory.
            if r.in_flight() {
                continue;
            }
            r.finished_at = Some(Timestamp::now());
            // No sync here, with the job state locked: an answer promises
            // nothing to anyone, and the pass this wakes flushes it.
            if self.save_task(id, t).is_err() {
                warn!(job = %id, "cannot save an offer's answer");
            }
        }
        self.inner.wake.notify_one();
    }

    /// A worker says a task still runs (its lease is renewed), or sends a
    /// checkpoint (kept once it checks out, acknowledged once durable).
    pub async fn progress(
        &self,
        peer: PeerId,
        member: &Member,
        p: alliance_protocol::wire::Progress,
    ) -> Ack {
        use alliance_protocol::wire::Progress as P;
        let (job, task, attempt) = match &p {
            P::Running {
                job, task, attempt, ..
            } => (*job, *task, *attempt),
            P::Checkpoint { record, state } => {
                return match self.take_checkpoint(peer, record, state).await {
                    Ok(()) => match self.durable().await {
                        Ok(()) => Ack::Ok,
                        Err(e) => Ack::Refused(format!("cannot record the checkpoint: {e}")),
                    },
                    Err(Refusal::Late(why) | Refusal::Again(why)) => Ack::Refused(why),
                    Err(Refusal::Bad(why)) => {
                        warn!(%peer, %why, "bad checkpoint");
                        self.count_against(
                            &peer.to_string(),
                            &member.institution_name,
                            Event::Wrong,
                        );
                        let _ = self.inner.client.punish(peer, why.clone()).await;
                        Ack::Refused(why)
                    }
                };
            }
        };
        let worker = peer.to_string();
        let id = job.to_string();
        let Ok(mut live) = self.lock() else {
            return Ack::Refused("job state unavailable".into());
        };
        let Some(r) = live
            .get_mut(&id)
            .filter(|l| l.job.state == JobState::Active)
            .and_then(|l| l.tasks.get_mut(task as usize))
            .and_then(|t| {
                t.replicas
                    .iter_mut()
                    .find(|r| r.attempt == attempt && r.worker == worker)
            })
        else {
            return Ack::Refused("no such task here".into());
        };
        match r.state {
            ReplicaState::Running { .. } | ReplicaState::Offered => {
                r.state = ReplicaState::Running {
                    lease_until: lease_from_now(),
                };
                Ack::Ok
            }
            _ => Ack::Refused("this attempt is no longer wanted".into()),
        }
    }

    /// Checks a checkpoint against the attempt that sends it and the job,
    /// fetches its buffers and keeps it; a checkpoint that as many
    /// institutions vouch for as a result needs becomes the task's resume
    /// point.
    async fn take_checkpoint(
        &self,
        peer: PeerId,
        record: &Signed<alliance_protocol::task::CheckpointRecord>,
        state: &[(u32, Data)],
    ) -> Result<(), Refusal> {
        let bad = |m: String| Refusal::Bad(m);
        let worker_key = PublicKey::from_peer_id(&peer).map_err(|e| bad(e.to_string()))?;
        let rec = record
            .verify()
            .map_err(|e| bad(format!("its checkpoint does not verify: {e}")))?;
        if record.signer() != worker_key || rec.worker != worker_key {
            return Err(bad(
                "signed a checkpoint with a key that is not its own".into()
            ));
        }
        let (id, worker) = (rec.job.to_string(), peer.to_string());
        // What the job expects: its state buffers and their sizes.
        let expected: Vec<(u32, u64)> = {
            let live = self.lock().map_err(|e| Refusal::Late(e.to_string()))?;
            let l = live
                .get(&id)
                .filter(|l| l.job.state == JobState::Active)
                .ok_or_else(|| Refusal::Late("no such active job here".into()))?;
            let t = l
                .tasks
                .get(rec.task as usize)
                .ok_or_else(|| bad("a checkpoint of no task of the job".into()))?;
            let r = t
                .replicas
                .iter()
                .find(|r| r.attempt == rec.attempt && r.worker == worker && r.in_flight())
                .ok_or_else(|| Refusal::Late("this attempt is no longer wanted".into()))?;
            if rec.kernel != l.job.kernel_hash {
                return Err(bad("the checkpoint names another kernel".into()));
            }
            let Some(every) = l.job.checkpoint_every else {
                return Err(bad("a checkpoint of a job that takes none".into()));
            };
            if rec.step == 0 || rec.step >= l.job.steps || !rec.step.is_multiple_of(every) {
                return Err(bad(format!(
                    "a checkpoint at step {} of {}, every {every}",
                    rec.step, l.job.steps
                )));
            }
            if rec.step <= r.checkpoint.unwrap_or(r.start_step) {
                return Err(Refusal::Again(format!(
                    "step {} is not past this attempt's last checkpoint",
                    rec.step
                )));
            }
            l.job
                .inputs
                .iter()
                .filter(|i| i.kind == InputKind::State)
                .map(|i| {
                    let part = if i.split {
                        i.parts.get(rec.task as usize)
                    } else {
                        i.parts.first()
                    };
                    (i.binding, part.map_or(0, Data::len))
                })
                .collect()
        };
        if rec.state.len() != expected.len()
            || state.len() != expected.len()
            || expected.iter().any(|(b, len)| {
                !rec.state.iter().any(|d| d.binding == *b && d.len == *len)
                    || !state.iter().any(|(sb, _)| sb == b)
            })
        {
            return Err(bad(
                "the checkpoint's buffers are not the job's state buffers".into(),
            ));
        }
        for (binding, data) in state {
            let d = rec
                .state
                .iter()
                .find(|d| d.binding == *binding)
                .ok_or_else(|| bad(format!("state {binding} is not in the record")))?;
            match data {
                Data::Inline(bytes) => {
                    if Hash::of(bytes) != d.hash || bytes.len() as u64 != d.len {
                        return Err(bad(format!("state {binding} does not match its hash")));
                    }
                    self.inner
                        .checkpoints
                        .put(bytes)
                        .map_err(|e| Refusal::Late(format!("cannot keep the checkpoint: {e}")))?;
                }
                Data::Blob { hash, len } => {
                    if *hash != d.hash || *len != d.len {
                        return Err(bad(format!(
                            "state {binding} names another blob than its record"
                        )));
                    }
                    blobs::fetch(
                        &self.inner.client,
                        &self.inner.checkpoints,
                        peer,
                        *hash,
                        *len,
                    )
                    .await
                    .map_err(|e| match e {
                        blobs::BlobError::HashMismatch { .. } => Refusal::Bad(e.to_string()),
                        other => Refusal::Late(other.to_string()),
                    })?;
                }
            }
        }
        let mut live = self.lock().map_err(|e| Refusal::Late(e.to_string()))?;
        let Live { job, tasks, .. } = live
            .get_mut(&id)
            .ok_or_else(|| Refusal::Late("no such job here".into()))?;
        let t = tasks
            .get_mut(rec.task as usize)
            .ok_or_else(|| Refusal::Late("no such task".into()))?;
        let r = t
            .replicas
            .iter_mut()
            .find(|r| r.attempt == rec.attempt && r.worker == worker && r.in_flight())
            .ok_or_else(|| Refusal::Late("this attempt is no longer wanted".into()))?;
        r.checkpoint = Some(rec.step);
        let institution = r.institution.clone();
        let mut digests = rec.state.clone();
        digests.sort_by_key(|d| d.binding);
        t.checkpoints.push(SentCheckpoint {
            attempt: rec.attempt,
            worker: worker.clone(),
            institution,
            step: rec.step,
            state: digests.clone(),
        });
        let mine = count(t.checkpoints.iter().filter(|c| c.attempt == rec.attempt));
        if mine as usize > CHECKPOINTS_PER_ATTEMPT
            && let Some(oldest) = t.checkpoints.iter().position(|c| c.attempt == rec.attempt)
        {
            t.checkpoints.remove(oldest);
        }
        // Vouched for like a result: by as many institutions as the task's
        // quorum (workers, where the task's replicas all come from one).
        let agreeing: Vec<&SentCheckpoint> = t
            .checkpoints
            .iter()
            .filter(|c| c.step == rec.step && c.state == digests)
            .collect();
        let institutions: std::collections::HashSet<&str> =
            t.replicas.iter().map(|r| r.institution.as_str()).collect();
        let support = if institutions.len() <= 1 {
            count(
                agreeing
                    .iter()
                    .map(|c| &c.worker)
                    .collect::<std::collections::HashSet<_>>()
                    .into_iter(),
            )
        } else {
            count(
                agreeing
                    .iter()
                    .map(|c| &c.institution)
                    .collect::<std::collections::HashSet<_>>()
                    .into_iter(),
            )
        };
        if support >= quorum(self.required(job, t))
            && t.checkpoint.as_ref().is_none_or(|c| c.step < rec.step)
        {
            t.checkpoint = Some(Checkpoint {
                step: rec.step,
                state: digests,
                workers: agreeing.iter().map(|c| c.worker.clone()).collect(),
            });
        }
        self.save_task(&id, t)
            .map_err(|e| Refusal::Late(e.to_string()))
    }

    /// The offer's task for another attempt of `t`: from its checkpoint
    /// when it has one whose buffers are at hand, else from the start.
    fn resume_spec(&self, job: &JobRecord, t: &mut TaskRecord) -> TaskSpec {
        let mut spec = spec(job, t.index);
        let Some(c) = &t.checkpoint else {
            return spec;
        };
        let mut state = Vec::new();
        for d in &c.state {
            let data = if d.len <= INLINE_INPUT as u64 {
                self.inner.checkpoints.read(&d.hash).ok().map(Data::Inline)
            } else {
                // Workers fetch it from the blob store this node serves.
                self.inner
                    .checkpoints
                    .read(&d.hash)
                    .ok()
                    .and_then(|bytes| self.inner.blobs.put(&bytes).ok())
                    .map(|hash| Data::Blob { hash, len: d.len })
            };
            match data {
                Some(data) if data.hash() == d.hash => state.push((d.binding, data)),
                _ => {
                    warn!(job = %job.id, task = t.index, step = c.step, "a checkpoint's buffer is missing; the task starts over");
                    t.checkpoint = None;
                    return spec;
                }
            }
        }
        for b in &mut spec.bindings {
            if let BindingKind::State { data, .. } = &mut b.kind
                && let Some((_, d)) = state.iter().find(|(binding, _)| *binding == b.binding)
            {
                *data = d.clone();
            }
        }
        spec.start_step = c.step;
        spec
    }

    /// Checks and records a worker's report; the answer goes back to it.
    /// Takes a batch of reports from `peer` (at most `MAX_BATCH`: the
    /// codec refuses more); every result kept is durable before the
    /// acknowledgements (one disk sync for the batch) go back.
    pub async fn reports(&self, peer: PeerId, member: &Member, reports: Reports) -> Acks {
        // One signature covers the batch: checked once, by the key of the
        // peer that sent it.
        let worker = reports.outcomes.signer();
        let own = PublicKey::from_peer_id(&peer).is_ok_and(|k| k == worker);
        let count = reports.outputs.len();
        let opened = if own {
            reports.open()
        } else {
            Err("signed its reports with a key that is not its own".to_owned())
        };
        let reports = match opened {
            Ok(reports) => reports,
            Err(why) => {
                warn!(%peer, %why, "bad reports");
                self.count_against(&peer.to_string(), &member.institution_name, Event::Wrong);
                let _ = self.inner.client.punish(peer, why.clone()).await;
                return Acks(vec![Ack::Refused(short_reason(why)); count]);
            }
        };
        let mut acks = Vec::with_capacity(reports.len());
        let mut kept = false;
        for (outcome, outputs) in reports {
            acks.push(
                match self
                    .take_report(peer, member, worker, outcome, outputs)
                    .await
                {
                    Ok(()) => {
                        kept = true;
                        None
                    }
                    Err(Refusal::Late(why)) => Some(why),
                    Err(Refusal::Again(why)) => {
                        self.count_against(
                            &peer.to_string(),
                            &member.institution_name,
                            Event::Lapsed,
                        );
                        Some(why)
                    }
                    Err(Refusal::Bad(why)) => {
                        warn!(%peer, %why, "bad report");
                        self.count_against(
                            &peer.to_string(),
                            &member.institution_name,
                            Event::Wrong,
                        );
                        let _ = self.inner.client.punish(peer, why.clone()).await;
                        Some(why)
                    }
                },
            );
        }
        let synced = if kept {
            self.inner.wake.notify_one();
            self.durable()
                .await
                .map_err(|e| format!("cannot record the result: {e}"))
        } else {
            Ok(())
        };
        Acks(
            acks.into_iter()
                .map(|refused| match (refused, &synced) {
                    (Some(why), _) => Ack::Refused(short_reason(why)),
                    (None, Err(why)) => Ack::Refused(short_reason(why.clone())),
                    (None, Ok(())) => Ack::Ok,
                })
                .collect(),
        )
    }

    async fn take_report(
        &self,
        peer: PeerId,
        member: &Member,
        worker: PublicKey,
        outcome: Outcome,
        sent: Vec<(u32, Data)>,
    ) -> Result<(), Refusal> {
        let about = outcome.about();
        let (task, attempt) = (about.task, about.attempt);
        if about.worker != worker {
            return Err(Refusal::Bad(
                "a report names another worker than its signer".into(),
            ));
        }
        if about.submitter != self.inner.identity.public() {
            return Err(Refusal::Late("the report is for another submitter".into()));
        }
        let id = about.job.to_string();
        let worker_id = peer.to_string();
        let (kernel_hash, outputs) = self.expect_replica(&id, task, attempt, &worker_id)?;
        if about.kernel != kernel_hash {
            return Err(Refusal::Bad("the report names another kernel".into()));
        }
        match outcome {
            Outcome::Failed(f) => {
                let reason = f.reason;
                self.finish_replica(&id, task, attempt, &worker_id, |r| {
                    self.count_against(&r.worker, &r.institution, Event::Lapsed);
                    r.state = ReplicaState::Failed { reason };
                })
            }
            Outcome::HandedBack(f) => {
                let reason = f.reason;
                info!(job = %id, task, worker = %short(&worker_id), %reason, "task handed back; offering it elsewhere");
                self.finish_replica(&id, task, attempt, &worker_id, |r| {
                    r.state = ReplicaState::HandedBack { reason };
                })
            }
            Outcome::Done(receipt) => {
                let mut digests = Vec::new();
                for o in &outputs {
                    let d = receipt
                        .outputs
                        .iter()
                        .find(|d| d.binding == o.binding)
                        .ok_or_else(|| {
                            Refusal::Bad(format!("the receipt lacks output {}", o.binding))
                        })?;
                    let expected = o.len * o.elem.size();
                    if d.len != expected {
                        return Err(Refusal::Bad(format!(
                            "output {} has {} bytes, not the {expected} declared",
                            o.binding, d.len
                        )));
                    }
                    let data = sent
                        .iter()
                        .find(|(b, _)| *b == o.binding)
                        .map(|(_, d)| d)
                        .ok_or_else(|| Refusal::Bad(format!("output {} is missing", o.binding)))?;
                    match data {
                        Data::Inline(bytes) => {
                            if Hash::of(bytes) != d.hash || bytes.len() as u64 != d.len {
                                return Err(Refusal::Bad(format!(
                                    "output {} does not match its hash",
                                    o.binding
                                )));
                            }
                            self.inner
                                .outputs
                                .insert(d.hash.as_bytes(), bytes.as_slice())
                                .map(|_| ())
                                .map_err(|e| {
                                    Refusal::Late(format!("cannot keep the output: {e}"))
                                })?;
                        }
                        Data::Blob { hash, len } => {
                            if *hash != d.hash || *len != d.len {
                                return Err(Refusal::Bad(format!(
                                    "output {} names another blob than its receipt",
                                    o.binding
                                )));
                            }
                            blobs::fetch(&self.inner.client, &self.inner.blobs, peer, *hash, *len)
                                .await
                                .map_err(|e| match e {
                                    blobs::BlobError::HashMismatch { .. } => {
                                        Refusal::Bad(e.to_string())
                                    }
                                    other => Refusal::Late(other.to_string()),
                                })?;
                        }
                    }
                    digests.push(d.clone());
                }
                let (gpu, adapter) = (receipt.gpu_time_us, receipt.adapter.clone());
                let paid_for = receipt.digest();
                self.finish_replica(&id, task, attempt, &worker_id, |r| {
                    r.state = ReplicaState::Returned;
                    r.outputs = digests;
                    r.gpu_time_us = gpu;
                    r.adapter = adapter;
                    r.receipt = Some(paid_for);
                    r.institution_key = Some(member.institution_key);
                })
            }
        }
    }

    /// The job's kernel hash and outputs, if `worker` holds attempt
    /// `attempt` of task `task` now.
    fn expect_replica(
        &self,
        id: &str,
        task: u32,
        attempt: u32,
        worker: &str,
    ) -> Result<(Hash, Vec<Output>), Refusal> {
        let live = self.lock().map_err(|e| Refusal::Late(e.to_string()))?;
        let l = live
            .get(id)
            .ok_or_else(|| Refusal::Late("no such job here".into()))?;
        let t = l
            .tasks
            .get(task as usize)
            .ok_or_else(|| Refusal::Bad("no such task in the job".into()))?;
        if t.replicas
            .iter()
            .any(|r| r.attempt == attempt && r.worker == worker && r.returned())
        {
            return Err(Refusal::Again(format!(
                "attempt {attempt} of task {task} was already reported"
            )));
        }
        if l.job.state != JobState::Active {
            return Err(Refusal::Late("the job is no longer active".into()));
        }
        let held = t
            .replicas
            .iter()
            .any(|r| r.attempt == attempt && r.worker == worker && r.in_flight());
        if !held || t.state != TaskState::Waiting {
            return Err(Refusal::Late(
                "this attempt is no longer wanted (it was offered elsewhere, or the task is done)"
                    .into(),
            ));
        }
        Ok((l.job.kernel_hash, l.job.outputs.clone()))
    }

    fn finish_replica(
        &self,
        id: &str,
        task: u32,
        attempt: u32,
        worker: &str,
        update: impl FnOnce(&mut Replica),
    ) -> Result<(), Refusal> {
        let late = |m: &str| Refusal::Late(m.to_owned());
        let mut live = self.lock().map_err(|e| Refusal::Late(e.to_string()))?;
        let Live { job, tasks, .. } = live.get_mut(id).ok_or_else(|| late("no such job here"))?;
        let t = tasks
            .get_mut(task as usize)
            .ok_or_else(|| late("no such task"))?;
        let r = t
            .replicas
            .iter_mut()
            .find(|r| r.attempt == attempt && r.worker == worker && r.in_flight())
            .ok_or_else(|| late("this attempt is no longer wanted"))?;
        update(r);
        r.finished_at = Some(Timestamp::now());
        self.vote(job, t);
        // Durable before the acknowledgement: the caller awaits `durable`.
        self.save_task(id, t)
            .map_err(|e| Refusal::Late(e.to_string()))?;
        Ok(())
    }

    /// Returns once every write made before the call is on disk (at once
    /// when there is nothing to flush). Callers
    /// that arrive while a flush runs share the next one (group commit), so
    /// many acknowledgements cost one disk sync.
    async fn durable(&self) -> Result<(), JobsError> {
        use std::sync::atomic::Ordering;
        let mine = self.inner.writes.load(Ordering::Acquire);
        let _turn = self.inner.flushing.lock().await;
        let due = self.credits_due();
        if self.inner.flushed.load(Ordering::Acquire) >= mine && due.is_empty() {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if !due.is_empty() {
                me.seal_credits(&due);
            }
            me.flush()
        })
        .await
        .map_err(db)?
    }

    /// The groups of owed results due to be sealed: a full credit's worth,
    /// or waiting since [`CREDIT_DELAY`].
    fn credits_due(&self) -> std::collections::HashSet<OwedGroup> {
        let now = Instant::now();
        self.inner
            .owed
            .lock()
            .map(|owed| {
                owed.iter()
                    .filter(|(_, (n, due))| *n >= MAX_CREDIT_TASKS || *due <= now)
                    .map(|(g, _)| *g)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Signs credits for the verified results of the `due` groups: a
    /// credit per job and worker for up to [`MAX_CREDIT_TASKS`] tasks. Each
    /// credit is stored, and the results it pays for struck off, in one
    /// transaction: no result is paid twice, none is forgotten.
    fn seal_credits(&self, due: &std::collections::HashSet<OwedGroup>) {
        use sled::Transactional;
        let mut groups: BTreeMap<OwedGroup, Vec<(sled::IVec, Owed)>> = BTreeMap::new();
        for (k, v) in self.inner.owed_credits.iter().flatten() {
            match serde_json::from_slice::<Owed>(&v) {
                Ok(o) if due.contains(&o.group()) => {
                    groups.entry(o.group()).or_default().push((k, o))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("dropping an unreadable owed credit: {e}");
                    let _ = self.inner.owed_credits.remove(k);
                }
            }
        }
        for (group, owed) in groups {
            let (job, worker, worker_institution) = group;
            for part in owed.chunks(MAX_CREDIT_TASKS) {
                let credit = Credit {
                    job,
                    tasks: part
                        .iter()
                        .map(|(_, o)| CreditedTask {
                            task: o.task,
                            receipt: o.receipt,
                        })
                        .collect(),
                    worker,
                    worker_institution,
                    submitter_institution: self.inner.institution,
                    gpu_time_us: part.iter().fold(0u64, |sum, (_, o)| {
                        sum.saturating_add(o.gpu_time_us.min(crate::credits::MAX_GPU_TIME_US))
                    }),
                    issued_at: Timestamp::now(),
                };
                let bytes = match Signed::sign(&credit, &self.inner.identity) {
                    Ok(signed) => signed.to_bytes(),
                    Err(e) => {
                        warn!("cannot sign a credit: {e}");
                        continue;
                    }
                };
                let key = Hash::of(&bytes);
                let stored = (&self.inner.owed_credits, &self.inner.unsent_credits).transaction(
                    |(owed, unsent)| {
                        for (k, _) in part {
                            owed.remove(k.clone())?;
                        }
                        unsent.insert(key.as_bytes(), bytes.as_slice())?;
                        Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                    },
                );
                match stored {
                    Ok(()) => {
                        self.wrote();
                        if let Ok(mut o) = self.inner.owed.lock()
                            && let Some((n, _)) = o.get_mut(&group)
                        {
                            *n = n.saturating_sub(part.len());
                            if *n == 0 {
                                o.remove(&group);
                            }
                        }
                    }
                    Err(e) => warn!("cannot keep a credit: {e:?}"),
                }
            }
        }
    }

    /// Verifies `t` when a quorum of its returned replicas agrees.
    fn vote(&self, job: &JobRecord, t: &mut TaskRecord) {
        let returned: Vec<usize> = (0..t.replicas.len())
            .filter(|&i| t.replicas[i].state == ReplicaState::Returned)
            .collect();
        let required = self.required(job, t);
        // A result a trusted worker returned alone is checked by another
        // worker as often as its record says.
        if job.adaptive && required == 1 && !t.spot_check && returned.len() == 1 {
            let r = &t.replicas[returned[0]];
            if random_unit() < self.inner.reputation.worker(&r.worker).spot_check() {
                t.spot_check = true;
                t.waiting = Some("spot check: another worker runs it too".into());
                return;
            }
        }
        let quorum = quorum(required);
        // With `group_by_gpu`, replicas are compared only with replicas
        // that ran on the same GPU model, backend and driver: bit-exact
        // floats may differ between models without anyone lying.
        let gpu = |i: usize| -> &str {
            if job.requirements.group_by_gpu {
                t.replicas[i].adapter.as_str()
            } else {
                ""
            }
        };
        // Group replicas that agree with each other's first member.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &returned {
            match groups
                .iter_mut()
                .find(|g| gpu(g[0]) == gpu(i) && self.agree(job, &t.replicas[g[0]], &t.replicas[i]))
            {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        // Agreement counts institutions, not workers, unless every replica
        // came from one institution (an alliance, or a job, with no other
        // to ask): two workers of one institution cannot outvote another.
        let institutions = |g: &[usize]| {
            count(
                g.iter()
                    .map(|&i| t.replicas[i].institution.as_str())
                    .collect::<std::collections::HashSet<_>>()
                    .into_iter(),
            )
        };
        let one_institution = |g: &[usize]| {
            let same_gpu: Vec<usize> = returned
                .iter()
                .copied()
                .filter(|&i| gpu(i) == gpu(g[0]))
                .collect();
            institutions(&same_gpu) <= 1
        };
        let support = |g: &[usize]| {
            if one_institution(g) {
                count(g.iter())
            } else {
                institutions(g)
            }
        };
        let Some(winner) = groups.iter().find(|g| support(g) >= quorum) else {
            if count(returned.iter()) >= required {
                t.waiting = Some(format!(
                    "{} replicas disagree; asking another worker",
                    returned.len()
                ));
            }
            return;
        };
        let winner = winner.clone();
        let winning_gpu = gpu(winner[0]).to_owned();
        let compared: Vec<bool> = (0..t.replicas.len())
            .map(|i| gpu(i) == winning_gpu)
            .collect();
        t.result = Some(t.replicas[winner[0]].outputs.clone());
        // A result accepted alone proves nothing about its worker: only
        // results another worker confirmed count for it.
        let confirmed = winner.len() >= 2;
        for &i in &returned {
            let r = &mut t.replicas[i];
            let (state, event) = if winner.contains(&i) {
                // A recheck that confirms a result from before the
                // worker's last lie does not make it trusted again.
                let before_wrong = self
                    .inner
                    .reputation
                    .worker(&r.worker)
                    .last_wrong
                    .zip(r.finished_at)
                    .is_some_and(|(wrong, returned)| returned <= wrong);
                let agreed = if before_wrong {
                    Event::AgreedBeforeWrong
                } else {
                    Event::Agreed
                };
                (ReplicaState::Verified, confirmed.then_some(agreed))
            } else if compared[i] {
                (ReplicaState::Outvoted, Some(Event::Wrong))
            } else {
                (ReplicaState::Unmatched, None)
            };
            r.state = state;
            if let Some(event) = event {
                self.count_against(&r.worker, &r.institution, event);
            }
        }
        t.state = TaskState::Verified;
        t.waiting = None;
        debug!(job = %job.id, task = t.index, replicas = winner.len(), "task verified");
        for &i in &winner {
            self.issue_credit(job, t.index, &t.replicas[i]);
        }
    }

    /// Replicas whose agreement verifies `t`: the job's redundancy, or for
    /// `redundancy = "auto"` one while every worker holding the task is
    /// trusted and no spot check was drawn.
    fn required(&self, job: &JobRecord, t: &TaskRecord) -> u32 {
        if !job.adaptive || t.spot_check {
            return job.redundancy;
        }
        let all_trusted = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .all(|r| self.inner.reputation.worker(&r.worker).trusted());
        if all_trusted { 1 } else { job.redundancy }
    }

    /// Records that a replica's verified work is owed a credit; the next
    /// flush signs it into one (see `seal_credits`), and the pass after
    /// gossips it.
    fn issue_credit(&self, job: &JobRecord, task: u32, r: &Replica) {
        let (Some(receipt), Some(worker_institution), Ok(peer)) =
            (r.receipt, r.institution_key, r.worker.parse::<PeerId>())
        else {
            return;
        };
        let Ok(worker) = PublicKey::from_peer_id(&peer) else {
            return;
        };
        let owed = Owed {
            job: job_id(&job.id),
            task,
            receipt,
            worker,
            worker_institution,
            gpu_time_us: r.gpu_time_us,
        };
        let mut key = owed.job.0.to_vec();
        key.extend_from_slice(&task.to_be_bytes());
        key.extend_from_slice(worker.as_bytes());
        let group = owed.group();
        match serde_json::to_vec(&owed).map_err(db).and_then(|v| {
            self.inner
                .owed_credits
                .insert(key, v)
                .map_err(db)
                .map(|old| old.is_none())
        }) {
            Ok(new) => {
                self.wrote();
                if new && let Ok(mut o) = self.inner.owed.lock() {
                    o.entry(group)
                        .or_insert((0, Instant::now() + CREDIT_DELAY))
                        .0 += 1;
                }
            }
            Err(e) => warn!("cannot record a credit owed: {e}"),
        }
    }

    /// Counts a verified outcome in the worker's record.
    fn count_against(&self, worker: &str, institution: &str, event: Event) {
        match self.inner.reputation.record(worker, institution, event) {
            Ok(r) if event == Event::Wrong => {
                warn!(worker = %short(worker), %institution, streak = r.streak, "a wrong result: the worker is replicated from now on, and what it ran alone is checked again");
                if let Ok(mut c) = self.inner.caught.lock() {
                    c.insert(worker.to_owned());
                }
            }
            Ok(_) => {}
            Err(e) => warn!("cannot update the reputation of {}: {e}", short(worker)),
        }
    }

    /// Every worker's and institution's record.
    pub fn reputation(&self) -> (Vec<WorkerView>, Vec<InstitutionView>) {
        self.inner.reputation.table()
    }

    fn agree(&self, job: &JobRecord, a: &Replica, b: &Replica) -> bool {
        if a.outputs == b.outputs {
            return true;
        }
        let Comparison::Tolerance { abs, rel, ulps } = job.comparison else {
            return false;
        };
        let tol = Tolerance { abs, rel, ulps };
        job.outputs.iter().all(|o| {
            let (Some(da), Some(db)) = (
                a.outputs.iter().find(|d| d.binding == o.binding),
                b.outputs.iter().find(|d| d.binding == o.binding),
            ) else {
                return false;
            };
            let (Ok(x), Ok(y)) = (self.read_output(&da.hash), self.read_output(&db.hash)) else {
                return false;
            };
            match o.elem {
                ElemType::F32 => compare::f32_within(&x, &y, &tol).is_ok(),
                _ => x == y,
            }
        })
    }
}

/// What the scheduler knows of the workers during one pass.
#[derive(Clone, Copy)]
struct Market<'a> {
    adverts: &'a [AdvertView],
    /// Members connected now.
    connected: &'a std::collections::HashSet<String>,
    /// This node's tasks running at each worker.
    in_flight: &'a HashMap<String, u32>,
    /// Offers made in this pass, per worker.
    planned: &'a HashMap<String, u32>,
    /// Workers that hold the current job's inputs.
    warm: &'a std::collections::HashSet<String>,
}

/// A verified result that a credit is owed for.
#[derive(Debug, Serialize, Deserialize)]
struct Owed {
    job: JobId,
    task: u32,
    receipt: Hash,
    worker: PublicKey,
    worker_institution: PublicKey,
    gpu_time_us: u64,
}

impl Owed {
    fn group(&self) -> OwedGroup {
        (self.job, self.worker, self.worker_institution)
    }
}

/// Offers of one pass to one worker for one job, sent as one request.
struct OfferBatch {
    peer: PeerId,
    job: String,
    kernel: String,
    bytes: usize,
    /// (task, attempt) of each offer, in order.
    tasks: Vec<(u32, u32)>,
    offers: Vec<TaskOffer>,
}

/// About the encoded size of an offer, without encoding it: its inline
/// data, and room for the rest.
fn offer_size(offer: &TaskOffer) -> usize {
    let data = |b: &Binding| match &b.kind {
        BindingKind::Input { data }
        | BindingKind::Uniform { data }
        | BindingKind::State { data, .. } => data.size_hint(),
        BindingKind::Output { .. } => 32,
    };
    512 + offer.spec.entry_point.len() + offer.spec.bindings.iter().map(data).sum::<usize>()
}

enum Refusal {
    /// Nothing wrong with the worker: the result is simply not wanted.
    Late(String),
    /// A report of an attempt the worker already reported: a replay, or a
    /// retry after a lost acknowledgement. Harmless either way (the
    /// signature binds it to that attempt), and indistinguishable, so it
    /// counts against the worker as a lapse, not as a lie.
    Again(String),
    /// The worker broke the protocol; it is dropped.
    Bad(String),
}

/// Why no worker takes another replica of a task now.
enum Unplaced {
    /// It waits; why, in words for the researcher.
    Waits(String),
    /// Its replicas disagree and no other worker is left to ask: the
    /// evidence, which fails the task once no replica runs.
    Exhausted(String),
}

/// How a task's failure starts when its replicas disagree and no other
/// worker can break the tie.
const EXHAUSTED: &str = "replicas disagree and no other worker can break the tie";

/// The replicas' answers, grouped: who returned which outputs.
fn disagreement(t: &TaskRecord) -> String {
    let mut groups: Vec<(&[OutputDigest], Vec<String>)> = Vec::new();
    for r in t.replicas.iter().filter(|r| r.returned()) {
        let who = format!("{} ({})", short(&r.worker), r.institution);
        match groups.iter_mut().find(|(o, _)| *o == r.outputs.as_slice()) {
            Some((_, w)) => w.push(who),
            None => groups.push((&r.outputs, vec![who])),
        }
    }
    groups
        .iter()
        .map(|(outputs, who)| {
            let hashes: Vec<String> = outputs
                .iter()
                .map(|d| d.hash.to_string().chars().take(12).collect())
                .collect();
            format!("{} returned {}", who.join(" and "), hashes.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Seconds left before a task that failed or was lost may be offered
/// again: 1 s after the first setback, doubling, at most 30 s.
fn backoff(t: &TaskRecord) -> Option<u64> {
    let setbacks = || {
        t.replicas.iter().filter(|r| {
            matches!(
                r.state,
                ReplicaState::Failed { .. } | ReplicaState::Lost { .. }
            )
        })
    };
    let last = setbacks().filter_map(|r| r.finished_at).max()?;
    let n = count(setbacks());
    let delay = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(30).min(30);
    let ready = last.saturating_add_secs(delay);
    let now = Timestamp::now();
    (ready > now).then(|| ready.as_secs() - now.as_secs())
}

/// A lease that lapses after [`LEASE`] without progress.
fn lease_from_now() -> Timestamp {
    Timestamp::now().saturating_add_secs(LEASE.as_secs())
}

/// How many items, as a u32 (saturating).
fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

/// A job id as text, back to bytes.
fn job_id(text: &str) -> JobId {
    let mut id = [0u8; 16];
    if let Ok(bytes) = hex::decode(text) {
        let n = 16.min(bytes.len());
        id[..n].copy_from_slice(&bytes[..n]);
    }
    JobId(id)
}

/// Replicas placed for one task in one scheduling pass, at most.
const MAX_REPLICAS: u32 = 16;

/// Replicas that must agree: all of them for one or two, a majority above.
fn quorum(redundancy: u32) -> u32 {
    if redundancy <= 2 {
        redundancy
    } else {
        redundancy / 2 + 1
    }
}

/// Replicas a task should have returned or running now, when `required`
/// must agree.
fn target_replicas(required: u32, t: &TaskRecord) -> u32 {
    let returned = count(t.replicas.iter().filter(|r| r.returned()));
    if returned >= required {
        // Returned, no quorum yet: one more opinion.
        returned + 1
    } else {
        required
    }
}

/// A uniform random number in [0, 1).
fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    #[allow(clippy::cast_precision_loss)]
    let x = (u64::from_le_bytes(b) >> 11) as f64;
    x / (1u64 << 53) as f64
}

/// Replicas of open tasks of active jobs that each worker holds. A
/// replica left over when its task ended, or its job, no longer counts:
/// its worker is told the result is not wanted when it reports, and no
/// lease of it expires, so counting it would leave the worker looking
/// busy to this node for good.
fn in_flight_by_worker(live: &BTreeMap<String, Live>) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for l in live.values().filter(|l| l.job.state == JobState::Active) {
        let placed = l.last_placed.map_or(0, |p| p + 1);
        for t in l.tasks.get(l.open_from..placed).unwrap_or_default() {
            if t.state != TaskState::Waiting {
                continue;
            }
            for r in t.replicas.iter().filter(|r| r.in_flight()) {
                *m.entry(r.worker.clone()).or_default() += 1;
            }
        }
    }
    m
}

fn job_buffer_bytes(job: &JobRecord) -> u64 {
    let inputs = job
        .inputs
        .iter()
        .flat_map(|i| i.parts.iter().map(Data::len));
    let outputs = job.outputs.iter().map(|o| o.len * o.elem.size());
    inputs.chain(outputs).max().unwrap_or(0)
}

fn spec(job: &JobRecord, index: u32) -> TaskSpec {
    let mut bindings: Vec<Binding> = job
        .inputs
        .iter()
        .map(|i| {
            let data = if i.split {
                i.parts
                    .get(index as usize)
                    .cloned()
                    .unwrap_or(Data::Inline(Vec::new()))
            } else {
                i.parts.first().cloned().unwrap_or(Data::Inline(Vec::new()))
            };
            let kind = match i.kind {
                InputKind::Storage => BindingKind::Input { data },
                InputKind::Uniform => BindingKind::Uniform { data },
                InputKind::State => BindingKind::State { data, elem: i.elem },
            };
            Binding {
                binding: i.binding,
                kind,
            }
        })
        .collect();
    let state: Vec<u32> = job
        .inputs
        .iter()
        .filter(|i| i.kind == InputKind::State)
        .map(|i| i.binding)
        .collect();
    bindings.extend(
        job.outputs
            .iter()
            .filter(|o| !state.contains(&o.binding))
            .map(|o| Binding {
                binding: o.binding,
                kind: BindingKind::Output {
                    len: o.len,
                    elem: o.elem,
                },
            }),
    );
    TaskSpec {
        job: job_id(&job.id),
        task: index,
        task_count: job.tasks,
        kernel: job.kernel_hash,
        entry_point: job.entry_point.clone(),
        bindings,
        dispatch: job.dispatch,
        steps: job.steps,
        start_step: 0,
        checkpoint_every: job.checkpoint_every,
        timeout_ms: job.timeout_ms,
        comparison: job.comparison,
        info_binding: job.info_binding,
    }
}

fn summary(l: &Live) -> JobSummary {
    let mut p = Progress::default();
    let mut waiting: BTreeMap<String, u32> = BTreeMap::new();
    for t in &l.tasks {
        match t.state {
            TaskState::Verified => p.verified += 1,
            TaskState::Failed => p.failed += 1,
            TaskState::Waiting if t.replicas.iter().any(Replica::in_flight) => p.running += 1,
            TaskState::Waiting => {
                p.queued += 1;
                if let Some(w) = &t.waiting {
                    *waiting.entry(w.clone()).or_default() += 1;
                }
            }
        }
    }
    let mut waiting: Vec<(String, u32)> = waiting.into_iter().collect();
    waiting.sort_by_key(|w| std::cmp::Reverse(w.1));
    JobSummary {
        id: l.job.id.clone(),
        name: l.job.name.clone(),
        state: l.job.state.clone(),
        tasks: l.job.tasks,
        redundancy: l.job.redundancy,
        progress: p,
        submitted_at: l.job.submitted_at,
        finished_at: l.job.finished_at,
        waiting,
    }
}

fn describe_decline(r: &alliance_protocol::wire::DeclineReason) -> String {
    use alliance_protocol::wire::DeclineReason as D;
    match r {
        D::Busy => "no free GPU".into(),
        D::Paused => "its owner paused sharing".into(),
        D::Unavailable(m) => format!("no GPU free: {m}"),
        D::PolicyRefuses => "its owner's policy refuses this submitter".into(),
        D::Limits(m) => format!("the task breaks its limits: {m}"),
        D::BadOffer(m) => format!("the offer was refused: {m}"),
    }
}

fn short(peer: &str) -> String {
    let n = peer.len();
    peer[n.saturating_sub(8)..].to_owned()
}

fn write_npy(
    dir: &Path,
    name: &str,
    elem: ElemType,
    shape: &[u64],
    data: &[u8],
) -> Result<(), JobsError> {
    let path = dir.join(name);
    std::fs::write(&path, npy::write(elem, shape, data))
        .map_err(|e| JobsError::Refused(format!("cannot write {}: {e}", path.display())))
}
