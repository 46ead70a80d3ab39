//! This node's GPUs as the alliance sees them: discovery and self-benchmark
//! results from `alliance-kernels`, turned into the `GpuInfo` entries of a
//! signed `GpuAdvert`.

use alliance_kernels::gpu::{self, AdapterReport};
use alliance_kernels::selfbench::Figures;
use alliance_protocol::advert::{self, GpuBench, GpuInfo, GpuLimits, GpuState};

fn backend(b: gpu::Backend) -> advert::Backend {
    match b {
        gpu::Backend::Vulkan => advert::Backend::Vulkan,
        gpu::Backend::Metal => advert::Backend::Metal,
        gpu::Backend::Dx12 => advert::Backend::Dx12,
        gpu::Backend::Gl => advert::Backend::Gl,
        gpu::Backend::Other => advert::Backend::Other,
    }
}

fn device_type(t: gpu::DeviceType) -> advert::DeviceType {
    match t {
        gpu::DeviceType::DiscreteGpu => advert::DeviceType::DiscreteGpu,
        gpu::DeviceType::IntegratedGpu => advert::DeviceType::IntegratedGpu,
        gpu::DeviceType::VirtualGpu => advert::DeviceType::VirtualGpu,
        gpu::DeviceType::Cpu => advert::DeviceType::Cpu,
        gpu::DeviceType::Other => advert::DeviceType::Other,
    }
}

/// Truncates text from an adapter to what an advert carries.
fn short(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// `x · 1000` as a whole number (0 for negative or non-finite figures).
#[allow(clippy::cast_possible_truncation)] // `as` saturates; the range is checked
fn per_thousand(x: f64) -> u64 {
    let v = (x * 1000.0).round();
    if v.is_finite() && v > 0.0 {
        v as u64
    } else {
        0
    }
}

/// The advert entry for one adapter.
pub fn advert_entry(
    report: &AdapterReport,
    figures: Option<&Figures>,
    state: GpuState,
    free_slots: u16,
) -> GpuInfo {
    let l = &report.limits;
    GpuInfo {
        index: u16::try_from(report.index).unwrap_or(u16::MAX),
        name: short(&report.name, 96),
        vendor: report.vendor,
        device: report.device,
        backend: backend(report.backend),
        device_type: device_type(report.device_type),
        driver: short(
            format!("{} {}", report.driver, report.driver_info).trim(),
            96,
        ),
        limits: GpuLimits {
            max_buffer_size: l.max_buffer_size,
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_uniform_buffer_binding_size: l.max_uniform_buffer_binding_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size: l.max_compute_workgroup_size,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
        },
        bench: figures.map(|f| GpuBench {
            copy_mb_per_s: per_thousand(f.copy_gb_per_s),
            fma_mflops: per_thousand(f.fma_gflop_per_s),
        }),
        state,
        reason: String::new(),
        free_slots,
        terms: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alliance_kernels::gpu::Selection;
    use alliance_protocol::advert::GpuAdvert;
    use alliance_protocol::{Identity, Signed, Timestamp};

    #[test]
    fn discovered_gpus_fit_a_signed_advert() {
        let node = Identity::generate();
        let figures = Figures {
            copy_gb_per_s: 12.5,
            fma_gflop_per_s: 80.25,
        };
        let gpus: Vec<GpuInfo> = gpu::discover(&Selection::All)
            .unwrap()
            .iter()
            .map(|g| advert_entry(&g.report, Some(&figures), GpuState::Idle, 2))
            .collect();
        assert!(!gpus.is_empty());
        assert_eq!(
            gpus[0].bench,
            Some(GpuBench {
                copy_mb_per_s: 12_500,
                fma_mflops: 80_250
            })
        );
        let now = Timestamp::now();
        let advert = GpuAdvert {
            peer: node.public(),
            institution: Identity::generate().public(),
            gpus,
            sequence: 1,
            issued_at: now,
            expires_at: now.saturating_add_secs(120),
        };
        let signed = Signed::sign(&advert, &node).unwrap();
        let back = Signed::<GpuAdvert>::from_bytes(&signed.to_bytes())
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(back, advert);
        back.check(node.public(), now, None).unwrap();
    }
}
