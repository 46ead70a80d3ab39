//! Matching a task to a worker: requirements, owners' terms, free slots,
//! no two replicas on one worker or (while another can take it) one
//! institution; preferred institutions first, then the least loaded, warm
//! and fastest GPU. When nothing matches, the reason in words for the
//! researcher.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use alliance_protocol::advert::{DeviceType, GpuInfo, GpuState};
use alliance_protocol::task::Data;

use crate::net::actor::AdvertView;
use crate::submit::spec::Requirements;

use super::Jobs;
use super::{
    records::{JobRecord, ReplicaState, TaskRecord, count, short},
    verify::{EXHAUSTED, disagreement},
};

/// How long a worker that declined is left alone.
pub(super) const DECLINE_BACKOFF: Duration = Duration::from_secs(5);

/// What the scheduler knows of the workers during one pass.
#[derive(Clone, Copy)]
pub(super) struct Market<'a> {
    pub(super) adverts: &'a [AdvertView],
    /// Members connected now.
    pub(super) connected: &'a HashSet<String>,
    /// This node's tasks running at each worker.
    pub(super) in_flight: &'a HashMap<String, u32>,
    /// Offers made in this pass, per worker.
    pub(super) planned: &'a HashMap<String, u32>,
    /// Workers that hold the current job's inputs.
    pub(super) warm: &'a HashSet<String>,
}

impl Market<'_> {
    /// This node's tasks at `worker`, running or offered in this pass.
    fn load(&self, worker: &str) -> u32 {
        self.in_flight.get(worker).copied().unwrap_or(0)
            + self.planned.get(worker).copied().unwrap_or(0)
    }
}

/// Why no worker takes another replica of a task now.
pub(super) enum Unplaced {
    /// It waits; why, in words for the researcher.
    Waits(String),
    /// Its replicas disagree and no other worker is left to ask: the
    /// evidence, which fails the task once no replica runs.
    Exhausted(String),
}

pub(super) fn job_buffer_bytes(job: &JobRecord) -> u64 {
    let inputs = job
        .inputs
        .iter()
        .flat_map(|i| i.parts.iter().map(Data::len));
    let outputs = job.outputs.iter().map(|o| o.len * o.elem.size());
    inputs.chain(outputs).max().unwrap_or(0)
}

/// What a job asks of a GPU before owners' terms: backend, hardware, and
/// buffers as large as its largest (or its declared minimum memory).
fn meets_requirements(req: &Requirements, needed_bytes: u64, g: &GpuInfo) -> bool {
    (req.backends.is_empty()
        || req
            .backends
            .iter()
            .any(|b| b.eq_ignore_ascii_case(&format!("{:?}", g.backend))))
        && (!req.hardware_only || g.device_type != DeviceType::Cpu)
        && g.limits.max_buffer_size >= (req.min_memory_mib << 20).max(needed_bytes)
}

/// Why every GPU that could run the job refuses it on its owner's terms.
fn owners_refuse(refused: &[&AdvertView], me: &str, job: &JobRecord, needed_bytes: u64) -> String {
    let timeout_secs = job.timeout_ms.div_ceil(1000);
    let mut why: Vec<String> = Vec::new();
    let gpus = || refused.iter().flat_map(|a| &a.gpus);
    let denied = gpus().filter(|g| !g.terms.admits(me)).count();
    if denied > 0 {
        why.push(format!(
            "{denied} refuse{} {me} (their owners' allow or deny lists)",
            if denied == 1 { "s" } else { "" }
        ));
    }
    if let Some(max) = gpus()
        .filter(|g| g.terms.admits(me) && g.terms.max_task_secs > 0)
        .map(|g| g.terms.max_task_secs)
        .max()
        .filter(|max| timeout_secs > *max)
    {
        why.push(format!(
            "owners allow tasks of at most {max} s and this job's timeout_secs is {timeout_secs}"
        ));
    }
    if let Some(max) = gpus()
        .filter(|g| g.terms.admits(me) && g.terms.max_task_bytes > 0)
        .map(|g| g.terms.max_task_bytes)
        .max()
        .filter(|max| needed_bytes > *max)
    {
        why.push(format!(
            "owners allow at most {} MiB per task and this job needs {} MiB",
            max >> 20,
            needed_bytes.div_ceil(1 << 20)
        ));
    }
    format!(
        "the {} matching GPU{} will not take this job: {}",
        refused.len(),
        if refused.len() == 1 { "" } else { "s" },
        why.join("; ")
    )
}

