//! The owner's policy for each lent GPU: whether it is shared, when
//! (sharing windows in the owner's time zone), for whom (allow and deny
//! lists), on what terms (memory, duration, tasks at once), and whether the
//! owner is using it now (idle detection).
//!
//! - [`Policy`] is `[worker.policy]`, the terms of every lent GPU;
//!   [`PolicyPatch`] is `[worker.gpu.N]`, what differs for GPU `N`.
//! - [`Schedule`] decides whether a sharing window is open.
//! - [`Probe`] reads the signals that say the owner is at work: NVML on
//!   NVIDIA GPUs (loaded at run time, absent is not an error), sysfs
//!   `gpu_busy_percent` on AMD GPUs, named processes, the system load, and
//!   a signal file that scripts (or tests) create while the owner needs the
//!   GPUs.
//! - [`Gate`] turns those into a GPU's state with the owner's hold-off:
//!   after being busy, a GPU is offered again only once it has been idle
//!   for `idle_for_secs`.

mod idle;
pub mod nvml;
mod windows;

pub use idle::{GpuId, Probe};
pub use windows::Schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alliance_protocol::advert::{GpuState, Terms};
use serde::{Deserialize, Serialize};

/// `[worker.policy]`: the owner's terms for every lent GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Whether the GPU is lent at all.
    pub shared: bool,
    /// When it is lent, e.g. `["Mon-Fri 19:00-07:00", "Sat-Sun"]`; empty:
    /// always.
    pub windows: Vec<String>,
    /// The time zone of the windows, e.g. `"Europe/Berlin"`; empty: the
    /// system's.
    pub timezone: String,
    /// GPU memory one task may use, MiB (0: the limits' own).
    pub max_task_memory_mib: u64,
    /// GPU memory all alliance tasks on the GPU may use together, MiB (0:
    /// no cap).
    pub max_total_memory_mib: u64,
    /// Longest a task may run, seconds (0: no cap).
    pub max_task_secs: u64,
    /// Only these institutions' tasks run (empty: every member's).
    pub allow: Vec<String>,
    /// These institutions' tasks never run.
    pub deny: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            shared: true,
            windows: Vec::new(),
            timezone: String::new(),
            max_task_memory_mib: 0,
            max_total_memory_mib: 0,
            max_task_secs: 0,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// `[worker.gpu.N]`: what differs for one GPU; unset fields keep
/// `[worker.policy]`'s value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyPatch {
    pub shared: Option<bool>,
    pub windows: Option<Vec<String>>,
    pub timezone: Option<String>,
    pub max_task_memory_mib: Option<u64>,
    pub max_total_memory_mib: Option<u64>,
    pub max_task_secs: Option<u64>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    /// Tasks this GPU takes at once (default `worker.tasks_per_gpu`).
    pub max_tasks: Option<u16>,
}

/// `[worker.idle]`: how the node tells that the owner uses a GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdleConfig {
    /// How often the signals are read, milliseconds.
    pub poll_ms: u64,
    /// After the owner's work, how long a GPU must be idle before it is
    /// offered again, seconds.
    pub idle_for_secs: u64,
    /// Utilisation (NVML, sysfs), in percent, at which a GPU that runs no
    /// alliance task counts as used by its owner.
    pub busy_percent: u8,
    /// Ask NVML about NVIDIA GPUs (when the driver's library loads).
    pub nvml: bool,
    /// Read `gpu_busy_percent` of AMD GPUs from sysfs.
    pub sysfs: bool,
    /// The system's one-minute load per core, in percent, at which every
    /// GPU counts as busy (0: not a signal).
    pub max_load_percent: u32,
    /// Programs (process names, as `ps -e` shows them) whose running means
    /// the owner needs every GPU.
    pub busy_processes: Vec<String>,
    /// While this file exists the owner needs the GPUs: all of them if it
    /// is empty, else the GPU indices it lists. For scripts (a batch
    /// system's prologue, a desktop session hook).
    pub busy_file: Option<PathBuf>,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            poll_ms: 1000,
            idle_for_secs: 300,
            busy_percent: 20,
            nvml: true,
            sysfs: true,
            max_load_percent: 0,
            busy_processes: Vec::new(),
            busy_file: None,
        }
    }
}

/// One GPU's terms after its patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPolicy {
    pub shared: bool,
    pub schedule: Schedule,
    /// Who may use the GPU, for how long, with how much memory: what the
    /// advert tells schedulers.
    pub terms: Terms,
    pub max_total_bytes: u64,
    pub max_tasks: u16,
}

/// One GPU's terms as its owner and the dashboard read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PolicyView {
    /// Whether the GPU is lent at all.
    pub shared: bool,
    /// When it is lent (empty: always), read in `timezone`.
    pub windows: Vec<String>,
    pub timezone: String,
    /// GPU memory one task may use, bytes (0: the device's limits).
    pub max_task_bytes: u64,
    /// GPU memory all alliance tasks may use together, bytes (0: no cap).
    pub max_total_bytes: u64,
    /// Longest a task may run, seconds (0: no cap).
    pub max_task_secs: u64,
    /// Tasks it takes at once.
    pub max_tasks: u16,
    /// Only these institutions' tasks run (empty: every member's).
    pub allow: Vec<String>,
    /// These institutions' tasks never run.
    pub deny: Vec<String>,
}

impl GpuPolicy {
    /// What the owner set, for people.
    pub fn view(&self) -> PolicyView {
        PolicyView {
            shared: self.shared,
            windows: self.schedule.windows().to_vec(),
            timezone: self.schedule.timezone().to_owned(),
            max_task_bytes: self.terms.max_task_bytes,
            max_total_bytes: self.max_total_bytes,
            max_task_secs: self.terms.max_task_secs,
            max_tasks: self.max_tasks,
            allow: self.terms.allow.clone(),
            deny: self.terms.deny.clone(),
        }
    }
}

