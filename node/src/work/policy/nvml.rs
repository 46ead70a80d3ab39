//! NVML, the NVIDIA driver's management library, loaded at run time: a
//! node without an NVIDIA driver runs the same binary, and idle detection
//! just has one signal fewer.
//!
//! Only what idle detection needs: each device's utilisation and the
//! processes computing on it.
#![allow(unsafe_code)]

use std::ffi::{CString, c_char, c_int, c_uint, c_void};

use libloading::{Library, Symbol};

type Device = *mut c_void;
type Ret = c_int;
const SUCCESS: Ret = 0;
const INSUFFICIENT_SIZE: Ret = 7;

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlProcessInfo_t` of the v2 and v3 calls.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: u64,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

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
    /// Loads `libnvidia-ml.so.1` and initialises it.
    pub fn load() -> Result<Self, String> {
        let mut last = String::new();
        for name in ["libnvidia-ml.so.1", "libnvidia-ml.so"] {
            // SAFETY: loading the NVIDIA driver's own library runs its
            // initialisers, which are written to be loaded this way (it is
            // how nvidia-smi and every monitoring tool use it).
            match unsafe { Library::new(name) } {
                Ok(lib) => {
                    let nvml = Self { lib };
                    // SAFETY: nvmlInit_v2 takes no arguments and returns a status.
                    let ret = unsafe { nvml.call0(b"nvmlInit_v2\0") }?;
                    if ret != SUCCESS {
                        return Err(format!("nvmlInit_v2 returned {ret}"));
                    }
                    return Ok(nvml);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!(
            "the NVIDIA management library is not installed ({last})"
        ))
    }

    /// # Safety
    /// `symbol` must name an NVML function of type `fn() -> nvmlReturn_t`.
    unsafe fn call0(&self, symbol: &[u8]) -> Result<Ret, String> {
        // SAFETY: the caller names a function of this type.
        let f: Symbol<'_, unsafe extern "C" fn() -> Ret> =
            unsafe { self.lib.get(symbol) }.map_err(|e| e.to_string())?;
        // SAFETY: as above.
        Ok(unsafe { f() })
    }

    fn device(&self, index: u32) -> Option<Device> {
        // SAFETY: the documented signature of nvmlDeviceGetHandleByIndex_v2.
        let f: Symbol<'_, unsafe extern "C" fn(c_uint, *mut Device) -> Ret> =
            unsafe { self.lib.get(b"nvmlDeviceGetHandleByIndex_v2\0") }.ok()?;
        let mut dev: Device = std::ptr::null_mut();
        // SAFETY: `dev` is a valid out pointer for the call's duration.
        (unsafe { f(index, &raw mut dev) } == SUCCESS).then_some(dev)
    }

    /// Devices NVML knows.
    pub fn count(&self) -> u32 {
        // SAFETY: the documented signature of nvmlDeviceGetCount_v2.
        let Ok(f) = (unsafe {
            self.lib
                .get::<unsafe extern "C" fn(*mut c_uint) -> Ret>(b"nvmlDeviceGetCount_v2\0")
        }) else {
            return 0;
        };
        let mut n: c_uint = 0;
        // SAFETY: `n` is a valid out pointer.
        if unsafe { f(&raw mut n) } == SUCCESS {
            n
        } else {
            0
        }
    }

    /// NVML's index of the GPU at `pci_bus_id`, or, when the id is
    /// unknown, of the `fallback`-th device.
    pub fn index_of(&self, pci_bus_id: &str, fallback: usize) -> Option<u32> {
        if !pci_bus_id.is_empty()
            && let Ok(id) = CString::new(pci_bus_id)
        {
            // SAFETY: documented signatures of the two calls.
            let by_bus: Result<
                Symbol<'_, unsafe extern "C" fn(*const c_char, *mut Device) -> Ret>,
                _,
            > = unsafe { self.lib.get(b"nvmlDeviceGetHandleByPciBusId_v2\0") };
            let index: Result<Symbol<'_, unsafe extern "C" fn(Device, *mut c_uint) -> Ret>, _> =
                unsafe { self.lib.get(b"nvmlDeviceGetIndex\0") };
            if let (Ok(by_bus), Ok(index)) = (by_bus, index) {
                let mut dev: Device = std::ptr::null_mut();
                let mut i: c_uint = 0;
                // SAFETY: `id` is a NUL-terminated string and the out
                // pointers are valid for the calls.
                if unsafe { by_bus(id.as_ptr(), &raw mut dev) } == SUCCESS
                    && unsafe { index(dev, &raw mut i) } == SUCCESS
                {
                    return Some(i);
                }
            }
        }
        let i = u32::try_from(fallback).ok()?;
        (i < self.count()).then_some(i)
    }

    /// Percent of the last sample period in which a kernel ran.
    pub fn utilization(&self, index: u32) -> Option<u32> {
        let dev = self.device(index)?;
        // SAFETY: the documented signature of nvmlDeviceGetUtilizationRates.
        let f: Symbol<'_, unsafe extern "C" fn(Device, *mut Utilization) -> Ret> =
            unsafe { self.lib.get(b"nvmlDeviceGetUtilizationRates\0") }.ok()?;
        let mut u = Utilization::default();
        // SAFETY: `dev` came from NVML and `u` is a valid out pointer.
        (unsafe { f(dev, &raw mut u) } == SUCCESS).then_some(u.gpu)
    }

    /// Processes with a compute context on the device.
    pub fn compute_pids(&self, index: u32) -> Vec<u32> {
        let Some(dev) = self.device(index) else {
            return Vec::new();
        };
        type Procs = unsafe extern "C" fn(Device, *mut c_uint, *mut ProcessInfo) -> Ret;
        for symbol in [
            &b"nvmlDeviceGetComputeRunningProcesses_v3\0"[..],
            b"nvmlDeviceGetComputeRunningProcesses_v2\0",
        ] {
            // SAFETY: both versions have this signature and this struct.
            let Ok(f) = (unsafe { self.lib.get::<Procs>(symbol) }) else {
                continue;
            };
            let mut infos = vec![ProcessInfo::default(); 64];
            let mut n = c_uint::try_from(infos.len()).unwrap_or(0);
            // SAFETY: `infos` holds `n` entries; NVML writes at most `n`
            // and sets `n` to the number written.
            let ret = unsafe { f(dev, &raw mut n, infos.as_mut_ptr()) };
            if ret == SUCCESS || ret == INSUFFICIENT_SIZE {
                let n = usize::try_from(n).unwrap_or(0).min(infos.len());
                return infos[..n].iter().map(|p| p.pid).collect();
            }
        }
        Vec::new()
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: nvmlShutdown pairs with the nvmlInit_v2 of `load`.
        let _ = unsafe { self.call0(b"nvmlShutdown\0") };
    }
}
