//! The job file: what a researcher writes to run a batch of WGSL tasks.
//!
//! A job file is TOML; `examples/*/job.toml` are commented examples and
//! `JOBS.md` documents every field. [`Job::parse`] reads it with the files
//! it names, found through [`Files`] (uploaded blobs, or a directory for
//! [`Job::load`]): the kernel, and every input (`.npy` or raw
//! little-endian) located but not read into memory, its split across tasks
//! worked out; then checks the whole by the same intake rules a worker
//! applies, and each declared element type against the kernel's, so a bad
//! job is refused with the reason before anything is stored.

mod inputs;
#[cfg(test)]
mod tests;

pub use inputs::{Dir, Files, Input, Located, Source, Uploaded};

use std::path::{Path, PathBuf};
use std::time::Duration;

use alliance_kernels::executor::{Binding, INFO_BYTES, Task};
use alliance_kernels::intake::{self, BufferKind, Limits, Supplied};
use alliance_protocol::task::{Comparison, ElemType};
use serde::{Deserialize, Serialize};

use crate::work::kernels_elem;

/// Tasks one job may hold.
pub const MAX_TASKS: u32 = 100_000;

/// The job file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// A name for people; defaults to the file's name.
    pub name: Option<String>,
    /// The WGSL file (relative to the job file), or `library:NAME` for a
    /// kernel of the standard library.
    pub kernel: String,
    #[serde(default = "default_entry_point")]
    pub entry_point: String,
    /// Workgroups along x, y and z.
    pub dispatch: [u32; 3],
    /// Tasks in the array job; each gets its index and the count in the
    /// info uniform.
    #[serde(default = "one")]
    pub tasks: u32,
    /// Times each task's dispatch repeats on the same buffers.
    #[serde(default = "one")]
    pub steps: u32,
    /// Hand back state buffers every this many steps.
    pub checkpoint_every: Option<u32>,
    /// Per task, from the worker accepting it to its result.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Replicas of every task on different workers.
    #[serde(default)]
    pub redundancy: Redundancy,
    /// How replicas are compared.
    #[serde(default)]
    pub compare: Compare,
    /// Binding of the uniform `struct { step, steps, task, task_count }`.
    pub info_binding: Option<u32>,
    #[serde(default)]
    pub inputs: Vec<InputFile>,
    /// Buffers read back per task (state inputs come back too).
    #[serde(default)]
    pub outputs: Vec<OutputFile>,
    #[serde(default)]
    pub requirements: Requirements,
}

fn default_entry_point() -> String {
    "main".into()
}
const fn one() -> u32 {
    1
}
const fn default_timeout() -> u64 {
    300
}

/// `redundancy = 2`, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Redundancy {
    Replicas(u32),
    Auto(AutoWord),
}

/// The word `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoWord {
    Auto,
}

impl Default for Redundancy {
    fn default() -> Self {
        Self::Replicas(1)
    }
}

/// `compare = "exact"`, or `compare = { abs = 1e-5, rel = 1e-4, ulps = 4 }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Compare {
    Exact(ExactWord),
    Tolerance {
        #[serde(default)]
        abs: f64,
        #[serde(default)]
        rel: f64,
        #[serde(default)]
        ulps: u32,
    },
}

/// The word `exact`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExactWord {
    Exact,
}

impl Default for Compare {
    fn default() -> Self {
        Self::Exact(ExactWord::Exact)
    }
}

/// How an input is bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// A storage buffer (the kernel may declare it `read`).
    #[default]
    Storage,
    /// A uniform buffer.
    Uniform,
    /// A read-write buffer carried across steps and read back at the end.
    State,
}

/// Element types as written in job files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Elem {
    F32,
    U32,
    I32,
    U8,
}

impl From<Elem> for ElemType {
    fn from(e: Elem) -> Self {
        match e {
            Elem::F32 => ElemType::F32,
            Elem::U32 => ElemType::U32,
            Elem::I32 => ElemType::I32,
            Elem::U8 => ElemType::Bytes,
        }
    }
}

/// One input.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputFile {
    pub binding: u32,
    #[serde(default)]
    pub kind: InputKind,
    /// A `.npy` file, or any other file as raw little-endian bytes.
    pub file: Option<PathBuf>,
    /// Values written in the job file instead of a file (needs `type`).
    pub values: Option<Vec<toml::Value>>,
    /// Element type: checked against a `.npy` file's dtype; needed for
    /// `values` and for state buffers.
    #[serde(rename = "type")]
    pub elem: Option<Elem>,
    /// Split evenly across the tasks along the first axis, instead of
    /// every task getting all of it.
    #[serde(default)]
    pub split: bool,
    /// The whole input's shape, for raw files and values (a `.npy` file
    /// carries its own): splitting goes along its first axis, and a state
    /// buffer comes back with the shape of one task's part.
    pub shape: Option<Vec<u64>>,
}

