//! Offer intake: a batch of signed offers checked (signer, submit role,
//! this node, expiry, kernel hash, intake against the owner's limits and
//! the GPU's own) and each accepted with a slot on a GPU, or declined with
//! the reason.

use std::path::PathBuf;
use std::sync::Arc;

use alliance_kernels::executor::{self, Task};
use alliance_kernels::gpu::{AdapterReport, ComputeLimits};
use alliance_kernels::intake::{self};
use alliance_protocol::cert::{Member, Roles};
use alliance_protocol::task::{self as records, TaskOffer};
use alliance_protocol::wire::{
    DeclineReason, MAX_BATCH, OfferAnswer, OfferAnswers, OfferRequest, Progress,
};
use alliance_protocol::{Hash, PublicKey, Timestamp};
use libp2p::PeerId;
use tracing::{debug, info};

use alliance_protocol::advert::{GpuState, TermsRefusal};

use super::run::{heartbeat, to_task};
use super::{TaskKey, Worker};

pub(super) fn decline(reason: DeclineReason) -> OfferAnswer {
    OfferAnswer::Decline(reason)
}

/// The offers of a request, once its signature is checked and its
/// signer is the peer that sent it.
pub(super) fn open_offers(
    peer: PeerId,
    req: &OfferRequest,
) -> Result<Vec<TaskOffer>, DeclineReason> {
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

impl Worker {
    /// Answers a batch of offers from `peer` (at most `MAX_BATCH`, signed
    /// together), one answer per offer in their order; each accepted task
    /// starts at once. A batch that cannot be opened gets one decline.
    pub async fn offers(&self, peer: PeerId, member: &Member, req: OfferRequest) -> OfferAnswers {
        let offers = match open_offers(peer, &req) {
            Ok(offers) => offers,
            Err(reason) => {
                self.count(|s| s.declined += 1);
                self.inner
                    .setup
                    .metrics
                    .worker_offers
                    .get_or_create(&crate::metrics::Answer { answer: "declined" })
                    .inc();
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
        let m = &self.inner.setup.metrics;
        let answered = |answer| {
            m.worker_offers
                .get_or_create(&crate::metrics::Answer { answer })
        };
        answered("accepted").inc_by(accepted);
        answered("declined").inc_by(declined);
        // One line per batch (each task's are at debug level): small tasks
        // come by the thousand.
        info!(%peer, accepted, declined, "offers answered");
        OfferAnswers(answers)
    }

    pub(super) fn consider(
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
        let lease_until = Timestamp::now().saturating_add_secs(crate::submit::LEASE.as_secs());
        let from = (
            member.institution_key,
            s.shares.get(&member.institution_name).copied().unwrap_or(1),
        );
        debug!(%peer, job = %offer.spec.job, task = offer.spec.task, attempt = offer.attempt, gpu = slot.1, "task accepted");
        let me = self.clone();
        // Every line the task logs carries its ids.
        let span = tracing::info_span!(
            "task",
            job = %offer.spec.job,
            task = offer.spec.task,
            attempt = offer.attempt,
            %peer
        );
        let run = async move {
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
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
        OfferAnswer::Accept { lease_until }
    }

    /// The offer and its kernel source, if the offer may be considered.
    pub(super) fn check_offer(
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
    pub(super) fn claim(
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

    pub(super) fn release(&self, i: usize, bytes: u64, key: TaskKey) {
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
    pub(super) fn abandon(&self, key: TaskKey) {
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

    /// `check`'s kernel passes intake: the answer is kept by kernel hash
    /// and entry point, so a job's tasks parse their kernel once.
    pub(super) fn kernel_ok(
        &self,
        check: &Task,
        hash: Hash,
        device: &ComputeLimits,
    ) -> Result<(), String> {
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
}
