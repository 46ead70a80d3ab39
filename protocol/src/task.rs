//! Tasks, offers, receipts, checkpoints and credits.
//!
//! A submitter sends a worker a signed [`TaskOffer`] holding a [`TaskSpec`];
//! the worker runs it and answers with a signed [`Receipt`] naming the hashes
//! of everything it read and wrote; long tasks send signed
//! [`CheckpointRecord`]s on the way; once the submitter has verified the
//! result it grants the worker a signed [`Credit`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::keys::PublicKey;
use crate::signed::Record;
use crate::time::Timestamp;

/// Data bytes a binding may carry inline in an offer; larger data moves as
/// a blob.
pub const MAX_INLINE_BYTES: usize = 256 * 1024;

/// A job's id: 16 random bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub [u8; 16]);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", hex::encode(&self.0[..4]))
    }
}

/// Element type of a buffer, for `.npy` output and float comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElemType {
    F32,
    U32,
    I32,
    /// Opaque bytes: compared bit-exact.
    Bytes,
}

impl ElemType {
    /// Bytes per element.
    pub const fn size(self) -> u64 {
        match self {
            ElemType::F32 | ElemType::U32 | ElemType::I32 => 4,
            ElemType::Bytes => 1,
        }
    }
}

/// Where a buffer's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    /// Carried in the message (at most [`MAX_INLINE_BYTES`]).
    Inline(#[serde(with = "crate::encoding::bytes")] Vec<u8>),
    /// Fetched by content hash from the sender's blob store.
    Blob { hash: Hash, len: u64 },
}

impl Data {
    /// The content hash of the bytes.
    pub fn hash(&self) -> Hash {
        match self {
            Data::Inline(bytes) => Hash::of(bytes),
            Data::Blob { hash, .. } => *hash,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Inline(bytes) => bytes.len() as u64,
            Data::Blob { len, .. } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a kernel binding is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindingKind {
    /// A read-only storage buffer filled with `data`.
    Input { data: Data },
    /// A uniform buffer filled with `data`.
    Uniform { data: Data },
    /// A storage buffer the kernel writes: `len` elements of `elem`, zeroed.
    Output { len: u64, elem: ElemType },
    /// A read-write buffer that carries state across steps: initialised
    /// from `data`, read back as an output, saved in checkpoints.
    State { data: Data, elem: ElemType },
}

/// One binding of the kernel's bind group 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// `@binding(N)` in the kernel.
    pub binding: u32,
    pub kind: BindingKind,
}

/// How replicas of a float output are compared.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Comparison {
    /// Every byte equal.
    Exact,
    /// Floats within tolerance: equal if within `abs`, or within `rel` of
    /// the larger magnitude, or within `ulps` units in the last place. NaN
    /// and infinities must match exactly.
    Tolerance { abs: f64, rel: f64, ulps: u32 },
}

// Tolerances are finite, non-negative numbers (checked at intake), so
// equality is total on the values that occur.
impl Eq for Comparison {}

/// Everything a worker needs to run one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub job: JobId,
    /// Index of this task in the array job.
    pub task: u32,
    /// Tasks in the job (the kernel receives index and count).
    pub task_count: u32,
    /// Hash of the WGSL source.
    pub kernel: Hash,
    pub entry_point: String,
    pub bindings: Vec<Binding>,
    /// Workgroups in x, y, z.
    pub dispatch: [u32; 3],
    /// Times the dispatch repeats on the same buffers (1 for plain kernels).
    pub steps: u32,
    /// Step to start from (non-zero when resuming from a checkpoint).
    pub start_step: u32,
    /// Send a checkpoint every this many steps (absent: never).
    pub checkpoint_every: Option<u32>,
    /// Wall-clock limit for the whole task, in milliseconds.
    pub timeout_ms: u64,
    pub comparison: Comparison,
    /// Binding of the uniform `struct { step, steps, task, task_count }`
    /// (all u32) the worker fills before every dispatch, if the kernel has one.
    pub info_binding: Option<u32>,
}

/// A worker could not run a task: signed, so the submitter knows the
/// failure is the worker's word and can hold it to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    pub job: JobId,
    pub task: u32,
    pub attempt: u32,
    pub kernel: Hash,
    pub worker: PublicKey,
    pub submitter: PublicKey,
    /// What went wrong, for the researcher.
    pub reason: String,
    pub failed_at: Timestamp,
}

impl Record for TaskFailure {
    const NAME: &'static str = "task failure";
    const CONTEXT: &'static str = "task-failure/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 16 * 1024;
}

/// A submitter offers a task to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOffer {
    pub spec: TaskSpec,
    /// The worker this offer is for (an offer for another is refused).
    pub worker: PublicKey,
    /// Counts re-offers of the same task; a result for an older attempt is ignored.
    pub attempt: u32,
    /// The offer is void after this instant.
    pub expires_at: Timestamp,
}

impl Record for TaskOffer {
    const NAME: &'static str = "task offer";
    const CONTEXT: &'static str = "task-offer/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 2 * 1024 * 1024;
}

/// A buffer a task produced, named by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigest {
    pub binding: u32,
    pub hash: Hash,
    pub len: u64,
}

/// A worker's signed account of one finished task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub job: JobId,
    pub task: u32,
    pub attempt: u32,
    pub kernel: Hash,
    /// Hashes of every input, uniform and initial state, in binding order.
    pub inputs: Vec<Hash>,
    pub outputs: Vec<OutputDigest>,
    /// GPU time (timestamp queries where supported, else wall time), µs.
    pub gpu_time_us: u64,
    /// Adapter name and backend it ran on.
    pub adapter: String,
    /// The worker's node key (must be the signer).
    pub worker: PublicKey,
    /// The submitter the result is for.
    pub submitter: PublicKey,
    pub finished_at: Timestamp,
}

impl Record for Receipt {
    const NAME: &'static str = "receipt";
    const CONTEXT: &'static str = "receipt/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 64 * 1024;
}

/// A worker's signed statement of a task's state after `step` steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub job: JobId,
    pub task: u32,
    pub attempt: u32,
    pub kernel: Hash,
    /// Steps completed.
    pub step: u32,
    /// Hashes of the state buffers after `step` steps.
    pub state: Vec<OutputDigest>,
    pub worker: PublicKey,
    pub made_at: Timestamp,
}

impl Record for CheckpointRecord {
    const NAME: &'static str = "checkpoint";
    const CONTEXT: &'static str = "checkpoint/v1";
    const VERSION: u16 = 1;
    const MAX_SIZE: usize = 64 * 1024;
}

/// Most tasks one [`Credit`] pays for.
pub const MAX_CREDIT_TASKS: usize = 32;

/// A task a credit pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditedTask {
    pub task: u32,
    /// Hash of the receipt payload of the verified result.
    pub receipt: Hash,
}

/// A submitter's signed grant of validated GPU time to a worker, for 1 to
/// [`MAX_CREDIT_TASKS`] tasks of one job whose results were verified
/// together. Every member checks and keeps every credit, so one signature
/// pays for a burst of small tasks rather than one each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub job: JobId,
    pub tasks: Vec<CreditedTask>,
    pub worker: PublicKey,
    pub worker_institution: PublicKey,
    /// The submitter's institution (the submitter's node key signs).
    pub submitter_institution: PublicKey,
    /// Validated GPU time of all its tasks, µs.
    pub gpu_time_us: u64,
    pub issued_at: Timestamp,
}

impl Record for Credit {
    const NAME: &'static str = "credit";
    const CONTEXT: &'static str = "credit/v2";
    const VERSION: u16 = 2;
    const MAX_SIZE: usize = 2048;
}
