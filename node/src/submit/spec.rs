//! The job file: what a researcher writes to run a batch of WGSL tasks.
//!
//! A job file is TOML; `examples/*/job.toml` are commented examples and
//! `JOBS.md` documents every field. [`Job::load`] reads it, reads every
//! input (`.npy` or raw little-endian), splits the inputs that are split
//! across tasks, and checks the result by the same intake rules a worker
//! applies, so a bad job is refused with the reason before anything leaves
//! the machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use alliance_kernels::executor::{self, Binding, Task};
use alliance_kernels::intake::Limits;
use alliance_protocol::task::{Comparison, ElemType};
use serde::{Deserialize, Serialize};

use super::npy;
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
}

/// One output, per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    pub binding: u32,
    #[serde(rename = "type")]
    pub elem: Elem,
    /// Elements per task.
    pub len: u64,
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

/// An input's bytes: the same for every task, or one part per task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parts {
    Shared(Vec<u8>),
    Split(Vec<Vec<u8>>),
}

/// A loaded input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub binding: u32,
    pub kind: InputKind,
    pub elem: ElemType,
    pub parts: Parts,
}

impl Input {
    /// Task `index`'s bytes.
    pub fn bytes(&self, index: u32) -> &[u8] {
        match &self.parts {
            Parts::Shared(b) => b,
            Parts::Split(parts) => parts.get(index as usize).map_or(&[][..], |p| p.as_slice()),
        }
    }
}

/// A loaded output declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub binding: u32,
    pub elem: ElemType,
    /// Elements per task.
    pub len: u64,
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

/// Why a job was refused; every message names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct JobError {
    pub file: PathBuf,
    pub message: String,
}

