//! What an executor keeps between tasks: compiled pipelines (keyed by
//! kernel hash and entry point), idle buffers, timestamp queries.
//!
//! A new pipeline is compiled *and warmed*: some drivers compile a compute
//! shader at its first dispatch, not when the pipeline is made, and for a
//! kernel with barriers in a loop that takes seconds (tens of seconds on
//! Mesa's llvmpipe through GL). Left to the task's first dispatch it would
//! be billed as GPU time and count against the task's deadline. So a new
//! pipeline gets a warm-up dispatch on scratch buffers of the least sizes
//! its bindings take, and the time to make and warm it is compile time,
//! kept apart ([`WarmUp`] says how far the warm-up may go).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{TaskError, error_text};
use crate::gpu::ComputeLimits;
use crate::intake::{self, BufferKind, Kernel, Limits};

/// Compiled pipelines kept.
const MAX_PIPELINES: usize = 64;
/// Bytes of idle buffers kept for reuse.
const MAX_POOLED_BYTES: u64 = 512 << 20;

/// How a new pipeline is warmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmUp {
    /// A dispatch of no workgroups: no code of the kernel runs, which is
    /// what a submitted kernel gets (run on zeroed scratch data it might
    /// never end). It makes lavapipe compile; on llvmpipe through GL the
    /// compile still happens at the task's first dispatch.
    Empty,
    /// One workgroup on zeroed scratch buffers: every driver compiles.
    /// For the standard library's kernels, which end at once on zeros.
    OneWorkgroup,
}

pub(super) struct Pipeline {
    pub(super) pipeline: wgpu::ComputePipeline,
    pub(super) kernel: Kernel,
}

/// Compiled pipelines and idle buffers kept between tasks on one device.
#[derive(Default)]
pub struct Cache {
    pipelines: HashMap<([u8; 32], String), Arc<Pipeline>>,
    order: VecDeque<([u8; 32], String)>,
    buffers: HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>,
    pooled_bytes: u64,
    timer: Option<Timer>,
    /// Pipelines compiled since the cache was made (for tests and metrics).
    pub compiled: u64,
}

/// Two timestamp queries around a batch, and the buffer they resolve into.
pub(super) struct Timer {
    pub(super) queries: wgpu::QuerySet,
    pub(super) resolve: wgpu::Buffer,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("pipelines", &self.pipelines.len())
            .field("pooled_bytes", &self.pooled_bytes)
            .field("compiled", &self.compiled)
            .finish()
    }
}

impl Cache {
    /// The device's timestamp queries, made once; `None` without the feature.
    pub(super) fn timer(&mut self, device: &wgpu::Device) -> Option<&Timer> {
        if !device.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        Some(self.timer.get_or_insert_with(|| Timer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("alliance timing"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("alliance timing"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
        }))
    }

    pub(super) fn buffer(
        &mut self,
        device: &wgpu::Device,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        if let Some(b) = self.buffers.get_mut(&(size, usage)).and_then(Vec::pop) {
            self.pooled_bytes -= size;
            return b;
        }
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("alliance task buffer"),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    pub(super) fn give_back(&mut self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        if self.pooled_bytes + size > MAX_POOLED_BYTES {
            return; // dropped: freed by wgpu
        }
        self.pooled_bytes += size;
        self.buffers
            .entry((size, buffer.usage()))
            .or_default()
            .push(buffer);
    }

    /// The pipeline of `source`'s `entry_point` (whose BLAKE3 is `hash`),
    /// compiled and warmed if new, and how long that took (zero when it
    /// was cached).
    pub(super) fn pipeline(
        &mut self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        kernel: (&str, [u8; 32], &str),
        limits: &Limits,
        device_limits: Option<&ComputeLimits>,
        warm: WarmUp,
    ) -> Result<(Arc<Pipeline>, Duration), TaskError> {
        let (source, hash, entry_point) = kernel;
        let key = (hash, entry_point.to_owned());
        if let Some(p) = self.pipelines.get(&key) {
            let p = Arc::clone(p);
            self.order.retain(|k| k != &key);
            self.order.push_back(key);
            return Ok((p, Duration::ZERO));
        }
        let kernel = intake::check_kernel(source, entry_point, limits, device_limits)?;
        let started = Instant::now();
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("alliance kernel"),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("alliance kernel"),
            layout: None,
            module: &module,
            entry_point: Some(entry_point),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(TaskError::Gpu(error_text(&err)));
        }
        warm_up(device, queue, &pipeline, &kernel, warm)?;
        let compile = started.elapsed();
        self.compiled += 1;
        let p = Arc::new(Pipeline { pipeline, kernel });
        if self.order.len() >= MAX_PIPELINES
            && let Some(old) = self.order.pop_front()
        {
            self.pipelines.remove(&old);
        }
        self.order.push_back(key.clone());
        self.pipelines.insert(key, Arc::clone(&p));
        Ok((p, compile))
    }
}

/// Dispatches `pipeline` as `warm` says on zeroed scratch buffers of the
/// least sizes `kernel`'s bindings take, and waits for it: what makes a
/// driver that compiles at first dispatch compile now.
fn warm_up(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    pipeline: &wgpu::ComputePipeline,
    kernel: &Kernel,
    warm: WarmUp,
) -> Result<(), TaskError> {
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let buffers: Vec<(u32, wgpu::Buffer)> = kernel
        .bindings
        .iter()
        .map(|b| {
            let usage = match b.kind {
                BufferKind::Uniform => wgpu::BufferUsages::UNIFORM,
                BufferKind::Storage { .. } => wgpu::BufferUsages::STORAGE,
            };
            let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("alliance warm-up"),
                size: b.min_bytes.max(4).next_multiple_of(16),
                usage,
                mapped_at_creation: false,
            });
            (b.binding, buffer)
        })
        .collect();
    let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
        .iter()
        .map(|(binding, buffer)| wgpu::BindGroupEntry {
            binding: *binding,
            resource: buffer.as_entire_binding(),
        })
        .collect();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("alliance warm-up"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let mut encoder = device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("alliance warm-up"),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        let n = u32::from(warm == WarmUp::OneWorkgroup);
        pass.dispatch_workgroups(n, n, n);
    }
    let submitted = queue.submit([encoder.finish()]);
    device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(submitted),
            timeout: None,
        })
        .map_err(|e| TaskError::Gpu(format!("the warm-up dispatch did not finish: {e}")))?;
    match pollster::block_on(scope.pop()) {
        Some(err) => Err(TaskError::Gpu(error_text(&err))),
        None => Ok(()),
    }
}