/// Why no member's GPU meets the job's requirements.
fn none_capable(req: &Requirements, remote: &[&AdvertView], needed_bytes: u64) -> String {
    let mut what = Vec::new();
    if req.min_memory_mib > 0 {
        what.push(format!("{} MiB buffers", req.min_memory_mib));
    }
    if !req.backends.is_empty() {
        what.push(format!("the {} backend", req.backends.join(" or ")));
    }
    if req.hardware_only {
        what.push("a hardware GPU".into());
    }
    if what.is_empty() {
        what.push(format!("buffers of {needed_bytes} bytes"));
    }
    format!(
        "no member advertises a GPU with {} ({} advertise{} GPUs{})",
        what.join(", "),
        remote.len(),
        if remote.len() == 1 { "s" } else { "" },
        if req.avoid_institutions.is_empty() {
            String::new()
        } else {
            format!(", avoiding {}", req.avoid_institutions.join(", "))
        }
    )
}

/// Why none of the `fresh` workers that could take `t` has a slot: paused,
/// busy, their owners' reasons, the latest declines.
fn all_busy(t: &TaskRecord, fresh: &[&AdvertView]) -> String {
    let paused = fresh
        .iter()
        .filter(|a| a.gpus.iter().all(|g| g.state == GpuState::Paused))
        .count();
    let recent: Vec<String> = t
        .replicas
        .iter()
        .rev()
        .filter_map(|r| match &r.state {
            ReplicaState::Declined { reason } => {
                Some(format!("{} declined: {reason}", short(&r.worker)))
            }
            _ => None,
        })
        .take(2)
        .collect();
    let mut why = format!(
        "all {} matching GPU{} are busy or paused ({paused} paused)",
        fresh.len(),
        if fresh.len() == 1 { "" } else { "s" }
    );
    let mut owners: Vec<String> = fresh
        .iter()
        .flat_map(|a| {
            a.gpus
                .iter()
                .filter(|g| !g.reason.is_empty())
                .map(|g| format!("{}: {}", short(&a.peer_id), g.reason))
        })
        .collect();
    owners.sort();
    owners.dedup();
    if !owners.is_empty() {
        let more = owners.len().saturating_sub(3);
        owners.truncate(3);
        why.push_str(&format!(": {}", owners.join("; ")));
        if more > 0 {
            why.push_str(&format!("; and {more} more"));
        }
    }
    if !recent.is_empty() {
        why.push_str(&format!("; {}", recent.join("; ")));
    }
    why
}

