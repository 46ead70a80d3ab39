//! The executor: runs one task on a device and reads its outputs back.
//!
//! [`run`] takes a `Device` and `Queue` it did not create, so tests call it
//! directly on the software adapter and the sandbox calls it on the GPU it
//! opened. A [`Cache`] keeps compiled pipelines (keyed by kernel hash and
//! entry point) and buffers between tasks.
//!
//! Safety rules kept here:
//! - shaders are created with `create_shader_module`, never the trusted
//!   path, so wgpu's bounds checks, loop bounding and zero-initialised
//!   memory stay on;
//! - pooled buffers are cleared or fully overwritten before a task sees
//!   them, so no task reads another's data;
//! - validation errors, out-of-memory and device loss become
//!   [`TaskError`]s, never panics.

mod cache;
mod transfer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cache::Pipeline;
pub use cache::{Cache, WarmUp};
use transfer::{Bound, Readback};

use serde::{Deserialize, Serialize};

use crate::gpu::ComputeLimits;
use crate::intake::{self, BufferKind, IntakeError, Limits, Supplied};

/// Element type of a buffer, for `.npy` output and float comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ElemType {
    F32,
    U32,
    I32,
    Bytes,
}

impl ElemType {
    /// Bytes per element.
    pub const fn size(self) -> u64 {
        match self {
            ElemType::F32 | ElemType::U32 | ElemType::I32 => 4,
            ElemType::Bytes => 1,
        }
    }
}

/// The bytes that fill a buffer.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Data {
    /// Carried with the task.
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Read from a file (a blob in the worker's store) straight into the
    /// GPU's upload buffer; the file must hold exactly `len` bytes.
    File { path: PathBuf, len: u64 },
}

impl Data {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Data::Bytes(b) => b.len() as u64,
            Data::File { len, .. } => *len,
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for Data {
    fn from(bytes: Vec<u8>) -> Self {
        Data::Bytes(bytes)
    }
}

impl std::fmt::Debug for Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Data::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Data::File { path, len } => write!(f, "File({}, {len} bytes)", path.display()),
        }
    }
}

/// One buffer of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Binding {
    /// A storage buffer filled with `data` (the kernel may declare it `read`).
    Input { binding: u32, data: Data },
    /// A uniform buffer filled with `data`.
    Uniform { binding: u32, data: Data },
    /// A zeroed read-write storage buffer of `len` elements, read back.
    Output {
        binding: u32,
        len: u64,
        elem: ElemType,
    },
    /// A read-write storage buffer that carries state across steps:
    /// filled with `data`, read back, and handed out in checkpoints.
    State {
        binding: u32,
        data: Data,
        elem: ElemType,
    },
}

impl Binding {
    /// The `@binding(N)` number.
    pub fn binding(&self) -> u32 {
        match self {
            Binding::Input { binding, .. }
            | Binding::Uniform { binding, .. }
            | Binding::Output { binding, .. }
            | Binding::State { binding, .. } => *binding,
        }
    }

    /// Bytes of data the buffer holds.
    pub fn bytes(&self) -> u64 {
        match self {
            Binding::Input { data, .. }
            | Binding::Uniform { data, .. }
            | Binding::State { data, .. } => data.len(),
            Binding::Output { len, elem, .. } => len.saturating_mul(elem.size()),
        }
    }

    fn kind(&self) -> BufferKind {
        match self {
            Binding::Uniform { .. } => BufferKind::Uniform,
            Binding::Input { .. } => BufferKind::Storage { read_only: true },
            Binding::Output { .. } | Binding::State { .. } => {
                BufferKind::Storage { read_only: false }
            }
        }
    }
}

/// Bytes of the dispatch-info uniform: `step, steps, task, task_count` as u32.
pub const INFO_BYTES: u64 = 16;

