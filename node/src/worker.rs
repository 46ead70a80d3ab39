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
    self as records, Binding, BindingKind, Data, MAX_INLINE_BYTES, Outcomes, OutputDigest, Receipt,
    TaskFailure, TaskOffer,
};
use alliance_protocol::wire::{
    self, Ack, Acks, DeclineReason, MAX_BATCH, OfferAnswer, OfferAnswers, OfferRequest, Progress,
    REPORT_BATCH_BYTES, Reports,
};
use alliance_protocol::{Hash, Identity, PublicKey, Signed, Timestamp};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use alliance_protocol::advert::{GpuInfo, GpuState, TermsRefusal};
use alliance_protocol::task::CheckpointRecord;

use crate::blobs::{self, Blobs};
use crate::job::spec::kernels_elem;
use crate::net::actor::Client;
use crate::policy::{Gate, GpuId, IdleConfig, Probe};

/// How often a worker tells the submitter that a task still runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a worker keeps trying to deliver a report.
const REPORT_PATIENCE: Duration = Duration::from_secs(30 * 60);

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

/// The reports waiting to go to one submitter, and whether a sender is
/// draining them.
#[derive(Default)]
struct Outbox {
    queue: std::collections::VecDeque<Outgoing>,
    sending: bool,
}

struct Outgoing {
    outcome: records::Outcome,
    outputs: Vec<(u32, Data)>,
    /// Encoded bytes, about, for sizing batches.
    size: usize,
    since: std::time::Instant,
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
    /// Tasks handed back because the owner took the GPU back.
    pub handed_back: u64,
    /// Checkpoints the submitters acknowledged.
    pub checkpoints: u64,
    /// Each lent GPU's index, state and why.
    pub states: Vec<GpuStateView>,
}

