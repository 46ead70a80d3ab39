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

use std::collections::{BTreeMap, HashSet};
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

/// Days and a daily span of minutes in which a GPU is lent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight; `end` ≤ `start` runs past midnight into the
    /// next day.
    start: u16,
    end: u16,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const WINDOW_FORM: &str = "write windows like \"Mon-Fri 19:00-07:00\", \"Sat-Sun\", \"daily 22:00-06:00\" or \"Mon,Wed 12:00-14:00\"";

fn day(text: &str) -> Option<usize> {
    let t = text.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| t.len() >= 3 && d.starts_with(&t[..3]) && t.starts_with(d))
}

fn minutes(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

impl Window {
    fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("window {text:?}: {why}; {WINDOW_FORM}");
        let mut days = [true; 7];
        let (mut start, mut end) = (0, 24 * 60);
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.is_empty() || words.len() > 2 {
            return Err(bad("expected days, a time span, or both"));
        }
        for word in words {
            if word.contains(':') {
                let (a, b) = word
                    .split_once('-')
                    .ok_or_else(|| bad("a time span is HH:MM-HH:MM"))?;
                start = minutes(a).ok_or_else(|| bad(&format!("{a:?} is not a time")))?;
                end = minutes(b).ok_or_else(|| bad(&format!("{b:?} is not a time")))?;
                if start == end {
                    return Err(bad("the span is empty (start equals end)"));
                }
            } else if word.eq_ignore_ascii_case("daily") || word == "*" {
                days = [true; 7];
            } else {
                days = [false; 7];
                for part in word.split(',') {
                    let (a, b) = part.split_once('-').unwrap_or((part, part));
                    let a = day(a).ok_or_else(|| bad(&format!("{a:?} is not a day")))?;
                    let b = day(b).ok_or_else(|| bad(&format!("{b:?} is not a day")))?;
                    let mut d = a;
                    loop {
                        days[d] = true;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
            }
        }
        Ok(Self { days, start, end })
    }

    /// Whether minute `m` of weekday `d` (Monday 0) is inside.
    fn contains(&self, d: usize, m: u16) -> bool {
        if self.start < self.end {
            self.days[d] && m >= self.start && m < self.end
        } else {
            (self.days[d] && m >= self.start) || (self.days[(d + 6) % 7] && m < self.end)
        }
    }
}

/// Sharing windows in a time zone; no windows means always open.
#[derive(Debug, Clone)]
pub struct Schedule {
    windows: Vec<Window>,
    texts: Vec<String>,
    tz: jiff::tz::TimeZone,
    tz_name: String,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.windows == other.windows && self.tz_name == other.tz_name
    }
}

impl Eq for Schedule {}

impl Schedule {
    /// Parses windows and a time zone name (empty: the system's).
    pub fn new(windows: &[String], timezone: &str) -> Result<Self, String> {
        let (tz, tz_name) = if timezone.is_empty() {
            let tz = jiff::tz::TimeZone::system();
            let name = tz
                .iana_name()
                .unwrap_or("the system's time zone")
                .to_owned();
            (tz, name)
        } else {
            let tz = jiff::tz::TimeZone::get(timezone).map_err(|e| {
                format!(
                    "timezone = {timezone:?} is not a time zone ({e}); write an IANA name like \"Europe/Berlin\" or \"America/New_York\", or \"UTC\""
                )
            })?;
            (tz, timezone.to_owned())
        };
        Ok(Self {
            windows: windows
                .iter()
                .map(|w| Window::parse(w))
                .collect::<Result<_, _>>()?,
            texts: windows.to_vec(),
            tz,
            tz_name,
        })
    }

    /// Whether the GPU is lent at `at` (seconds since the epoch).
    pub fn open_at(&self, at: i64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let Ok(ts) = jiff::Timestamp::from_second(at) else {
            return false;
        };
        let z = ts.to_zoned(self.tz.clone());
        let d = usize::from(z.weekday().to_monday_zero_offset().unsigned_abs());
        let m = u16::try_from(i32::from(z.hour()) * 60 + i32::from(z.minute())).unwrap_or(0);
        self.windows.iter().any(|w| w.contains(d, m))
    }

    /// The next minute (within a week) at which the window state differs
    /// from now's, in the schedule's time zone.
    pub fn next_change(&self, at: i64) -> Option<String> {
        let now = self.open_at(at);
        let start = at - at.rem_euclid(60) + 60;
        (0..7 * 24 * 60 + 1)
            .map(|i| start + i * 60)
            .find(|&t| self.open_at(t) != now)
            .and_then(|t| jiff::Timestamp::from_second(t).ok())
            .map(|t| {
                t.to_zoned(self.tz.clone())
                    .strftime("%a %H:%M %Z")
                    .to_string()
            })
    }

    /// The windows as written, with the time zone.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.texts.join(", "), self.tz_name)
    }
}

