//! The node's counters, in one prometheus-client registry with libp2p's
//! beside them (`GET /metrics`).
//!
//! Every room counts what it does through a [`Metrics`] handle (cheap to
//! clone: each metric is shared). Names follow the Prometheus conventions:
//! an `alliance_` prefix, the unit in the name, `_total` on counters.
//! Labels take a few fixed values each (a state, a reason's kind, a
//! route's template), never an id, so a series' number stays small.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `alliance_jobs` | gauge | `state` | this node's jobs by state |
//! | `alliance_tasks_offered_total` | counter | | replicas this node offered to workers |
//! | `alliance_tasks_accepted_total` | counter | | of those, accepted |
//! | `alliance_tasks_declined_total` | counter | `reason` | of those, declined, by the worker's reason |
//! | `alliance_task_leases_expired_total` | counter | | replicas given up: no result before the lease ended |
//! | `alliance_replicas_total` | counter | `outcome` | returned replicas by verdict: `verified` (agreed), `outvoted` (disagreed), `unmatched` |
//! | `alliance_spot_checks_total` | counter | | extra replicas drawn to check a trusted worker |
//! | `alliance_reputation_events_total` | counter | `event` | events this node recorded of workers |
//! | `alliance_credits_issued_total` | counter | | credits this node signed |
//! | `alliance_credited_gpu_seconds_total` | counter | | GPU time those credits pay for |
//! | `alliance_worker_offers_total` | counter | `answer` | offers this node's worker accepted or declined |
//! | `alliance_task_queue_wait_seconds` | histogram | | accepted task until its GPU is free |
//! | `alliance_task_run_seconds` | histogram | | a task in the sandbox, compile included |
//! | `alliance_task_compile_seconds` | histogram | | compiling its kernel (zero when cached) |
//! | `alliance_sandbox_failures_total` | counter | `kind` | tasks that did not finish, by kind |
//! | `alliance_owner_preemptions_total` | counter | | tasks stopped because the owner took the GPU back |
//! | `alliance_blob_bytes_total` | counter | `direction`, `via` | blob bytes `in`/`out`, over the `network` or the `api` |
//! | `alliance_api_requests_total` | counter | `method`, `route`, `status` | API requests answered |
//! | `alliance_peers_turned_away_total` | counter | `blocked` | peers turned away (failed membership, a bad, unfinished or stalled frame); `true` when also blocked |
//! | `libp2p_*` | | | the swarm's traffic and protocol counters |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Answer {
    pub answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    pub direction: &'static str,
    pub via: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Blocked {
    pub blocked: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Request {
    pub method: String,
    /// The route's template (`/v1/jobs/{id}`), or `unmatched`.
    pub route: String,
    pub status: u16,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 4.6 hours.
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

/// Every counter of the node; clones share them.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub jobs: Family<State, Gauge>,
    pub tasks_offered: Counter,
    pub tasks_accepted: Counter,
    pub tasks_declined: Family<Reason, Counter>,
    pub leases_expired: Counter,
    pub replicas: Family<Outcome, Counter>,
    pub spot_checks: Counter,
    pub reputation_events: Family<EventLabel, Counter>,
    pub credits_issued: Counter,
    pub credited_gpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub worker_offers: Family<Answer, Counter>,
    pub queue_wait: Histogram,
    pub run_time: Histogram,
    pub compile_time: Histogram,
    pub sandbox_failures: Family<Kind, Counter>,
    pub preemptions: Counter,
    pub blob_bytes: Family<Flow, Counter>,
    pub api_requests: Family<Request, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            jobs: Family::default(),
            tasks_offered: Counter::default(),
            tasks_accepted: Counter::default(),
            tasks_declined: Family::default(),
            leases_expired: Counter::default(),
            replicas: Family::default(),
            spot_checks: Counter::default(),
            reputation_events: Family::default(),
            credits_issued: Counter::default(),
            credited_gpu_seconds: Counter::default(),
            worker_offers: Family::default(),
            queue_wait: seconds_histogram(),
            run_time: seconds_histogram(),
            compile_time: seconds_histogram(),
            sandbox_failures: Family::default(),
            preemptions: Counter::default(),
            blob_bytes: Family::default(),
            api_requests: Family::default(),
        }
    }
}

impl Metrics {
    /// A fresh set, registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("alliance");
        r.register("jobs", "This node's jobs by state", m.jobs.clone());
        r.register(
            "tasks_offered",
            "Replicas this node offered to workers",
            m.tasks_offered.clone(),
        );
        r.register(
            "tasks_accepted",
            "Replicas workers accepted",
            m.tasks_accepted.clone(),
        );
        r.register(
            "tasks_declined",
            "Replicas workers declined, by their reason",
            m.tasks_declined.clone(),
        );
        r.register(
            "task_leases_expired",
            "Replicas given up with no result before their lease ended",
            m.leases_expired.clone(),
        );
        r.register(
            "replicas",
            "Returned replicas by verdict (verified agreed, outvoted disagreed)",
            m.replicas.clone(),
        );
        r.register(
            "spot_checks",
            "Extra replicas drawn to check a trusted worker",
            m.spot_checks.clone(),
        );
        r.register(
            "reputation_events",
            "Events this node recorded of workers",
            m.reputation_events.clone(),
        );
        r.register(
            "credits_issued",
            "Credits this node signed",
            m.credits_issued.clone(),
        );
        r.register_with_unit(
            "credited_gpu",
            "GPU time the credits this node signed pay for",
            Unit::Seconds,
            m.credited_gpu_seconds.clone(),
        );
        r.register(
            "worker_offers",
            "Offers this node's worker accepted or declined",
            m.worker_offers.clone(),
        );
        r.register_with_unit(
            "task_queue_wait",
            "From a task's acceptance until its GPU is free",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register_with_unit(
            "task_run",
            "A task in the sandbox, its kernel's compile included",
            Unit::Seconds,
            m.run_time.clone(),
        );
        r.register_with_unit(
            "task_compile",
            "Compiling a task's kernel (zero when the worker had it)",
            Unit::Seconds,
            m.compile_time.clone(),
        );
        r.register(
            "sandbox_failures",
            "Tasks that did not finish in the sandbox, by kind",
            m.sandbox_failures.clone(),
        );
        r.register(
            "owner_preemptions",
            "Tasks stopped because the GPU's owner took it back",
            m.preemptions.clone(),
        );
        r.register_with_unit(
            "blob",
            "Blob bytes in and out, over the network or the API",
            Unit::Bytes,
            m.blob_bytes.clone(),
        );
        r.register(
            "api_requests",
            "API requests answered, by method, route and status",
            m.api_requests.clone(),
        );
        m
    }

    /// Counts `bytes` of blob data moving `direction` (`in`, `out`) `via`
    /// (`network`, `api`).
    pub fn blob(&self, direction: &'static str, via: &'static str, bytes: u64) {
        self.blob_bytes
            .get_or_create(&Flow { direction, via })
            .inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.tasks_offered.inc();
        m.tasks_declined
            .get_or_create(&Reason { reason: "busy" })
            .inc();
        m.run_time.observe(0.25);
        m.blob("in", "api", 10);
        m.credited_gpu_seconds.inc_by(1.5);
        // As `GET /metrics` renders the registry.
        let text = crate::net::metrics_text(&registry);
        for line in [
            "alliance_tasks_offered_total 1",
            "alliance_tasks_declined_total{reason=\"busy\"} 1",
            "alliance_task_run_seconds_count 1",
            "alliance_blob_bytes_total{direction=\"in\",via=\"api\"} 10",
            "alliance_credited_gpu_seconds_total 1.5",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }
}