/// Everything needed to run one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// WGSL source.
    pub kernel: String,
    pub entry_point: String,
    pub bindings: Vec<Binding>,
    /// Workgroups along x, y, z.
    pub dispatch: [u32; 3],
    /// Total steps: the dispatch repeats this many times on the same buffers.
    pub steps: u32,
    /// Steps already done (non-zero when resuming from a checkpoint whose
    /// state the `State` bindings carry).
    pub start_step: u32,
    /// Hand back the state buffers every this many steps.
    pub checkpoint_every: Option<u32>,
    /// Binding of an optional uniform `struct { step: u32, steps: u32,
    /// task: u32, task_count: u32 }`, filled before every dispatch.
    pub info_binding: Option<u32>,
    /// This task's index in its array job, and the job's task count.
    pub task_index: u32,
    pub task_count: u32,
    /// Write outputs to files `<dir>/out-<binding>` instead of returning
    /// their bytes (for large outputs that go on to the blob store).
    pub output_dir: Option<PathBuf>,
}

impl Task {
    /// A one-step task with no info uniform.
    pub fn new(
        kernel: impl Into<String>,
        entry_point: impl Into<String>,
        bindings: Vec<Binding>,
        dispatch: [u32; 3],
    ) -> Self {
        Self {
            kernel: kernel.into(),
            entry_point: entry_point.into(),
            bindings,
            dispatch,
            steps: 1,
            start_step: 0,
            checkpoint_every: None,
            info_binding: None,
            task_index: 0,
            task_count: 1,
            output_dir: None,
        }
    }

    /// The blake3 hash of the kernel source.
    pub fn kernel_hash(&self) -> [u8; 32] {
        *blake3::hash(self.kernel.as_bytes()).as_bytes()
    }
}

/// A buffer read back after the task.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub binding: u32,
    pub elem: ElemType,
    /// Length in bytes.
    pub len: u64,
    /// The bytes, unless they were written to `file`.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Where the bytes were written, when the task asked for files.
    pub file: Option<PathBuf>,
    /// blake3 of the bytes.
    pub hash: [u8; 32],
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("binding", &self.binding)
            .field("elem", &self.elem)
            .field("len", &self.len)
            .field("file", &self.file)
            .field(
                "hash",
                &blake3::Hash::from_bytes(self.hash).to_hex().as_str()[..16].to_owned(),
            )
            .finish()
    }
}

/// How the GPU time was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Timing {
    /// GPU timestamp queries around the dispatches.
    GpuTimestamps,
    /// Wall time from submission to completion (the adapter has no timestamps).
    WallClock,
}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Output and state buffers, by binding.
    pub outputs: Vec<Output>,
    /// GPU time of the dispatches.
    pub gpu_time: Duration,
    pub timing: Timing,
    /// Time to compile and warm the kernel's pipeline (zero when the
    /// executor had it already): not GPU work, billed apart from it.
    #[serde(default)]
    pub compile_time: Duration,
}

/// The state buffers after `step` steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u32,
    pub state: Vec<Output>,
}

/// Why a task did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TaskError {
    #[error("the task was refused: {0}")]
    Intake(#[from] IntakeError),
    #[error("the GPU refused the work: {0}")]
    Gpu(String),
    #[error("the GPU ran out of memory: {0}")]
    OutOfMemory(String),
    #[error("the GPU device was lost: {0}")]
    DeviceLost(String),
    #[error("the task ran past its deadline of {0:?} and was stopped")]
    Timeout(Duration),
    #[error("the kernel took longer than {0:?} to compile and was stopped")]
    CompileTimeout(Duration),
    #[error("the sandbox process died: {0}")]
    Crashed(String),
    #[error("the sandbox failed: {0}")]
    Sandbox(String),
    #[error("stopped by the caller at step {0}")]
    Stopped(u32),
    #[error("{0}")]
    Io(String),
}

pub(crate) fn error_text(err: &wgpu::Error) -> String {
    match err {
        wgpu::Error::Validation { description, .. } | wgpu::Error::Internal { description, .. } => {
            description.clone()
        }
        other => other.to_string(),
    }
}

/// Errors the device reports outside error scopes, and device loss.
#[derive(Debug, Default, Clone)]
pub struct DeviceErrors {
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl DeviceErrors {
    /// Installs handlers on `device` that record errors instead of panicking.
    pub fn install(device: &wgpu::Device) -> Self {
        let me = Self::default();
        let errors = Arc::clone(&me.errors);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = errors.lock() {
                v.push(error_text(&e));
            }
        }));
        let lost = Arc::clone(&me.lost);
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost.lock() {
                *l = Some(format!("{reason:?}: {message}"));
            }
        });
        me
    }

    fn check(&self) -> Result<(), TaskError> {
        if let Some(lost) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(TaskError::DeviceLost(lost));
        }
        let errors: Vec<String> = self
            .errors
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        if !errors.is_empty() {
            return Err(TaskError::Gpu(errors.join("; ")));
        }
        Ok(())
    }
}

