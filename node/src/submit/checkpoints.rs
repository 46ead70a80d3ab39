//! Checkpoints of long tasks: checked against the attempt that sends them,
//! kept content-addressed until the task is verified, and the resume point
//! of the next attempt once as many institutions vouch for one as a result
//! would need.

use std::collections::{HashMap, HashSet};

use alliance_protocol::task::{BindingKind, CheckpointRecord, Data, TaskSpec};
use alliance_protocol::{Hash, PublicKey, Signed};
use libp2p::PeerId;
use tracing::warn;

use crate::net::blobs;
use crate::submit::spec::InputKind;

use super::{INLINE_INPUT, Jobs, Live};
use super::{
    offers::spec,
    records::{Checkpoint, JobRecord, JobState, SentCheckpoint, TaskRecord, TaskState, count},
    reports::Refusal,
    verify::quorum,
};

/// Checkpoints remembered per attempt (the newest one's buffers are kept).
pub(super) const CHECKPOINTS_PER_ATTEMPT: usize = 8;

pub(super) type CheckpointRefs = (HashMap<(String, u32), Vec<Hash>>, HashMap<Hash, u32>);

/// The checkpoint buffers a task keeps: none once it is finished; else
/// those of the checkpoint it would resume from and the newest of each
/// attempt still running.
pub(super) fn held_checkpoints(t: &TaskRecord) -> Vec<Hash> {
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

impl Jobs {
    /// Keeps the checkpoint buffers `task` needs and deletes those no task
    /// needs any more. A buffer deleted before the record that dropped it
    /// is on disk costs, after a crash, a restart from an older point.
    pub(super) fn hold_checkpoints(&self, id: &str, task: &TaskRecord) {
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

    /// Checks a checkpoint against the attempt that sends it and the job,
    /// fetches its buffers and keeps it; a checkpoint that as many
    /// institutions vouch for as a result needs becomes the task's resume
    /// point.
    pub(super) async fn take_checkpoint(
        &self,
        peer: PeerId,
        record: &Signed<CheckpointRecord>,
        state: &[(u32, Data)],
    ) -> Result<(), Refusal> {
        let worker_key = PublicKey::from_peer_id(&peer).map_err(|e| Refusal::Bad(e.to_string()))?;
        let rec = record
            .verify()
            .map_err(|e| Refusal::Bad(format!("its checkpoint does not verify: {e}")))?;
        if record.signer() != worker_key || rec.worker != worker_key {
            return Err(Refusal::Bad(
                "signed a checkpoint with a key that is not its own".into(),
            ));
        }
        let worker = peer.to_string();
        let expected = self.expected_state(&rec, &worker)?;
        self.keep_state(peer, &rec, state, &expected).await?;
        self.record_checkpoint(&rec, &worker)
    }

    /// The state buffers (binding, bytes) a checkpoint of `rec`'s task
    /// must carry, if `worker` runs that attempt and the step is one the
    /// job takes checkpoints at, past the attempt's last.
    fn expected_state(
        &self,
        rec: &CheckpointRecord,
        worker: &str,
    ) -> Result<Vec<(u32, u64)>, Refusal> {
        let bad = |m: String| Refusal::Bad(m);
        let id = rec.job.to_string();
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
        Ok(l.job
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
            .collect())
    }

    /// Checks the buffers a checkpoint carries (inline) or names (blobs at
    /// `peer`) against its record and the `expected` state buffers, and
    /// keeps them in the checkpoint store.
    async fn keep_state(
        &self,
        peer: PeerId,
        rec: &CheckpointRecord,
        state: &[(u32, Data)],
        expected: &[(u32, u64)],
    ) -> Result<(), Refusal> {
        let bad = |m: String| Refusal::Bad(m);
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
                    let n = blobs::fetch(
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
                    self.inner.metrics.blob("in", "network", n);
                }
            }
        }
        Ok(())
    }

    /// Adds a checked checkpoint to its task's; the task resumes from it
    /// once as many institutions (workers, where the task's replicas all
    /// come from one) vouch for it as for a result.
    fn record_checkpoint(&self, rec: &CheckpointRecord, worker: &str) -> Result<(), Refusal> {
        let id = rec.job.to_string();
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
            worker: worker.to_owned(),
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
        let agreeing: Vec<&SentCheckpoint> = t
            .checkpoints
            .iter()
            .filter(|c| c.step == rec.step && c.state == digests)
            .collect();
        let institutions: HashSet<&str> =
            t.replicas.iter().map(|r| r.institution.as_str()).collect();
        let distinct = |key: fn(&SentCheckpoint) -> &str| {
            count(
                agreeing
                    .iter()
                    .map(|c| key(c))
                    .collect::<HashSet<_>>()
                    .into_iter(),
            )
        };
        let support = if institutions.len() <= 1 {
            distinct(|c| c.worker.as_str())
        } else {
            distinct(|c| c.institution.as_str())
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
    pub(super) fn resume_spec(&self, job: &JobRecord, t: &mut TaskRecord) -> TaskSpec {
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
}
