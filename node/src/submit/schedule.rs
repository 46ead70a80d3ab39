//! The scheduler's loop and its pass: replicas whose lease ran out, whose
//! offer went unanswered or whose worker left are ended; tasks out of
//! attempts fail with the reasons; every other waiting task gets the
//! replicas it needs (see [`super::matching`]) or says why it waits; ended
//! jobs are finished; the pass's offers go out (see [`super::offers`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use alliance_protocol::task::Credit;
use alliance_protocol::{Signed, Timestamp};
use tracing::{info, warn};

use crate::net::actor::AdvertView;
use crate::trust::reputation::Event;

use super::{Jobs, JobsError, LEASE, Live};
use super::{
    matching::{Market, Unplaced},
    offers::Planned,
    records::{JobRecord, JobState, ReplicaState, TaskRecord, TaskState, count, short},
    verify::target_replicas,
};

/// Offers a task may receive: this many per replica it needs, and as
/// many again for settling disagreements.
pub(super) const ATTEMPTS_PER_REPLICA: u32 = 5;

/// An offer not answered in this time counts as lost.
pub(super) const OFFER_TIMEOUT: Duration = Duration::from_secs(60);

/// A worker gone from the network this long loses its tasks.
pub(super) const GONE_GRACE: Duration = Duration::from_secs(5);

/// After a restart, how long workers have to reconnect.
pub(super) const RECONNECT_GRACE: Duration = Duration::from_secs(30);

/// Scheduler passes woken by events, at least this far apart.
pub(super) const COALESCE: Duration = Duration::from_millis(2);

/// Scheduler passes, at most this far apart.
pub(super) const TICK: Duration = Duration::from_millis(250);

/// Seconds left before a task that failed or was lost may be offered
/// again: 1 s after the first setback, doubling, at most 30 s.
pub(super) fn backoff(t: &TaskRecord) -> Option<u64> {
    let setbacks = || {
        t.replicas.iter().filter(|r| {
            matches!(
                r.state,
                ReplicaState::Failed { .. } | ReplicaState::Lost { .. }
            )
        })
    };
    let last = setbacks().filter_map(|r| r.finished_at).max()?;
    let n = count(setbacks());
    let delay = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(30).min(30);
    let ready = last.saturating_add_secs(delay);
    let now = Timestamp::now();
    (ready > now).then(|| ready.as_secs() - now.as_secs())
}

/// A lease that lapses after [`LEASE`] without progress.
pub(super) fn lease_from_now() -> Timestamp {
    Timestamp::now().saturating_add_secs(LEASE.as_secs())
}

/// Replicas placed for one task in one scheduling pass, at most.
pub(super) const MAX_REPLICAS: u32 = 16;

/// The active jobs in the order a pass places them: the jobs of the users
/// with the fewest tasks running first, then the oldest, so that between
/// the users of one node the GPUs the alliance lends go round as they go
/// round between institutions: the user who holds least gets the next.
pub(super) fn fair_order(live: &BTreeMap<String, Live>) -> Vec<String> {
    let mut running: HashMap<&str, usize> = HashMap::new();
    for l in live.values().filter(|l| l.job.state == JobState::Active) {
        // Past the last task ever placed no task has a replica.
        let placed = l.last_placed.map_or(0, |p| p + 1);
        *running.entry(l.job.owner.as_str()).or_default() += l
            .tasks
            .get(l.open_from..placed)
            .unwrap_or_default()
            .iter()
            .filter(|t| t.replicas.iter().any(super::records::Replica::in_flight))
            .count();
    }
    let mut order: Vec<&Live> = live
        .values()
        .filter(|l| l.job.state == JobState::Active)
        .collect();
    order.sort_by_key(|l| {
        (
            running.get(l.job.owner.as_str()).copied().unwrap_or(0),
            l.job.submitted_at,
        )
    });
    order.into_iter().map(|l| l.job.id.clone()).collect()
}

/// Replicas of open tasks of active jobs that each worker holds. A
/// replica left over when its task ended, or its job, no longer counts:
/// its worker is told the result is not wanted when it reports, and no
/// lease of it expires, so counting it would leave the worker looking
/// busy to this node for good.
pub(super) fn in_flight_by_worker(live: &BTreeMap<String, Live>) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for l in live.values().filter(|l| l.job.state == JobState::Active) {
        let placed = l.last_placed.map_or(0, |p| p + 1);
        for t in l.tasks.get(l.open_from..placed).unwrap_or_default() {
            if t.state != TaskState::Waiting {
                continue;
            }
            for r in t.replicas.iter().filter(|r| r.in_flight()) {
                *m.entry(r.worker.clone()).or_default() += 1;
            }
        }
    }
    m
}

