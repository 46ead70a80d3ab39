//! GPU discovery: which adapters this machine has, and which of them the
//! owner shares.
//!
//! wgpu lists adapters per backend, so one physical GPU can appear twice
//! (through Vulkan and through GL). [`discover`] keeps one entry per GPU,
//! preferring Vulkan, Metal and DX12 over GL, unless asked for every
//! backend. Software adapters (llvmpipe, lavapipe) are reported as
//! [`DeviceType::Cpu`] and flagged `software`, so nobody mistakes them for
//! a GPU.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The graphics API an adapter is driven through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    Other,
}

impl Backend {
    fn from_wgpu(b: wgpu::Backend) -> Self {
        match b {
            wgpu::Backend::Vulkan => Backend::Vulkan,
            wgpu::Backend::Metal => Backend::Metal,
            wgpu::Backend::Dx12 => Backend::Dx12,
            wgpu::Backend::Gl => Backend::Gl,
            _ => Backend::Other,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Vulkan => "vulkan",
            Backend::Metal => "metal",
            Backend::Dx12 => "dx12",
            Backend::Gl => "gl",
            Backend::Other => "other",
        })
    }
}

/// What kind of device an adapter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    /// A software implementation running on the CPU.
    Cpu,
    Other,
}

impl DeviceType {
    fn from_wgpu(t: wgpu::DeviceType) -> Self {
        match t {
            wgpu::DeviceType::DiscreteGpu => DeviceType::DiscreteGpu,
            wgpu::DeviceType::IntegratedGpu => DeviceType::IntegratedGpu,
            wgpu::DeviceType::VirtualGpu => DeviceType::VirtualGpu,
            wgpu::DeviceType::Cpu => DeviceType::Cpu,
            _ => DeviceType::Other,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceType::DiscreteGpu => "discrete",
            DeviceType::IntegratedGpu => "integrated",
            DeviceType::VirtualGpu => "virtual",
            DeviceType::Cpu => "cpu (software)",
            DeviceType::Other => "other",
        })
    }
}

/// The device limits that decide whether a compute kernel fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeLimits {
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_uniform_buffer_binding_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size: [u32; 3],
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_workgroup_storage_size: u32,
}

impl ComputeLimits {
    pub(crate) fn from_wgpu(l: &wgpu::Limits) -> Self {
        Self {
            max_buffer_size: l.max_buffer_size,
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_uniform_buffer_binding_size: l.max_uniform_buffer_binding_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size: [
                l.max_compute_workgroup_size_x,
                l.max_compute_workgroup_size_y,
                l.max_compute_workgroup_size_z,
            ],
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        }
    }
}

/// A description of one adapter, in plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterReport {
    /// Position in the list [`discover`] returned; stable while the
    /// machine's GPUs and drivers stay the same.
    pub index: usize,
    pub name: String,
    /// PCI vendor id (0 when the backend does not say).
    pub vendor: u32,
    /// PCI device id (0 when the backend does not say).
    pub device: u32,
    pub backend: Backend,
    pub device_type: DeviceType,
    /// Driver name, e.g. "NVIDIA" or "llvmpipe".
    pub driver: String,
    /// Driver version details.
    pub driver_info: String,
    /// PCI bus id where known, e.g. "0000:65:00.0".
    pub pci_bus_id: String,
    /// True for software implementations (llvmpipe, lavapipe, WARP).
    pub software: bool,
    pub limits: ComputeLimits,
    /// Optional wgpu features the adapter supports, by name.
    pub features: Vec<String>,
    /// Whether the adapter can time work with timestamp queries.
    pub timestamps: bool,
}

/// Which adapters the owner shares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// Every adapter found (software ones included when no GPU is present).
    #[default]
    All,
    /// Only these indices of the full list.
    Indices(Vec<usize>),
    /// Adapters whose name contains this text (case-insensitive).
    NameContains(String),
}

/// Why discovery found nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error(
        "no GPU adapter found on any backend; install a Vulkan driver (on Debian: `apt-get install mesa-vulkan-drivers` for the software one) or check that the GPU driver is loaded"
    )]
    NoAdapters,
    #[error("the selection {selection} matches none of the adapters found: {found}")]
    NothingSelected { selection: String, found: String },
}

/// An adapter with its report, ready to open a device on.
#[derive(Debug)]
pub struct Gpu {
    pub report: AdapterReport,
    pub adapter: wgpu::Adapter,
}

/// A wgpu instance on every native backend, configured for compute.
pub fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::VULKAN
            | wgpu::Backends::METAL
            | wgpu::Backends::DX12
            | wgpu::Backends::GL;
    }
    wgpu::Instance::new(desc)
}

/// Backends that drive the GPU natively rank above GL, which we keep only
/// for GPUs no other backend reaches.
fn backend_rank(b: Backend) -> u8 {
    match b {
        Backend::Vulkan | Backend::Metal | Backend::Dx12 => 0,
        Backend::Gl => 1,
        Backend::Other => 2,
    }
}

