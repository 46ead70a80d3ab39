//! The alliance's capacity over time, for the dashboard's chart: every
//! [`INTERVAL`] the node counts the GPUs in its advert table by state and
//! keeps the last day of counts in memory (a restart starts afresh).

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alliance_protocol::advert::GpuState;
use serde::Serialize;

use crate::net::actor::{AdvertView, Client, now_us};

/// How often the table is counted.
pub const INTERVAL: Duration = Duration::from_secs(15);

/// Counts kept: one day's.
const KEPT: usize = 24 * 3600 / 15;

/// The GPUs the alliance lends at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// Microseconds since the Unix epoch.
    pub at_us: u64,
    /// Nodes that advertise GPUs, and their institutions.
    pub nodes: u32,
    pub institutions: u32,
    /// GPUs by state.
    pub idle: u32,
    pub busy: u32,
    pub paused: u32,
    /// Tasks the idle GPUs would take now.
    pub free_slots: u32,
    /// The self-benchmarked multiply-add throughput of the idle GPUs, MFLOP/s.
    pub idle_mflops: u64,
}

impl Sample {
    /// The counts of an advert table.
    pub fn of(adverts: &[AdvertView], at_us: u64) -> Self {
        let mut s = Self {
            at_us,
            ..Self::default()
        };
        let mut institutions = BTreeSet::new();
        for a in adverts.iter().filter(|a| !a.gpus.is_empty()) {
            s.nodes += 1;
            institutions.insert(a.institution.as_str());
            for g in &a.gpus {
                match g.state {
                    GpuState::Idle => {
                        s.idle += 1;
                        s.free_slots += u32::from(g.free_slots);
                        s.idle_mflops += g.bench.map_or(0, |b| b.fma_mflops);
                    }
                    GpuState::Busy => s.busy += 1,
                    GpuState::Paused => s.paused += 1,
                }
            }
        }
        s.institutions = u32::try_from(institutions.len()).unwrap_or(u32::MAX);
        s
    }
}

/// What `GET /v1/capacity` returns.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct History {
    /// Seconds between samples.
    pub interval_secs: u64,
    /// Oldest first; the last one is counted when asked.
    pub samples: Vec<Sample>,
}

/// The samples so far, shared by the sampler and the API.
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    samples: Arc<Mutex<VecDeque<Sample>>>,
}

impl Capacity {
    fn push(&self, s: Sample) {
        if let Ok(mut q) = self.samples.lock() {
            if q.len() == KEPT {
                q.pop_front();
            }
            q.push_back(s);
        }
    }

    /// The history, ending with `now`.
    pub fn history(&self, now: Sample) -> History {
        let mut samples: Vec<Sample> = self
            .samples
            .lock()
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default();
        samples.push(now);
        History {
            interval_secs: INTERVAL.as_secs(),
            samples,
        }
    }

    /// Counts the advert table every [`INTERVAL`] until the node stops.
    pub async fn sample(self, client: Client) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(adverts) = client.gpus().await else {
                return;
            };
            self.push(Sample::of(&adverts, now_us()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_kept_and_the_oldest_goes_first() {
        let c = Capacity::default();
        for i in 0..KEPT as u64 + 3 {
            c.push(Sample {
                at_us: i,
                ..Sample::default()
            });
        }
        let h = c.history(Sample {
            at_us: u64::MAX,
            ..Sample::default()
        });
        assert_eq!(h.samples.len(), KEPT + 1);
        assert_eq!(h.samples[0].at_us, 3);
        assert_eq!(h.samples[KEPT - 1].at_us, KEPT as u64 + 2);
        assert_eq!(h.samples[KEPT].at_us, u64::MAX);
    }
}
