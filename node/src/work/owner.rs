//! The owner's side of the worker: pausing and resuming GPUs, the idle
//! watch that turns the owner's signals and terms into each GPU's state
//! in the advert, and handing tasks back when the owner takes a GPU back.

use std::sync::Arc;
use std::time::Duration;

use alliance_protocol::Timestamp;
use tracing::{info, warn};

use alliance_protocol::advert::{GpuInfo, GpuState};

use crate::work::policy::{GpuId, Probe};

use super::{TaskKey, Worker};

impl Worker {
    /// Pauses or resumes lending GPU `gpu` (its index), or every GPU; the
    /// change is kept across restarts, shown in the advert at once, and a
    /// pause hands back the tasks the GPU holds.
    pub fn set_paused(&self, gpu: Option<usize>, paused: bool) -> Result<(), String> {
        let indices = {
            let mut slots = self
                .inner
                .slots
                .lock()
                .map_err(|_| "worker state poisoned".to_owned())?;
            if let Some(g) = gpu
                && !slots.iter().any(|s| s.report.index == g)
            {
                let lent: Vec<String> = slots.iter().map(|s| s.report.index.to_string()).collect();
                return Err(format!(
                    "this node lends no GPU {g}; it lends GPU {} (see `alliance gpus --local`)",
                    lent.join(", ")
                ));
            }
            for s in slots.iter_mut() {
                if gpu.is_none_or(|g| g == s.report.index) {
                    s.gate.paused = paused;
                }
            }
            slots
                .iter()
                .filter(|s| s.gate.paused)
                .map(|s| s.report.index)
                .collect::<Vec<_>>()
        };
        let path = &self.inner.setup.pause_file;
        let text = serde_json::to_string(&indices).map_err(|e| e.to_string())?;
        std::fs::write(path, text)
            .map_err(|e| format!("cannot keep the pause in {}: {e}", path.display()))?;
        self.inner.recheck.notify_one();
        Ok(())
    }

    /// Replaces each lent GPU's owner policy with `policy(index)` (a
    /// reloaded config's), shown in the advert at once. When one GPU's new
    /// policy is wrong none changes, and the error says why.
    pub fn set_policies(
        &self,
        policy: impl Fn(usize) -> Result<super::policy::GpuPolicy, String>,
    ) -> Result<(), String> {
        let mut slots = self
            .inner
            .slots
            .lock()
            .map_err(|_| "worker state poisoned".to_owned())?;
        let fresh: Vec<_> = slots
            .iter()
            .map(|s| policy(s.report.index))
            .collect::<Result<_, _>>()?;
        for (s, p) in slots.iter_mut().zip(fresh) {
            s.gate.policy = p;
        }
        drop(slots);
        self.inner.recheck.notify_one();
        Ok(())
    }

    /// Watches the owner's policy and signals: keeps each GPU's state,
    /// publishes it in the advert when it changes, and hands back the
    /// tasks of a GPU the owner takes back. Runs until the node stops.
    pub async fn watch(self) {
        let s = &self.inner.setup;
        let ids: Vec<GpuId> = s
            .gpus
            .iter()
            .map(|g| GpuId {
                index: g.index,
                vendor: g.vendor,
                pci_bus_id: g.pci_bus_id.clone(),
            })
            .collect();
        let probe = Arc::new(Probe::new(s.idle.clone(), ids));
        let poll = Duration::from_millis(s.idle.poll_ms.max(50));
        let mut published: Option<Vec<GpuInfo>> = None;
        loop {
            let running: Vec<bool> = self
                .inner
                .slots
                .lock()
                .map(|slots| {
                    slots
                        .iter()
                        .map(|x| x.running.lock().map(|r| r.is_some()).unwrap_or(false))
                        .collect()
                })
                .unwrap_or_default();
            let p = Arc::clone(&probe);
            let busy = tokio::task::spawn_blocking(move || p.sample(&running))
                .await
                .unwrap_or_default();
            let (adverts, taken_back) = self.evaluate(&busy);
            for (slot, reason) in taken_back {
                self.hand_back_all(slot, &reason);
            }
            if published.as_ref() != Some(&adverts) {
                if s.client.set_gpus(adverts.clone()).await.is_err() {
                    return;
                }
                published = Some(adverts);
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                () = self.inner.recheck.notified() => {}
            }
        }
    }

    /// Each GPU's state now, as advert entries, and the GPUs that stopped
    /// taking work with why.
    pub(super) fn evaluate(&self, busy: &[Option<String>]) -> (Vec<GpuInfo>, Vec<(usize, String)>) {
        let now = std::time::Instant::now();
        let wall = i64::try_from(Timestamp::now().as_secs()).unwrap_or(i64::MAX);
        let mut adverts = Vec::new();
        let mut taken_back = Vec::new();
        let Ok(mut slots) = self.inner.slots.lock() else {
            return (adverts, taken_back);
        };
        for (i, slot) in slots.iter_mut().enumerate() {
            let signal = busy.get(i).and_then(|b| b.as_deref());
            let (state, reason) = slot.gate.evaluate(signal, now, wall);
            if state != GpuState::Idle && slot.state.0 == GpuState::Idle && slot.taken > 0 {
                taken_back.push((i, reason.clone()));
            }
            if state != slot.state.0 || reason != slot.state.1 {
                info!(gpu = slot.report.index, ?state, %reason, "GPU state");
            }
            slot.state = (state, reason.clone());
            if let Some(base) = self.inner.setup.adverts.get(i) {
                adverts.push(GpuInfo {
                    state,
                    free_slots: if state == GpuState::Idle {
                        slot.gate.policy.max_tasks
                    } else {
                        0
                    },
                    reason,
                    terms: slot.gate.policy.terms.clone(),
                    ..base.clone()
                });
            }
        }
        (adverts, taken_back)
    }

    /// Stops every task GPU `slot` holds, to hand each back to its
    /// submitter.
    pub(super) fn hand_back_all(&self, slot: usize, reason: &str) {
        let Ok(slots) = self.inner.slots.lock() else {
            return;
        };
        let Some(s) = slots.get(slot) else {
            return;
        };
        if let Ok(mut p) = self.inner.preempted.lock() {
            for key in &s.keys {
                p.insert(*key, reason.to_owned());
            }
        }
        if let Ok(r) = s.running.lock()
            && let Some((_, stopper)) = r.as_ref()
        {
            warn!(gpu = s.report.index, %reason, tasks = s.keys.len(), "the owner takes the GPU back; handing its tasks back");
            stopper.stop();
        }
    }

    pub(super) fn preempted(&self, key: &TaskKey) -> Option<String> {
        self.inner
            .preempted
            .lock()
            .ok()
            .and_then(|p| p.get(key).cloned())
    }
}
