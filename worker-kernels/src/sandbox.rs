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
//!   next task. It never blocks on a hung GPU.
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

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::executor::{Checkpoint, Executor, Outcome, Task, TaskError};
use crate::gpu::{self, AdapterReport, Selection};
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
    fn frame_cap(&self) -> u64 {
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
    Probe(ProbeRequest),
    Shutdown,
}

/// Child → parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Ready(Ready),
    InitFailed(String),
    Checkpoint(Checkpoint),
    Done(Result<Outcome, TaskError>),
    Probe(ProbeReport),
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

// ---------------------------------------------------------------- child --

/// The child's main loop; returns the process exit code.
pub fn child_main() -> u8 {
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let config = match read_frame::<Request, _>(&mut input, INIT_CAP) {
        Ok(Request::Init(c)) => c,
        Ok(_) => {
            eprintln!("alliance sandbox: the first frame must be Init");
            return 2;
        }
        Err(e) => {
            eprintln!("alliance sandbox: {e}");
            return 2;
        }
    };
    let hardening = harden(&config);
    let mut executor = match open_gpu(&config) {
        Ok(pair) => pair,
        Err(msg) => {
            let _ = write_frame(&mut output, &Response::InitFailed(msg));
            return 1;
        }
    };
    let ready = Response::Ready(Ready {
        adapter: executor.0,
        hardening,
    });
    if write_frame(&mut output, &ready).is_err() {
        return 1;
    }
    let cap = config.frame_cap();
    loop {
        let request = match read_frame::<Request, _>(&mut input, cap) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return 0,
            Err(e) => {
                eprintln!("alliance sandbox: {e}");
                return 2;
            }
        };
        let response = match request {
            Request::Run(task) => {
                let mut send_checkpoint = |c: Checkpoint| {
                    write_frame(&mut output, &Response::Checkpoint(c))
                        .map_err(|e| TaskError::Sandbox(format!("cannot send a checkpoint: {e}")))
                };
                Response::Done(executor.1.run(&task, &mut send_checkpoint))
            }
            Request::Probe(p) => Response::Probe(probe(&p, &config)),
            Request::Shutdown => return 0,
            Request::Init(_) => {
                Response::Done(Err(TaskError::Sandbox("already initialised".into())))
            }
        };
        if write_frame(&mut output, &response).is_err() {
            return 1;
        }
    }
}

fn open_gpu(config: &ChildConfig) -> Result<(AdapterReport, Executor), String> {
    let gpu = gpu::discover(&config.adapter)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no adapter selected")?;
    let executor =
        Executor::open(&gpu.adapter, config.limits.clone()).map_err(|e| e.to_string())?;
    Ok((gpu.report, executor))
}

fn io_result<T>(r: std::io::Result<T>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| e.to_string())
}

fn probe(p: &ProbeRequest, config: &ChildConfig) -> ProbeReport {
    let tcp_connect = p.connect.as_ref().map(|addr| {
        addr.parse::<std::net::SocketAddr>()
            .map_err(|e| e.to_string())
            .and_then(|a| {
                io_result(std::net::TcpStream::connect_timeout(
                    &a,
                    Duration::from_secs(2),
                ))
            })
    });
    let udp_bind = io_result(std::net::UdpSocket::bind("127.0.0.1:0"));
    let scratch_write = io_result(std::fs::write(config.scratch.join("probe"), b"ok"));
    let outside_write = p
        .write_outside
        .as_ref()
        .map(|path| io_result(std::fs::write(path, b"escaped")));
    let limit = |r| limits::get(r);
    ProbeReport {
        tcp_connect,
        udp_bind,
        scratch_write,
        outside_write,
        cpu_seconds: limit(limits::Kind::Cpu),
        file_bytes: limit(limits::Kind::FileSize),
        open_files: limit(limits::Kind::OpenFiles),
    }
}

fn harden(config: &ChildConfig) -> Hardening {
    Hardening {
        limits: limits::apply(&config.rlimits),
        filesystem: filesystem::confine(&config.scratch),
        network: network::deny(),
    }
}

#[cfg(unix)]
mod limits {
    use super::{Layer, ResourceLimits};
    use rlimit::Resource;

    pub(super) enum Kind {
        Cpu,
        FileSize,
        OpenFiles,
    }

    fn resource(k: Kind) -> Resource {
        match k {
            Kind::Cpu => Resource::CPU,
            Kind::FileSize => Resource::FSIZE,
            Kind::OpenFiles => Resource::NOFILE,
        }
    }

