//! NVML, the NVIDIA driver's management library, through nvml-wrapper,
//! which loads `libnvidia-ml.so.1` at run time: a node without an NVIDIA
//! driver runs the same binary, and idle detection just has one signal
//! fewer.
//!
//! Only what idle detection needs: each device's utilisation, memory in
//! use, and the processes computing on it.

use nvml_wrapper::Nvml as Library;

/// A loaded and initialised NVML.
pub struct Nvml {
    lib: Library,
}

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvml").finish_non_exhaustive()
    }
}

impl Nvml {
    /// Loads the driver's library and initialises it.
    pub fn load() -> Result<Self, String> {
        Library::init()
            .map(|lib| Self { lib })
            .map_err(|e| format!("NVML is not available ({e})"))
    }

    /// Devices NVML knows.
    pub fn count(&self) -> u32 {
        self.lib.device_count().unwrap_or(0)
    }

    /// NVML's index of the GPU at `pci_bus_id`, or, when the id is
    /// unknown, of the `fallback`-th device.
    pub fn index_of(&self, pci_bus_id: &str, fallback: usize) -> Option<u32> {
        if !pci_bus_id.is_empty()
            && let Ok(i) = self
                .lib
                .device_by_pci_bus_id(pci_bus_id)
                .and_then(|d| d.index())
        {
            return Some(i);
        }
        let i = u32::try_from(fallback).ok()?;
        (i < self.count()).then_some(i)
    }

    /// Percent of the last sample period in which a kernel ran.
    pub fn utilization(&self, index: u32) -> Option<u32> {
        let dev = self.lib.device_by_index(index).ok()?;
        dev.utilization_rates().ok().map(|u| u.gpu)
    }

    /// Bytes of the device's memory in use, and in all.
    pub fn memory(&self, index: u32) -> Option<(u64, u64)> {
        let dev = self.lib.device_by_index(index).ok()?;
        dev.memory_info().ok().map(|m| (m.used, m.total))
    }

    /// Processes with a compute context on the device.
    pub fn compute_pids(&self, index: u32) -> Vec<u32> {
        self.lib
            .device_by_index(index)
            .and_then(|d| d.running_compute_processes())
            .map(|ps| ps.iter().map(|p| p.pid).collect())
            .unwrap_or_default()
    }
}
