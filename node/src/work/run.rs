//! Running an accepted task: its blob inputs fetched once, the task run in
//! the GPU's sandbox child (restarted when a task kills it), progress
//! heartbeats to the submitter while it runs, and its outcome handed to
//! [`super::reports`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alliance_kernels::executor::{self, Outcome, Task};
use alliance_kernels::gpu::{AdapterReport, Selection};
use alliance_kernels::sandbox::{self, ChildConfig, Sandbox};
use alliance_protocol::task::{
    self as records, Binding, BindingKind, Data, MAX_INLINE_BYTES, Receipt, TaskFailure, TaskOffer,
};
use alliance_protocol::wire::{Ack, Progress};
use alliance_protocol::{Hash, PublicKey, Timestamp};
use libp2p::PeerId;
use tracing::{debug, info, warn};

use super::kernels_elem;
use crate::net::blobs;

use super::{PROGRESS_EVERY, TaskKey, Worker};
use super::{checkpoints::send_checkpoints, reports::outgoing};

/// A task error's kind, as `alliance_sandbox_failures_total` labels it.
fn failure_kind(e: &executor::TaskError) -> &'static str {
    use executor::TaskError as E;
    match e {
        E::Intake(_) => "refused",
        E::Gpu(_) => "gpu_error",
        E::OutOfMemory(_) => "out_of_memory",
        E::DeviceLost(_) => "device_lost",
        E::Timeout(_) => "timeout",
        E::CompileTimeout(_) => "compile_timeout",
        E::Crashed(_) => "crashed",
        E::Sandbox(_) => "sandbox",
        E::Stopped(_) => "stopped",
        _ => "other",
    }
}

