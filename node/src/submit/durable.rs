//! Writes to the submitter's tables, and the group commit that makes them
//! durable: nothing is acknowledged (a job to its researcher, a result to
//! its worker) before the write it depends on is flushed.

use super::records::{JobRecord, TaskRecord, task_key};
use super::{Jobs, JobsError, db};

impl Jobs {
    pub(super) fn save_job(&self, job: &JobRecord) -> Result<(), JobsError> {
        let v = serde_json::to_vec(job).map_err(db)?;
        self.inner.jobs.insert(job.id.as_bytes(), v).map_err(db)?;
        self.wrote();
        Ok(())
    }

    /// Counts a write that the next flush must cover.
    pub(super) fn wrote(&self) {
        self.inner
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub(super) fn save_task(&self, id: &str, task: &TaskRecord) -> Result<(), JobsError> {
        // A task never offered is as [`TaskRecord::new`] makes it on load
        // (only why it waits differs, and the next pass says that again).
        if task.untouched() {
            return Ok(());
        }
        let v = serde_json::to_vec(task).map_err(db)?;
        self.inner
            .tasks
            .insert(task_key(id, task.index), v)
            .map_err(db)?;
        self.wrote();
        self.hold_checkpoints(id, task);
        Ok(())
    }

    /// Makes every write so far durable. The trees share one database
    /// log, so one flush covers them all.
    pub(super) fn flush(&self) -> Result<(), JobsError> {
        use std::sync::atomic::Ordering;
        let upto = self.inner.writes.load(Ordering::Acquire);
        self.inner.reputation.write_back().map_err(db)?;
        self.inner.tasks.flush().map_err(db)?;
        self.inner.flushed.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Returns once every write made before the call is on disk (at once
    /// when there is nothing to flush). Callers
    /// that arrive while a flush runs share the next one (group commit), so
    /// many acknowledgements cost one disk sync.
    pub(super) async fn durable(&self) -> Result<(), JobsError> {
        use std::sync::atomic::Ordering;
        let mine = self.inner.writes.load(Ordering::Acquire);
        let _turn = self.inner.flushing.lock().await;
        let due = self.credits_due();
        if self.inner.flushed.load(Ordering::Acquire) >= mine && due.is_empty() {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if !due.is_empty() {
                me.seal_credits(&due);
            }
            me.flush()
        })
        .await
        .map_err(db)?
    }
}