/// What a GPU is, for finding it in NVML and sysfs.
#[derive(Debug, Clone)]
pub struct GpuId {
    pub index: usize,
    pub vendor: u32,
    pub pci_bus_id: String,
}

/// Reads the signals of owner activity.
#[derive(Debug)]
pub struct Probe {
    config: IdleConfig,
    gpus: Vec<GpuId>,
    nvml: Option<crate::nvml::Nvml>,
    /// Each GPU's NVML device, when NVML has one for it.
    nvml_index: Vec<Option<u32>>,
}

const NVIDIA: u32 = 0x10de;
const AMD: u32 = 0x1002;

impl Probe {
    /// A probe for `gpus`; NVML is loaded now if asked for and present.
    pub fn new(config: IdleConfig, gpus: Vec<GpuId>) -> Self {
        let wants_nvml = config.nvml && gpus.iter().any(|g| g.vendor == NVIDIA);
        let nvml = wants_nvml.then(crate::nvml::Nvml::load).and_then(|r| {
            r.inspect_err(|e| tracing::info!("NVML not used for idle detection: {e}"))
                .ok()
        });
        let nvml_index = gpus
            .iter()
            .map(|g| {
                let n = nvml.as_ref()?;
                (g.vendor == NVIDIA).then(|| n.index_of(&g.pci_bus_id, g.index))?
            })
            .collect();
        Self {
            config,
            gpus,
            nvml,
            nvml_index,
        }
    }

    /// Whether NVML answers.
    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// Why each GPU is busy with its owner's work now (`None`: it is not).
    /// `running[i]` says whether an alliance task runs on GPU `i`: while
    /// one does, its utilisation is not the owner's.
    pub fn sample(&self, running: &[bool]) -> Vec<Option<String>> {
        let mut busy: Vec<Option<String>> = vec![None; self.gpus.len()];
        let all = |busy: &mut Vec<Option<String>>, why: &str| {
            for b in busy.iter_mut() {
                b.get_or_insert_with(|| why.to_owned());
            }
        };
        if let Some(path) = &self.config.busy_file
            && let Ok(text) = std::fs::read_to_string(path)
        {
            let listed: Vec<usize> = text
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter_map(|w| w.parse().ok())
                .collect();
            let why = format!(
                "its owner's signal file {} says it is in use",
                path.display()
            );
            for (i, g) in self.gpus.iter().enumerate() {
                if listed.is_empty() || listed.contains(&g.index) {
                    busy[i].get_or_insert_with(|| why.clone());
                }
            }
        }
        let needs_procs = !self.config.busy_processes.is_empty() || self.nvml.is_some();
        let procs = if needs_procs {
            processes()
        } else {
            Processes::default()
        };
        if let Some((pid, name)) = procs.list.iter().find(|(pid, name)| {
            !procs.ours.contains(pid)
                && self
                    .config
                    .busy_processes
                    .iter()
                    .any(|want| same_program(want, name))
        }) {
            all(
                &mut busy,
                &format!("its owner's program {name} (pid {pid}) is running"),
            );
        }
        if self.config.max_load_percent > 0
            && let Some((load, cores)) = load_per_core()
            && load * 100.0 >= f64::from(self.config.max_load_percent) * cores
        {
            all(
                &mut busy,
                &format!("the system load is {load:.1} on {cores} cores"),
            );
        }
        let threshold = u32::from(self.config.busy_percent);
        for (i, g) in self.gpus.iter().enumerate() {
            if busy[i].is_some() {
                continue;
            }
            let ours = running.get(i).copied().unwrap_or(false);
            if let (Some(n), Some(Some(dev))) = (&self.nvml, self.nvml_index.get(i)) {
                if let Some(pid) = n
                    .compute_pids(*dev)
                    .into_iter()
                    .find(|p| !procs.ours.contains(p))
                {
                    let name = procs
                        .list
                        .iter()
                        .find(|(p, _)| *p == pid)
                        .map_or("another program", |(_, n)| n.as_str());
                    busy[i] = Some(format!("NVML: {name} (pid {pid}) computes on it"));
                } else if !ours
                    && let Some(u) = n.utilization(*dev)
                    && u >= threshold
                {
                    busy[i] = Some(format!("NVML: {u}% busy with other work"));
                }
            } else if self.config.sysfs
                && g.vendor == AMD
                && !ours
                && let Some(u) = amd_busy_percent(&g.pci_bus_id)
                && u >= threshold
            {
                busy[i] = Some(format!("sysfs: gpu_busy_percent {u}%"));
            }
        }
        busy
    }