impl Jobs {
    /// The best worker for another replica of `t`, or why there is none.
    pub(super) fn choose<'a>(
        &self,
        job: &JobRecord,
        t: &TaskRecord,
        market: &Market<'a>,
    ) -> Result<&'a AdvertView, Unplaced> {
        let req = &job.requirements;
        let remote: Vec<&AdvertView> = market.adverts.iter().filter(|a| !a.local).collect();
        if remote.is_empty() {
            return Err(Unplaced::Waits("no other member advertises a GPU".into()));
        }
        let needed_bytes = job_buffer_bytes(job);
        let capable: Vec<&AdvertView> = remote
            .iter()
            .copied()
            .filter(|a| !req.avoid_institutions.contains(&a.institution))
            .filter(|a| {
                a.gpus
                    .iter()
                    .any(|g| meets_requirements(req, needed_bytes, g))
            })
            .collect();
        // The owners' terms: who may use a GPU, for how long, with how
        // much memory.
        let me = self.inner.institution_name.as_str();
        let fits = |g: &GpuInfo| g.terms.check(me, job.timeout_ms, needed_bytes).is_ok();
        let refused: Vec<&AdvertView> = capable
            .iter()
            .copied()
            .filter(|a| !a.gpus.iter().any(fits))
            .collect();
        if !capable.is_empty() && refused.len() == capable.len() {
            return Err(Unplaced::Waits(owners_refuse(
                &refused,
                me,
                job,
                needed_bytes,
            )));
        }
        let capable: Vec<&AdvertView> = capable
            .into_iter()
            .filter(|a| a.gpus.iter().any(fits))
            .collect();
        if capable.is_empty() {
            return Err(Unplaced::Waits(none_capable(req, &remote, needed_bytes)));
        }
        let holders: HashSet<&str> = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .map(|r| r.worker.as_str())
            .collect();
        let fresh: Vec<&AdvertView> = capable
            .iter()
            .copied()
            .filter(|a| !holders.contains(a.peer_id.as_str()))
            .collect();
        // Never two replicas of a task to one institution while another
        // can take it: colleagues who share a bug, a build or a motive
        // must not form a quorum between themselves.
        let used_institutions: HashSet<&str> = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .map(|r| r.institution.as_str())
            .collect();
        let other_institution =
            |a: &&AdvertView| !used_institutions.contains(a.institution.as_str());
        let fresh: Vec<&AdvertView> = if fresh
            .iter()
            .any(|a| other_institution(a) && market.connected.contains(&a.peer_id))
        {
            fresh.into_iter().filter(other_institution).collect()
        } else {
            fresh
        };
        if fresh.is_empty() {
            let returned = count(t.replicas.iter().filter(|r| r.returned()));
            if returned >= self.required(job, t) {
                return Err(Unplaced::Exhausted(format!(
                    "{EXHAUSTED}: {}",
                    disagreement(t)
                )));
            }
            return Err(Unplaced::Waits(format!(
                "the {} matching worker{} already hold{} a replica of this task; redundancy {} needs more workers",
                capable.len(),
                if capable.len() == 1 { "" } else { "s" },
                if capable.len() == 1 { "s" } else { "" },
                job.redundancy
            )));
        }
        let declined = self
            .inner
            .declined
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        let free: Vec<&AdvertView> = fresh
            .iter()
            .copied()
            .filter(|a| market.connected.contains(&a.peer_id))
            .filter(|a| {
                declined
                    .get(&a.peer_id)
                    .is_none_or(|at| at.elapsed() >= DECLINE_BACKOFF)
            })
            .filter(|a| {
                let slots: u32 = a
                    .gpus
                    .iter()
                    .filter(|g| g.state == GpuState::Idle || g.state == GpuState::Busy)
                    .filter(|g| fits(g))
                    .map(|g| u32::from(g.free_slots))
                    .sum();
                slots > market.load(&a.peer_id)
            })
            .collect();
        if free.is_empty() {
            return Err(Unplaced::Waits(all_busy(t, &fresh)));
        }
        self.best(job, t, market, &free, &used_institutions)
            .ok_or_else(|| Unplaced::Waits("no worker".into()))
    }

    /// The first of the `free` workers in the order a replica of `t` goes
    /// to: preferred institutions first, then institutions that hold no
    /// replica of this task yet, then (with `group_by_gpu`) GPUs of a model
    /// that can complete its quorum, then trusted checkers, then the least
    /// loaded, then those that already hold the job's inputs, then the
    /// fastest. Load comes before warm inputs: a GPU holds many tasks at
    /// once, and warmth first would pile a job on the worker that took its
    /// first task.
    fn best<'a>(
        &self,
        job: &JobRecord,
        t: &TaskRecord,
        market: &Market<'_>,
        free: &[&'a AdvertView],
        used_institutions: &HashSet<&str>,
    ) -> Option<&'a AdvertView> {
        // A second opinion on an adaptive job's task comes from a trusted
        // worker where one is free: a check by a stranger catches a liar
        // only as often as the stranger is honest.
        let checking = job.adaptive && !used_institutions.is_empty();
        // With `group_by_gpu`, a GPU of a model that already returned a
        // replica of this task can complete its quorum.
        let models: Vec<&str> = if job.requirements.group_by_gpu {
            t.replicas
                .iter()
                .filter(|r| r.returned())
                .map(|r| r.adapter.as_str())
                .collect()
        } else {
            Vec::new()
        };
        free.iter().copied().min_by_key(|x| {
            let preferred = job
                .requirements
                .prefer_institutions
                .contains(&x.institution);
            let spread = used_institutions.contains(x.institution.as_str());
            let speed = x
                .gpus
                .iter()
                .filter_map(|g| g.bench.as_ref().map(|b| b.fma_mflops))
                .max()
                .unwrap_or(0);
            let untrusted_checker = checking && !self.inner.reputation.worker(&x.peer_id).trusted();
            let other_model = !models.is_empty()
                && !x.gpus.iter().any(|g| {
                    models
                        .iter()
                        .any(|m| m.starts_with(&format!("{} (", g.name)))
                });
            (
                !preferred,
                spread,
                other_model,
                untrusted_checker,
                market.load(&x.peer_id),
                !market.warm.contains(&x.peer_id),
                std::cmp::Reverse(speed),
                x.peer_id.clone(),
            )
        })
    }
}
