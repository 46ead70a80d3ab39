//! What researchers ask of the submitter: a job file checked, stored and
//! scheduled; the list of jobs, one job's detail, cancelling, and waiting
//! for a job's end.

use std::collections::BTreeMap;
use std::time::Duration;

use alliance_protocol::task::{Data, JobId};
use alliance_protocol::{Hash, Timestamp};
use tracing::info;

use crate::submit::Job;
use crate::submit::spec::Source;

use super::records::{
    InputRecord, JobDetail, JobRecord, JobState, JobSummary, Progress, Replica, TaskRecord,
    TaskState,
};
use super::{INLINE_INPUT, Jobs, JobsError, Live, db};

pub(super) fn summary(l: &Live) -> JobSummary {
    let mut p = Progress::default();
    let mut waiting: BTreeMap<String, u32> = BTreeMap::new();
    let (mut gpu_time_us, mut compile_time_us) = (0u64, 0u64);
    for r in l
        .tasks
        .iter()
        .flat_map(|t| &t.replicas)
        .filter(|r| r.returned())
    {
        gpu_time_us = gpu_time_us.saturating_add(r.gpu_time_us);
        compile_time_us = compile_time_us.saturating_add(r.compile_time_us);
    }
    for t in &l.tasks {
        match t.state {
            TaskState::Verified => p.verified += 1,
            TaskState::Failed => p.failed += 1,
            TaskState::Waiting if t.replicas.iter().any(Replica::in_flight) => p.running += 1,
            TaskState::Waiting => {
                p.queued += 1;
                if let Some(w) = &t.waiting {
                    *waiting.entry(w.clone()).or_default() += 1;
                }
            }
        }
    }
    let mut waiting: Vec<(String, u32)> = waiting.into_iter().collect();
    waiting.sort_by_key(|w| std::cmp::Reverse(w.1));
    JobSummary {
        id: l.job.id.clone(),
        name: l.job.name.clone(),
        owner: l.job.owner.clone(),
        state: l.job.state.clone(),
        tasks: l.job.tasks,
        redundancy: l.job.redundancy,
        progress: p,
        submitted_at: l.job.submitted_at,
        finished_at: l.job.finished_at,
        waiting,
        gpu_time_us,
        compile_time_us,
    }
}