    /// What NVML sees of GPU `i`: utilisation and compute processes.
    pub fn nvml_view(&self, i: usize) -> Option<(Option<u32>, Vec<u32>)> {
        let n = self.nvml.as_ref()?;
        let dev = (*self.nvml_index.get(i)?)?;
        Some((n.utilization(dev), n.compute_pids(dev)))
    }
}

/// Whether `want` names the program whose process name is `comm` (which
/// the kernel cuts to 15 bytes).
fn same_program(want: &str, comm: &str) -> bool {
    want == comm || (comm.len() == 15 && want.starts_with(comm))
}

#[derive(Debug, Default)]
struct Processes {
    /// (pid, name) of every process.
    list: Vec<(u32, String)>,
    /// This node and its descendants (the sandboxes).
    ours: HashSet<u32>,
}

/// The processes of the machine, from /proc.
fn processes() -> Processes {
    let me = std::process::id();
    let mut list = Vec::new();
    let mut parent = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // "pid (comm) state ppid …": comm may hold spaces and brackets.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let name = stat[open + 1..close].to_owned();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or(0);
            list.push((pid, name));
            parent.push((pid, ppid));
        }
    }
    let mut ours: HashSet<u32> = HashSet::from([me]);
    loop {
        let before = ours.len();
        for (pid, ppid) in &parent {
            if ours.contains(ppid) {
                ours.insert(*pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    Processes { list, ours }
}

/// The one-minute load average and the number of cores.
fn load_per_core() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().ok()?.get();
    #[allow(clippy::cast_precision_loss)]
    Some((load, cores as f64))
}

/// `gpu_busy_percent` of the AMD GPU at `pci_bus_id` (or of the only AMD
/// GPU when the id is unknown).
fn amd_busy_percent(pci_bus_id: &str) -> Option<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/class/drm").ok()?.flatten() {
        let dev = entry.path().join("device");
        let Ok(uevent) = std::fs::read_to_string(dev.join("uevent")) else {
            continue;
        };
        if !uevent.contains("DRIVER=amdgpu") {
            continue;
        }
        let slot = uevent
            .lines()
            .find_map(|l| l.strip_prefix("PCI_SLOT_NAME="))
            .unwrap_or("")
            .to_owned();
        if let Ok(v) = std::fs::read_to_string(dev.join("gpu_busy_percent"))
            && let Ok(v) = v.trim().parse::<u32>()
            && !found.iter().any(|(s, _)| *s == slot)
        {
            found.push((slot, v));
        }
    }
    let id = pci_bus_id.to_ascii_lowercase();
    match found
        .iter()
        .find(|(s, _)| !id.is_empty() && id.ends_with(s.as_str()))
    {
        Some((_, v)) => Some(*v),
        None if found.len() == 1 => Some(found[0].1),
        None => None,
    }
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

    fn at(weekday: &str, hm: &str) -> i64 {
        // 2026-11-30 is a Monday.
        let d = day(weekday).unwrap() as i64;
        let m = i64::from(minutes(hm).unwrap());
        jiff::civil::date(2026, 11, 30)
            .to_zoned(jiff::tz::TimeZone::UTC)
            .unwrap()
            .timestamp()
            .as_second()
            + d * 86_400
            + m * 60
    }

    #[test]
    fn windows_open_and_close() {
        let s = Schedule::new(&["Mon-Fri 19:00-07:00".into(), "Sat-Sun".into()], "UTC").unwrap();
        assert!(!s.open_at(at("mon", "12:00")));
        assert!(s.open_at(at("mon", "19:00")));
        assert!(s.open_at(at("tue", "06:59")));
        assert!(!s.open_at(at("tue", "07:00")));
        assert!(s.open_at(at("sat", "12:00")));
        // Friday night runs into Saturday; Monday 06:00 belongs to Sunday's
        // whole day, not to a Sunday-night span.
        assert!(s.open_at(at("sat", "03:00")));
        assert!(!s.open_at(at("mon", "08:00")));
        assert_eq!(s.next_change(at("mon", "12:00")).unwrap(), "Mon 19:00 UTC");
        let always = Schedule::new(&[], "UTC").unwrap();
        assert!(always.open_at(at("wed", "03:00")));
        assert!(always.next_change(at("wed", "03:00")).is_none());
    }

    #[test]
    fn windows_follow_the_time_zone() {
        let s = Schedule::new(&["daily 09:00-17:00".into()], "America/New_York").unwrap();
        // 15:00 UTC is 10:00 in New York in November.
        assert!(s.open_at(at("wed", "15:00")));
        assert!(!s.open_at(at("wed", "23:00")));
    }

    #[test]
    fn bad_windows_and_zones_say_how_to_write_them() {
        for (w, tz, want) in [
            ("Mon-Fry", "UTC", "\"Fry\" is not a day"),
            ("Mon 25:00-26:00", "UTC", "is not a time"),
            ("12:00-12:00", "UTC", "empty"),
            ("Mon-Fri", "Mars/Olympus", "IANA"),
        ] {
            let e = Schedule::new(&[w.into()], tz).unwrap_err();
            assert!(e.contains(want), "{w} {tz}: {e}");
        }
    }

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

    #[test]
    fn the_signal_file_and_named_processes_mark_gpus_busy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("owner-busy");
        let gpus = vec![
            GpuId {
                index: 0,
                vendor: 0,
                pci_bus_id: String::new(),
            },
            GpuId {
                index: 1,
                vendor: 0,
                pci_bus_id: String::new(),
            },
        ];
        let probe = Probe::new(
            IdleConfig {
                busy_file: Some(file.clone()),
                ..IdleConfig::default()
            },
            gpus.clone(),
        );
        assert_eq!(probe.sample(&[false, false]), vec![None, None]);
        std::fs::write(&file, "1\n").unwrap();
        let s = probe.sample(&[false, false]);
        assert!(s[0].is_none() && s[1].as_deref().unwrap().contains("owner-busy"));
        std::fs::write(&file, "").unwrap();
        assert!(probe.sample(&[false, false]).iter().all(Option::is_some));

        // A real process with the owner's program name.
        // A name no other run of this test uses at the same time.
        let name = format!("owner-{}", std::process::id());
        let prog = dir.path().join(&name);
        std::fs::copy("/bin/sleep", &prog).unwrap();
        let probe = Probe::new(
            IdleConfig {
                busy_processes: vec![name.clone()],
                ..IdleConfig::default()
            },
            gpus,
        );
        assert_eq!(probe.sample(&[false, false]), vec![None, None]);
        let mut child = std::process::Command::new(&prog).arg("30").spawn().unwrap();
        let s = probe.sample(&[false, false]);
        let _ = child.kill();
        let _ = child.wait();
        // Our own children do not count: the process must be another's.
        // `sleep` here is our child, so spawn it through a shell that exits.
        assert_eq!(
            s,
            vec![None, None],
            "our own descendants are not the owner's work"
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "setsid {} 30 >/dev/null 2>&1 & echo $!",
                prog.display()
            ))
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let s = probe.sample(&[false, false]);
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
        assert!(
            s.iter()
                .all(|b| b.as_deref().is_some_and(|w| w.contains(&name))),
            "{s:?}"
        );
    }
}
