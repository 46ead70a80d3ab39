//! What an executor keeps between tasks: compiled pipelines (keyed by
//! kernel hash and entry point), idle buffers, timestamp queries.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{Task, TaskError, error_text};
use crate::gpu::ComputeLimits;
use crate::intake::{self, Kernel, Limits};

/// Compiled pipelines kept.
const MAX_PIPELINES: usize = 64;
/// Bytes of idle buffers kept for reuse.
const MAX_POOLED_BYTES: u64 = 512 << 20;

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

    pub(super) fn pipeline(
        &mut self,
        device: &wgpu::Device,
        task: &Task,
        limits: &Limits,
        device_limits: Option<&ComputeLimits>,
    ) -> Result<Arc<Pipeline>, TaskError> {
        let key = (task.kernel_hash(), task.entry_point.clone());
        if let Some(p) = self.pipelines.get(&key) {
            let p = Arc::clone(p);
            self.order.retain(|k| k != &key);
            self.order.push_back(key);
            return Ok(p);
        }
        let kernel = intake::check_kernel(&task.kernel, &task.entry_point, limits, device_limits)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("alliance kernel"),
            source: wgpu::ShaderSource::Wgsl(task.kernel.as_str().into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("alliance kernel"),
            layout: None,
            module: &module,
            entry_point: Some(&task.entry_point),
            compilation_options: Default::default(),
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(TaskError::Gpu(error_text(&err)));
        }
        self.compiled += 1;
        let p = Arc::new(Pipeline { pipeline, kernel });
        if self.order.len() >= MAX_PIPELINES
            && let Some(old) = self.order.pop_front()
        {
            self.pipelines.remove(&old);
        }
        self.order.push_back(key.clone());
        self.pipelines.insert(key, Arc::clone(&p));
        Ok(p)
    }
}