/// The policy of the GPU with index `index`, or what is wrong with it.
pub fn for_gpu(
    policy: &Policy,
    patches: &BTreeMap<String, PolicyPatch>,
    index: usize,
    tasks_per_gpu: u16,
) -> Result<GpuPolicy, String> {
    let patch = patches.get(&index.to_string()).cloned().unwrap_or_default();
    let windows = patch.windows.unwrap_or_else(|| policy.windows.clone());
    let timezone = patch.timezone.unwrap_or_else(|| policy.timezone.clone());
    let section = if patches.contains_key(&index.to_string()) {
        format!("worker.gpu.{index}")
    } else {
        "worker.policy".to_owned()
    };
    let schedule = Schedule::new(&windows, &timezone).map_err(|e| format!("{section}: {e}"))?;
    let mib = |m: u64| m.saturating_mul(1 << 20);
    let max_tasks = patch.max_tasks.unwrap_or(tasks_per_gpu);
    if max_tasks == 0 {
        return Err(format!(
            "{section}: max_tasks = 0; to stop lending this GPU write shared = false"
        ));
    }
    Ok(GpuPolicy {
        shared: patch.shared.unwrap_or(policy.shared),
        schedule,
        terms: Terms {
            max_task_bytes: mib(patch
                .max_task_memory_mib
                .unwrap_or(policy.max_task_memory_mib)),
            max_task_secs: patch.max_task_secs.unwrap_or(policy.max_task_secs),
            allow: patch.allow.unwrap_or_else(|| policy.allow.clone()),
            deny: patch.deny.unwrap_or_else(|| policy.deny.clone()),
        },
        max_total_bytes: mib(patch
            .max_total_memory_mib
            .unwrap_or(policy.max_total_memory_mib)),
        max_tasks,
    })
}

/// One GPU's state over time: the owner's switches, the window, the
/// signals, and the hold-off after the owner's work.
#[derive(Debug)]
pub struct Gate {
    pub policy: GpuPolicy,
    /// Paused by the owner (`alliance pause`).
    pub paused: bool,
    /// When the owner's work was last seen.
    last_busy: Option<Instant>,
    idle_for: Duration,
}

impl Gate {
    pub fn new(policy: GpuPolicy, idle_for: Duration) -> Self {
        Self {
            policy,
            paused: false,
            last_busy: None,
            idle_for,
        }
    }

    /// The GPU's state and why, given what the signals say now.
    pub fn evaluate(&mut self, busy: Option<&str>, now: Instant, wall: i64) -> (GpuState, String) {
        if !self.policy.shared {
            return (GpuState::Paused, "not shared by its owner".into());
        }
        if self.paused {
            return (GpuState::Paused, "paused by its owner".into());
        }
        if !self.policy.schedule.open_at(wall) {
            let opens = self
                .policy
                .schedule
                .next_change(wall)
                .map(|t| format!("; opens {t}"))
                .unwrap_or_default();
            return (
                GpuState::Paused,
                format!(
                    "outside its sharing window {}{opens}",
                    self.policy.schedule.describe()
                ),
            );
        }
        if let Some(why) = busy {
            self.last_busy = Some(now);
            return (GpuState::Busy, format!("its owner is using it: {why}"));
        }
        if let Some(at) = self.last_busy {
            let idle = now.duration_since(at);
            if idle < self.idle_for {
                return (
                    GpuState::Busy,
                    format!(
                        "its owner used it {} s ago; offered again after {} s idle",
                        idle.as_secs(),
                        self.idle_for.as_secs()
                    ),
                );
            }
            self.last_busy = None;
        }
        (GpuState::Idle, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches_override_the_node_policy() {
        let policy = Policy {
            deny: vec!["U".into()],
            max_task_secs: 60,
            ..Policy::default()
        };
        let mut patches = BTreeMap::new();
        patches.insert(
            "1".to_owned(),
            PolicyPatch {
                shared: Some(false),
                max_tasks: Some(1),
                ..PolicyPatch::default()
            },
        );
        let g0 = for_gpu(&policy, &patches, 0, 4).unwrap();
        let g1 = for_gpu(&policy, &patches, 1, 4).unwrap();
        assert!(g0.shared && g0.max_tasks == 4 && g0.terms.max_task_secs == 60);
        assert!(!g1.shared && g1.max_tasks == 1 && g1.terms.deny == ["U"]);
        assert!(!g0.terms.admits("U") && g0.terms.admits("V"));
        assert_eq!(
            g0.terms.check("V", 61_000, 0),
            Err(alliance_protocol::advert::TermsRefusal::TooLong {
                max_secs: 60,
                secs: 61
            })
        );
        assert!(g0.terms.check("V", 60_000, 1 << 40).is_ok());
    }

    #[test]
    fn the_gate_holds_off_after_the_owner_works() {
        let policy = for_gpu(&Policy::default(), &BTreeMap::new(), 0, 4).unwrap();
        let mut gate = Gate::new(policy, Duration::from_secs(300));
        let t0 = Instant::now();
        assert_eq!(gate.evaluate(None, t0, 0).0, GpuState::Idle);
        assert_eq!(gate.evaluate(Some("x"), t0, 0).0, GpuState::Busy);
        let (state, why) = gate.evaluate(None, t0 + Duration::from_secs(10), 0);
        assert_eq!(state, GpuState::Busy);
        assert!(why.contains("after 300 s idle"), "{why}");
        assert_eq!(
            gate.evaluate(None, t0 + Duration::from_secs(301), 0).0,
            GpuState::Idle
        );
        gate.paused = true;
        assert_eq!(gate.evaluate(None, t0, 0).0, GpuState::Paused);
    }
}
