//! The supervisor's side of the sandbox: start a child, send it tasks,
//! wait with a deadline, kill it when it hangs or is told to stop, and say
//! why a child died.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    ChildConfig, ProbeReport, ProbeRequest, Ready, Request, Response, STDERR_TAIL, Warmed,
    read_frame, write_frame,
};
use crate::executor::{Checkpoint, Outcome, Task, TaskError};

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
    /// How long a task's kernel may take to compile (and warm) before the
    /// task's own deadline starts; also the bound on warming each library
    /// kernel.
    pub compile_timeout: Duration,
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

    /// The next frame while the child compiles, within `budget`: past it,
    /// a [`TaskError::CompileTimeout`].
    fn receive_compiled(&mut self, budget: Duration) -> Result<Response, TaskError> {
        self.receive(Instant::now() + budget, budget)
            .map_err(|e| match e {
                TaskError::Timeout(d) => TaskError::CompileTimeout(d),
                other => other,
            })
    }

    /// Runs `task` in the child within `deadline`, passing checkpoints on.
    pub fn run(
        &mut self,
        task: &Task,
        deadline: Duration,
        on_checkpoint: &mut dyn FnMut(Checkpoint) -> Result<(), TaskError>,
    ) -> Result<Outcome, TaskError> {
        self.send(&Request::Run(Box::new(task.clone())))?;
        match self.receive_compiled(self.config.compile_timeout)? {
            Response::Compiled(_) => {}
            Response::Done(result) => return result,
            other => {
                self.kill();
                return Err(TaskError::Sandbox(format!("unexpected answer {other:?}")));
            }
        }
        let until = Instant::now() + deadline;
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

    /// Compiles and warms the library kernels `names` in the child, each
    /// within the compile timeout, so tasks of them pay no compile time.
    pub fn warm(&mut self, names: &[&str]) -> Result<Vec<Warmed>, TaskError> {
        self.send(&Request::Warm(
            names.iter().map(|&n| n.to_owned()).collect(),
        ))?;
        let budget = self
            .config
            .compile_timeout
            .saturating_mul(u32::try_from(names.len().max(1)).unwrap_or(u32::MAX));
        match self.receive_compiled(budget)? {
            Response::Warmed(w) => Ok(w),
            other => {
                self.kill();
                Err(TaskError::Sandbox(format!("unexpected answer {other:?}")))
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
