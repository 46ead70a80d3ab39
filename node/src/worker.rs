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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alliance_kernels::executor::{self, Outcome, Task};
use alliance_kernels::gpu::{AdapterReport, ComputeLimits, Selection};
use alliance_kernels::intake::{self, Limits};
use alliance_kernels::sandbox::{self, ChildConfig, ResourceLimits, Sandbox};
use alliance_protocol::cert::{Member, Roles};
use alliance_protocol::task::{
    Binding, BindingKind, Data, MAX_INLINE_BYTES, OutputDigest, Receipt, TaskFailure, TaskOffer,
};
use alliance_protocol::wire::{
    Ack, DeclineReason, OfferAnswer, OfferRequest, Progress, TaskReport, TaskResult,
};
use alliance_protocol::{Hash, Identity, PublicKey, Signed, Timestamp};
use libp2p::PeerId;
use tracing::{info, warn};

use crate::blobs::{self, Blobs};
use crate::job::spec::kernels_elem;
use crate::net::actor::Client;

/// How often a worker tells the submitter that a task still runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a worker keeps trying to deliver a report.
const REPORT_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// A task as the worker names it: job, task, attempt.
type TaskKey = (alliance_protocol::task::JobId, u32, u32);

struct Slot {
    report: AdapterReport,
    /// The task running on this GPU now, and how to stop it.
    running: Arc<Mutex<Option<(TaskKey, sandbox::Stopper)>>>,
    /// Tasks accepted for this GPU and not finished (one runs at a time).
    taken: usize,
    sandbox: Arc<Mutex<Option<Sandbox>>>,
    /// Whose task runs next on this GPU.
    turns: Arc<Turns>,
}

/// One task at a time on a GPU; the tasks waiting go in order of the
/// owner's share for their submitting institution, then of that
/// institution's balance (GPU time given minus taken, from the alliance's
/// credits), then of arrival. Members who give are served before members
/// who only take.
#[derive(Default)]
struct Turns {
    state: Mutex<TurnState>,
}

#[derive(Default)]
struct TurnState {
    busy: bool,
    arrivals: u64,
    /// (priority reversed, arrival) → the waiter to wake.
    waiting: std::collections::BTreeMap<
        (std::cmp::Reverse<Priority>, u64),
        tokio::sync::oneshot::Sender<()>,
    >,
}

/// A waiting task's claim: the owner's share for its institution, then the
/// institution's balance in GPU milliseconds.
type Priority = (u32, i64);

/// The GPU, while held.
struct Turn(Arc<Turns>);

impl Turns {
    /// The GPU if nobody holds it now.
    fn try_take(self: &Arc<Self>) -> Option<Turn> {
        let mut s = self.state.lock().ok()?;
        if s.busy {
            return None;
        }
        s.busy = true;
        Some(Turn(Arc::clone(self)))
    }

    /// Waits for the GPU; `priority` orders the waiters, highest first.
    async fn wait(self: &Arc<Self>, priority: Priority) -> Turn {
        let rx = {
            let Ok(mut s) = self.state.lock() else {
                return Turn(Arc::clone(self));
            };
            if !s.busy {
                s.busy = true;
                return Turn(Arc::clone(self));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            s.arrivals += 1;
            let at = s.arrivals;
            s.waiting.insert((std::cmp::Reverse(priority), at), tx);
            rx
        };
        // The GPU is handed over busy; a dropped gate lets the next one in.
        let _ = rx.await;
        Turn(Arc::clone(self))
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let Ok(mut s) = self.0.state.lock() else {
            return;
        };
        while let Some((_, next)) = s.waiting.pop_first() {
            if next.send(()).is_ok() {
                return;
            }
        }
        s.busy = false;
    }
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
    /// Tasks each GPU takes at once.
    pub tasks_per_gpu: usize,
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
    /// Intake verdicts by kernel hash and entry point.
    kernels: Mutex<HashMap<(Hash, String), Result<intake::Kernel, String>>>,
    /// One fetch per blob at a time: tasks that need a blob being fetched
    /// wait for it instead of fetching it again.
    fetching: tokio::sync::Mutex<HashMap<Hash, Arc<tokio::sync::Mutex<()>>>>,
}

/// What the worker has done since it started.
#[derive(Debug, Clone, Default, serde::Serialize)]
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
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("gpus", &self.inner.setup.gpus.len())
            .finish_non_exhaustive()
    }
}