impl Job {
    /// Reads, loads and checks the job file at `path` against `limits`.
    pub fn load(path: &Path, limits: &Limits) -> Result<Self, JobError> {
        let err = |message: String| JobError {
            file: path.to_owned(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let file: JobFile =
            toml::from_str(&text).map_err(|e| err(format!("not a valid job file: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let job = Self::from_file(file, base, path).map_err(err)?;
        job.check(limits).map_err(err)?;
        Ok(job)
    }

    fn from_file(file: JobFile, base: &Path, path: &Path) -> Result<Self, String> {
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
                let p = base.join(&file.kernel);
                std::fs::read_to_string(&p).map_err(|e| {
                    format!(
                        "kernel = {:?}: cannot read {}: {e}",
                        file.kernel,
                        p.display()
                    )
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
            .map(|i| load_input(i, base, file.tasks))
            .collect::<Result<Vec<_>, _>>()?;
        // A state buffer's final contents come back like an output.
        let outputs = file
            .outputs
            .iter()
            .map(|o| Output {
                binding: o.binding,
                elem: o.elem.into(),
                len: o.len,
            })
            .chain(
                inputs
                    .iter()
                    .filter(|i: &&Input| i.kind == InputKind::State)
                    .map(|i| Output {
                        binding: i.binding,
                        elem: i.elem,
                        len: i.bytes(0).len() as u64 / i.elem.size(),
                    }),
            )
            .collect();
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

    /// Task `index` as the executor would run it.
    pub fn task(&self, index: u32) -> Task {
        let mut bindings: Vec<Binding> = self
            .inputs
            .iter()
            .map(|i| {
                let data = i.bytes(index).to_vec().into();
                match i.kind {
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
                }
            })
            .collect();
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
        task
    }

    /// Whether `binding` is a state buffer (an input that comes back).
    pub fn is_state(&self, binding: u32) -> bool {
        self.inputs
            .iter()
            .any(|i| i.binding == binding && i.kind == InputKind::State)
    }

    /// Checks the job by a worker's intake rules with `limits`.
    pub fn check(&self, limits: &Limits) -> Result<(), String> {
        // Split parts are equal in size, so the first task stands for all.
        executor::check(&self.task(0), limits, None).map_err(|e| e.to_string())?;
        Ok(())
    }
}

fn value_bytes(values: &[toml::Value], elem: Elem, binding: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for (i, v) in values.iter().enumerate() {
        let bad = || {
            format!(
                "input binding {binding}: values[{i}] = {v} is not a {elem:?} value",
                elem = elem
            )
        };
        match elem {
            Elem::F32 => {
                #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
                let x = match v {
                    toml::Value::Float(f) => *f as f32,
                    toml::Value::Integer(n) => *n as f32,
                    _ => return Err(bad()),
                };
                out.extend_from_slice(&x.to_le_bytes());
            }
            Elem::U32 => {
                let n = v
                    .as_integer()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Elem::I32 => {
                let n = v
                    .as_integer()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.extend_from_slice(&n.to_le_bytes());
            }
            Elem::U8 => {
                let n = v
                    .as_integer()
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(bad)?;
                out.push(n);
            }
        }
    }
    Ok(out)
}

fn load_input(i: &InputFile, base: &Path, tasks: u32) -> Result<Input, String> {
    let b = i.binding;
    let declared: Option<ElemType> = i.elem.map(Into::into);
    let (elem, rows, data) = match (&i.file, &i.values) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "input binding {b}: give either file or values, not both"
            ));
        }
        (None, None) => return Err(format!("input binding {b}: give a file or values")),
        (None, Some(values)) => {
            let elem = i.elem.ok_or_else(|| {
                format!("input binding {b}: values need a type (type = \"f32\", \"u32\", \"i32\" or \"u8\")")
            })?;
            (
                elem.into(),
                values.len() as u64,
                value_bytes(values, elem, b)?,
            )
        }
        (Some(f), None) => {
            let p = base.join(f);
            let bytes = std::fs::read(&p)
                .map_err(|e| format!("input binding {b}: cannot read {}: {e}", p.display()))?;
            if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy")) {
                let a = npy::parse(&bytes)
                    .map_err(|e| format!("input binding {b}: {}: {e}", p.display()))?;
                if let Some(d) = declared
                    && d != a.elem
                {
                    return Err(format!(
                        "input binding {b}: {} holds a {a}, but the job says type = {:?}; convert it with a.astype(np.{}) or change the type",
                        p.display(),
                        i.elem
                            .map_or("?".to_owned(), |e| format!("{e:?}").to_lowercase()),
                        match d {
                            ElemType::F32 => "float32",
                            ElemType::U32 => "uint32",
                            ElemType::I32 => "int32",
                            ElemType::Bytes => "uint8",
                        }
                    ));
                }
                let rows = a.shape.first().copied().unwrap_or(1);
                (a.elem, rows, a.data)
            } else {
                let elem = declared.unwrap_or(ElemType::Bytes);
                if !(bytes.len() as u64).is_multiple_of(elem.size()) {
                    return Err(format!(
                        "input binding {b}: {} has {} bytes, not a whole number of {}-byte elements",
                        p.display(),
                        bytes.len(),
                        elem.size()
                    ));
                }
                (elem, bytes.len() as u64 / elem.size(), bytes)
            }
        }
    };
    if i.kind == InputKind::State
        && i.elem.is_none()
        && i.values.is_none()
        && elem == ElemType::Bytes
    {
        return Err(format!("input binding {b}: a state buffer needs a type"));
    }
    let parts = if i.split {
        if !rows.is_multiple_of(u64::from(tasks)) {
            return Err(format!(
                "input binding {b}: {rows} rows do not split evenly into {tasks} tasks"
            ));
        }
        let per = data.len() / tasks as usize;
        Parts::Split(data.chunks(per.max(1)).map(<[u8]>::to_vec).collect())
    } else {
        Parts::Shared(data)
    };
    Ok(Input {
        binding: b,
        kind: i.kind,
        elem,
        parts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const PI: &str = r#"
kernel = "library:monte_carlo_pi"
dispatch = [4, 1, 1]
tasks = 3
info_binding = 0
[[inputs]]
binding = 1
kind = "uniform"
type = "u32"
values = [7, 64]
[[outputs]]
binding = 2
type = "u32"
len = 4
"#;

    #[test]
    fn a_library_array_job_loads() {
        let dir = tempfile::tempdir().unwrap();
        let job = Job::load(&write(dir.path(), "pi.toml", PI), &Limits::default()).unwrap();
        assert_eq!(job.name, "pi");
        assert_eq!(job.tasks, 3);
        assert_eq!(
            job.inputs[0].bytes(2),
            [7u32.to_le_bytes(), 64u32.to_le_bytes()].concat()
        );
        let t = job.task(2);
        assert_eq!(
            (t.task_index, t.task_count, t.info_binding),
            (2, 3, Some(0))
        );
    }

    #[test]
    fn redundancy_is_a_number_or_auto() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| Job::load(&write(dir.path(), "pi.toml", text), &Limits::default());
        let job = load(PI).unwrap();
        assert_eq!((job.redundancy, job.adaptive), (1, false));
        let job = load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = 3")).unwrap();
        assert_eq!((job.redundancy, job.adaptive), (3, false));
        let job = load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = \"auto\"")).unwrap();
        assert_eq!((job.redundancy, job.adaptive), (2, true));
        assert!(load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = \"often\"")).is_err());
    }

    fn refused(text: &str, files: &[(&str, Vec<u8>)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let err = Job::load(&write(dir.path(), "job.toml", text), &Limits::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("job.toml"), "{msg}");
        msg
    }

    #[test]
    fn bad_jobs_are_refused_with_the_reason() {
        let msg = refused(
            "kernel = \"k.wgsl\"\ndispatch = [1,1,1]\n[[outputs]]\nbinding = 0\ntype = \"u32\"\nlen = 4\n",
            &[("k.wgsl", b"@compute fn main( {".to_vec())],
        );
        assert!(msg.contains("line") || msg.contains("parse"), "{msg}");

        let texture = b"@group(0) @binding(0) var t: texture_2d<f32>;\n@group(0) @binding(1) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1) fn main() { o[0] = u32(textureDimensions(t).x); }".to_vec();
        let msg = refused(
            "kernel = \"k.wgsl\"\ndispatch = [1,1,1]\n[[outputs]]\nbinding = 1\ntype = \"u32\"\nlen = 4\n",
            &[("k.wgsl", texture)],
        );
        assert!(msg.contains("texture"), "{msg}");

        let msg = refused(&PI.replace("len = 4", "len = 4000000000"), &[]);
        assert!(msg.contains("max_buffer_bytes"), "{msg}");

        let msg = refused(
            &PI.replace("values = [7, 64]", "file = \"missing.npy\""),
            &[],
        );
        assert!(msg.contains("missing.npy"), "{msg}");

        let f64_npy = npy::write(ElemType::U32, &[2], &[0; 8]);
        let text = PI
            .replace("values = [7, 64]", "file = \"p.npy\"")
            .replace("type = \"u32\"\nfile", "type = \"f32\"\nfile");
        let msg = refused(&text, &[("p.npy", f64_npy)]);
        assert!(msg.contains("float32"), "{msg}");

        let text = PI.replace("values = [7, 64]", "file = \"p.npy\"\nsplit = true");
        let msg = refused(
            &text,
            &[("p.npy", npy::write(ElemType::U32, &[4], &[0; 16]))],
        );
        assert!(msg.contains("split evenly"), "{msg}");

        let msg = refused(&PI.replace("dispatch", "dispatchh"), &[]);
        assert!(msg.contains("dispatchh"), "{msg}");
    }
}