/// A device opened for running tasks, with its error handlers and cache.
pub struct Executor {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub cache: Cache,
    pub limits: Limits,
    pub device_limits: ComputeLimits,
    errors: DeviceErrors,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Opens a device on `adapter` with its full limits and, where
    /// supported, timestamp queries.
    pub fn open(adapter: &wgpu::Adapter, limits: Limits) -> Result<Self, TaskError> {
        // Timestamp queries time hardware GPUs; on software adapters they
        // cost about as much as a small task, and wall time measures the
        // same CPU work anyway.
        let software = adapter.get_info().device_type == wgpu::DeviceType::Cpu;
        let features = if software {
            wgpu::Features::empty()
        } else {
            adapter.features() & wgpu::Features::TIMESTAMP_QUERY
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("alliance worker"),
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| TaskError::Gpu(format!("cannot open the GPU: {e}")))?;
        let errors = DeviceErrors::install(&device);
        Ok(Self {
            device_limits: ComputeLimits::from_wgpu(&adapter.limits()),
            device,
            queue,
            cache: Cache::default(),
            limits,
            errors,
        })
    }

    /// Compiles `task`'s pipeline unless it is cached (warmed by an empty
    /// dispatch: none of its code runs before the task), and says
    /// how long that took: what [`Executor::run`] then does not pay.
    pub fn prepare(&mut self, task: &Task) -> Result<Duration, TaskError> {
        let kernel = (
            task.kernel.as_str(),
            task.kernel_hash(),
            task.entry_point.as_str(),
        );
        self.compile(kernel, WarmUp::Empty)
    }

    /// Compiles the pipeline of `source`'s `entry_point` and runs one
    /// workgroup of it on zeroed scratch buffers, so every driver has
    /// compiled it: what a worker does with the standard library's kernels
    /// when it starts. Only for kernels that end at once on zeros.
    pub fn warm(&mut self, source: &str, entry_point: &str) -> Result<Duration, TaskError> {
        let hash = *blake3::hash(source.as_bytes()).as_bytes();
        self.compile((source, hash, entry_point), WarmUp::OneWorkgroup)
    }

    fn compile(
        &mut self,
        kernel: (&str, [u8; 32], &str),
        warm: WarmUp,
    ) -> Result<Duration, TaskError> {
        let compiled = self.cache.pipeline(
            &self.device,
            &self.queue,
            kernel,
            &self.limits,
            Some(&self.device_limits),
            warm,
        );
        self.errors.check()?;
        compiled.map(|(_, took)| took)
    }

    /// Runs `task`, calling `on_checkpoint` every `checkpoint_every` steps.
    pub fn run(
        &mut self,
        task: &Task,
        on_checkpoint: &mut dyn FnMut(Checkpoint) -> Result<(), TaskError>,
    ) -> Result<Outcome, TaskError> {
        let result = run(
            &self.device,
            &self.queue,
            &mut self.cache,
            task,
            &self.limits,
            Some(&self.device_limits),
            on_checkpoint,
        );
        // Errors reported outside scopes (or loss) override a result that
        // looked fine.
        self.errors.check()?;
        result
    }
}

/// What `task` supplies for each binding, the info uniform included.
fn supplied(task: &Task) -> Vec<Supplied> {
    let mut supplied: Vec<Supplied> = task
        .bindings
        .iter()
        .map(|b| Supplied {
            binding: b.binding(),
            kind: b.kind(),
            bytes: b.bytes(),
        })
        .collect();
    if let Some(binding) = task.info_binding {
        supplied.push(Supplied {
            binding,
            kind: BufferKind::Uniform,
            bytes: INFO_BYTES,
        });
    }
    supplied
}

