//! The worker: takes task offers from members, runs them in the sandbox on
//! one of this node's lent GPUs, and reports back.
//!
//! - An offer is accepted only when the node is not paused, a GPU is free,
//!   the offer is signed by the peer that sent it (a member with the submit
//!   role), names this node, has not expired, carries the kernel its hash
//!   names, and the task passes intake against the owner's limits and the
//!   GPU's own. Otherwise it is declined with the reason.
//! - Inputs that travel as blobs are fetched from the submitter once and
//!   kept (content-addressed), so tasks that share an input fetch it once.
//! - Each GPU has one sandbox child, kept warm between tasks and restarted
//!   when a task kills it.
//! - The end of every accepted task is reported: a signed receipt with the
//!   outputs (inline when small, else as blobs the submitter fetches), or a
//!   signed failure with the reason. Reports are retried until the
//!   submitter acknowledges them or half an hour passes.
//!
//! The files of this room follow a task through the worker:
//!
//! - [`offers`]: offer intake: the checks above, a slot claimed on a GPU.
//! - [`turns`]: a GPU's queue; the waiting task of the institution that
//!   gave most goes first.
//! - [`run`]: fetching inputs, running the task in the GPU's sandbox,
//!   progress heartbeats.
//! - [`checkpoints`]: a long task's state sent to its submitter every K
//!   steps.
//! - [`reports`]: signed receipts and failures, batched per submitter and
//!   retried until acknowledged.
//! - [`owner`]: the owner's side: pause and resume, idle detection, the
//!   GPU's state in the advert, tasks handed back when the owner takes the
//!   GPU back; [`policy`] holds the owner's terms, [`gpus`] this node's
//!   GPUs as advert entries.

mod checkpoints;
pub mod gpus;
mod offers;
mod owner;
pub mod policy;
mod reports;
mod run;
mod turns;

use reports::Outbox;
use turns::Turns;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alliance_kernels::executor;
use alliance_kernels::gpu::AdapterReport;
use alliance_kernels::intake::{self, Limits};
use alliance_kernels::sandbox::{self, ResourceLimits, Sandbox};
use alliance_protocol::task::ElemType;
use alliance_protocol::{Hash, Identity};
use libp2p::PeerId;

use alliance_protocol::advert::{GpuInfo, GpuState};

use crate::net::actor::Client;
use crate::store::blobs::Blobs;
use crate::work::policy::{Gate, IdleConfig};

/// The executor's element type for a protocol one.
pub fn kernels_elem(e: ElemType) -> executor::ElemType {
    match e {
        ElemType::F32 => executor::ElemType::F32,
        ElemType::U32 => executor::ElemType::U32,
        ElemType::I32 => executor::ElemType::I32,
        ElemType::Bytes => executor::ElemType::Bytes,
    }
}

/// How often a worker tells the submitter that a task still runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A task as the worker names it: job, task, attempt.
type TaskKey = (alliance_protocol::task::JobId, u32, u32);

struct Slot {
    report: AdapterReport,
    /// The owner's policy and switches for this GPU.
    gate: Gate,
    /// The GPU's state and why, as last evaluated.
    state: (GpuState, String),
    /// GPU buffer bytes of the tasks taken.
    bytes: u64,
    /// The tasks taken, for handing them back.
    keys: std::collections::HashSet<TaskKey>,
    /// The task running on this GPU now, and how to stop it.
    running: Arc<Mutex<Option<(TaskKey, sandbox::Stopper)>>>,
    /// Tasks accepted for this GPU and not finished (one runs at a time).
    taken: usize,
    sandbox: Arc<Mutex<Option<Sandbox>>>,
    /// Whose task runs next on this GPU.
    turns: Arc<Turns>,
    /// True once this GPU's sandbox has warmed the library kernels (at
    /// once without any): its tasks start after, so they find them
    /// compiled.
    warmed: Arc<tokio::sync::watch::Sender<bool>>,
}

/// What the worker needs to start.
#[derive(Debug)]
pub struct WorkerSetup {
    pub identity: Arc<Identity>,
    pub client: Client,
    pub blobs: Blobs,
    /// The lent GPUs.
    pub gpus: Vec<AdapterReport>,
    pub limits: Limits,
    /// The owner's shares by institution name (default 1): larger shares
    /// run first, then higher balances.
    pub shares: std::collections::BTreeMap<String, u32>,
    pub rlimits: ResourceLimits,
    /// Under this directory each GPU's sandbox gets a scratch directory.
    pub scratch: PathBuf,
    /// The sandbox program and its arguments (`alliance sandbox`).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Return wrong outputs with valid receipts after this many honest
    /// results: a lying worker, for testing the alliance's verification
    /// (`ALLIANCE_TEST_CORRUPT_RESULTS=1`, or `=after:N`).
    pub corrupt_after: Option<u64>,
    /// Each lent GPU's owner policy and switches, in the order of `gpus`.
    pub gates: Vec<Gate>,
    /// The advert entry of each lent GPU, in the order of `gpus`; the
    /// worker fills in state, reason, free slots and terms.
    pub adverts: Vec<GpuInfo>,
    /// How the owner's own use of a GPU is detected.
    pub idle: IdleConfig,
    /// Where the owner's pauses are kept across restarts.
    pub pause_file: PathBuf,
    /// Library kernels each GPU's sandbox compiles at start.
    pub warm: Vec<String>,
    /// How long a task's kernel may take to compile.
    pub compile_timeout: std::time::Duration,
    /// What the worker counts, for `GET /metrics`.
    pub metrics: crate::metrics::Metrics,
}

