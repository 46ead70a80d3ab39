//! A short self-benchmark per adapter: streaming copy bandwidth and FMA
//! throughput, for matching tasks to GPUs and estimating finish times.
//!
//! It runs in well under a second on a software adapter and is cached on
//! disk per adapter and driver version, so a node measures once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::executor::{Binding, ElemType, Executor, Task, TaskError};
use crate::gpu::AdapterReport;

/// What the self-benchmark measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Streaming copy bandwidth (bytes read plus written), GB/s.
    pub copy_gb_per_s: f64,
    /// Fused multiply-add throughput, GFLOP/s (an FMA counts as 2).
    pub fma_gflop_per_s: f64,
}

/// Sizes for one run; software adapters get small ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// Bytes copied per run.
    pub copy_bytes: u64,
    /// Invocations of the FMA kernel.
    pub fma_invocations: u32,
    /// FMA rounds per invocation.
    pub fma_iterations: u32,
    /// Runs of each kernel; the best counts.
    pub repeats: u32,
}

impl Sizes {
    /// Sizes that fit the adapter: a GPU gets enough work to reach its
    /// speed, a software adapter stays quick.
    pub fn for_adapter(report: &AdapterReport) -> Self {
        if report.software {
            Self {
                copy_bytes: 16 << 20,
                fma_invocations: 1 << 14,
                fma_iterations: 256,
                repeats: 3,
            }
        } else {
            Self {
                copy_bytes: 256 << 20,
                fma_invocations: 1 << 20,
                fma_iterations: 4096,
                repeats: 5,
            }
        }
    }
}

fn best(executor: &mut Executor, task: &Task, repeats: u32) -> Result<Duration, TaskError> {
    let mut best = Duration::MAX;
    // One run to warm the pipeline cache and the buffer pool.
    executor.run(task, &mut |_| Ok(()))?;
    for _ in 0..repeats {
        let out = executor.run(task, &mut |_| Ok(()))?;
        best = best.min(out.gpu_time);
    }
    Ok(best.max(Duration::from_nanos(1)))
}

/// Runs both kernels on `executor`.
pub fn measure(executor: &mut Executor, sizes: Sizes) -> Result<Figures, TaskError> {
    let vec4s = sizes.copy_bytes / 16;
    let groups = u32::try_from(vec4s.div_ceil(256)).unwrap_or(u32::MAX);
    // Spread the workgroups over y so no dimension passes 65535.
    let (gx, gy) = (groups.min(32_768), groups.div_ceil(32_768));
    let copy = Task::new(
        include_str!("../kernels/bench_copy.wgsl"),
        "main",
        vec![
            Binding::Input {
                binding: 0,
                data: vec![0u8; usize::try_from(sizes.copy_bytes).unwrap_or(0)].into(),
            },
            Binding::Output {
                binding: 1,
                len: vec4s * 4,
                elem: ElemType::F32,
            },
        ],
        [gx, gy, 1],
    );
    let copy_time = best(executor, &copy, sizes.repeats)?;
    let fma = Task::new(
        include_str!("../kernels/bench_fma.wgsl"),
        "main",
        vec![
            Binding::Uniform {
                binding: 0,
                data: sizes.fma_iterations.to_le_bytes().to_vec().into(),
            },
            Binding::Output {
                binding: 1,
                len: u64::from(sizes.fma_invocations) * 4,
                elem: ElemType::F32,
            },
        ],
        [sizes.fma_invocations.div_ceil(256), 1, 1],
    );
    let fma_time = best(executor, &fma, sizes.repeats)?;
    let flops = f64::from(sizes.fma_invocations) * f64::from(sizes.fma_iterations) * 32.0;
    Ok(Figures {
        copy_gb_per_s: 2.0 * sizes.copy_bytes as f64 / copy_time.as_secs_f64() / 1e9,
        fma_gflop_per_s: flops / fma_time.as_secs_f64() / 1e9,
    })
}

/// The cache file for an adapter: one per adapter, driver and version.
pub fn cache_path(dir: &Path, report: &AdapterReport) -> PathBuf {
    let key = format!(
        "{}|{:x}|{:x}|{}|{}|{}|{}",
        report.name,
        report.vendor,
        report.device,
        report.backend,
        report.driver,
        report.driver_info,
        report.pci_bus_id
    );
    dir.join(format!(
        "selfbench-{}.json",
        &blake3::hash(key.as_bytes()).to_hex()[..16]
    ))
}

/// The cached figures for this adapter, or a fresh measurement (saved).
pub fn measure_cached(
    executor: &mut Executor,
    report: &AdapterReport,
    dir: &Path,
) -> Result<Figures, TaskError> {
    let path = cache_path(dir, report);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(figures) = serde_json::from_str::<Figures>(&text)
    {
        return Ok(figures);
    }
    let figures = measure(executor, Sizes::for_adapter(report))?;
    let text = serde_json::to_string_pretty(&figures).map_err(|e| TaskError::Io(e.to_string()))?;
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, text))
        .map_err(|e| {
            TaskError::Io(format!(
                "cannot save the self-benchmark to {}: {e}",
                path.display()
            ))
        })?;
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{self, Selection};
    use crate::intake::Limits;

    #[test]
    fn measures_and_caches_per_adapter() {
        let gpu = gpu::discover(&Selection::All).unwrap().remove(0);
        let mut ex = Executor::open(&gpu.adapter, Limits::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let small = Sizes {
            copy_bytes: 1 << 20,
            fma_invocations: 1024,
            fma_iterations: 64,
            repeats: 1,
        };
        let f = measure(&mut ex, small).unwrap();
        assert!(
            f.copy_gb_per_s > 0.0 && f.copy_gb_per_s.is_finite(),
            "{f:?}"
        );
        assert!(
            f.fma_gflop_per_s > 0.0 && f.fma_gflop_per_s.is_finite(),
            "{f:?}"
        );

        // A cached file is used as it is; another adapter gets another file.
        let path = cache_path(dir.path(), &gpu.report);
        std::fs::write(&path, r#"{"copy_gb_per_s": 1.5, "fma_gflop_per_s": 2.5}"#).unwrap();
        let cached = measure_cached(&mut ex, &gpu.report, dir.path()).unwrap();
        assert_eq!(
            cached,
            Figures {
                copy_gb_per_s: 1.5,
                fma_gflop_per_s: 2.5
            }
        );
        let mut other = gpu.report.clone();
        other.driver_info.push_str(" (updated)");
        assert_ne!(cache_path(dir.path(), &other), path);
    }
}