/// Checks `task`'s bindings, dispatch and steps against a kernel already
/// checked by [`intake::check_kernel`] (a worker keeps those by hash).
pub fn check_bindings(
    kernel: &intake::Kernel,
    task: &Task,
    limits: &Limits,
    device_limits: Option<&ComputeLimits>,
) -> Result<(), IntakeError> {
    intake::check_task(
        kernel,
        &supplied(task),
        task.dispatch,
        task.steps,
        task.checkpoint_every,
        limits,
        device_limits,
    )?;
    if task.start_step >= task.steps {
        return Err(IntakeError::NoSteps);
    }
    Ok(())
}

/// Checks `task` by the rules a worker applies before it runs it (kernel
/// intake, bindings, dispatch, steps), without a GPU: what a submitter
/// runs before anything leaves its machine.
pub fn check(
    task: &Task,
    limits: &Limits,
    device_limits: Option<&ComputeLimits>,
) -> Result<intake::Kernel, IntakeError> {
    let kernel = intake::check_kernel(&task.kernel, &task.entry_point, limits, device_limits)?;
    check_bindings(&kernel, task, limits, device_limits)?;
    Ok(kernel)
}

/// Runs one task on `device`. See the module documentation.
pub fn run(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    cache: &mut Cache,
    task: &Task,
    limits: &Limits,
    device_limits: Option<&ComputeLimits>,
    on_checkpoint: &mut dyn FnMut(Checkpoint) -> Result<(), TaskError>,
) -> Result<Outcome, TaskError> {
    let kernel = (
        task.kernel.as_str(),
        task.kernel_hash(),
        task.entry_point.as_str(),
    );
    let (pipeline, compile_time) =
        cache.pipeline(device, queue, kernel, limits, device_limits, WarmUp::Empty)?;
    check_bindings(&pipeline.kernel, task, limits, device_limits)?;

    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let result = execute(device, queue, cache, &pipeline, task, on_checkpoint);
    let scoped = pollster::block_on(scope.pop());
    match (result, scoped) {
        (_, Some(err)) => Err(TaskError::Gpu(error_text(&err))),
        (result, None) => result.map(|o| Outcome { compile_time, ..o }),
    }
}

/// Dispatches submitted together at most, between waits.
const MAX_BATCH: u32 = 1024;

