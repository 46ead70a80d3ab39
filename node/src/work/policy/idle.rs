//! Idle detection: the signals that say the owner is at work on a GPU:
//! NVML on NVIDIA GPUs (loaded at run time, absent is not an error), sysfs
//! `gpu_busy_percent` on AMD GPUs, named processes, the system load, and a
//! signal file that scripts (or tests) create while the owner needs the
//! GPUs.

use std::collections::HashSet;

use super::IdleConfig;

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
    nvml: Option<crate::work::policy::nvml::Nvml>,
    /// Each GPU's NVML device, when NVML has one for it.
    nvml_index: Vec<Option<u32>>,
}

pub(super) const NVIDIA: u32 = 0x10de;

pub(super) const AMD: u32 = 0x1002;

impl Probe {
    /// A probe for `gpus`; NVML is loaded now if asked for and present.
    pub fn new(config: IdleConfig, gpus: Vec<GpuId>) -> Self {
        let wants_nvml = config.nvml && gpus.iter().any(|g| g.vendor == NVIDIA);
        let nvml = wants_nvml
            .then(crate::work::policy::nvml::Nvml::load)
            .and_then(|r| {
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
pub(super) fn same_program(want: &str, comm: &str) -> bool {
    want == comm || (comm.len() == 15 && want.starts_with(comm))
}

#[derive(Debug, Default)]
pub(super) struct Processes {
    /// (pid, name) of every process.
    list: Vec<(u32, String)>,
    /// This node and its descendants (the sandboxes).
    ours: HashSet<u32>,
}

/// The processes of the machine, from /proc.
pub(super) fn processes() -> Processes {
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
pub(super) fn load_per_core() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load: f64 = text.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().ok()?.get();
    #[allow(clippy::cast_precision_loss)]
    Some((load, cores as f64))
}

/// `gpu_busy_percent` of the AMD GPU at `pci_bus_id` (or of the only AMD
/// GPU when the id is unknown).
pub(super) fn amd_busy_percent(pci_bus_id: &str) -> Option<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