fn report(index: usize, adapter: &wgpu::Adapter) -> AdapterReport {
    let info = adapter.get_info();
    let features = adapter.features();
    let device_type = DeviceType::from_wgpu(info.device_type);
    AdapterReport {
        index,
        software: device_type == DeviceType::Cpu,
        name: info.name,
        vendor: info.vendor,
        device: info.device,
        backend: Backend::from_wgpu(info.backend),
        device_type,
        driver: info.driver,
        driver_info: info.driver_info,
        pci_bus_id: info.device_pci_bus_id,
        limits: ComputeLimits::from_wgpu(&adapter.limits()),
        features: features.iter_names().map(|(n, _)| n.to_owned()).collect(),
        timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
    }
}

/// Every adapter on every backend, one entry per physical GPU unless
/// `all_backends`, in a stable order (best backend first, then name).
pub fn list(instance: &wgpu::Instance, all_backends: bool) -> Vec<Gpu> {
    let mut adapters: Vec<(AdapterReport, wgpu::Adapter)> =
        pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .into_iter()
            .map(|a| (report(0, &a), a))
            .collect();
    adapters.sort_by(|(a, _), (b, _)| {
        (backend_rank(a.backend), &a.name, &a.pci_bus_id, a.backend).cmp(&(
            backend_rank(b.backend),
            &b.name,
            &b.pci_bus_id,
            b.backend,
        ))
    });
    if !all_backends {
        // A GPU seen through a native backend and through GL: keep the native one.
        let native: Vec<String> = adapters
            .iter()
            .filter(|(r, _)| backend_rank(r.backend) == 0)
            .map(|(r, _)| r.name.clone())
            .collect();
        adapters.retain(|(r, _)| backend_rank(r.backend) == 0 || !native.contains(&r.name));
    }
    adapters
        .into_iter()
        .enumerate()
        .map(|(i, (mut report, adapter))| {
            report.index = i;
            Gpu { report, adapter }
        })
        .collect()
}

/// The adapters `selection` picks from [`list`].
pub fn select(all: Vec<Gpu>, selection: &Selection) -> Result<Vec<Gpu>, DiscoveryError> {
    if all.is_empty() {
        return Err(DiscoveryError::NoAdapters);
    }
    let found = all
        .iter()
        .map(|g| format!("{} {:?}", g.report.index, g.report.name))
        .collect::<Vec<_>>()
        .join(", ");
    let chosen: Vec<Gpu> = match selection {
        Selection::All => all,
        Selection::Indices(idx) => all
            .into_iter()
            .filter(|g| idx.contains(&g.report.index))
            .collect(),
        Selection::NameContains(text) => {
            let text = text.to_lowercase();
            all.into_iter()
                .filter(|g| g.report.name.to_lowercase().contains(&text))
                .collect()
        }
    };
    if chosen.is_empty() {
        return Err(DiscoveryError::NothingSelected {
            selection: format!("{selection:?}"),
            found,
        });
    }
    Ok(chosen)
}

/// The adapters the owner shares: [`list`] then [`select`].
pub fn discover(selection: &Selection) -> Result<Vec<Gpu>, DiscoveryError> {
    select(list(&instance(), false), selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_adapter_with_sane_limits() {
        let gpus = discover(&Selection::All).unwrap();
        assert!(!gpus.is_empty());
        for (i, g) in gpus.iter().enumerate() {
            let r = &g.report;
            assert_eq!(r.index, i);
            assert!(!r.name.is_empty());
            assert!(
                r.limits.max_compute_invocations_per_workgroup >= 64,
                "{r:?}"
            );
            assert!(r.limits.max_storage_buffer_binding_size >= 1 << 20, "{r:?}");
            assert_eq!(r.software, r.device_type == DeviceType::Cpu);
            // The report is what the node stores and prints as JSON.
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(serde_json::from_str::<AdapterReport>(&json).unwrap(), *r);
        }
    }

    #[test]
    fn one_entry_per_gpu_unless_all_backends() {
        let instance = instance();
        let deduped = list(&instance, false);
        let every = list(&instance, true);
        assert!(every.len() >= deduped.len());
        let names: Vec<_> = deduped
            .iter()
            .map(|g| (&g.report.name, &g.report.pci_bus_id))
            .collect();
        for (i, n) in names.iter().enumerate() {
            assert!(!names[..i].contains(n), "{n:?} listed twice");
        }
    }

    #[test]
    fn selection_by_name_and_index() {
        let all = list(&instance(), false);
        let first_name = all[0].report.name.clone();
        let by_name = select(
            list(&instance(), false),
            &Selection::NameContains(first_name.to_uppercase()),
        )
        .unwrap();
        assert!(by_name.iter().all(|g| g.report.name == first_name));
        let by_index = select(list(&instance(), false), &Selection::Indices(vec![0])).unwrap();
        assert_eq!(by_index.len(), 1);
        let err = select(
            list(&instance(), false),
            &Selection::NameContains("no such gpu".into()),
        )
        .unwrap_err();
        assert!(matches!(err, DiscoveryError::NothingSelected { .. }));
        assert!(err.to_string().contains(&first_name), "{err}");
        assert_eq!(
            select(Vec::new(), &Selection::All).unwrap_err(),
            DiscoveryError::NoAdapters
        );
    }
}