    pub(super) fn get(k: Kind) -> (u64, u64) {
        rlimit::getrlimit(resource(k)).unwrap_or((0, 0))
    }

    pub(super) fn apply(l: &ResourceLimits) -> Layer {
        let mut failed = Vec::new();
        for (name, k, v) in [
            ("cpu", Kind::Cpu, l.cpu_seconds),
            ("file size", Kind::FileSize, l.file_bytes),
            ("open files", Kind::OpenFiles, l.open_files),
        ] {
            if let Err(e) = rlimit::setrlimit(resource(k), v, v) {
                failed.push(format!("{name}: {e}"));
            }
        }
        if failed.is_empty() {
            Layer::Enforced(format!(
                "cpu {}s, file size {} bytes, {} open files",
                l.cpu_seconds, l.file_bytes, l.open_files
            ))
        } else {
            Layer::Partial(failed.join("; "))
        }
    }
}

#[cfg(not(unix))]
mod limits {
    use super::{Layer, ResourceLimits};
    pub(super) enum Kind {
        Cpu,
        FileSize,
        OpenFiles,
    }
    pub(super) fn get(_: Kind) -> (u64, u64) {
        (0, 0)
    }
    pub(super) fn apply(_: &ResourceLimits) -> Layer {
        Layer::Unavailable("resource limits need a Unix system".into())
    }
}

#[cfg(target_os = "linux")]
mod filesystem {
    use std::path::Path;

    use landlock::{
        ABI, AccessFs, RulesetAttr, RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
    };

    use super::Layer;

    /// Device nodes GPU drivers open read-write.
    const DEVICES: [&str; 6] = [
        "/dev/dri",
        "/dev/null",
        "/dev/zero",
        "/dev/kfd",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
    ];

    pub(super) fn confine(scratch: &Path) -> Layer {
        let abi = ABI::V3;
        let mut writable: Vec<std::path::PathBuf> = vec![scratch.to_owned()];
        writable.extend(
            DEVICES
                .iter()
                .map(Into::into)
                .filter(|p: &std::path::PathBuf| p.exists()),
        );
        if let Ok(dir) = std::fs::read_dir("/dev") {
            writable.extend(dir.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nvidia"))
            }));
        }
        let result = landlock::Ruleset::default()
            .handle_access(AccessFs::from_write(abi))
            .and_then(|r| r.create())
            .and_then(|r| r.add_rules(path_beneath_rules(&writable, AccessFs::from_write(abi))))
            .and_then(|r| r.restrict_self());
        match result {
            Ok(s) => match s.ruleset {
                RulesetStatus::FullyEnforced => {
                    Layer::Enforced(format!("Landlock: writes only under {}", scratch.display()))
                }
                RulesetStatus::PartiallyEnforced => Layer::Partial(format!(
                    "Landlock (older kernel ABI): writes only under {}",
                    scratch.display()
                )),
                RulesetStatus::NotEnforced => {
                    Layer::Unavailable("this kernel has no Landlock".into())
                }
            },
            Err(e) => Layer::Unavailable(format!("Landlock failed: {e}")),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod filesystem {
    use super::Layer;
    pub(super) fn confine(_: &std::path::Path) -> Layer {
        Layer::Unavailable("filesystem confinement needs Linux Landlock".into())
    }
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod network {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };

    use super::Layer;

    pub(super) fn deny() -> Layer {
        match install() {
            Ok(()) => Layer::Enforced("seccomp: no sockets but Unix ones, no io_uring".into()),
            Err(e) => Layer::Unavailable(format!("seccomp failed: {e}")),
        }
    }

    fn install() -> Result<(), String> {
        let not_unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            libc::AF_UNIX as u64,
        )
        .map_err(|e| e.to_string())?;
        let mut rules = BTreeMap::new();
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![not_unix]).map_err(|e| e.to_string())?],
        );
        // io_uring can open sockets without the socket syscall.
        rules.insert(libc::SYS_io_uring_setup, vec![]);
        let arch = std::env::consts::ARCH
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )
        .map_err(|e| e.to_string())?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())?;
        seccompiler::apply_filter_all_threads(&program).map_err(|e| e.to_string())
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod network {
    use super::Layer;
    pub(super) fn deny() -> Layer {
        Layer::Unavailable("the network filter needs Linux seccomp on x86_64 or aarch64".into())
    }
}

// --------------------------------------------------------------- parent --

/// How to start sandbox children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The program to run: `alliance-sandbox`, or `alliance` with `args = ["sandbox"]`.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment for the child (driver settings).
    pub env: Vec<(String, String)>,
    pub child: ChildConfig,
    /// How long a child may take to open its GPU.
    pub start_timeout: Duration,
}

