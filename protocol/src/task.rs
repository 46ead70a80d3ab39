//! Tasks, offers, receipts, checkpoints and credits.
//!
//! A submitter sends a worker [`TaskOffer`]s, each holding a [`TaskSpec`],
//! signed together as [`TaskOffers`]; the worker runs them and answers with
//! a [`Receipt`] for each, naming the hashes of everything it read and
//! wrote, signed together with the other [`Outcome`]s it reports at the
//! same time as [`Outcomes`]; long tasks send signed [`CheckpointRecord`]s
//! on the way; once the submitter has verified the result it grants the
//! worker a signed [`Credit`].
//!
//! Offers and outcomes are signed a batch at a time, not one each: small
//! tasks come by the thousand, and an ed25519 verification costs more than
//! a tiny task's whole trip through the network. The signed batch is the
//! evidence for every record in it.

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

    /// About its encoded size, without encoding it: the inline bytes and
    /// their length prefix, or a blob's hash and length.
    pub fn size_hint(&self) -> usize {
        match self {
            Data::Inline(bytes) => bytes.len() + 16,
            Data::Blob { .. } => 64,
        }
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

/// A worker could not run a task: signed (in [`Outcomes`]), so the
/// submitter knows the failure is the worker's word and can hold it to it.
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

/// Most offers one [`TaskOffers`] holds, and most outcomes one
/// [`Outcomes`] holds.
pub const MAX_BATCH: usize = 64;

/// A submitter's offers to one worker, signed together: at most
/// [`MAX_BATCH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOffers(pub Vec<TaskOffer>);

impl Record for TaskOffers {
    const NAME: &'static str = "task offers";
    const CONTEXT: &'static str = "task-offers/v1";
    const VERSION: u16 = 1;
    /// Leaves room for the kernel source in the request that carries it.
    const MAX_SIZE: usize = 7 * 1024 * 1024;
}

/// A buffer a task produced, named by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigest {
    pub binding: u32,
    pub hash: Hash,
    pub len: u64,
}

/// A worker's account of one finished task (signed in [`Outcomes`]).
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
    /// Time to compile the kernel on this worker, µs: zero when the worker
    /// had it compiled already. Not GPU work, and not credited.
    pub compile_time_us: u64,
    /// Adapter name and backend it ran on.
    pub adapter: String,
    /// The worker's node key (must be the signer).
    pub worker: PublicKey,
    /// The submitter the result is for.
    pub submitter: PublicKey,
    pub finished_at: Timestamp,
}

impl Receipt {
    /// The content hash of the receipt's canonical bytes: names it (a
    /// [`Credit`] pays for receipts by this hash).
    pub fn digest(&self) -> Hash {
        // A receipt is plain data: encoding it cannot fail.
        Hash::of(&postcard::to_stdvec(self).unwrap_or_default())
    }
}

/// What a worker reports of one task it accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The task ran: the receipt names its outputs.
    Done(Receipt),
    /// The task could not run or did not finish, and why.
    Failed(TaskFailure),
    /// The worker's owner took the GPU back (paused it, the sharing window
    /// closed, or the owner's own work started): the task was stopped and
    /// is handed back to be offered elsewhere, from its last checkpoint.
    /// Not a failure of the worker's.
    HandedBack(TaskFailure),
}

/// The task attempt an [`Outcome`] is about, and between whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct About {
    pub job: JobId,
    pub task: u32,
    pub attempt: u32,
    pub kernel: Hash,
    pub worker: PublicKey,
    pub submitter: PublicKey,
}

impl Outcome {
    /// The task attempt it is about.
    pub fn about(&self) -> About {
        match self {
            Outcome::Done(r) => About {
                job: r.job,
                task: r.task,
                attempt: r.attempt,
                kernel: r.kernel,
                worker: r.worker,
                submitter: r.submitter,
            },
            Outcome::Failed(f) | Outcome::HandedBack(f) => About {
                job: f.job,
                task: f.task,
                attempt: f.attempt,
                kernel: f.kernel,
                worker: f.worker,
                submitter: f.submitter,
            },
        }
    }
}

/// A worker's outcomes for one submitter, signed together: at most
/// [`MAX_BATCH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcomes(pub Vec<Outcome>);

impl Record for Outcomes {
    const NAME: &'static str = "task outcomes";
    const CONTEXT: &'static str = "task-outcomes/v2";
    const VERSION: u16 = 2;
    /// A full batch of receipts of up to 64 KiB each.
    const MAX_SIZE: usize = MAX_BATCH * 64 * 1024;
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