/// One output, per task.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    pub binding: u32,
    #[serde(rename = "type")]
    pub elem: Elem,
    /// Elements per task (the product of `shape` when that is given).
    pub len: Option<u64>,
    /// Each task's output shape, written into its `.npy` header.
    pub shape: Option<Vec<u64>>,
}

/// What a worker must offer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Requirements {
    /// Largest buffer the GPU must allow, in MiB.
    pub min_memory_mib: u64,
    /// Backends to use ("vulkan", "metal", "dx12", "gl"); empty for any.
    pub backends: Vec<String>,
    /// Run only on hardware GPUs, not software adapters.
    pub hardware_only: bool,
    /// Institutions to try first.
    pub prefer_institutions: Vec<String>,
    /// Institutions never to use.
    pub avoid_institutions: Vec<String>,
    /// Compare replicas only with replicas that ran on the same GPU model,
    /// backend and driver (as their receipts name them), and send further
    /// replicas to such GPUs first: for bit-exact floats, which different
    /// GPUs may round differently without anyone lying.
    pub group_by_gpu: bool,
}

/// A loaded output declaration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Output {
    pub binding: u32,
    #[schema(value_type = crate::submit::records::Elem)]
    pub elem: ElemType,
    /// Elements per task.
    pub len: u64,
    /// Each task's shape, when it is more than `[len]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shape: Vec<u64>,
}

impl Output {
    /// Each task's shape: as declared, else `[len]`.
    pub fn dims(&self) -> Vec<u64> {
        if self.shape.is_empty() {
            vec![self.len]
        } else {
            self.shape.clone()
        }
    }
}

/// A job read from its file, with its inputs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: String,
    pub kernel: String,
    pub entry_point: String,
    pub dispatch: [u32; 3],
    pub tasks: u32,
    pub steps: u32,
    pub checkpoint_every: Option<u32>,
    pub timeout: Duration,
    /// Replicas per task; for `redundancy = "auto"`, those an untrusted
    /// worker's result needs.
    pub redundancy: u32,
    /// `redundancy = "auto"`: trusted workers run tasks alone.
    pub adaptive: bool,
    pub comparison: Comparison,
    pub info_binding: Option<u32>,
    pub inputs: Vec<Input>,
    pub outputs: Vec<Output>,
    pub requirements: Requirements,
}

/// Joins a refusal's message to its fix, which the API hands back as the
/// error's hint.
pub const FIX: &str = "\n  fix: ";

/// Why a job was refused; every message names the file and the problem,
/// and many end in the fix (after [`FIX`]).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct JobError {
    pub file: PathBuf,
    pub message: String,
}