/// A child process and its pipes.
struct Process {
    /// Shared with the [`Stopper`], which may kill it from another thread.
    child: Arc<Mutex<Child>>,
    stdin: ChildStdin,
    frames: Receiver<Result<Response, String>>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
}

/// A child that has opened its GPU.
struct Running {
    process: Process,
    ready: Ready,
}

/// A supervised sandbox child; starts a fresh one whenever the last was
/// killed or died.
pub struct Sandbox {
    config: Config,
    running: Option<Running>,
    stopper: Stopper,
    /// Children started so far.
    pub starts: u64,
}

/// Stops the task a [`Sandbox`] is running, from another thread, by killing
/// its child; [`Sandbox::run`] then returns a [`TaskError::Crashed`] and the
/// next task gets a fresh child. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Stopper {
    current: Arc<Mutex<Option<Arc<Mutex<Child>>>>>,
}

impl Stopper {
    /// Kills the current child, if there is one.
    pub fn stop(&self) {
        let child = self.current.lock().ok().and_then(|c| c.clone());
        if let Some(child) = child
            && let Ok(mut c) = child.lock()
        {
            // A child already reaped is not signalled again: std keeps
            // its status, so no recycled pid is hit.
            let _ = c.kill();
        }
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("program", &self.config.program)
            .field("running", &self.running.is_some())
            .field("starts", &self.starts)
            .finish()
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let what = match sig {
                libc::SIGKILL => "SIGKILL",
                libc::SIGSEGV => "SIGSEGV (a crash in the GPU driver or runtime)",
                libc::SIGABRT => "SIGABRT (the GPU driver or runtime aborted)",
                libc::SIGBUS => "SIGBUS",
                libc::SIGXCPU => "SIGXCPU (the sandbox's CPU time limit was reached)",
                libc::SIGXFSZ => "SIGXFSZ (the sandbox's file size limit was reached)",
                libc::SIGSYS => "SIGSYS (a forbidden system call)",
                _ => "a signal",
            };
            return format!("killed by signal {sig}: {what}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with status {c}"),
        None => "ended without a status".into(),
    }
}

impl Sandbox {
    /// Starts a child and waits until it has opened its GPU.
    pub fn start(config: Config) -> Result<Self, TaskError> {
        let mut sandbox = Self {
            config,
            running: None,
            stopper: Stopper::default(),
            starts: 0,
        };
        sandbox.ensure()?;
        Ok(sandbox)
    }

    /// The running child's report, starting one if needed.
    pub fn ready(&mut self) -> Result<Ready, TaskError> {
        Ok(self.ensure()?.ready.clone())
    }

    fn ensure(&mut self) -> Result<&mut Running, TaskError> {
        if self.running.is_none() {
            self.running = Some(self.spawn()?);
        }
        self.running
            .as_mut()
            .ok_or_else(|| TaskError::Sandbox("no child".into()))
    }