fn decline(reason: DeclineReason) -> OfferAnswer {
    OfferAnswer::Decline(reason)
}

impl Worker {
    pub fn new(setup: WorkerSetup) -> Self {
        let slots = setup
            .gpus
            .iter()
            .map(|g| Slot {
                report: g.clone(),
                running: Arc::new(Mutex::new(None)),
                taken: 0,
                sandbox: Arc::new(Mutex::new(None)),
                turns: Arc::new(Turns::default()),
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
                fetching: tokio::sync::Mutex::new(HashMap::new()),
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
        s
    }

    /// Answers an offer from `peer`; on acceptance the task starts at once.
    pub async fn offer(&self, peer: PeerId, member: &Member, req: OfferRequest) -> OfferAnswer {
        let answer = self.consider(peer, member, req).await;
        match answer {
            OfferAnswer::Accept { .. } => self.count(|s| s.accepted += 1),
            OfferAnswer::Decline(_) => self.count(|s| s.declined += 1),
        }
        answer
    }

    async fn consider(&self, peer: PeerId, member: &Member, req: OfferRequest) -> OfferAnswer {
        let s = &self.inner.setup;
        if s.client.paused().await.unwrap_or(true) {
            return decline(DeclineReason::Paused);
        }
        let (offer, source) = match self.check_offer(peer, member, req) {
            Ok(checked) => checked,
            Err(reason) => return decline(reason),
        };
        let check = to_task(&offer, &source, |_| PathBuf::new());
        let Some(slot) = self.claim() else {
            return decline(DeclineReason::Busy);
        };
        if let Err(e) = self.kernel_ok(&check, offer.spec.kernel, &slot.0.limits) {
            self.release(slot.1);
            return decline(DeclineReason::Limits(e));
        }
        let lease_until = Timestamp::now().saturating_add_secs(crate::jobs::LEASE.as_secs());
        let from = (
            member.institution_key,
            s.shares.get(&member.institution_name).copied().unwrap_or(1),
        );
        info!(%peer, job = %offer.spec.job, task = offer.spec.task, attempt = offer.attempt, gpu = slot.1, "task accepted");
        let me = self.clone();
        tokio::spawn(async move {
            let beat = tokio::spawn(heartbeat(
                me.clone(),
                peer,
                Progress::Running {
                    job: offer.spec.job,
                    task: offer.spec.task,
                    attempt: offer.attempt,
                    step: offer.spec.start_step,
                    steps: offer.spec.steps,
                },
            ));
            let report = me.execute(peer, &offer, source, slot.1, from).await;
            beat.abort();
            me.release(slot.1);
            match &report {
                Some(TaskReport::Done(_)) => me.count(|s| s.succeeded += 1),
                _ => me.count(|s| s.failed += 1),
            }
            match report {
                Some(r) => me.deliver(peer, r).await,
                // Only a record too large to sign gets here; the lease
                // runs out and the submitter offers the task again.
                None => warn!(%peer, "the task's report could not be signed"),
            }
        });
        OfferAnswer::Accept { lease_until }
    }

    /// The offer and its kernel source, if the offer may be considered.
    fn check_offer(
        &self,
        peer: PeerId,
        member: &Member,
        req: OfferRequest,
    ) -> Result<(TaskOffer, String), DeclineReason> {
        let bad = |m: &str| DeclineReason::BadOffer(m.to_owned());
        let offer = req
            .offer
            .verify()
            .map_err(|e| DeclineReason::BadOffer(e.to_string()))?;
        if PublicKey::from_peer_id(&peer).ok() != Some(req.offer.signer()) {
            return Err(bad(
                "the offer is signed by another node than the one that sent it",
            ));
        }
        if !member.roles.contains(Roles::SUBMIT) {
            return Err(DeclineReason::PolicyRefuses);
        }
        if offer.worker != self.inner.setup.identity.public() {
            return Err(bad("the offer is for another worker"));
        }
        if offer.expires_at <= Timestamp::now() {
            return Err(bad("the offer has expired"));
        }
        match req.kernel_source {
            Some(src) if Hash::of(src.as_bytes()) == offer.spec.kernel => Ok((offer, src)),
            Some(_) => Err(bad("the kernel does not match the hash in the offer")),
            None => Err(bad("the offer carries no kernel")),
        }
    }

    /// The least loaded GPU with room for another task, which it takes.
    fn claim(&self) -> Option<(AdapterReport, usize)> {
        let depth = self.inner.setup.tasks_per_gpu.max(1);
        let mut slots = self.inner.slots.lock().ok()?;
        let (i, slot) = slots
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.taken < depth)
            .min_by_key(|(_, s)| s.taken)?;
        slot.taken += 1;
        Some((slot.report.clone(), i))
    }

    fn release(&self, i: usize) {
        if let Ok(mut slots) = self.inner.slots.lock()
            && let Some(s) = slots.get_mut(i)
        {
            s.taken = s.taken.saturating_sub(1);
        }
    }

    /// Stops the task `key` if it runs, and keeps it from starting if it
    /// waits for its GPU.
    fn abandon(&self, key: TaskKey) {
        if let Ok(mut a) = self.inner.abandoned.lock() {
            if a.len() >= 4096 {
                a.clear();
            }
            a.insert(key);
        }
        if let Ok(slots) = self.inner.slots.lock() {
            for slot in slots.iter() {
                if let Ok(r) = slot.running.lock()
                    && let Some((k, stopper)) = r.as_ref()
                    && *k == key
                {
                    stopper.stop();
                }
            }
        }
    }

    /// GPUs lent and GPUs with work now.
    pub fn load(&self) -> (usize, usize) {
        self.inner
            .slots
            .lock()
            .map(|s| (s.len(), s.iter().filter(|x| x.taken > 0).count()))
            .unwrap_or((0, 0))
    }

    /// `check`'s kernel passes intake: the answer is kept by kernel hash
    /// and entry point, so a job's tasks parse their kernel once.
    fn kernel_ok(&self, check: &Task, hash: Hash, device: &ComputeLimits) -> Result<(), String> {
        let key = (hash, check.entry_point.clone());
        let known = self
            .inner
            .kernels
            .lock()
            .ok()
            .and_then(|k| k.get(&key).cloned());
        let kernel = match known {
            Some(k) => k,
            None => {
                let k = intake::check_kernel(
                    &check.kernel,
                    &check.entry_point,
                    &self.inner.setup.limits,
                    Some(device),
                )
                .map_err(|e| e.to_string());
                if let Ok(mut map) = self.inner.kernels.lock() {
                    if map.len() >= 256 {
                        map.clear();
                    }
                    map.insert(key, k.clone());
                }
                k
            }
        }?;
        executor::check_bindings(&kernel, check, &self.inner.setup.limits, Some(device))
            .map_err(|e| e.to_string())
    }

    async fn execute(
        &self,
        peer: PeerId,
        offer: &TaskOffer,
        source: String,
        slot: usize,
        from: (PublicKey, u32),
    ) -> Option<TaskReport> {
        let s = &self.inner.setup;
        let spec = &offer.spec;
        let result = self.run(peer, offer, source, slot, from).await;
        let now = Timestamp::now();
        let submitter = PublicKey::from_peer_id(&peer).unwrap_or(offer.worker);
        match result {
            Ok((mut outcome, adapter)) => {
                let produced = self
                    .inner
                    .produced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if s.corrupt_after.is_some_and(|n| produced >= n) {
                    for o in &mut outcome.outputs {
                        if let Some(b) = o.data.first_mut() {
                            *b ^= 0x01;
                            o.hash = *blake3::hash(&o.data).as_bytes();
                        }
                    }
                }
                let mut outputs = Vec::new();
                let mut digests = Vec::new();
                for o in &outcome.outputs {
                    let hash = Hash::from_bytes(o.hash);
                    digests.push(OutputDigest {
                        binding: o.binding,
                        hash,
                        len: o.len,
                    });
                    let data = if o.data.len() <= MAX_INLINE_BYTES {
                        Data::Inline(o.data.clone())
                    } else {
                        match s.blobs.put(&o.data) {
                            Ok(h) => Data::Blob {
                                hash: h,
                                len: o.len,
                            },
                            Err(e) => {
                                return self.failure(
                                    offer,
                                    submitter,
                                    format!("cannot keep an output: {e}"),
                                );
                            }
                        }
                    };
                    outputs.push((o.binding, data));
                }
                let receipt = Receipt {
                    job: spec.job,
                    task: spec.task,
                    attempt: offer.attempt,
                    kernel: spec.kernel,
                    inputs: spec.bindings.iter().filter_map(input_hash).collect(),
                    outputs: digests,
                    gpu_time_us: u64::try_from(outcome.gpu_time.as_micros()).unwrap_or(u64::MAX),
                    adapter,
                    worker: s.identity.public(),
                    submitter,
                    finished_at: now,
                };
                match Signed::sign(&receipt, &s.identity) {
                    Ok(r) => Some(TaskReport::Done(TaskResult {
                        receipt: r,
                        outputs,
                    })),
                    Err(e) => {
                        self.failure(offer, submitter, format!("cannot sign the receipt: {e}"))
                    }
                }
            }
            Err(reason) => self.failure(offer, submitter, reason),
        }
    }

    fn failure(
        &self,
        offer: &TaskOffer,
        submitter: PublicKey,
        mut reason: String,
    ) -> Option<TaskReport> {
        if reason.len() > 4096 {
            let mut cut = 4096;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let s = &self.inner.setup;
        warn!(job = %offer.spec.job, task = offer.spec.task, %reason, "task failed");
        let failure = TaskFailure {
            job: offer.spec.job,
            task: offer.spec.task,
            attempt: offer.attempt,
            kernel: offer.spec.kernel,
            worker: s.identity.public(),
            submitter,
            reason,
            failed_at: Timestamp::now(),
        };
        Signed::sign(&failure, &s.identity)
            .ok()
            .map(TaskReport::Failed)
    }

    async fn run(
        &self,
        peer: PeerId,
        offer: &TaskOffer,
        source: String,
        slot: usize,
        from: (PublicKey, u32),
    ) -> Result<(Outcome, String), String> {
        let s = &self.inner.setup;
        for b in &offer.spec.bindings {
            if let Some(Data::Blob { hash, len }) = data_of(&b.kind) {
                let lock = {
                    let mut map = self.inner.fetching.lock().await;
                    Arc::clone(map.entry(*hash).or_default())
                };
                let _held = lock.lock().await;
                let got = blobs::fetch(&s.client, &s.blobs, peer, *hash, *len).await;
                match got {
                    Ok(0) => self.count(|s| s.blobs_cached += 1),
                    Ok(n) => self.count(|s| {
                        s.blobs_fetched += 1;
                        s.bytes_fetched += n;
                    }),
                    Err(e) => {
                        if matches!(e, blobs::BlobError::HashMismatch { .. }) {
                            let _ = s.client.punish(peer, e.to_string()).await;
                        }
                        return Err(format!("cannot fetch an input: {e}"));
                    }
                }
            }
        }
        let blobs = s.blobs.clone();
        let task = to_task(offer, &source, |h| blobs.path(h));
        let timeout = Duration::from_millis(offer.spec.timeout_ms);
        let (sandbox, config, running, turns) = {
            let slots = self
                .inner
                .slots
                .lock()
                .map_err(|_| "worker state poisoned".to_owned())?;
            let slot_ref = slots.get(slot).ok_or("no such GPU")?;
            (
                Arc::clone(&slot_ref.sandbox),
                self.sandbox_config(&slot_ref.report, slot),
                Arc::clone(&slot_ref.running),
                Arc::clone(&slot_ref.turns),
            )
        };
        // Only a task that must wait needs its institution's balance.
        let turn = match turns.try_take() {
            Some(turn) => turn,
            None => {
                let (institution, share) = from;
                let balance = s.client.balance(institution).await.unwrap_or(0.0);
                #[allow(clippy::cast_possible_truncation)]
                let priority = (share, (balance * 1000.0) as i64);
                turns.wait(priority).await
            }
        };
        info!(%peer, job = %offer.spec.job, task = offer.spec.task, "task started");
        let key: TaskKey = (offer.spec.job, offer.spec.task, offer.attempt);
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            // The GPU is this task's until the closure ends.
            let _turn = turn;
            let mut guard = sandbox.lock().map_err(|_| "sandbox poisoned".to_owned())?;
            if guard.is_none() {
                *guard = Some(Sandbox::start(config).map_err(|e| e.to_string())?);
            }
            let sb = guard.as_mut().ok_or("no sandbox")?;
            // Model, backend and driver: what bit-exact comparison of
            // floats between replicas depends on.
            let adapter = sb
                .ready()
                .map(|r| {
                    let a = r.adapter;
                    format!(
                        "{} ({:?}, {} {})",
                        a.name, a.backend, a.driver, a.driver_info
                    )
                })
                .unwrap_or_default();
            let wanted = |k: &TaskKey| me.inner.abandoned.lock().map_or(true, |a| !a.contains(k));
            if !wanted(&key) {
                me.count(|s| s.stopped += 1);
                return Err("stopped before it ran: the submitter no longer wants it".into());
            }
            if let Ok(mut r) = running.lock() {
                *r = Some((key, sb.stopper()));
            }
            let result = sb.run(&task, timeout, &mut |_| Ok(()));
            if let Ok(mut r) = running.lock() {
                *r = None;
            }
            match result {
                Ok(o) => Ok((o, adapter)),
                Err(_) if !wanted(&key) => {
                    me.count(|s| s.stopped += 1);
                    Err("stopped: the submitter no longer wants it".into())
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| format!("the task runner stopped: {e}"))?
    }

    fn sandbox_config(&self, report: &AdapterReport, slot: usize) -> sandbox::Config {
        let s = &self.inner.setup;
        let scratch = s.scratch.join(format!("gpu{slot}"));
        let _ = std::fs::create_dir_all(&scratch);
        sandbox::Config {
            program: s.program.clone(),
            args: s.args.clone(),
            env: Vec::new(),
            child: ChildConfig {
                adapter: Selection::Indices(vec![report.index]),
                limits: s.limits.clone(),
                rlimits: s.rlimits,
                scratch,
            },
            start_timeout: Duration::from_secs(120),
        }
    }

    /// Sends `report` to the submitter until it answers.
    async fn deliver(&self, peer: PeerId, report: TaskReport) {
        let s = &self.inner.setup;
        let start = std::time::Instant::now();
        let mut wait = Duration::from_millis(500);
        loop {
            match s.client.report(peer, report.clone()).await {
                Ok(Ok(Ack::Ok)) => return,
                Ok(Ok(Ack::Refused(why))) => {
                    warn!(%peer, %why, "the submitter refused the report");
                    return;
                }
                Ok(Err(e)) => warn!(%peer, error = %e, "report not delivered yet"),
                Err(_) => return,
            }
            if start.elapsed() > REPORT_PATIENCE {
                warn!(%peer, "giving up delivering a report");
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// Sends `progress` to the submitter every [`PROGRESS_EVERY`] until aborted;
/// when the submitter says it no longer wants the task (it was cancelled,
/// or offered elsewhere), the task is stopped.
async fn heartbeat(worker: Worker, peer: PeerId, progress: Progress) {
    let Progress::Running {
        job, task, attempt, ..
    } = progress
    else {
        return;
    };
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        match worker
            .inner
            .setup
            .client
            .progress(peer, progress.clone())
            .await
        {
            Ok(Ok(Ack::Refused(why))) => {
                info!(%peer, %why, "the submitter no longer wants the task; stopping it");
                worker.abandon((job, task, attempt));
                return;
            }
            Err(_) => return,
            _ => {}
        }
    }
}

fn data_of(kind: &BindingKind) -> Option<&Data> {
    match kind {
        BindingKind::Input { data }
        | BindingKind::Uniform { data }
        | BindingKind::State { data, .. } => Some(data),
        BindingKind::Output { .. } => None,
    }
}

fn input_hash(b: &Binding) -> Option<Hash> {
    data_of(&b.kind).map(Data::hash)
}

/// The executor's task for an offer; blobs are read from `blob_path`.
fn to_task(offer: &TaskOffer, source: &str, blob_path: impl Fn(&Hash) -> PathBuf) -> Task {
    let spec = &offer.spec;
    let data = |d: &Data| match d {
        Data::Inline(bytes) => executor::Data::Bytes(bytes.clone()),
        Data::Blob { hash, len } => executor::Data::File {
            path: blob_path(hash),
            len: *len,
        },
    };
    let bindings = spec
        .bindings
        .iter()
        .map(|b| match &b.kind {
            BindingKind::Input { data: d } => executor::Binding::Input {
                binding: b.binding,
                data: data(d),
            },
            BindingKind::Uniform { data: d } => executor::Binding::Uniform {
                binding: b.binding,
                data: data(d),
            },
            BindingKind::Output { len, elem } => executor::Binding::Output {
                binding: b.binding,
                len: *len,
                elem: kernels_elem(*elem),
            },
            BindingKind::State { data: d, elem } => executor::Binding::State {
                binding: b.binding,
                data: data(d),
                elem: kernels_elem(*elem),
            },
        })
        .collect();
    let mut task = Task::new(source, &spec.entry_point, bindings, spec.dispatch);
    task.steps = spec.steps;
    task.start_step = spec.start_step;
    task.checkpoint_every = spec.checkpoint_every;
    task.info_binding = spec.info_binding;
    task.task_index = spec.task;
    task.task_count = spec.task_count;
    task
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_gpu_goes_to_the_largest_share_then_balance_then_the_earliest() {
        let turns = Arc::new(Turns::default());
        let held = turns.wait((1, 0)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for (name, priority) in [
            ("taker", (1, -5)),
            ("giver", (1, 10)),
            ("new", (1, 0)),
            ("new2", (1, 0)),
            ("shunned", (0, 50)),
        ] {
            let (turns, order) = (Arc::clone(&turns), Arc::clone(&order));
            waiters.push(tokio::spawn(async move {
                let _turn = turns.wait(priority).await;
                order.lock().unwrap().push(name);
            }));
            // Arrival order is the order of the loop.
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // One waiter gives up: the GPU passes over it.
        let (quitter, stop) = {
            let turns = Arc::clone(&turns);
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            (
                tokio::spawn(async move {
                    tokio::select! {
                        _ = turns.wait((9, 0)) => {}
                        _ = rx => {}
                    }
                }),
                tx,
            )
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let _ = stop.send(());
        quitter.await.unwrap();
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["giver", "new", "new2", "taker", "shunned"]
        );
        // Free again: the next comer gets it at once.
        let _again = tokio::time::timeout(Duration::from_secs(1), turns.wait((1, 0)))
            .await
            .unwrap();
    }
}