impl Jobs {
    /// Stores a checked job: its inputs' parts inline or as blobs (a blob
    /// already in the store is named, not copied), then the job record,
    /// on disk before its id is handed out.
    pub fn submit(&self, job: Job, owner: &str) -> Result<JobSummary, JobsError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(db)?;
        let id = JobId(raw).to_string();
        let mut inputs = Vec::new();
        for i in &job.inputs {
            let mut stored = Vec::new();
            for part in 0..i.parts {
                let len = i.part_len();
                stored.push(if len <= INLINE_INPUT as u64 {
                    Data::Inline(i.bytes(part).map_err(db)?)
                } else {
                    let hash = match &i.source {
                        Source::File {
                            hash: Some(h),
                            offset: 0,
                            ..
                        } if i.parts == 1 => *h,
                        Source::File { path, offset, .. } => self
                            .inner
                            .blobs
                            .put_range(path, offset + i.part_start(part), len)
                            .map_err(db)?,
                        Source::Values(_) => self
                            .inner
                            .blobs
                            .put(&i.bytes(part).map_err(db)?)
                            .map_err(db)?,
                    };
                    Data::Blob { hash, len }
                });
            }
            inputs.push(InputRecord {
                binding: i.binding,
                kind: i.kind,
                elem: i.elem,
                split: i.split,
                parts: stored,
            });
        }
        let record = JobRecord {
            id: id.clone(),
            name: job.name.clone(),
            submitted_at: Timestamp::now(),
            kernel_hash: Hash::of(job.kernel.as_bytes()),
            kernel: job.kernel,
            entry_point: job.entry_point,
            dispatch: job.dispatch,
            tasks: job.tasks,
            steps: job.steps,
            checkpoint_every: job.checkpoint_every,
            timeout_ms: u64::try_from(job.timeout.as_millis()).unwrap_or(u64::MAX),
            redundancy: job.redundancy,
            adaptive: job.adaptive,
            comparison: job.comparison,
            info_binding: job.info_binding,
            inputs,
            outputs: job.outputs,
            requirements: job.requirements,
            state: JobState::Active,
            finished_at: None,
            owner: owner.to_owned(),
        };
        // Tasks are stored once they are first offered: the job record
        // alone stands for all its tasks until then, so a job of any size
        // costs one write to submit.
        let tasks: Vec<TaskRecord> = (0..record.tasks).map(TaskRecord::new).collect();
        self.save_job(&record)?;
        self.flush()?;
        info!(job = %id, name = %record.name, tasks = record.tasks, "job submitted");
        let live = Live::new(record, tasks);
        let submitted = summary(&live);
        self.lock()?.insert(id, live);
        self.inner.wake.notify_one();
        Ok(submitted)
    }

    /// What `owner` has on this node now: active jobs, and their tasks
    /// not yet ended.
    pub fn usage(&self, owner: &str) -> Result<(u32, u64), JobsError> {
        let live = self.lock()?;
        let mut usage = (0, 0);
        for l in live
            .values()
            .filter(|l| l.job.owner == owner && l.job.state == JobState::Active)
        {
            usage.0 += 1;
            usage.1 += l
                .tasks
                .iter()
                .filter(|t| t.state == TaskState::Waiting)
                .count() as u64;
        }
        Ok(usage)
    }

    /// Who submitted job `id`.
    pub fn owner(&self, id: &str) -> Result<String, JobsError> {
        let live = self.lock()?;
        live.get(id)
            .map(|l| l.job.owner.clone())
            .ok_or_else(|| JobsError::NotFound(id.to_owned()))
    }

    /// How many jobs are in each state, without building their summaries.
    pub fn count_by_state(&self) -> Result<Vec<(JobState, usize)>, JobsError> {
        let live = self.lock()?;
        let states = [
            JobState::Active,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ];
        Ok(states
            .into_iter()
            .map(|s| {
                let n = live.values().filter(|l| l.job.state == s).count();
                (s, n)
            })
            .collect())
    }

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<JobSummary>, JobsError> {
        let live = self.lock()?;
        let mut out: Vec<JobSummary> = live.values().map(summary).collect();
        out.sort_by(|a, b| b.submitted_at.cmp(&a.submitted_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// One job with its tasks.
    pub fn detail(&self, id: &str) -> Result<JobDetail, JobsError> {
        let live = self.lock()?;
        let l = live
            .get(id)
            .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        Ok(JobDetail {
            summary: summary(l),
            outputs: l.job.outputs.clone(),
            tasks: l.tasks.clone(),
        })
    }

    /// Stops offering a job's tasks; results still on their way are refused.
    pub fn cancel(&self, id: &str) -> Result<JobSummary, JobsError> {
        let mut live = self.lock()?;
        let l = live
            .get_mut(id)
            .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
        if l.job.state == JobState::Active {
            l.job.state = JobState::Cancelled;
            l.job.finished_at = Some(Timestamp::now());
            let job = l.job.clone();
            self.save_job(&job)?;
            self.flush()?;
            self.inner.ended.send_modify(|n| *n += 1);
        }
        Ok(summary(l))
    }

    /// The job's summary once it has ended (done, failed or cancelled), or
    /// after `patience`, whichever comes first.
    pub async fn wait_end(&self, id: &str, patience: Duration) -> Result<JobSummary, JobsError> {
        let mut ended = self.inner.ended.subscribe();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let now = {
                let live = self.lock()?;
                let l = live
                    .get(id)
                    .ok_or_else(|| JobsError::NotFound(id.to_owned()))?;
                summary(l)
            };
            if now.state != JobState::Active {
                return Ok(now);
            }
            match tokio::time::timeout_at(deadline, ended.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(now),
            }
        }
    }
}
