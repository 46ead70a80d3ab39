//! The sandbox: tasks run in a child process the node can kill.
//!
//! A kernel from another university reaches the GPU driver, which is large
//! C code. So the worker never runs one in its own process: a [`Sandbox`]
//! owns a child process (the `alliance-sandbox` binary, or `alliance
//! sandbox` in the node) that opens the GPU and runs tasks it receives as
//! frames on stdin, answering on stdout.
//!
//! - **Frames**: a 4-byte big-endian length, then a postcard-encoded
//!   [`Request`] or [`Response`]; each side checks the length against its
//!   cap before allocating.
//! - **Deadline**: the parent waits for the answer with a timeout; past the
//!   deadline it kills the child (SIGKILL) and starts a fresh one for the
//!   next task. It never blocks on a hung GPU. A task's kernel is compiled
//!   first, under a deadline of its own ([`Config::compile_timeout`]); the
//!   child says when it is ([`Response::Compiled`]), and only then does
//!   the task's own deadline start.
//! - **Warming**: [`Sandbox::warm`] compiles the standard library's kernels
//!   ahead of any task, so a task of one pays no compile time; the child's
//!   `XDG_CACHE_HOME` is inside its scratch directory, where Mesa's
//!   on-disk shader cache then keeps them across restarts.
//! - **Crashes**: a child that dies becomes [`TaskError::Crashed`] with its
//!   exit status and the last lines it wrote to stderr.
//! - **Defence in depth** (Linux), applied by the child to itself before it
//!   opens the GPU, reported in [`Hardening`]: resource limits (CPU time,
//!   file size, open files); a seccomp filter that refuses every socket but
//!   Unix ones (no network) and io_uring; Landlock, where the kernel has it,
//!   so the child writes nowhere but its scratch directory and the GPU
//!   device nodes.
//!
//! Large inputs and outputs travel as files ([`crate::executor::Data::File`],
//! `Task::output_dir`), not through the pipe.
//!
//! This file holds what both sides share: the child's settings, the
//! messages and their frames. [`child`] is the child's side (its loop and
//! the hardening it applies to itself), [`parent`] the supervisor's.

mod child;
mod parent;

pub use child::child_main;
pub use parent::{Config, Sandbox, Stopper};

use std::io::{Read, Write};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::executor::{Checkpoint, Outcome, Task, TaskError};
use crate::gpu::{AdapterReport, Selection};
use crate::intake::Limits;

/// Largest `Init` frame.
const INIT_CAP: u64 = 64 * 1024;
/// Room for everything in a frame besides buffer bytes.
const FRAME_SLACK: u64 = 4 << 20;
/// Bytes of the child's stderr kept for crash reports.
const STDERR_TAIL: usize = 4096;

/// OS limits on the child process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// CPU seconds over the child's life (software GPUs count here).
    pub cpu_seconds: u64,
    /// Largest file the child may write, in bytes.
    pub file_bytes: u64,
    /// Most open file descriptors.
    pub open_files: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            cpu_seconds: 3600,
            file_bytes: 4 << 30,
            open_files: 256,
        }
    }
}

/// What the child needs to start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildConfig {
    /// Which adapter to open (the first that matches).
    pub adapter: Selection,
    pub limits: Limits,
    pub rlimits: ResourceLimits,
    /// The only directory the child may write to.
    pub scratch: PathBuf,
}

impl ChildConfig {
    pub(crate) fn frame_cap(&self) -> u64 {
        self.limits
            .max_total_bytes
            .saturating_add(self.limits.max_source_bytes)
            .saturating_add(FRAME_SLACK)
    }
}

/// How far one layer of the sandbox took effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layer {
    Enforced(String),
    Partial(String),
    Unavailable(String),
}

impl Layer {
    /// Whether the layer is fully in force.
    pub fn is_enforced(&self) -> bool {
        matches!(self, Layer::Enforced(_))
    }
}

/// The child's report of its own confinement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardening {
    pub limits: Layer,
    pub network: Layer,
    pub filesystem: Layer,
}

/// The child is ready: the adapter it opened and how it is confined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub adapter: AdapterReport,
    pub hardening: Hardening,
}

/// A self-check the child runs from inside its confinement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// A TCP address to try to connect to.
    pub connect: Option<String>,
    /// A file outside the scratch directory to try to create.
    pub write_outside: Option<PathBuf>,
}

/// What the self-check saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub tcp_connect: Option<Result<(), String>>,
    pub udp_bind: Result<(), String>,
    pub scratch_write: Result<(), String>,
    pub outside_write: Option<Result<(), String>>,
    /// `(soft, hard)` limits as the child sees them.
    pub cpu_seconds: (u64, u64),
    pub file_bytes: (u64, u64),
    pub open_files: (u64, u64),
}

/// Parent → child.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Init(ChildConfig),
    Run(Box<Task>),
    /// Compile and warm these library kernels, by name.
    Warm(Vec<String>),
    Probe(ProbeRequest),
    Shutdown,
}

/// One library kernel warmed: how long it took, or why it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warmed {
    pub name: String,
    pub compiled: Result<std::time::Duration, String>,
}

/// Child → parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Ready(Ready),
    InitFailed(String),
    /// The task's kernel is compiled (in that long; zero when cached):
    /// its deadline starts now.
    Compiled(std::time::Duration),
    Checkpoint(Checkpoint),
    Done(Result<Outcome, TaskError>),
    Probe(ProbeReport),
    Warmed(Vec<Warmed>),
}

/// Writes one frame.
pub fn write_frame<T: Serialize, W: Write>(w: &mut W, msg: &T) -> std::io::Result<()> {
    // One buffer, one write: stdout is line-buffered, and binary frames
    // are full of newlines.
    let mut frame = postcard::to_extend(msg, vec![0u8; 4]).map_err(std::io::Error::other)?;
    let len = u32::try_from(frame.len() - 4)
        .map_err(|_| std::io::Error::other("frame larger than 4 GiB"))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    w.write_all(&frame)?;
    w.flush()
}

/// Reads one frame, refusing a length above `cap` before allocating.
pub fn read_frame<T: DeserializeOwned, R: Read>(r: &mut R, cap: u64) -> std::io::Result<T> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes(prefix);
    if u64::from(len) > cap {
        return Err(std::io::Error::other(format!(
            "frame of {len} bytes is over the cap of {cap}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(|e| std::io::Error::other(format!("bad frame: {e}")))
}