/// The worker; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

struct Inner {
    setup: WorkerSetup,
    slots: Mutex<Vec<Slot>>,
    stats: Mutex<Stats>,
    /// Results produced so far (for `corrupt_after`).
    produced: std::sync::atomic::AtomicU64,
    /// Tasks the submitter no longer wants: stopped if running, skipped if
    /// still waiting for their GPU.
    abandoned: Mutex<std::collections::HashSet<TaskKey>>,
    /// Tasks whose GPU its owner took back, and why: stopped, and handed
    /// back to their submitter.
    preempted: Mutex<HashMap<TaskKey, String>>,
    /// Wakes the policy watcher at once (the owner paused or resumed).
    recheck: tokio::sync::Notify,
    /// Intake verdicts by kernel hash and entry point.
    kernels: Mutex<HashMap<(Hash, String), Result<intake::Kernel, String>>>,
    /// One fetch per blob at a time: tasks that need a blob being fetched
    /// wait for it instead of fetching it again.
    fetching: tokio::sync::Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
    /// Reports on their way, by submitter.
    outbox: Mutex<HashMap<PeerId, Outbox>>,
}

/// What the worker has done since it started.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub gpus: usize,
    pub busy: usize,
    pub accepted: u64,
    pub declined: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Input blobs fetched over the network, and their bytes.
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
    /// Input blobs found already in the store.
    pub blobs_cached: u64,
    /// Tasks stopped because their submitter no longer wanted them.
    pub stopped: u64,
    /// Tasks handed back because the owner took the GPU back.
    pub handed_back: u64,
    /// Checkpoints the submitters acknowledged.
    pub checkpoints: u64,
    /// Each lent GPU's index, state and why.
    pub states: Vec<GpuStateView>,
}

/// A lent GPU's state as the owner sees it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct GpuStateView {
    pub index: usize,
    pub name: String,
    #[schema(value_type = crate::net::actor::GpuStateName)]
    pub state: GpuState,
    pub reason: String,
    pub paused: bool,
    pub tasks: usize,
    /// The owner's terms for it.
    pub policy: policy::PolicyView,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("gpus", &self.inner.setup.gpus.len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    pub fn new(setup: WorkerSetup) -> Self {
        let mut setup = setup;
        let gates = std::mem::take(&mut setup.gates);
        let nothing_to_warm = setup.warm.is_empty();
        let slots = setup
            .gpus
            .iter()
            .zip(gates)
            .map(|(g, gate)| Slot {
                report: g.clone(),
                gate,
                state: (GpuState::Idle, String::new()),
                bytes: 0,
                keys: std::collections::HashSet::new(),
                running: Arc::new(Mutex::new(None)),
                taken: 0,
                sandbox: Arc::new(Mutex::new(None)),
                turns: Arc::new(Turns::default()),
                warmed: Arc::new(tokio::sync::watch::Sender::new(nothing_to_warm)),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                setup,
                slots: Mutex::new(slots),
                stats: Mutex::new(Stats::default()),
                produced: std::sync::atomic::AtomicU64::new(0),
                kernels: Mutex::new(HashMap::new()),
                abandoned: Mutex::new(std::collections::HashSet::new()),
                preempted: Mutex::new(HashMap::new()),
                recheck: tokio::sync::Notify::new(),
                fetching: tokio::sync::Mutex::new(HashMap::new()),
                outbox: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        if let Ok(mut s) = self.inner.stats.lock() {
            f(&mut s);
        }
    }

    /// What the worker has done, and its GPUs now.
    pub fn stats(&self) -> Stats {
        let (gpus, busy) = self.load();
        let mut s = self
            .inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        s.gpus = gpus;
        s.busy = busy;
        s.states = self
            .inner
            .slots
            .lock()
            .map(|slots| {
                slots
                    .iter()
                    .map(|x| GpuStateView {
                        index: x.report.index,
                        name: x.report.name.clone(),
                        state: x.state.0,
                        reason: x.state.1.clone(),
                        paused: x.gate.paused,
                        tasks: x.taken,
                        policy: x.gate.policy.view(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        s
    }

    /// GPUs lent and GPUs with work now.
    pub fn load(&self) -> (usize, usize) {
        self.inner
            .slots
            .lock()
            .map(|s| (s.len(), s.iter().filter(|x| x.taken > 0).count()))
            .unwrap_or((0, 0))
    }
}