impl Jobs {
    /// Runs the scheduler until the process ends.
    pub async fn run(self) {
        loop {
            let pass = Instant::now();
            if let Err(e) = self.schedule().await {
                warn!("scheduling pass failed: {e}");
            }
            if tokio::time::timeout(TICK, self.inner.wake.notified())
                .await
                .is_ok()
            {
                // Woken by a submission, an answer or a report. Alone, it
                // is acted on at once; in a burst, passes come at most
                // every COALESCE, each for all that arrived since the last.
                if let Some(rest) = COALESCE.checked_sub(pass.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
            }
        }
    }

    /// One scheduling pass over every active job.
    pub(super) async fn schedule(&self) -> Result<(), JobsError> {
        let Ok(adverts) = self.inner.client.gpus().await else {
            return Ok(());
        };
        let Ok(peers) = self.inner.client.peers().await else {
            return Ok(());
        };
        let connected: HashSet<String> = peers.into_iter().map(|p| p.peer_id).collect();
        self.inner
            .gone_since
            .lock()
            .map_err(|_| JobsError::Db("poisoned".into()))?
            .retain(|w, _| !connected.contains(w));
        let now = Instant::now();
        let mut planned = Planned::default();
        let mut ended = 0;
        {
            let mut live = self.lock()?;
            let caught: Vec<String> = self
                .inner
                .caught
                .lock()
                .map(|mut c| c.drain().collect())
                .unwrap_or_default();
            if !caught.is_empty() {
                self.recheck(&mut live, &caught)?;
            }
            let in_flight = in_flight_by_worker(&live);
            for id in fair_order(&live) {
                let Some(l) = live.get_mut(&id) else {
                    continue;
                };
                let seen = Seen {
                    adverts: &adverts,
                    connected: &connected,
                    in_flight: &in_flight,
                    now,
                };
                self.place_job(l, &seen, &mut planned)?;
                if self.finish_if_done(l)? {
                    ended += 1;
                }
            }
        }
        // Credits read before the flush are durable after it, with the
        // verifications that earned them.
        let (keys, credits): (Vec<_>, Vec<_>) = self
            .inner
            .unsent_credits
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k, Signed::<Credit>::from_bytes(&v).ok()?)))
            .unzip();
        self.durable().await?;
        if ended > 0 {
            self.inner.ended.send_modify(|n| *n += ended);
        }
        if !credits.is_empty() && self.inner.client.publish_credits(credits).await.is_ok() {
            for k in keys {
                let _ = self.inner.unsent_credits.remove(k);
            }
        }
        self.send_offers(planned);
        Ok(())
    }

    /// Gives the waiting tasks of one active job the replicas they need, or
    /// the reason they wait.
    fn place_job(
        &self,
        l: &mut Live,
        seen: &Seen<'_>,
        planned: &mut Planned,
    ) -> Result<(), JobsError> {
        // Read the job, write its tasks: no copy of the job's kernel and
        // inputs on every pass.
        let Live {
            job,
            tasks,
            warm,
            open_from,
            last_placed,
            blank_why,
            ..
        } = l;
        // Tasks with no replica yet look alike to `choose`, and the market
        // only fills up during a pass: once one of them cannot be placed,
        // the rest wait for the same reason.
        let mut blank_waits: Option<String> = None;
        for t in tasks.iter_mut().skip(*open_from) {
            if t.state != TaskState::Waiting {
                continue;
            }
            // Past the last task ever offered, every task is one that
            // cannot be placed now either; once they all say so, there is
            // nothing to write.
            if blank_waits.is_some()
                && *blank_why == blank_waits
                && last_placed.is_none_or(|p| t.index as usize > p)
            {
                break;
            }
            let mut changed = self.expire(t, seen.connected, seen.now);
            if let Some(wait) = backoff(t) {
                let why = format!("offered again in {wait} s, after a failed attempt");
                if t.waiting.as_deref() != Some(why.as_str()) {
                    t.waiting = Some(why);
                    self.save_task(&job.id, t)?;
                }
                continue;
            }
            if give_up(job, t) {
                self.save_task(&job.id, t)?;
                continue;
            }
            let mut placing = Placing {
                warm,
                last_placed,
                blank_waits: &mut blank_waits,
            };
            changed |= self.place_replicas(job, t, seen, &mut placing, planned);
            if changed {
                self.save_task(&job.id, t)?;
            }
        }
        // Every task that was never offered waits for this reason now
        // (those before the first that could not be placed were placed).
        *blank_why = blank_waits;
        Ok(())
    }

    /// Places replicas of `t` until it has as many as it needs or no
    /// worker takes one; returns whether `t` changed.
    fn place_replicas(
        &self,
        job: &JobRecord,
        t: &mut TaskRecord,
        seen: &Seen<'_>,
        placing: &mut Placing<'_>,
        planned: &mut Planned,
    ) -> bool {
        let mut changed = false;
        let active = count(t.replicas.iter().filter(|r| r.in_flight()));
        // The replicas a task needs can grow as they are placed: an
        // adaptive job's task that goes to an untrusted worker needs a
        // second opinion at once.
        for _ in 0..MAX_REPLICAS {
            let target = target_replicas(self.required(job, t), t);
            let have = count(t.replicas.iter().filter(|r| r.in_flight() || r.returned()));
            if have >= target {
                break;
            }
            if t.replicas.is_empty()
                && let Some(why) = &*placing.blank_waits
            {
                if t.waiting.as_ref() != Some(why) {
                    t.waiting = Some(why.clone());
                    changed = true;
                }
                break;
            }
            let market = Market {
                adverts: seen.adverts,
                connected: seen.connected,
                in_flight: seen.in_flight,
                planned: &planned.per_worker,
                warm: placing.warm,
            };
            match self.choose(job, t, &market) {
                Ok(advert) => {
                    let Some((peer, offer)) = self.offer_replica(job, t, advert) else {
                        continue;
                    };
                    let chosen = advert.peer_id.clone();
                    *placing.last_placed = (*placing.last_placed).max(Some(t.index as usize));
                    placing.warm.insert(chosen.clone());
                    planned.add(job, t.index, peer, offer, chosen);
                    changed = true;
                }
                Err(Unplaced::Exhausted(why)) if active == 0 => {
                    // Disagreement, and nobody left to ask: the task fails
                    // with the evidence.
                    t.state = TaskState::Failed;
                    t.failure = Some(why);
                    t.waiting = None;
                    changed = true;
                    break;
                }
                Err(Unplaced::Exhausted(why) | Unplaced::Waits(why)) => {
                    if t.replicas.is_empty() {
                        *placing.blank_waits = Some(why.clone());
                    }
                    if t.waiting.as_deref() != Some(why.as_str()) {
                        t.waiting = Some(why);
                        changed = true;
                    }
                    break;
                }
            }
        }
        changed
    }

    /// Ends a job whose tasks have all ended; returns whether it did.
    fn finish_if_done(&self, l: &mut Live) -> Result<bool, JobsError> {
        l.advance();
        if l.open_from < l.tasks.len() {
            return Ok(false);
        }
        let failed = l.tasks.iter().any(|t| t.state == TaskState::Failed);
        let job = &mut l.job;
        job.state = if failed {
            JobState::Failed
        } else {
            JobState::Done
        };
        job.finished_at = Some(Timestamp::now());
        info!(job = %job.id, state = ?job.state, "job finished");
        self.save_job(job)?;
        Ok(true)
    }

    /// Tasks of `redundancy = "auto"` jobs that a worker since caught with
    /// a wrong result verified alone go to other workers again; their jobs
    /// become active again until that is done.
    pub(super) fn recheck(
        &self,
        live: &mut BTreeMap<String, Live>,
        caught: &[String],
    ) -> Result<(), JobsError> {
        for l in live.values_mut() {
            if !l.job.adaptive || l.job.state == JobState::Cancelled {
                continue;
            }
            let mut reopened = 0u32;
            for t in &mut l.tasks {
                if t.state != TaskState::Verified {
                    continue;
                }
                let verified: Vec<usize> = (0..t.replicas.len())
                    .filter(|&i| t.replicas[i].state == ReplicaState::Verified)
                    .collect();
                let [alone] = verified[..] else {
                    continue;
                };
                if !caught.contains(&t.replicas[alone].worker) {
                    continue;
                }
                t.replicas[alone].state = ReplicaState::Returned;
                t.state = TaskState::Waiting;
                t.result = None;
                t.spot_check = true;
                t.rechecked = true;
                t.waiting = Some(
                    "checked again: the worker that ran it alone was since caught with a wrong result"
                        .into(),
                );
                self.save_task(&l.job.id, t)?;
                reopened += 1;
            }
            if reopened > 0 {
                // Tasks anywhere in the job are open again.
                l.open_from = 0;
                warn!(job = %l.job.id, tasks = reopened, "checking again what a worker caught lying ran alone");
                if l.job.state != JobState::Active {
                    l.job.state = JobState::Active;
                    l.job.finished_at = None;
                    self.save_job(&l.job)?;
                }
            }
        }
        Ok(())
    }

    /// Ends replicas whose lease ran out, whose offer went unanswered, or
    /// whose worker left. Returns whether anything changed.
    pub(super) fn expire(
        &self,
        t: &mut TaskRecord,
        connected: &HashSet<String>,
        now: Instant,
    ) -> bool {
        let wall = Timestamp::now();
        let mut changed = false;
        let Ok(mut gone) = self.inner.gone_since.lock() else {
            return false;
        };
        for r in &mut t.replicas {
            let reason = match &r.state {
                ReplicaState::Running { lease_until }
                    if *lease_until <= wall
                        && now.duration_since(self.inner.started) >= RECONNECT_GRACE =>
                {
                    self.inner.metrics.leases_expired.inc();
                    Some("no result before the lease ended".to_owned())
                }
                ReplicaState::Offered
                    if r.offered_at.saturating_add_secs(OFFER_TIMEOUT.as_secs()) <= wall =>
                {
                    Some("no answer to the offer".to_owned())
                }
                ReplicaState::Offered | ReplicaState::Running { .. }
                    if !connected.contains(&r.worker)
                        && now.duration_since(self.inner.started) >= RECONNECT_GRACE =>
                {
                    let since = *gone.entry(r.worker.clone()).or_insert(now);
                    (now.duration_since(since) >= GONE_GRACE)
                        .then(|| "the worker left the network".to_owned())
                }
                _ => None,
            };
            if let Some(reason) = reason {
                info!(worker = %short(&r.worker), task = t.index, %reason, "task replica lost; offering it again");
                // Only a task the worker accepted counts against it.
                if matches!(r.state, ReplicaState::Running { .. }) {
                    self.count_against(&r.worker, &r.institution, Event::Lapsed);
                }
                r.state = ReplicaState::Lost { reason };
                r.finished_at = Some(wall);
                changed = true;
            }
        }
        changed
    }
}

