//! Settlement: each verified outcome counted in the worker's reputation,
//! and the credits owed to the workers' institutions, sealed into signed
//! credits (up to [`MAX_CREDIT_TASKS`] tasks each) with the flush that
//! makes them durable.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use alliance_protocol::task::{Credit, CreditedTask, JobId, MAX_CREDIT_TASKS};
use alliance_protocol::{Hash, PublicKey, Signed, Timestamp};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::trust::reputation::{Event, InstitutionView, WorkerView};

use super::records::{JobRecord, Replica, job_id, short};
use super::{Jobs, db};

/// How long verified results wait for more of their job and worker before
/// a credit pays for fewer than [`MAX_CREDIT_TASKS`] of them: every member
/// checks and stores every credit, so a credit per report batch would cost
/// the alliance many times what a full one does.
pub(super) const CREDIT_DELAY: Duration = Duration::from_secs(1);

/// The results one credit may pay for: one job's, done by one worker of one
/// institution.
pub(super) type OwedGroup = (JobId, PublicKey, PublicKey);

/// A verified result that a credit is owed for.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Owed {
    pub(super) job: JobId,
    pub(super) task: u32,
    pub(super) receipt: Hash,
    pub(super) worker: PublicKey,
    pub(super) worker_institution: PublicKey,
    pub(super) gpu_time_us: u64,
}

impl Owed {
    pub(super) fn group(&self) -> OwedGroup {
        (self.job, self.worker, self.worker_institution)
    }
}

impl Jobs {
    /// The groups of owed results due to be sealed: a full credit's worth,
    /// or waiting since [`CREDIT_DELAY`].
    pub(super) fn credits_due(&self) -> HashSet<OwedGroup> {
        let now = Instant::now();
        self.inner
            .owed
            .lock()
            .map(|owed| {
                owed.iter()
                    .filter(|(_, (n, due))| *n >= MAX_CREDIT_TASKS || *due <= now)
                    .map(|(g, _)| *g)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Signs credits for the verified results of the `due` groups: a
    /// credit per job and worker for up to [`MAX_CREDIT_TASKS`] tasks. Each
    /// credit is stored, and the results it pays for struck off, in one
    /// transaction: no result is paid twice, none is forgotten.
    pub(super) fn seal_credits(&self, due: &HashSet<OwedGroup>) {
        use sled::Transactional;
        let mut groups: BTreeMap<OwedGroup, Vec<(sled::IVec, Owed)>> = BTreeMap::new();
        for (k, v) in self.inner.owed_credits.iter().flatten() {
            match serde_json::from_slice::<Owed>(&v) {
                Ok(o) if due.contains(&o.group()) => {
                    groups.entry(o.group()).or_default().push((k, o))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("dropping an unreadable owed credit: {e}");
                    let _ = self.inner.owed_credits.remove(k);
                }
            }
        }
        for (group, owed) in groups {
            let (job, worker, worker_institution) = group;
            for part in owed.chunks(MAX_CREDIT_TASKS) {
                let credit = Credit {
                    job,
                    tasks: part
                        .iter()
                        .map(|(_, o)| CreditedTask {
                            task: o.task,
                            receipt: o.receipt,
                        })
                        .collect(),
                    worker,
                    worker_institution,
                    submitter_institution: self.inner.institution,
                    gpu_time_us: part.iter().fold(0u64, |sum, (_, o)| {
                        sum.saturating_add(
                            o.gpu_time_us.min(crate::trust::credits::MAX_GPU_TIME_US),
                        )
                    }),
                    issued_at: Timestamp::now(),
                };
                let bytes = match Signed::sign(&credit, &self.inner.identity) {
                    Ok(signed) => signed.to_bytes(),
                    Err(e) => {
                        warn!("cannot sign a credit: {e}");
                        continue;
                    }
                };
                let key = Hash::of(&bytes);
                let stored = (&self.inner.owed_credits, &self.inner.unsent_credits).transaction(
                    |(owed, unsent)| {
                        for (k, _) in part {
                            owed.remove(k.clone())?;
                        }
                        unsent.insert(key.as_bytes(), bytes.as_slice())?;
                        Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                    },
                );
                match stored {
                    Ok(()) => {
                        let m = &self.inner.metrics;
                        m.credits_issued.inc();
                        #[allow(clippy::cast_precision_loss)] // µs far below 2^53
                        m.credited_gpu_seconds
                            .inc_by(credit.gpu_time_us as f64 / 1e6);
                        self.wrote();
                        if let Ok(mut o) = self.inner.owed.lock()
                            && let Some((n, _)) = o.get_mut(&group)
                        {
                            *n = n.saturating_sub(part.len());
                            if *n == 0 {
                                o.remove(&group);
                            }
                        }
                    }
                    Err(e) => warn!("cannot keep a credit: {e:?}"),
                }
            }
        }
    }

    /// Records that a replica's verified work is owed a credit; the next
    /// flush signs it into one (see `seal_credits`), and the pass after
    /// gossips it.
    pub(super) fn issue_credit(&self, job: &JobRecord, task: u32, r: &Replica) {
        let (Some(receipt), Some(worker_institution), Ok(peer)) =
            (r.receipt, r.institution_key, r.worker.parse::<PeerId>())
        else {
            return;
        };
        let Ok(worker) = PublicKey::from_peer_id(&peer) else {
            return;
        };
        let owed = Owed {
            job: job_id(&job.id),
            task,
            receipt,
            worker,
            worker_institution,
            gpu_time_us: r.gpu_time_us,
        };
        let mut key = owed.job.0.to_vec();
        key.extend_from_slice(&task.to_be_bytes());
        key.extend_from_slice(worker.as_bytes());
        let group = owed.group();
        match serde_json::to_vec(&owed).map_err(db).and_then(|v| {
            self.inner
                .owed_credits
                .insert(key, v)
                .map_err(db)
                .map(|old| old.is_none())
        }) {
            Ok(new) => {
                self.wrote();
                if new && let Ok(mut o) = self.inner.owed.lock() {
                    o.entry(group)
                        .or_insert((0, Instant::now() + CREDIT_DELAY))
                        .0 += 1;
                }
            }
            Err(e) => warn!("cannot record a credit owed: {e}"),
        }
    }

    /// Counts a verified outcome in the worker's record.
    pub(super) fn count_against(&self, worker: &str, institution: &str, event: Event) {
        let label = match event {
            Event::Agreed => "agreed",
            Event::AgreedBeforeWrong => "agreed_before_wrong",
            Event::Wrong => "wrong",
            Event::Lapsed => "lapsed",
        };
        self.inner
            .metrics
            .reputation_events
            .get_or_create(&crate::metrics::EventLabel { event: label })
            .inc();
        match self.inner.reputation.record(worker, institution, event) {
            Ok(r) if event == Event::Wrong => {
                warn!(worker = %short(worker), %institution, streak = r.streak, "a wrong result: the worker is replicated from now on, and what it ran alone is checked again");
                if let Ok(mut c) = self.inner.caught.lock() {
                    c.insert(worker.to_owned());
                }
            }
            Ok(_) => {}
            Err(e) => warn!("cannot update the reputation of {}: {e}", short(worker)),
        }
    }

    /// Every worker's and institution's record.
    pub fn reputation(&self) -> (Vec<WorkerView>, Vec<InstitutionView>) {
        self.inner.reputation.table()
    }
}
