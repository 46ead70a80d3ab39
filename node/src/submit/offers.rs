//! Offers: a task's spec as a worker receives it, offers batched per
//! worker and job and signed once, and the worker's answers recorded.

use std::collections::HashMap;
use std::time::Instant;

use alliance_protocol::task::{Binding, BindingKind, Data, TaskOffer, TaskOffers, TaskSpec};
use alliance_protocol::wire::{MAX_BATCH, OFFER_BATCH_BYTES, OfferAnswer, OfferRequest};
use alliance_protocol::{PublicKey, Signed, Timestamp};
use libp2p::PeerId;
use tracing::warn;

use crate::net::actor::AdvertView;
use crate::submit::spec::InputKind;

use super::Jobs;
use super::{
    records::{JobRecord, Replica, ReplicaState, TaskRecord, job_id},
    schedule::lease_from_now,
};

/// Offers of one pass to one worker for one job, sent as one request.
pub(super) struct OfferBatch {
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
pub(super) fn offer_size(offer: &TaskOffer) -> usize {
    let data = |b: &Binding| match &b.kind {
        BindingKind::Input { data }
        | BindingKind::Uniform { data }
        | BindingKind::State { data, .. } => data.size_hint(),
        BindingKind::Output { .. } => 32,
    };
    512 + offer.spec.entry_point.len() + offer.spec.bindings.iter().map(data).sum::<usize>()
}

pub(super) fn spec(job: &JobRecord, index: u32) -> TaskSpec {
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

pub(super) fn describe_decline(r: &alliance_protocol::wire::DeclineReason) -> String {
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

/// A decline's kind, as `alliance_tasks_declined_total` labels it.
pub(crate) fn decline_kind(r: &alliance_protocol::wire::DeclineReason) -> &'static str {
    use alliance_protocol::wire::DeclineReason as D;
    match r {
        D::Busy => "busy",
        D::Paused => "paused",
        D::Unavailable(_) => "unavailable",
        D::PolicyRefuses => "policy",
        D::Limits(_) => "limits",
        D::BadOffer(_) => "bad_offer",
    }
}

impl Jobs {
    /// Records a worker's answers to offers of tasks of job `id`, given as
    /// ((task, attempt), answer).
    pub(super) fn on_answers(
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
            let m = &self.inner.metrics;
            r.state = match answer {
                // The lease runs on this node's clock; progress reports
                // renew it.
                Ok(OfferAnswer::Accept { .. }) => {
                    m.tasks_accepted.inc();
                    ReplicaState::Running {
                        lease_until: lease_from_now(),
                    }
                }
                Ok(OfferAnswer::Decline(reason)) => {
                    m.tasks_declined
                        .get_or_create(&crate::metrics::Reason {
                            reason: decline_kind(&reason),
                        })
                        .inc();
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
}

/// The offers one pass places, in the order it placed them.
#[derive(Default)]
pub(super) struct Planned {
    /// (job, task, attempt, worker, offer).
    offers: Vec<(String, u32, u32, PeerId, TaskOffer)>,
    /// The kernel source of each job with an offer, sent once per batch.
    kernels: HashMap<String, String>,
    /// Offers per worker (by PeerId text), which the market counts as
    /// taken slots.
    pub(super) per_worker: HashMap<String, u32>,
}

impl Planned {
    /// Adds an offer of task `index` of `job` to `worker`.
    pub(super) fn add(
        &mut self,
        job: &JobRecord,
        index: u32,
        peer: PeerId,
        offer: TaskOffer,
        worker: String,
    ) {
        *self.per_worker.entry(worker).or_default() += 1;
        if !self.kernels.contains_key(&job.id) {
            self.kernels.insert(job.id.clone(), job.kernel.clone());
        }
        self.offers
            .push((job.id.clone(), index, offer.attempt, peer, offer));
    }

    /// One request per worker and job, up to a batch: a pass that places
    /// many small tasks on a worker sends them, and the kernel, once.
    fn batches(self) -> Vec<OfferBatch> {
        let mut batches: Vec<OfferBatch> = Vec::new();
        for (id, index, attempt, peer, offer) in self.offers {
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
                    kernel: self.kernels.get(&id).cloned().unwrap_or_default(),
                    job: id,
                    bytes: size,
                    tasks: vec![(index, attempt)],
                    offers: vec![offer],
                }),
            }
        }
        batches
    }
}

impl Jobs {
    /// Another attempt of `t` for the worker of `advert`: the replica is
    /// recorded as offered, and the offer returned to be sent. `None` when
    /// the advert names no valid peer.
    pub(super) fn offer_replica(
        &self,
        job: &JobRecord,
        t: &mut TaskRecord,
        advert: &AdvertView,
    ) -> Option<(PeerId, TaskOffer)> {
        let peer = advert.peer_id.parse::<PeerId>().ok()?;
        let worker_key = PublicKey::from_peer_id(&peer).ok()?;
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
        self.inner.metrics.tasks_offered.inc();
        t.replicas.push(Replica {
            attempt,
            worker: advert.peer_id.clone(),
            institution: advert.institution.clone(),
            state: ReplicaState::Offered,
            offered_at: Timestamp::now(),
            finished_at: None,
            gpu_time_us: 0,
            compile_time_us: 0,
            adapter: String::new(),
            outputs: Vec::new(),
            receipt: None,
            institution_key: None,
            start_step,
            checkpoint: None,
        });
        t.waiting = None;
        Some((peer, offer))
    }

    /// Sends a pass's offers, a signed batch per worker and job, each from
    /// a task of its own; the answers are recorded as they come.
    pub(super) fn send_offers(&self, planned: Planned) {
        for b in planned.batches() {
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
    }
}