/// A lent GPU's state as the owner sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuStateView {
    pub index: usize,
    pub name: String,
    pub state: GpuState,
    pub reason: String,
    pub paused: bool,
    pub tasks: usize,
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
        let mut setup = setup;
        let gates = std::mem::take(&mut setup.gates);
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
                    })
                    .collect()
            })
            .unwrap_or_default();
        s
    }

    /// Pauses or resumes lending GPU `gpu` (its index), or every GPU; the
    /// change is kept across restarts, shown in the advert at once, and a
    /// pause hands back the tasks the GPU holds.
    pub fn set_paused(&self, gpu: Option<usize>, paused: bool) -> Result<(), String> {
        let indices = {
            let mut slots = self
                .inner
                .slots
                .lock()
                .map_err(|_| "worker state poisoned".to_owned())?;
            if let Some(g) = gpu
                && !slots.iter().any(|s| s.report.index == g)
            {
                let lent: Vec<String> = slots.iter().map(|s| s.report.index.to_string()).collect();
                return Err(format!(
                    "this node lends no GPU {g}; it lends GPU {} (see `alliance gpus --local`)",
                    lent.join(", ")
                ));
            }
            for s in slots.iter_mut() {
                if gpu.is_none_or(|g| g == s.report.index) {
                    s.gate.paused = paused;
                }
            }
            slots
                .iter()
                .filter(|s| s.gate.paused)
                .map(|s| s.report.index)
                .collect::<Vec<_>>()
        };
        let path = &self.inner.setup.pause_file;
        let text = serde_json::to_string(&indices).map_err(|e| e.to_string())?;
        std::fs::write(path, text)
            .map_err(|e| format!("cannot keep the pause in {}: {e}", path.display()))?;
        self.inner.recheck.notify_one();
        Ok(())
    }

    /// Watches the owner's policy and signals: keeps each GPU's state,
    /// publishes it in the advert when it changes, and hands back the
    /// tasks of a GPU the owner takes back. Runs until the node stops.
    pub async fn watch(self) {
        let s = &self.inner.setup;
        let ids: Vec<GpuId> = s
            .gpus
            .iter()
            .map(|g| GpuId {
                index: g.index,
                vendor: g.vendor,
                pci_bus_id: g.pci_bus_id.clone(),
            })
            .collect();
        let probe = Arc::new(Probe::new(s.idle.clone(), ids));
        let poll = Duration::from_millis(s.idle.poll_ms.max(50));
        let mut published: Option<Vec<GpuInfo>> = None;
        loop {
            let running: Vec<bool> = self
                .inner
                .slots
                .lock()
                .map(|slots| {
                    slots
                        .iter()
                        .map(|x| x.running.lock().map(|r| r.is_some()).unwrap_or(false))
                        .collect()
                })
                .unwrap_or_default();
            let p = Arc::clone(&probe);
            let busy = tokio::task::spawn_blocking(move || p.sample(&running))
                .await
                .unwrap_or_default();
            let (adverts, taken_back) = self.evaluate(&busy);
            for (slot, reason) in taken_back {
                self.hand_back_all(slot, &reason);
            }
            if published.as_ref() != Some(&adverts) {
                if s.client.set_gpus(adverts.clone()).await.is_err() {
                    return;
                }
                published = Some(adverts);
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = self.inner.recheck.notified() => {}
            }
        }
    }

    /// Each GPU's state now, as advert entries, and the GPUs that stopped
    /// taking work with why.
    fn evaluate(&self, busy: &[Option<String>]) -> (Vec<GpuInfo>, Vec<(usize, String)>) {
        let now = std::time::Instant::now();
        let wall = i64::try_from(Timestamp::now().as_secs()).unwrap_or(i64::MAX);
        let mut adverts = Vec::new();
        let mut taken_back = Vec::new();
        let Ok(mut slots) = self.inner.slots.lock() else {
            return (adverts, taken_back);
        };
        for (i, slot) in slots.iter_mut().enumerate() {
            let signal = busy.get(i).and_then(|b| b.as_deref());
            let (state, reason) = slot.gate.evaluate(signal, now, wall);
            if state != GpuState::Idle && slot.state.0 == GpuState::Idle && slot.taken > 0 {
                taken_back.push((i, reason.clone()));
            }
            if state != slot.state.0 || reason != slot.state.1 {
                info!(gpu = slot.report.index, ?state, %reason, "GPU state");
            }
            slot.state = (state, reason.clone());
            if let Some(base) = self.inner.setup.adverts.get(i) {
                adverts.push(GpuInfo {
                    state,
                    free_slots: if state == GpuState::Idle {
                        slot.gate.policy.max_tasks
                    } else {
                        0
                    },
                    reason,
                    terms: slot.gate.policy.terms.clone(),
                    ..base.clone()
                });
            }
        }
        (adverts, taken_back)
    }

    /// Stops every task GPU `slot` holds, to hand each back to its
    /// submitter.
    fn hand_back_all(&self, slot: usize, reason: &str) {
        let Ok(slots) = self.inner.slots.lock() else {
            return;
        };
        let Some(s) = slots.get(slot) else {
            return;
        };
        if let Ok(mut p) = self.inner.preempted.lock() {
            for key in &s.keys {
                p.insert(*key, reason.to_owned());
            }
        }
        if let Ok(r) = s.running.lock()
            && let Some((_, stopper)) = r.as_ref()
        {
            warn!(gpu = s.report.index, %reason, tasks = s.keys.len(), "the owner takes the GPU back; handing its tasks back");
            stopper.stop();
        }
    }

    fn preempted(&self, key: &TaskKey) -> Option<String> {
        self.inner
            .preempted
            .lock()
            .ok()
            .and_then(|p| p.get(key).cloned())
    }

    /// Answers a batch of offers from `peer` (at most `MAX_BATCH`, signed
    /// together), one answer per offer in their order; each accepted task
    /// starts at once. A batch that cannot be opened gets one decline.
    pub async fn offers(&self, peer: PeerId, member: &Member, req: OfferRequest) -> OfferAnswers {
        let offers = match open_offers(peer, &req) {
            Ok(offers) => offers,
            Err(reason) => {
                self.count(|s| s.declined += 1);
                info!(%peer, ?reason, "offers refused");
                return OfferRequest::decline_all(&reason);
            }
        };
        // The kernel is hashed once for the batch.
        let kernel = req
            .kernel_source
            .map(|src| (Hash::of(src.as_bytes()), Arc::<str>::from(src)));
        let mut answers = Vec::with_capacity(offers.len());
        let (mut accepted, mut declined) = (0, 0);
        for offer in offers {
            let answer = self.consider(peer, member, offer, kernel.as_ref());
            match answer {
                OfferAnswer::Accept { .. } => accepted += 1,
                OfferAnswer::Decline(_) => declined += 1,
            }
            answers.push(answer);
        }
        self.count(|s| {
            s.accepted += accepted;
            s.declined += declined;
        });
        // One line per batch (each task's are at debug level): small tasks
        // come by the thousand.
        info!(%peer, accepted, declined, "offers answered");
        OfferAnswers(answers)
    }

    fn consider(
        &self,
        peer: PeerId,
        member: &Member,
        offer: TaskOffer,
        kernel: Option<&(Hash, Arc<str>)>,
    ) -> OfferAnswer {
        let s = &self.inner.setup;
        let (offer, source) = match self.check_offer(member, offer, kernel) {
            Ok(checked) => checked,
            Err(reason) => return decline(reason),
        };
        let check = to_task(&offer, &source, |_| PathBuf::new());
        let key: TaskKey = (offer.spec.job, offer.spec.task, offer.attempt);
        let bytes = check.bindings.iter().map(executor::Binding::bytes).sum();
        let slot = match self.claim(&member.institution_name, bytes, offer.spec.timeout_ms, key) {
            Ok(slot) => slot,
            Err(reason) => return decline(reason),
        };
        if let Err(e) = self.kernel_ok(&check, offer.spec.kernel, &slot.0.limits) {
            self.release(slot.1, bytes, key);
            return decline(DeclineReason::Limits(e));
        }
        let lease_until = Timestamp::now().saturating_add_secs(crate::jobs::LEASE.as_secs());
        let from = (
            member.institution_key,
            s.shares.get(&member.institution_name).copied().unwrap_or(1),
        );
        debug!(%peer, job = %offer.spec.job, task = offer.spec.task, attempt = offer.attempt, gpu = slot.1, "task accepted");
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
            let (outcome, outputs) = me.execute(peer, &offer, source, slot.1, from).await;
            beat.abort();
            me.release(slot.1, bytes, key);
            match &outcome {
                records::Outcome::Done(_) => me.count(|s| s.succeeded += 1),
                records::Outcome::HandedBack(_) => me.count(|s| s.handed_back += 1),
                records::Outcome::Failed(_) => me.count(|s| s.failed += 1),
            }
            me.deliver(peer, outcome, outputs);
        });
        OfferAnswer::Accept { lease_until }
    }

    /// The offer and its kernel source, if the offer may be considered.
    fn check_offer(
        &self,
        member: &Member,
        offer: TaskOffer,
        kernel: Option<&(Hash, Arc<str>)>,
    ) -> Result<(TaskOffer, Arc<str>), DeclineReason> {
        let bad = |m: &str| DeclineReason::BadOffer(m.to_owned());
        if !member.roles.contains(Roles::SUBMIT) {
            return Err(DeclineReason::PolicyRefuses);
        }
        if offer.worker != self.inner.setup.identity.public() {
            return Err(bad("the offer is for another worker"));
        }
        if offer.expires_at <= Timestamp::now() {
            return Err(bad("the offer has expired"));
        }
        match kernel {
            Some((hash, src)) if *hash == offer.spec.kernel => Ok((offer, Arc::clone(src))),
            Some(_) => Err(bad("the kernel does not match the hash in the offer")),
            None => Err(bad("the offer carries no kernel")),
        }
    }

    /// The least loaded GPU that takes this task under its owner's policy
    /// (state, institutions, memory, duration, tasks at once), which it
    /// takes; else the most telling reason none does.
    fn claim(
        &self,
        institution: &str,
        bytes: u64,
        timeout_ms: u64,
        key: TaskKey,
    ) -> Result<(AdapterReport, usize), DeclineReason> {
        let mut slots = self.inner.slots.lock().map_err(|_| DeclineReason::Busy)?;
        let mut why: Option<DeclineReason> = None;
        let mut best: Option<usize> = None;
        for (i, s) in slots.iter().enumerate() {
            let p = &s.gate.policy;
            let refusal = if s.state.0 != GpuState::Idle {
                Some(DeclineReason::Unavailable(s.state.1.clone()))
            } else if let Err(e) = p.terms.check(institution, timeout_ms, bytes) {
                Some(match e {
                    TermsRefusal::Institution => DeclineReason::PolicyRefuses,
                    other => DeclineReason::Limits(other.to_string()),
                })
            } else if s.taken >= usize::from(p.max_tasks)
                || (p.max_total_bytes > 0 && s.bytes.saturating_add(bytes) > p.max_total_bytes)
            {
                Some(DeclineReason::Busy)
            } else {
                None
            };
            match refusal {
                None => {
                    if best.is_none_or(|b| slots[b].taken > s.taken) {
                        best = Some(i);
                    }
                }
                // The reason of the GPU closest to taking it wins.
                Some(r) => {
                    let rank = |r: &DeclineReason| match r {
                        DeclineReason::Unavailable(_) => 0,
                        DeclineReason::PolicyRefuses => 1,
                        DeclineReason::Limits(_) => 2,
                        _ => 3,
                    };
                    if why.as_ref().is_none_or(|w| rank(w) < rank(&r)) {
                        why = Some(r);
                    }
                }
            }
        }
        let Some(i) = best else {
            return Err(why.unwrap_or(DeclineReason::Busy));
        };
        let slot = &mut slots[i];
        slot.taken += 1;
        slot.bytes = slot.bytes.saturating_add(bytes);
        slot.keys.insert(key);
        Ok((slot.report.clone(), i))
    }

    fn release(&self, i: usize, bytes: u64, key: TaskKey) {
        if let Ok(mut slots) = self.inner.slots.lock()
            && let Some(s) = slots.get_mut(i)
        {
            s.taken = s.taken.saturating_sub(1);
            s.bytes = s.bytes.saturating_sub(bytes);
            s.keys.remove(&key);
        }
        if let Ok(mut p) = self.inner.preempted.lock() {
            p.remove(&key);
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
        source: Arc<str>,
        slot: usize,
        from: (PublicKey, u32),
    ) -> (records::Outcome, Vec<(u32, Data)>) {
        let s = &self.inner.setup;
        let spec = &offer.spec;
        let acked = Arc::new(std::sync::atomic::AtomicU32::new(spec.start_step));
        let result = self
            .run(peer, offer, source, slot, from, Arc::clone(&acked))
            .await;
        let now = Timestamp::now();
        let submitter = PublicKey::from_peer_id(&peer).unwrap_or(offer.worker);
        let key: TaskKey = (spec.job, spec.task, offer.attempt);
        if result.is_err()
            && let Some(why) = self.preempted(&key)
        {
            let step = acked.load(std::sync::atomic::Ordering::Acquire);
            let reason = format!(
                "handed back at the owner's request ({why}); its last checkpoint is step {step}"
            );
            info!(job = %spec.job, task = spec.task, %reason, "task handed back");
            let back = records::Outcome::HandedBack(self.task_failure(offer, submitter, reason));
            return (back, Vec::new());
        }
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
                    match outgoing(&s.blobs, o, o.data.len() <= MAX_INLINE_BYTES) {
                        Ok((digest, data)) => {
                            digests.push(digest);
                            outputs.push((o.binding, data));
                        }
                        Err(e) => {
                            return self.failure(
                                offer,
                                submitter,
                                format!("cannot keep an output: {e}"),
                            );
                        }
                    }
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
                (records::Outcome::Done(receipt), outputs)
            }
            Err(reason) => self.failure(offer, submitter, reason),
        }
    }

    fn failure(
        &self,
        offer: &TaskOffer,
        submitter: PublicKey,
        reason: String,
    ) -> (records::Outcome, Vec<(u32, Data)>) {
        warn!(job = %offer.spec.job, task = offer.spec.task, %reason, "task failed");
        let failed = records::Outcome::Failed(self.task_failure(offer, submitter, reason));
        (failed, Vec::new())
    }

    fn task_failure(
        &self,
        offer: &TaskOffer,
        submitter: PublicKey,
        mut reason: String,
    ) -> TaskFailure {
        if reason.len() > 4096 {
            let mut cut = 4096;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let s = &self.inner.setup;
        TaskFailure {
            job: offer.spec.job,
            task: offer.spec.task,
            attempt: offer.attempt,
            kernel: offer.spec.kernel,
            worker: s.identity.public(),
            submitter,
            reason,
            failed_at: Timestamp::now(),
        }
    }

    async fn run(
        &self,
        peer: PeerId,
        offer: &TaskOffer,
        source: Arc<str>,
        slot: usize,
        from: (PublicKey, u32),
        acked: Arc<std::sync::atomic::AtomicU32>,
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
                let balance = s.client.balance(institution);
                #[allow(clippy::cast_possible_truncation)]
                let priority = (share, (balance * 1000.0) as i64);
                turns.wait(priority).await
            }
        };
        debug!(%peer, job = %offer.spec.job, task = offer.spec.task, "task started");
        let key: TaskKey = (offer.spec.job, offer.spec.task, offer.attempt);
        let (checkpoints, newest) = tokio::sync::watch::channel(None);
        // Only a task that takes checkpoints needs their sender.
        let sender = offer.spec.checkpoint_every.is_some().then(|| {
            tokio::spawn(send_checkpoints(
                self.clone(),
                peer,
                offer.clone(),
                newest,
                acked,
            ))
        });
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
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
            if me.preempted(&key).is_some() {
                return Err("its GPU was taken back before it ran".into());
            }
            if let Ok(mut r) = running.lock() {
                *r = Some((key, sb.stopper()));
            }
            // The GPU may have been taken back between the check and now.
            if me.preempted(&key).is_some() {
                sb.stopper().stop();
            }
            let result = sb.run(&task, timeout, &mut |c| {
                // The newest checkpoint replaces one not yet sent: the GPU
                // never waits for the network.
                let _ = checkpoints.send(Some(c));
                Ok(())
            });
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
        .map_err(|e| format!("the task runner stopped: {e}"))?;
        match sender {
            Some(sender) if result.is_ok() => sender.abort(),
            // A task handed back resumes from its newest checkpoint: let
            // the one on its way arrive first.
            Some(sender) => {
                let _ = sender.await;
            }
            None => {}
        }
        result
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

    /// Queues `report` for the submitter `peer`. One sender per submitter
    /// drains its queue: reports that end while one request is on its way
    /// travel together in the next.
    fn deliver(&self, peer: PeerId, outcome: records::Outcome, outputs: Vec<(u32, Data)>) {
        let size = wire::report_size_hint(&outcome, &outputs);
        let start = {
            let Ok(mut out) = self.inner.outbox.lock() else {
                return;
            };
            let o = out.entry(peer).or_default();
            o.queue.push_back(Outgoing {
                outcome,
                outputs,
                size,
                since: std::time::Instant::now(),
            });
            !std::mem::replace(&mut o.sending, true)
        };
        if start {
            tokio::spawn(self.clone().send_reports(peer));
        }
    }

    /// Sends the reports queued for `peer`, a batch at a time, until the
    /// queue is empty; a batch that does not arrive is sent again, with
    /// backoff, until the submitter answers or half an hour passes.
    async fn send_reports(self, peer: PeerId) {
        let s = &self.inner.setup;
        let mut wait = Duration::from_millis(500);
        loop {
            let batch: Vec<Outgoing> = {
                let Ok(mut out) = self.inner.outbox.lock() else {
                    return;
                };
                let Some(o) = out.get_mut(&peer) else {
                    return;
                };
                let mut bytes = 0;
                let mut batch = Vec::new();
                while let Some(next) = o.queue.front() {
                    if batch.len() >= MAX_BATCH
                        || (!batch.is_empty() && bytes + next.size > REPORT_BATCH_BYTES)
                    {
                        break;
                    }
                    bytes += next.size;
                    batch.extend(o.queue.pop_front());
                }
                if batch.is_empty() {
                    out.remove(&peer);
                    return;
                }
                batch
            };
            // The batch is signed as it leaves: one signature for all of
            // it (a batch sent again is signed again).
            let outcomes = Outcomes(batch.iter().map(|o| o.outcome.clone()).collect());
            let outcomes = match Signed::sign(&outcomes, &s.identity) {
                Ok(signed) => signed,
                Err(e) => {
                    // Only a batch too large to sign gets here (a single
                    // report is far below the cap); the leases run out and
                    // the submitter offers the tasks again.
                    warn!(%peer, error = %e, reports = batch.len(), "reports could not be signed; dropped");
                    continue;
                }
            };
            let reports = Reports {
                outcomes,
                outputs: batch.iter().map(|o| o.outputs.clone()).collect(),
            };
            match s.client.report(peer, reports).await {
                Ok(Ok(Acks(acks))) => {
                    wait = Duration::from_millis(500);
                    if acks.len() != batch.len() {
                        warn!(%peer, reports = batch.len(), acks = acks.len(), "the submitter acknowledged another number of reports than it got");
                    }
                    for ack in acks {
                        if let Ack::Refused(why) = ack {
                            warn!(%peer, %why, "the submitter refused a report");
                        }
                    }
                }
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, reports = batch.len(), "reports not delivered yet");
                    let keep: Vec<Outgoing> = batch
                        .into_iter()
                        .filter(|o| o.since.elapsed() <= REPORT_PATIENCE)
                        .collect();
                    if keep.is_empty() {
                        warn!(%peer, "giving up delivering reports");
                    }
                    if let Ok(mut out) = self.inner.outbox.lock() {
                        let o = out.entry(peer).or_default();
                        o.sending = true;
                        for k in keep.into_iter().rev() {
                            o.queue.push_front(k);
                        }
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(_) => return,
            }
        }
    }
}