impl Job {
    /// Reads, loads and checks the job file at `path`, with the files it
    /// names beside it, against `limits`.
    pub fn load(path: &Path, limits: &Limits) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError {
            file: path.to_owned(),
            message: format!("cannot read it: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, &Dir(base), limits)
    }

    /// Loads and checks the job file `text` (called `path` in messages and
    /// for its default name), finding the files it names through `files`.
    pub fn parse(
        text: &str,
        path: &Path,
        files: &dyn Files,
        limits: &Limits,
    ) -> Result<Self, JobError> {
        let err = |message: String| JobError {
            file: path.to_owned(),
            message,
        };
        let file: JobFile =
            toml::from_str(text).map_err(|e| err(format!("not a valid job file: {e}")))?;
        let job = Self::from_file(file, files, path, limits).map_err(err)?;
        job.check(limits).map_err(err)?;
        Ok(job)
    }

    fn from_file(
        file: JobFile,
        files: &dyn Files,
        path: &Path,
        limits: &Limits,
    ) -> Result<Self, String> {
        let name = file.name.clone().unwrap_or_else(|| {
            path.file_stem()
                .map_or("job".into(), |s| s.to_string_lossy().into_owned())
        });
        let kernel = match file.kernel.strip_prefix("library:") {
            Some(lib) => alliance_kernels::library::get(lib)
                .ok_or_else(|| {
                    format!(
                        "kernel = {:?}: the standard library has no kernel {lib:?} (it has {})",
                        file.kernel,
                        alliance_kernels::library::KERNELS
                            .iter()
                            .map(|k| k.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
                .source
                .to_owned(),
            None => {
                let at = files
                    .locate(&file.kernel)
                    .map_err(|e| format!("kernel = {:?}: {e}", file.kernel))?;
                if at.len > limits.max_source_bytes {
                    return Err(format!(
                        "kernel = {:?}: {} holds {} bytes, above max_source_bytes = {} (the owner's intake limit)",
                        file.kernel, at.shown, at.len, limits.max_source_bytes
                    ));
                }
                std::fs::read_to_string(&at.path).map_err(|e| {
                    format!("kernel = {:?}: cannot read {}: {e}", file.kernel, at.shown)
                })?
            }
        };
        if file.tasks == 0 || file.tasks > MAX_TASKS {
            return Err(format!(
                "tasks = {} must be between 1 and {MAX_TASKS}",
                file.tasks
            ));
        }
        let redundancy = match file.redundancy {
            Redundancy::Replicas(0) => {
                return Err("redundancy = 0: every task needs at least one replica".into());
            }
            Redundancy::Replicas(n) if n > 16 => {
                return Err(format!("redundancy = {n}: at most 16 replicas per task"));
            }
            Redundancy::Replicas(n) => n,
            // Two replicas, of different institutions, for workers without
            // a clean record; one, with spot checks, for trusted workers.
            Redundancy::Auto(_) => 2,
        };
        let adaptive = matches!(file.redundancy, Redundancy::Auto(_));
        let comparison = match file.compare {
            Compare::Exact(_) => Comparison::Exact,
            Compare::Tolerance { abs, rel, ulps } => {
                if !(abs >= 0.0 && rel >= 0.0 && abs.is_finite() && rel.is_finite()) {
                    return Err("compare: abs and rel must be finite and not negative".into());
                }
                Comparison::Tolerance { abs, rel, ulps }
            }
        };
        if file.timeout_secs == 0 {
            return Err("timeout_secs = 0: a task needs time to run".into());
        }
        if file.outputs.is_empty() && !file.inputs.iter().any(|i| i.kind == InputKind::State) {
            return Err(
                "the job has no [[outputs]] (and no state input): it would return nothing".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for b in file
            .inputs
            .iter()
            .map(|i| i.binding)
            .chain(file.outputs.iter().map(|o| o.binding))
            .chain(file.info_binding)
        {
            if !seen.insert(b) {
                return Err(format!("binding {b} is given twice"));
            }
        }
        let inputs = file
            .inputs
            .iter()
            .map(|i| Input::load(i, files, file.tasks))
            .collect::<Result<Vec<_>, _>>()?;
        let mut outputs = file
            .outputs
            .iter()
            .map(output)
            .collect::<Result<Vec<_>, _>>()?;
        // A state buffer's final contents come back like an output.
        outputs.extend(
            inputs
                .iter()
                .filter(|i| i.kind == InputKind::State)
                .map(|i| Output {
                    binding: i.binding,
                    elem: i.elem,
                    len: i.part_len() / i.elem.size(),
                    shape: i.part_shape(),
                }),
        );
        Ok(Self {
            name,
            kernel,
            entry_point: file.entry_point,
            dispatch: file.dispatch,
            tasks: file.tasks,
            steps: file.steps,
            checkpoint_every: file.checkpoint_every,
            timeout: Duration::from_secs(file.timeout_secs),
            redundancy,
            adaptive,
            comparison,
            info_binding: file.info_binding,
            inputs,
            outputs,
            requirements: file.requirements,
        })
    }

    /// Task `index` as the executor would run it, its inputs read.
    pub fn task(&self, index: u32) -> std::io::Result<Task> {
        let mut bindings: Vec<Binding> = self
            .inputs
            .iter()
            .map(|i| {
                let data = i.bytes(index)?.into();
                Ok(match i.kind {
                    InputKind::Storage => Binding::Input {
                        binding: i.binding,
                        data,
                    },
                    InputKind::Uniform => Binding::Uniform {
                        binding: i.binding,
                        data,
                    },
                    InputKind::State => Binding::State {
                        binding: i.binding,
                        data,
                        elem: kernels_elem(i.elem),
                    },
                })
            })
            .collect::<std::io::Result<_>>()?;
        bindings.extend(
            self.outputs
                .iter()
                .filter(|o| !self.is_state(o.binding))
                .map(|o| Binding::Output {
                    binding: o.binding,
                    len: o.len,
                    elem: kernels_elem(o.elem),
                }),
        );
        let mut task = Task::new(&self.kernel, &self.entry_point, bindings, self.dispatch);
        task.steps = self.steps;
        task.checkpoint_every = self.checkpoint_every;
        task.info_binding = self.info_binding;
        task.task_index = index;
        task.task_count = self.tasks;
        Ok(task)
    }

    /// Whether `binding` is a state buffer (an input that comes back).
    pub fn is_state(&self, binding: u32) -> bool {
        self.inputs
            .iter()
            .any(|i| i.binding == binding && i.kind == InputKind::State)
    }

    /// Checks the job by a worker's intake rules with `limits`, from the
    /// sizes of its buffers (split parts are equal, so one task stands for
    /// all), and every declared element type against the kernel's.
    pub fn check(&self, limits: &Limits) -> Result<(), String> {
        let kernel = intake::check_kernel(&self.kernel, &self.entry_point, limits, None)
            .map_err(|e| e.to_string())?;
        let mut supplied: Vec<Supplied> = self
            .inputs
            .iter()
            .map(|i| Supplied {
                binding: i.binding,
                kind: match i.kind {
                    InputKind::Storage => BufferKind::Storage { read_only: true },
                    InputKind::Uniform => BufferKind::Uniform,
                    InputKind::State => BufferKind::Storage { read_only: false },
                },
                bytes: i.part_len(),
            })
            .collect();
        supplied.extend(
            self.outputs
                .iter()
                .filter(|o| !self.is_state(o.binding))
                .map(|o| Supplied {
                    binding: o.binding,
                    kind: BufferKind::Storage { read_only: false },
                    bytes: o.len.saturating_mul(o.elem.size()),
                }),
        );
        if let Some(binding) = self.info_binding {
            supplied.push(Supplied {
                binding,
                kind: BufferKind::Uniform,
                bytes: INFO_BYTES,
            });
        }
        intake::check_task(
            &kernel,
            &supplied,
            self.dispatch,
            self.steps,
            self.checkpoint_every,
            limits,
            None,
        )
        .map_err(|e| e.to_string())?;
        let declared = self
            .inputs
            .iter()
            .map(|i| ("input", i.binding, i.elem, i.from.as_str()))
            .chain(
                self.outputs
                    .iter()
                    .filter(|o| !self.is_state(o.binding))
                    .map(|o| ("output", o.binding, o.elem, "")),
            );
        for (what, binding, elem, from) in declared {
            let Some(info) = kernel.bindings.iter().find(|b| b.binding == binding) else {
                continue;
            };
            check_elem(what, binding, elem, from, &info.name, info.scalar)?;
        }
        Ok(())
    }
}

/// A job file's name for an element type.
pub fn elem_name(e: ElemType) -> &'static str {
    match e {
        ElemType::F32 => "f32",
        ElemType::U32 => "u32",
        ElemType::I32 => "i32",
        ElemType::Bytes => "u8",
    }
}

/// NumPy's name for an element type.
pub fn numpy_name(e: ElemType) -> &'static str {
    match e {
        ElemType::F32 => "float32",
        ElemType::U32 => "uint32",
        ElemType::I32 => "int32",
        ElemType::Bytes => "uint8",
    }
}

/// Refuses a buffer whose elements the job declares as one type while the
/// kernel reads them as another: the bits would be reinterpreted, a
/// silently wrong result. Raw bytes (`u8`) and structs are not compared.
fn check_elem(
    what: &str,
    binding: u32,
    elem: ElemType,
    from: &str,
    var: &str,
    scalar: Option<&'static str>,
) -> Result<(), String> {
    let Some(kernel) = scalar.filter(|s| ["f32", "u32", "i32"].contains(s)) else {
        return Ok(());
    };
    let job = elem_name(elem);
    if elem == ElemType::Bytes || job == kernel {
        return Ok(());
    }
    let fix = match (what, from.is_empty()) {
        ("input", false) => format!(
            "convert the array with a.astype(np.{}) before saving it as {from}",
            numpy_name(match kernel {
                "f32" => ElemType::F32,
                "u32" => ElemType::U32,
                _ => ElemType::I32,
            })
        ),
        _ => format!("write type = \"{kernel}\""),
    };
    Err(format!(
        "{what} binding {binding} is {job} but the kernel declares `{var}` with {kernel} elements{FIX}{fix}, or change the kernel"
    ))
}

/// An output declaration checked: its length and shape agree.
fn output(o: &OutputFile) -> Result<Output, String> {
    let b = o.binding;
    let (len, shape) = match (o.len, &o.shape) {
        (None, None) => {
            return Err(format!(
                "output binding {b}: give its elements per task as len = N or shape = [..]"
            ));
        }
        (Some(len), None) => (len, Vec::new()),
        (len, Some(shape)) => {
            let n = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| format!("output binding {b}: shape {shape:?} is too large"))?;
            if shape.is_empty() || len.is_some_and(|l| l != n) {
                return Err(format!(
                    "output binding {b}: shape {shape:?} holds {n} elements but len = {}; drop len or make them agree",
                    len.unwrap_or(0)
                ));
            }
            (n, shape.clone())
        }
    };
    Ok(Output {
        binding: b,
        elem: o.elem.into(),
        len,
        shape,
    })
}
