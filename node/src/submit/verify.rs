//! Verification: returned replicas grouped by agreement under the job's
//! comparison (bit-exact, or within float tolerances, per GPU model with
//! `group_by_gpu`), a quorum that counts institutions, and adaptive
//! replication for `redundancy = "auto"` with spot checks.

use std::collections::HashSet;

use alliance_kernels::compare::{self, Tolerance};
use alliance_protocol::task::{Comparison, ElemType, OutputDigest};
use tracing::debug;

use crate::trust::reputation::Event;

use super::Jobs;
use super::records::{JobRecord, Replica, ReplicaState, TaskRecord, TaskState, count, short};

/// How a task's failure starts when its replicas disagree and no other
/// worker can break the tie.
pub(super) const EXHAUSTED: &str = "replicas disagree and no other worker can break the tie";

/// The replicas' answers, grouped: who returned which outputs.
pub(super) fn disagreement(t: &TaskRecord) -> String {
    let mut groups: Vec<(&[OutputDigest], Vec<String>)> = Vec::new();
    for r in t.replicas.iter().filter(|r| r.returned()) {
        let who = format!("{} ({})", short(&r.worker), r.institution);
        match groups.iter_mut().find(|(o, _)| *o == r.outputs.as_slice()) {
            Some((_, w)) => w.push(who),
            None => groups.push((&r.outputs, vec![who])),
        }
    }
    groups
        .iter()
        .map(|(outputs, who)| {
            let hashes: Vec<String> = outputs
                .iter()
                .map(|d| d.hash.to_string().chars().take(12).collect())
                .collect();
            format!("{} returned {}", who.join(" and "), hashes.join(","))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Replicas that must agree: all of them for one or two, a majority above.
pub(super) fn quorum(redundancy: u32) -> u32 {
    if redundancy <= 2 {
        redundancy
    } else {
        redundancy / 2 + 1
    }
}

/// Replicas a task should have returned or running now, when `required`
/// must agree.
pub(super) fn target_replicas(required: u32, t: &TaskRecord) -> u32 {
    let returned = count(t.replicas.iter().filter(|r| r.returned()));
    if returned >= required {
        // Returned, no quorum yet: one more opinion.
        returned + 1
    } else {
        required
    }
}

/// A uniform random number in [0, 1).
pub(super) fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    #[allow(clippy::cast_precision_loss)]
    let x = (u64::from_le_bytes(b) >> 11) as f64;
    x / (1u64 << 53) as f64
}

impl Jobs {
    /// Verifies `t` when a quorum of its returned replicas agrees.
    pub(super) fn vote(&self, job: &JobRecord, t: &mut TaskRecord) {
        let returned: Vec<usize> = (0..t.replicas.len())
            .filter(|&i| t.replicas[i].state == ReplicaState::Returned)
            .collect();
        let required = self.required(job, t);
        // A result a trusted worker returned alone is checked by another
        // worker as often as its record says.
        if job.adaptive && required == 1 && !t.spot_check && returned.len() == 1 {
            let r = &t.replicas[returned[0]];
            if random_unit() < self.inner.reputation.worker(&r.worker).spot_check() {
                self.inner.metrics.spot_checks.inc();
                t.spot_check = true;
                t.waiting = Some("spot check: another worker runs it too".into());
                return;
            }
        }
        let quorum = quorum(required);
        // With `group_by_gpu`, replicas are compared only with replicas
        // that ran on the same GPU model, backend and driver: bit-exact
        // floats may differ between models without anyone lying.
        let gpu = |i: usize| -> &str {
            if job.requirements.group_by_gpu {
                t.replicas[i].adapter.as_str()
            } else {
                ""
            }
        };
        // Group replicas that agree with each other's first member.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &returned {
            match groups
                .iter_mut()
                .find(|g| gpu(g[0]) == gpu(i) && self.agree(job, &t.replicas[g[0]], &t.replicas[i]))
            {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        // Agreement counts institutions, not workers, unless every replica
        // came from one institution (an alliance, or a job, with no other
        // to ask): two workers of one institution cannot outvote another.
        let institutions = |g: &[usize]| {
            count(
                g.iter()
                    .map(|&i| t.replicas[i].institution.as_str())
                    .collect::<HashSet<_>>()
                    .into_iter(),
            )
        };
        let one_institution = |g: &[usize]| {
            let same_gpu: Vec<usize> = returned
                .iter()
                .copied()
                .filter(|&i| gpu(i) == gpu(g[0]))
                .collect();
            institutions(&same_gpu) <= 1
        };
        let support = |g: &[usize]| {
            if one_institution(g) {
                count(g.iter())
            } else {
                institutions(g)
            }
        };
        let Some(winner) = groups.iter().find(|g| support(g) >= quorum) else {
            if count(returned.iter()) >= required {
                t.waiting = Some(format!(
                    "{} replicas disagree; asking another worker",
                    returned.len()
                ));
            }
            return;
        };
        let winner = winner.clone();
        let winning_gpu = gpu(winner[0]).to_owned();
        let compared: Vec<bool> = (0..t.replicas.len())
            .map(|i| gpu(i) == winning_gpu)
            .collect();
        t.result = Some(t.replicas[winner[0]].outputs.clone());
        // A result accepted alone proves nothing about its worker: only
        // results another worker confirmed count for it.
        let confirmed = winner.len() >= 2;
        for &i in &returned {
            let r = &mut t.replicas[i];
            let (state, event) = if winner.contains(&i) {
                // A recheck that confirms a result from before the
                // worker's last lie does not make it trusted again.
                let before_wrong = self
                    .inner
                    .reputation
                    .worker(&r.worker)
                    .last_wrong
                    .zip(r.finished_at)
                    .is_some_and(|(wrong, returned)| returned <= wrong);
                let agreed = if before_wrong {
                    Event::AgreedBeforeWrong
                } else {
                    Event::Agreed
                };
                (ReplicaState::Verified, confirmed.then_some(agreed))
            } else if compared[i] {
                (ReplicaState::Outvoted, Some(Event::Wrong))
            } else {
                (ReplicaState::Unmatched, None)
            };
            let outcome = match state {
                ReplicaState::Verified => "verified",
                ReplicaState::Outvoted => "outvoted",
                _ => "unmatched",
            };
            self.inner
                .metrics
                .replicas
                .get_or_create(&crate::metrics::Outcome { outcome })
                .inc();
            r.state = state;
            if let Some(event) = event {
                self.count_against(&r.worker, &r.institution, event);
            }
        }
        t.state = TaskState::Verified;
        t.waiting = None;
        debug!(job = %job.id, task = t.index, replicas = winner.len(), "task verified");
        for &i in &winner {
            self.issue_credit(job, t.index, &t.replicas[i]);
        }
    }

    /// Replicas whose agreement verifies `t`: the job's redundancy, or for
    /// `redundancy = "auto"` one while every worker holding the task is
    /// trusted and no spot check was drawn.
    pub(super) fn required(&self, job: &JobRecord, t: &TaskRecord) -> u32 {
        if !job.adaptive || t.spot_check {
            return job.redundancy;
        }
        let all_trusted = t
            .replicas
            .iter()
            .filter(|r| r.in_flight() || r.returned())
            .all(|r| self.inner.reputation.worker(&r.worker).trusted());
        if all_trusted { 1 } else { job.redundancy }
    }

    pub(super) fn agree(&self, job: &JobRecord, a: &Replica, b: &Replica) -> bool {
        if a.outputs == b.outputs {
            return true;
        }
        let Comparison::Tolerance { abs, rel, ulps } = job.comparison else {
            return false;
        };
        let tol = Tolerance { abs, rel, ulps };
        job.outputs.iter().all(|o| {
            let (Some(da), Some(db)) = (
                a.outputs.iter().find(|d| d.binding == o.binding),
                b.outputs.iter().find(|d| d.binding == o.binding),
            ) else {
                return false;
            };
            let (Ok(x), Ok(y)) = (self.read_output(&da.hash), self.read_output(&db.hash)) else {
                return false;
            };
            match o.elem {
                ElemType::F32 => compare::f32_within(&x, &y, &tol).is_ok(),
                _ => x == y,
            }
        })
    }
}