/// Binds every buffer of `task`: uploads data, records clears of outputs
/// into `encoder`, and adds the info uniform when the task has one.
fn bind(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    cache: &mut Cache,
    task: &Task,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<(Vec<Bound>, Option<wgpu::Buffer>), TaskError> {
    use wgpu::BufferUsages as U;
    let mut bound = Vec::new();
    let mut uploads = Vec::new();
    for b in &task.bindings {
        let len = b.bytes();
        let (usage, data, read_back, state) = match b {
            Binding::Input { data, .. } => (U::STORAGE | U::COPY_DST, Some(data), None, false),
            Binding::Uniform { data, .. } => (U::UNIFORM | U::COPY_DST, Some(data), None, false),
            Binding::Output { elem, .. } => (
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                None,
                Some(*elem),
                false,
            ),
            Binding::State { data, elem, .. } => (
                U::STORAGE | U::COPY_DST | U::COPY_SRC,
                Some(data),
                Some(*elem),
                true,
            ),
        };
        let buffer = cache.buffer(device, transfer::padded(len), usage);
        match data {
            Some(d) => uploads.push((buffer.clone(), d)),
            None => encoder.clear_buffer(&buffer, 0, None),
        }
        bound.push(Bound {
            binding: b.binding(),
            buffer,
            len,
            read_back,
            state,
        });
    }
    let pairs: Vec<(&wgpu::Buffer, &Data)> = uploads.iter().map(|(b, d)| (b, *d)).collect();
    transfer::upload_all(queue, &pairs)?;
    let info = task.info_binding.map(|binding| {
        let buffer = cache.buffer(device, INFO_BYTES, U::UNIFORM | U::COPY_DST);
        bound.push(Bound {
            binding,
            buffer: buffer.clone(),
            len: INFO_BYTES,
            read_back: None,
            state: false,
        });
        buffer
    });
    Ok((bound, info))
}

fn execute(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    cache: &mut Cache,
    pipeline: &Pipeline,
    task: &Task,
    on_checkpoint: &mut dyn FnMut(Checkpoint) -> Result<(), TaskError>,
) -> Result<Outcome, TaskError> {
    let mut first = Some(device.create_command_encoder(&Default::default()));
    let (bound, info) = match first.as_mut() {
        Some(encoder) => bind(device, queue, cache, task, encoder)?,
        None => return Err(TaskError::Gpu("no command encoder".into())),
    };
    let entries: Vec<wgpu::BindGroupEntry<'_>> = bound
        .iter()
        .map(|b| wgpu::BindGroupEntry {
            binding: b.binding,
            resource: b.buffer.as_entire_binding(),
        })
        .collect();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("alliance task"),
        layout: &pipeline.pipeline.get_bind_group_layout(0),
        entries: &entries,
    });
    let timer = cache
        .timer(device)
        .map(|t| (t.queries.clone(), t.resolve.clone()));
    let period = f64::from(queue.get_timestamp_period());
    let mut gpu_ns = 0f64;
    let started = Instant::now();

    let [x, y, z] = task.dispatch;
    let mut step = task.start_step;
    let outputs = loop {
        let mut end = task.steps.min(step.saturating_add(MAX_BATCH));
        if let Some(k) = task.checkpoint_every {
            end = end.min((step / k + 1).saturating_mul(k));
        }
        let table = info.as_ref().map(|_| {
            let rows: Vec<u8> = (step..end)
                .flat_map(|s| [s, task.steps, task.task_index, task.task_count])
                .flat_map(u32::to_le_bytes)
                .collect();
            let t = cache.buffer(
                device,
                u64::from(end - step) * INFO_BYTES,
                wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            );
            queue.write_buffer(&t, 0, &rows);
            t
        });
        let mut encoder = first
            .take()
            .unwrap_or_else(|| device.create_command_encoder(&Default::default()));
        // With an info uniform, each step is a pass of its own after a copy
        // of its row; without, all steps are dispatches in one pass.
        let passes = if info.is_some() { end - step } else { 1 };
        for p in 0..passes {
            if let (Some(info), Some(table)) = (&info, &table) {
                encoder.copy_buffer_to_buffer(
                    table,
                    u64::from(p) * INFO_BYTES,
                    info,
                    0,
                    INFO_BYTES,
                );
            }
            let (first_pass, last_pass) = (p == 0, p + 1 == passes);
            let timestamp_writes =
                timer
                    .as_ref()
                    .filter(|_| first_pass || last_pass)
                    .map(|(q, _)| wgpu::ComputePassTimestampWrites {
                        query_set: q,
                        beginning_of_pass_write_index: first_pass.then_some(0),
                        end_of_pass_write_index: last_pass.then_some(1),
                    });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("alliance task"),
                timestamp_writes,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            for _ in 0..(if info.is_some() { 1 } else { end - step }) {
                pass.dispatch_workgroups(x, y, z);
            }
        }
        if let Some((q, r)) = &timer {
            encoder.resolve_query_set(q, 0..2, r, 0);
        }
        step = end;
        let last = step >= task.steps;
        let checkpoint = !last
            && task
                .checkpoint_every
                .is_some_and(|k| step.is_multiple_of(k));
        let which = |b: &Bound| {
            if last {
                b.read_back.is_some()
            } else {
                checkpoint && b.state
            }
        };
        let readback = Readback::record(
            device,
            cache,
            &mut encoder,
            &bound,
            which,
            timer.as_ref().map(|(_, r)| r),
        );
        queue.submit([encoder.finish()]);
        let dir = if last {
            task.output_dir.as_deref()
        } else {
            None
        };
        let (read, ticks) = readback.finish(device, cache, &bound, dir)?;
        if let Some(t) = table {
            cache.give_back(t);
        }
        if let Some((begin, end)) = ticks {
            gpu_ns += end.saturating_sub(begin) as f64 * period;
        }
        if last {
            break read;
        }
        if checkpoint {
            on_checkpoint(Checkpoint { step, state: read })?;
        }
    };
    for b in bound {
        cache.give_back(b.buffer);
    }
    let (gpu_time, timing) = if timer.is_some() && gpu_ns > 0.0 {
        (Duration::from_secs_f64(gpu_ns / 1e9), Timing::GpuTimestamps)
    } else {
        (started.elapsed(), Timing::WallClock)
    };
    Ok(Outcome {
        outputs,
        gpu_time,
        timing,
        compile_time: Duration::ZERO,
    })
}
