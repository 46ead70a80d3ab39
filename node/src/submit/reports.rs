//! Report intake: a worker's signed batch of receipts and failures, and
//! its progress (lease renewals, checkpoints). Each report is checked
//! against the attempt it was offered, the kernel, the submitter and every
//! output's hash and size; a worker that breaks the protocol is counted
//! against and dropped.

use alliance_protocol::cert::Member;
use alliance_protocol::task::{Data, Outcome};
use alliance_protocol::wire::{Ack, Acks, Reports, short_reason};
use alliance_protocol::{Hash, PublicKey, Timestamp};
use libp2p::PeerId;
use tracing::{info, warn};

use crate::net::blobs;
use crate::submit::spec::Output;
use crate::trust::reputation::Event;

use super::{Jobs, Live};
use super::{
    records::{JobState, Replica, ReplicaState, TaskState, short},
    schedule::lease_from_now,
};

pub(super) enum Refusal {
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

impl Jobs {
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

    pub(super) async fn take_report(
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
                            let n = blobs::fetch(
                                &self.inner.client,
                                &self.inner.blobs,
                                peer,
                                *hash,
                                *len,
                            )
                            .await
                            .map_err(|e| match e {
                                blobs::BlobError::HashMismatch { .. } => {
                                    Refusal::Bad(e.to_string())
                                }
                                other => Refusal::Late(other.to_string()),
                            })?;
                            self.inner.metrics.blob("in", "network", n);
                        }
                    }
                    digests.push(d.clone());
                }
                let (gpu, compile) = (receipt.gpu_time_us, receipt.compile_time_us);
                let adapter = receipt.adapter.clone();
                let paid_for = receipt.digest();
                self.finish_replica(&id, task, attempt, &worker_id, |r| {
                    r.state = ReplicaState::Returned;
                    r.outputs = digests;
                    r.gpu_time_us = gpu;
                    r.compile_time_us = compile;
                    r.adapter = adapter;
                    r.receipt = Some(paid_for);
                    r.institution_key = Some(member.institution_key);
                })
            }
        }
    }

    /// The job's kernel hash and outputs, if `worker` holds attempt
    /// `attempt` of task `task` now.
    pub(super) fn expect_replica(
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

    pub(super) fn finish_replica(
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
}
