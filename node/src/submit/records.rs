//! The submitter's records as sled stores them (JSON, one key per job and
//! per task), what the API shows of them, and the tables they live in.

use alliance_protocol::task::{Comparison, Data, ElemType, JobId, OutputDigest};
use alliance_protocol::{Hash, PublicKey, Timestamp};
use serde::{Deserialize, Serialize};

use crate::submit::spec::{InputKind, Output, Requirements};

/// How a protocol [`OutputDigest`] reads in the API's JSON: a buffer by
/// binding, its BLAKE3 as 64 hex digits, its length in bytes. (The
/// protocol crate knows nothing of the API; this is its schema.)
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Digest {
    binding: u32,
    #[schema(pattern = "^[0-9a-f]{64}$")]
    hash: String,
    len: u64,
}

/// How a protocol [`ElemType`] reads in the API's JSON.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub enum Elem {
    F32,
    U32,
    I32,
    Bytes,
}

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// The API user who submitted it; jobs from before users existed
    /// belong to the node's own user.
    #[serde(default = "node_user")]
    pub owner: String,
}

/// The name of the node's own API user, an admin.
pub const NODE_USER: &str = "node";

fn node_user() -> String {
    NODE_USER.into()
}

/// One try of a task on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    Offered,
    Running {
        #[schema(value_type = u64)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Replica {
    pub attempt: u32,
    pub worker: String,
    pub institution: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    #[schema(value_type = u64)]
    pub offered_at: Timestamp,
    #[schema(value_type = Option<u64>)]
    pub finished_at: Option<Timestamp>,
    pub gpu_time_us: u64,
    /// Time the worker took to compile the kernel (zero when it had it).
    #[serde(default)]
    pub compile_time_us: u64,
    pub adapter: String,
    #[schema(value_type = Vec<Digest>)]
    pub outputs: Vec<OutputDigest>,
    /// Hash of the signed receipt's payload, which a credit pays for.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub receipt: Option<Hash>,
    /// The worker's institution, whose account a credit fills.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
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
    pub(super) fn in_flight(&self) -> bool {
        matches!(
            self.state,
            ReplicaState::Offered | ReplicaState::Running { .. }
        )
    }
    pub(super) fn returned(&self) -> bool {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Waiting,
    Verified,
    Failed,
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    pub index: u32,
    pub state: TaskState,
    pub replicas: Vec<Replica>,
    pub next_attempt: u32,
    /// Why the task is not running now, when it waits.
    pub waiting: Option<String>,
    /// The verified outputs.
    #[schema(value_type = Option<Vec<Digest>>)]
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
    pub(super) fn new(index: u32) -> Self {
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
    pub(super) fn untouched(&self) -> bool {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Checkpoint {
    pub step: u32,
    /// The state buffers, by binding, in the checkpoint store.
    #[schema(value_type = Vec<Digest>)]
    pub state: Vec<OutputDigest>,
    /// The workers whose checkpoints at this step agree.
    pub workers: Vec<String>,
}

/// A checkpoint one attempt sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SentCheckpoint {
    pub attempt: u32,
    pub worker: String,
    pub institution: String,
    pub step: u32,
    #[schema(value_type = Vec<Digest>)]
    pub state: Vec<OutputDigest>,
}

/// Counts of tasks by state, for progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub queued: u32,
    pub running: u32,
    pub verified: u32,
    pub failed: u32,
}

/// What `GET /v1/jobs` lists.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    /// The API user who submitted it.
    pub owner: String,
    pub state: JobState,
    pub tasks: u32,
    pub redundancy: u32,
    pub progress: Progress,
    #[schema(value_type = u64)]
    pub submitted_at: Timestamp,
    #[schema(value_type = Option<u64>)]
    pub finished_at: Option<Timestamp>,
    /// Why tasks wait, most common first, with how many.
    pub waiting: Vec<(String, u32)>,
    /// GPU time of every replica that returned a result, µs.
    #[serde(default)]
    pub gpu_time_us: u64,
    /// Time workers spent compiling the kernel for those replicas, µs:
    /// kept apart from GPU time, and not credited.
    #[serde(default)]
    pub compile_time_us: u64,
}

/// What `GET /v1/jobs/ID` returns.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobDetail {
    pub summary: JobSummary,
    pub outputs: Vec<Output>,
    pub tasks: Vec<TaskRecord>,
}

pub(super) fn task_key(id: &str, index: u32) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(b'/');
    k.extend_from_slice(&index.to_be_bytes());
    k
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

/// How many items, as a u32 (saturating).
pub(super) fn count<T>(items: impl Iterator<Item = T>) -> u32 {
    u32::try_from(items.count()).unwrap_or(u32::MAX)
}

/// A job id as text, back to bytes.
pub(super) fn job_id(text: &str) -> JobId {
    let mut id = [0u8; 16];
    if let Ok(bytes) = hex::decode(text) {
        let n = 16.min(bytes.len());
        id[..n].copy_from_slice(&bytes[..n]);
    }
    JobId(id)
}

pub(super) fn short(peer: &str) -> String {
    let n = peer.len();
    peer[n.saturating_sub(8)..].to_owned()
}