/// The offers of a request, once its signature is checked and its
/// signer is the peer that sent it.
fn open_offers(peer: PeerId, req: &OfferRequest) -> Result<Vec<TaskOffer>, DeclineReason> {
    let bad = |m: String| DeclineReason::BadOffer(m);
    if PublicKey::from_peer_id(&peer).ok() != Some(req.offers.signer()) {
        return Err(bad(
            "the offers are signed by another node than the one that sent them".into(),
        ));
    }
    let offers = req.offers.verify().map_err(|e| bad(e.to_string()))?.0;
    if offers.len() > MAX_BATCH {
        return Err(bad(format!(
            "{} offers; at most {MAX_BATCH} travel together",
            offers.len()
        )));
    }
    Ok(offers)
}

/// Inline state bytes a checkpoint message carries at most; larger state
/// goes as blobs the submitter fetches.
const INLINE_CHECKPOINT: usize = 512 * 1024;

/// Sends each newest checkpoint of a task to its submitter, signed, until
/// the task ends; `acked` holds the step of the last one acknowledged.
/// State too large to travel inline is kept as blobs until the next
/// checkpoint is acknowledged.
async fn send_checkpoints(
    worker: Worker,
    peer: PeerId,
    offer: TaskOffer,
    mut newest: tokio::sync::watch::Receiver<Option<executor::Checkpoint>>,
    acked: Arc<std::sync::atomic::AtomicU32>,
) {
    let s = &worker.inner.setup;
    // The blobs of the last checkpoint the submitter took (it has fetched
    // them), deleted when the next is taken or the task ends.
    let mut kept = CheckpointBlobs {
        blobs: s.blobs.clone(),
        inputs: offer.spec.bindings.iter().filter_map(input_hash).collect(),
        held: Vec::new(),
    };
    while newest.changed().await.is_ok() {
        let Some(c) = newest.borrow_and_update().clone() else {
            continue;
        };
        let mut inline = 0usize;
        let mut state = Vec::new();
        let mut digests = Vec::new();
        let mut sent = CheckpointBlobs {
            blobs: s.blobs.clone(),
            inputs: kept.inputs.clone(),
            held: Vec::new(),
        };
        for o in &c.state {
            let fits = inline + o.data.len() <= INLINE_CHECKPOINT;
            match outgoing(&s.blobs, o, fits) {
                Ok((digest, data)) => {
                    if fits {
                        inline += o.data.len();
                    } else {
                        sent.held.push(digest.hash);
                    }
                    digests.push(digest);
                    state.push((o.binding, data));
                }
                Err(e) => {
                    warn!(error = %e, "cannot keep a checkpoint for its submitter");
                    break;
                }
            }
        }
        // A blob the last checkpoint taken holds too stays until that one
        // goes: dropping `sent` deletes only its own.
        sent.held.retain(|h| !kept.held.contains(h));
        if state.len() != c.state.len() {
            continue;
        }
        let record = CheckpointRecord {
            job: offer.spec.job,
            task: offer.spec.task,
            attempt: offer.attempt,
            kernel: offer.spec.kernel,
            step: c.step,
            state: digests,
            worker: s.identity.public(),
            made_at: Timestamp::now(),
        };
        let Ok(record) = Signed::sign(&record, &s.identity) else {
            continue;
        };
        match s
            .client
            .progress(peer, Progress::Checkpoint { record, state })
            .await
        {
            Ok(Ok(Ack::Ok)) => {
                acked.store(c.step, std::sync::atomic::Ordering::Release);
                worker.count(|s| s.checkpoints += 1);
                // The submitter has fetched it: the previous one's blobs go.
                kept = sent;
            }
            // Not taken: its own blobs go when `sent` drops.
            Ok(Ok(Ack::Refused(why))) => {
                info!(%peer, step = c.step, %why, "the submitter did not take a checkpoint");
            }
            Ok(Err(e)) => info!(%peer, step = c.step, error = %e, "a checkpoint did not arrive"),
            Err(_) => return,
        }
    }
}

/// Checkpoint blobs in this worker's store, deleted when dropped, except
/// those that are the task's inputs.
struct CheckpointBlobs {
    blobs: Blobs,
    inputs: Vec<Hash>,
    held: Vec<Hash>,
}

impl Drop for CheckpointBlobs {
    fn drop(&mut self) {
        for h in &self.held {
            if !self.inputs.contains(h) {
                let _ = std::fs::remove_file(self.blobs.path(h));
            }
        }
    }
}

/// An output as it travels to the submitter: its digest, and its bytes
/// inline or as a blob of this node's store, which the submitter fetches.
fn outgoing(
    blobs: &Blobs,
    o: &executor::Output,
    inline: bool,
) -> std::io::Result<(OutputDigest, Data)> {
    let hash = Hash::from_bytes(o.hash);
    let data = if inline {
        Data::Inline(o.data.clone())
    } else {
        Data::Blob {
            hash: blobs.put(&o.data)?,
            len: o.len,
        }
    };
    Ok((
        OutputDigest {
            binding: o.binding,
            hash,
            len: o.len,
        },
        data,
    ))
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