/// Sends `progress` to the submitter every [`PROGRESS_EVERY`] until aborted;
/// when the submitter says it no longer wants the task (it was cancelled,
/// or offered elsewhere), the task is stopped.
pub(super) async fn heartbeat(worker: Worker, peer: PeerId, progress: Progress) {
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

pub(super) fn data_of(kind: &BindingKind) -> Option<&Data> {
    match kind {
        BindingKind::Input { data }
        | BindingKind::Uniform { data }
        | BindingKind::State { data, .. } => Some(data),
        BindingKind::Output { .. } => None,
    }
}

pub(super) fn input_hash(b: &Binding) -> Option<Hash> {
    data_of(&b.kind).map(Data::hash)
}

/// The executor's task for an offer; blobs are read from `blob_path`.
pub(super) fn to_task(
    offer: &TaskOffer,
    source: &str,
    blob_path: impl Fn(&Hash) -> PathBuf,
) -> Task {
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

impl Worker {
    pub(super) async fn execute(
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
        let began = std::time::Instant::now();
        let result = self
            .run(peer, offer, source, slot, from, Arc::clone(&acked))
            .await;
        let wall = began.elapsed();
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
            s.metrics.preemptions.inc();
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
                info!(
                    job = %spec.job,
                    task = spec.task,
                    attempt = offer.attempt,
                    wall_ms = u64::try_from(wall.as_millis()).unwrap_or(u64::MAX),
                    gpu_ms = u64::try_from(outcome.gpu_time.as_millis()).unwrap_or(u64::MAX),
                    compile_ms = u64::try_from(outcome.compile_time.as_millis()).unwrap_or(u64::MAX),
                    %adapter,
                    "task done"
                );
                let receipt = Receipt {
                    job: spec.job,
                    task: spec.task,
                    attempt: offer.attempt,
                    kernel: spec.kernel,
                    inputs: spec.bindings.iter().filter_map(input_hash).collect(),
                    outputs: digests,
                    gpu_time_us: u64::try_from(outcome.gpu_time.as_micros()).unwrap_or(u64::MAX),
                    compile_time_us: u64::try_from(outcome.compile_time.as_micros())
                        .unwrap_or(u64::MAX),
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

    pub(super) fn failure(
        &self,
        offer: &TaskOffer,
        submitter: PublicKey,
        reason: String,
    ) -> (records::Outcome, Vec<(u32, Data)>) {
        warn!(job = %offer.spec.job, task = offer.spec.task, %reason, "task failed");
        let failed = records::Outcome::Failed(self.task_failure(offer, submitter, reason));
        (failed, Vec::new())
    }

    pub(super) fn task_failure(
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

    pub(super) async fn run(
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
                let started = std::time::Instant::now();
                let got = blobs::fetch(&s.client, &s.blobs, peer, *hash, *len).await;
                match got {
                    Ok(0) => self.count(|s| s.blobs_cached += 1),
                    Ok(n) => {
                        let secs = started.elapsed().as_secs_f64();
                        #[allow(clippy::cast_precision_loss)]
                        let mib_s = n as f64 / f64::from(1u32 << 20) / secs.max(1e-6);
                        tracing::info!(
                            %peer,
                            blob = %hash.short(),
                            bytes = n,
                            secs = format!("{secs:.2}"),
                            mib_s = format!("{mib_s:.1}"),
                            "input fetched"
                        );
                        s.metrics.blob("in", "network", n);
                        self.count(|s| {
                            s.blobs_fetched += 1;
                            s.bytes_fetched += n;
                        });
                    }
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
        let (sandbox, config, running, turns, warmed) = {
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
                Arc::clone(&slot_ref.warmed),
            )
        };
        // Only a task that must wait needs its institution's balance.
        let queued = std::time::Instant::now();
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
        s.metrics.queue_wait.observe(queued.elapsed().as_secs_f64());
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
        // A task waits for its GPU to have warmed the library kernels.
        let _ = warmed.subscribe().wait_for(|&w| w).await;
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
            let ran = std::time::Instant::now();
            let result = sb.run(&task, timeout, &mut |c| {
                // The newest checkpoint replaces one not yet sent: the GPU
                // never waits for the network.
                let _ = checkpoints.send(Some(c));
                Ok(())
            });
            if let Ok(mut r) = running.lock() {
                *r = None;
            }
            let m = &me.inner.setup.metrics;
            m.run_time.observe(ran.elapsed().as_secs_f64());
            match result {
                Ok(o) => {
                    m.compile_time.observe(o.compile_time.as_secs_f64());
                    Ok((o, adapter))
                }
                Err(_) if !wanted(&key) => {
                    me.count(|s| s.stopped += 1);
                    Err("stopped: the submitter no longer wants it".into())
                }
                Err(e) => {
                    m.sandbox_failures
                        .get_or_create(&crate::metrics::Kind {
                            kind: failure_kind(&e),
                        })
                        .inc();
                    Err(e.to_string())
                }
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

    /// Starts each lent GPU's sandbox and compiles the configured library
    /// kernels in it (`[worker] warm`), so the first task of one pays no
    /// compile time. A task that arrives meanwhile waits for its GPU's
    /// sandbox; its deadline starts only once it runs.
    pub async fn warm(self) {
        let names = self.inner.setup.warm.clone();
        if names.is_empty() {
            return;
        }
        // Whatever happens to a GPU's warming, its tasks go ahead after.
        struct Done(Arc<tokio::sync::watch::Sender<bool>>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.send_replace(true);
            }
        }
        let slots: Vec<_> = match self.inner.slots.lock() {
            Ok(slots) => slots
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let done = Done(Arc::clone(&s.warmed));
                    // A GPU its owner paused is left alone.
                    let wanted = !s.gate.paused && s.gate.policy.shared;
                    let job = (Arc::clone(&s.sandbox), self.sandbox_config(&s.report, i));
                    (i, done, wanted.then_some(job))
                })
                .collect(),
            Err(_) => return,
        };
        let mut warming = Vec::new();
        for (gpu, done, job) in slots {
            let Some((sandbox, config)) = job else {
                continue;
            };
            let names = names.clone();
            warming.push(tokio::task::spawn_blocking(move || {
                let _done = done;
                let Ok(mut guard) = sandbox.lock() else {
                    return;
                };
                if guard.is_none() {
                    match Sandbox::start(config) {
                        Ok(sb) => *guard = Some(sb),
                        Err(e) => {
                            warn!(gpu, error = %e, "cannot start the sandbox to warm kernels");
                            return;
                        }
                    }
                }
                let Some(sb) = guard.as_mut() else {
                    return;
                };
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                match sb.warm(&names) {
                    Ok(warmed) => {
                        for w in warmed {
                            match w.compiled {
                                Ok(took) => info!(
                                    gpu,
                                    kernel = %w.name,
                                    compile_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                                    "library kernel warmed"
                                ),
                                Err(e) => warn!(gpu, kernel = %w.name, error = %e, "cannot warm a library kernel"),
                            }
                        }
                    }
                    Err(e) => warn!(gpu, error = %e, "cannot warm the library kernels"),
                }
            }));
        }
        for w in warming {
            let _ = w.await;
        }
    }

    pub(super) fn sandbox_config(&self, report: &AdapterReport, slot: usize) -> sandbox::Config {
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
            compile_timeout: s.compile_timeout,
        }
    }
}