/// What a pass knows of the alliance, read once at its start.
pub(super) struct Seen<'a> {
    pub(super) adverts: &'a [AdvertView],
    /// Members connected now.
    pub(super) connected: &'a HashSet<String>,
    /// This node's tasks running at each worker.
    pub(super) in_flight: &'a HashMap<String, u32>,
    pub(super) now: Instant,
}

/// The job state that placing one task's replicas updates.
pub(super) struct Placing<'a> {
    /// Workers that hold the job's inputs.
    warm: &'a mut HashSet<String>,
    /// The highest index of a task of the job that was ever offered.
    last_placed: &'a mut Option<usize>,
    /// Why a task with no replica could not be placed in this pass.
    blank_waits: &'a mut Option<String>,
}

/// Fails a task that has had all the offers it may have and runs nowhere,
/// with the reasons of its attempts; returns whether it did.
fn give_up(job: &JobRecord, t: &mut TaskRecord) -> bool {
    let active = count(t.replicas.iter().filter(|r| r.in_flight()));
    // Attempts handed back by owners who took their GPU back are nobody's
    // failure and do not count.
    let handed_back = count(
        t.replicas
            .iter()
            .filter(|r| matches!(r.state, ReplicaState::HandedBack { .. })),
    );
    if t.next_attempt.saturating_sub(handed_back) < ATTEMPTS_PER_REPLICA * (job.redundancy + 1)
        || active != 0
    {
        return false;
    }
    t.state = TaskState::Failed;
    let reasons: Vec<String> = t
        .replicas
        .iter()
        .filter_map(|r| match &r.state {
            ReplicaState::Declined { reason }
            | ReplicaState::Failed { reason }
            | ReplicaState::Lost { reason } => Some(format!("{}: {reason}", short(&r.worker))),
            _ => None,
        })
        .collect();
    t.failure = Some(format!(
        "gave up after {} offers: {}",
        t.next_attempt,
        reasons.join("; ")
    ));
    t.waiting = None;
    true
}
