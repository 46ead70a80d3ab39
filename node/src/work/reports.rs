//! Reports: every accepted task's end (a receipt with its outputs, or a
//! failure), signed a batch at a time per submitter and retried until it
//! acknowledges them or [`REPORT_PATIENCE`] passes.

use std::time::Duration;

use alliance_kernels::executor::{self};
use alliance_protocol::task::{self as records, Data, Outcomes, OutputDigest};
use alliance_protocol::wire::{self, Ack, Acks, MAX_BATCH, REPORT_BATCH_BYTES, Reports};
use alliance_protocol::{Hash, Signed};
use libp2p::PeerId;
use tracing::warn;

use crate::store::blobs::Blobs;

use super::Worker;

/// How long a worker keeps trying to deliver a report.
pub(super) const REPORT_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// The reports waiting to go to one submitter, and whether a sender is
/// draining them.
#[derive(Default)]
pub(super) struct Outbox {
    queue: std::collections::VecDeque<Outgoing>,
    sending: bool,
}

pub(super) struct Outgoing {
    outcome: records::Outcome,
    outputs: Vec<(u32, Data)>,
    /// Encoded bytes, about, for sizing batches.
    size: usize,
    since: std::time::Instant,
}

/// An output as it travels to the submitter: its digest, and its bytes
/// inline or as a blob of this node's store, which the submitter fetches.
pub(super) fn outgoing(
    blobs: &Blobs,
    o: &executor::Output,
    inline: bool,
) -> std::io::Result<(OutputDigest, Data)> {
    let hash = Hash::from_bytes(o.hash);
    let data = if inline {
        Data::Inline(o.data.clone())
    } else {
        Data::Blob {
            hash: blobs.put(&o.data)?,
            len: o.len,
        }
    };
    Ok((
        OutputDigest {
            binding: o.binding,
            hash,
            len: o.len,
        },
        data,
    ))
}

impl Worker {
    /// Queues `report` for the submitter `peer`. One sender per submitter
    /// drains its queue: reports that end while one request is on its way
    /// travel together in the next.
    pub(super) fn deliver(
        &self,
        peer: PeerId,
        outcome: records::Outcome,
        outputs: Vec<(u32, Data)>,
    ) {
        let size = wire::report_size_hint(&outcome, &outputs);
        let start = {
            let Ok(mut out) = self.inner.outbox.lock() else {
                return;
            };
            let o = out.entry(peer).or_default();
            o.queue.push_back(Outgoing {
                outcome,
                outputs,
                size,
                since: std::time::Instant::now(),
            });
            !std::mem::replace(&mut o.sending, true)
        };
        if start {
            tokio::spawn(self.clone().send_reports(peer));
        }
    }

    /// Sends the reports queued for `peer`, a batch at a time, until the
    /// queue is empty; a batch that does not arrive is sent again, with
    /// backoff, until the submitter answers or half an hour passes.
    pub(super) async fn send_reports(self, peer: PeerId) {
        let s = &self.inner.setup;
        let mut wait = Duration::from_millis(500);
        loop {
            let batch: Vec<Outgoing> = {
                let Ok(mut out) = self.inner.outbox.lock() else {
                    return;
                };
                let Some(o) = out.get_mut(&peer) else {
                    return;
                };
                let mut bytes = 0;
                let mut batch = Vec::new();
                while let Some(next) = o.queue.front() {
                    if batch.len() >= MAX_BATCH
                        || (!batch.is_empty() && bytes + next.size > REPORT_BATCH_BYTES)
                    {
                        break;
                    }
                    bytes += next.size;
                    batch.extend(o.queue.pop_front());
                }
                if batch.is_empty() {
                    out.remove(&peer);
                    return;
                }
                batch
            };
            // The batch is signed as it leaves: one signature for all of
            // it (a batch sent again is signed again).
            let outcomes = Outcomes(batch.iter().map(|o| o.outcome.clone()).collect());
            let outcomes = match Signed::sign(&outcomes, &s.identity) {
                Ok(signed) => signed,
                Err(e) => {
                    // Only a batch too large to sign gets here (a single
                    // report is far below the cap); the leases run out and
                    // the submitter offers the tasks again.
                    warn!(%peer, error = %e, reports = batch.len(), "reports could not be signed; dropped");
                    continue;
                }
            };
            let reports = Reports {
                outcomes,
                outputs: batch.iter().map(|o| o.outputs.clone()).collect(),
            };
            match s.client.report(peer, reports).await {
                Ok(Ok(Acks(acks))) => {
                    wait = Duration::from_millis(500);
                    if acks.len() != batch.len() {
                        warn!(%peer, reports = batch.len(), acks = acks.len(), "the submitter acknowledged another number of reports than it got");
                    }
                    for ack in acks {
                        if let Ack::Refused(why) = ack {
                            warn!(%peer, %why, "the submitter refused a report");
                        }
                    }
                }
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, reports = batch.len(), "reports not delivered yet");
                    let keep: Vec<Outgoing> = batch
                        .into_iter()
                        .filter(|o| o.since.elapsed() <= REPORT_PATIENCE)
                        .collect();
                    if keep.is_empty() {
                        warn!(%peer, "giving up delivering reports");
                    }
                    if let Ok(mut out) = self.inner.outbox.lock() {
                        let o = out.entry(peer).or_default();
                        o.sending = true;
                        for k in keep.into_iter().rev() {
                            o.queue.push_front(k);
                        }
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
                Err(_) => return,
            }
        }
    }
}
