//! Checkpoints of long tasks on the worker: each state the sandbox sends
//! every K steps, signed and delivered to the submitter (inline when
//! small, else as a blob it fetches).

use std::sync::Arc;

use alliance_kernels::executor::{self};
use alliance_protocol::task::TaskOffer;
use alliance_protocol::wire::{Ack, Progress};
use alliance_protocol::{Hash, Signed, Timestamp};
use libp2p::PeerId;
use tracing::{info, warn};

use alliance_protocol::task::CheckpointRecord;

use crate::store::blobs::Blobs;

use super::Worker;
use super::{reports::outgoing, run::input_hash};

/// Inline state bytes a checkpoint message carries at most; larger state
/// goes as blobs the submitter fetches.
pub(super) const INLINE_CHECKPOINT: usize = 512 * 1024;

/// Sends each newest checkpoint of a task to its submitter, signed, until
/// the task ends; `acked` holds the step of the last one acknowledged.
/// State too large to travel inline is kept as blobs until the next
/// checkpoint is acknowledged.
pub(super) async fn send_checkpoints(
    worker: Worker,
    peer: PeerId,
    offer: TaskOffer,
    mut newest: tokio::sync::watch::Receiver<Option<executor::Checkpoint>>,
    acked: Arc<std::sync::atomic::AtomicU32>,
) {
    let s = &worker.inner.setup;
    // The blobs of the last checkpoint the submitter took (it has fetched
    // them), deleted when the next is taken or the task ends.
    let mut kept = CheckpointBlobs {
        blobs: s.blobs.clone(),
        inputs: offer.spec.bindings.iter().filter_map(input_hash).collect(),
        held: Vec::new(),
    };
    while newest.changed().await.is_ok() {
        let Some(c) = newest.borrow_and_update().clone() else {
            continue;
        };
        let mut inline = 0usize;
        let mut state = Vec::new();
        let mut digests = Vec::new();
        let mut sent = CheckpointBlobs {
            blobs: s.blobs.clone(),
            inputs: kept.inputs.clone(),
            held: Vec::new(),
        };
        for o in &c.state {
            let fits = inline + o.data.len() <= INLINE_CHECKPOINT;
            match outgoing(&s.blobs, o, fits) {
                Ok((digest, data)) => {
                    if fits {
                        inline += o.data.len();
                    } else {
                        sent.held.push(digest.hash);
                    }
                    digests.push(digest);
                    state.push((o.binding, data));
                }
                Err(e) => {
                    warn!(error = %e, "cannot keep a checkpoint for its submitter");
                    break;
                }
            }
        }
        // A blob the last checkpoint taken holds too stays until that one
        // goes: dropping `sent` deletes only its own.
        sent.held.retain(|h| !kept.held.contains(h));
        if state.len() != c.state.len() {
            continue;
        }
        let record = CheckpointRecord {
            job: offer.spec.job,
            task: offer.spec.task,
            attempt: offer.attempt,
            kernel: offer.spec.kernel,
            step: c.step,
            state: digests,
            worker: s.identity.public(),
            made_at: Timestamp::now(),
        };
        let Ok(record) = Signed::sign(&record, &s.identity) else {
            continue;
        };
        match s
            .client
            .progress(peer, Progress::Checkpoint { record, state })
            .await
        {
            Ok(Ok(Ack::Ok)) => {
                acked.store(c.step, std::sync::atomic::Ordering::Release);
                worker.count(|s| s.checkpoints += 1);
                // The submitter has fetched it: the previous one's blobs go.
                kept = sent;
            }
            // Not taken: its own blobs go when `sent` drops.
            Ok(Ok(Ack::Refused(why))) => {
                info!(%peer, step = c.step, %why, "the submitter did not take a checkpoint");
            }
            Ok(Err(e)) => info!(%peer, step = c.step, error = %e, "a checkpoint did not arrive"),
            Err(_) => return,
        }
    }
}

/// Checkpoint blobs in this worker's store, deleted when dropped, except
/// those that are the task's inputs.
pub(super) struct CheckpointBlobs {
    blobs: Blobs,
    inputs: Vec<Hash>,
    held: Vec<Hash>,
}

impl Drop for CheckpointBlobs {
    fn drop(&mut self) {
        for h in &self.held {
            if !self.inputs.contains(h) {
                let _ = std::fs::remove_file(self.blobs.path(h));
            }
        }
    }
}