    fn spawn(&mut self) -> Result<Running, TaskError> {
        let scratch = &self.config.child.scratch;
        std::fs::create_dir_all(scratch.join("cache")).map_err(|e| {
            TaskError::Sandbox(format!(
                "cannot create scratch directory {}: {e}",
                scratch.display()
            ))
        })?;
        let mut child = Command::new(&self.config.program)
            .args(&self.config.args)
            .current_dir(scratch)
            .env("XDG_CACHE_HOME", scratch.join("cache"))
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                TaskError::Sandbox(format!(
                    "cannot start {}: {e}",
                    self.config.program.display()
                ))
            })?;
        self.starts += 1;
        let (Some(mut stdin), Some(mut stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(TaskError::Sandbox("the child has no pipes".into()));
        };
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = tail.lock() {
                    t.extend(&buf[..n]);
                    let excess = t.len().saturating_sub(STDERR_TAIL);
                    t.drain(..excess);
                }
            }
        });
        let (tx, frames) = std::sync::mpsc::channel();
        let cap = self.config.child.frame_cap();
        std::thread::spawn(move || {
            loop {
                let frame = read_frame::<Response, _>(&mut stdout, cap).map_err(|e| e.to_string());
                let end = frame.is_err();
                if tx.send(frame).is_err() || end {
                    break;
                }
            }
        });
        write_frame(&mut stdin, &Request::Init(self.config.child.clone()))
            .map_err(|e| TaskError::Sandbox(format!("cannot talk to the sandbox: {e}")))?;
        let child = Arc::new(Mutex::new(child));
        if let Ok(mut current) = self.stopper.current.lock() {
            *current = Some(Arc::clone(&child));
        }
        let mut process = Process {
            child,
            stdin,
            frames,
            stderr,
        };
        match process.frames.recv_timeout(self.config.start_timeout) {
            Ok(Ok(Response::Ready(ready))) => Ok(Running { process, ready }),
            Ok(Ok(Response::InitFailed(msg))) => {
                finish(&mut process);
                Err(TaskError::Sandbox(format!(
                    "the sandbox could not open a GPU: {msg}"
                )))
            }
            Ok(Ok(other)) => {
                finish(&mut process);
                Err(TaskError::Sandbox(format!(
                    "unexpected first answer {other:?}"
                )))
            }
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => Err(crashed(&mut process)),
            Err(RecvTimeoutError::Timeout) => {
                finish(&mut process);
                Err(TaskError::Sandbox(format!(
                    "the sandbox did not open its GPU within {:?}",
                    self.config.start_timeout
                )))
            }
        }
    }

    fn send(&mut self, request: &Request) -> Result<(), TaskError> {
        let running = self.ensure()?;
        if let Err(e) = write_frame(&mut running.process.stdin, request) {
            let err = crashed(&mut running.process);
            self.running = None;
            return Err(match err {
                TaskError::Crashed(m) => TaskError::Crashed(format!("{m} (while sending: {e})")),
                other => other,
            });
        }
        Ok(())
    }

    /// Waits for the next frame until `deadline`; kills the child on timeout.
    fn receive(&mut self, deadline: Instant, budget: Duration) -> Result<Response, TaskError> {
        let running = self.ensure()?;
        let wait = deadline.saturating_duration_since(Instant::now());
        match running.process.frames.recv_timeout(wait) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => {
                let err = crashed(&mut running.process);
                self.running = None;
                Err(err)
            }
            Err(RecvTimeoutError::Timeout) => {
                finish(&mut running.process);
                self.running = None;
                Err(TaskError::Timeout(budget))
            }
        }
    }

    /// Runs `task` in the child within `deadline`, passing checkpoints on.
    pub fn run(
        &mut self,
        task: &Task,
        deadline: Duration,
        on_checkpoint: &mut dyn FnMut(Checkpoint) -> Result<(), TaskError>,
    ) -> Result<Outcome, TaskError> {
        let until = Instant::now() + deadline;
        self.send(&Request::Run(Box::new(task.clone())))?;
        loop {
            match self.receive(until, deadline)? {
                Response::Checkpoint(c) => {
                    if let Err(e) = on_checkpoint(c) {
                        self.kill();
                        return Err(e);
                    }
                }
                Response::Done(result) => return result,
                other => {
                    self.kill();
                    return Err(TaskError::Sandbox(format!("unexpected answer {other:?}")));
                }
            }
        }
    }

    /// Runs a self-check inside the child.
    pub fn probe(
        &mut self,
        request: ProbeRequest,
        timeout: Duration,
    ) -> Result<ProbeReport, TaskError> {
        self.send(&Request::Probe(request))?;
        match self.receive(Instant::now() + timeout, timeout)? {
            Response::Probe(p) => Ok(p),
            other => {
                self.kill();
                Err(TaskError::Sandbox(format!("unexpected answer {other:?}")))
            }
        }
    }

    /// A handle that stops the running task from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Kills the child now; the next task starts a fresh one.
    pub fn kill(&mut self) {
        if let Some(mut r) = self.running.take() {
            finish(&mut r.process);
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = write_frame(&mut r.process.stdin, &Request::Shutdown);
            finish(&mut r.process);
        }
    }
}

/// Kills and reaps the child.
fn finish(r: &mut Process) {
    if let Ok(mut c) = r.child.lock() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The child stopped talking: wait briefly for its status, then describe it.
fn crashed(r: &mut Process) -> TaskError {
    let start = Instant::now();
    let status = loop {
        let polled = r.child.lock().map_or(Ok(None), |mut c| c.try_wait());
        match polled {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break None,
        }
    };
    let status = match status {
        Some(s) => describe(s),
        None => {
            finish(r);
            "stopped answering and was killed".into()
        }
    };
    let tail: Vec<u8> = r
        .stderr
        .lock()
        .map(|t| t.iter().copied().collect())
        .unwrap_or_default();
    let tail = String::from_utf8_lossy(&tail);
    let last: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = last[last.len().saturating_sub(3)..].join(" | ");
    if last.is_empty() {
        TaskError::Crashed(status)
    } else {
        TaskError::Crashed(format!("{status}; it last said: {last}"))
    }
}
