//! The child's side of the sandbox: read `Init`, harden itself, open the
//! GPU, then answer each request on stdin with a frame on stdout.

use std::time::Duration;

use super::{
    ChildConfig, Hardening, INIT_CAP, ProbeReport, ProbeRequest, Ready, Request, Response, Warmed,
    read_frame, write_frame,
};
use crate::executor::{Checkpoint, Executor, Outcome, TaskError};
use crate::gpu::{self, AdapterReport};
use crate::library;

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
            Request::Run(task) => match executor.1.prepare(&task) {
                Err(e) => Response::Done(Err(e)),
                Ok(compile_time) => {
                    if write_frame(&mut output, &Response::Compiled(compile_time)).is_err() {
                        return 1;
                    }
                    let mut send_checkpoint = |c: Checkpoint| {
                        write_frame(&mut output, &Response::Checkpoint(c)).map_err(|e| {
                            TaskError::Sandbox(format!("cannot send a checkpoint: {e}"))
                        })
                    };
                    let outcome = executor.1.run(&task, &mut send_checkpoint);
                    Response::Done(outcome.map(|o| Outcome { compile_time, ..o }))
                }
            },
            Request::Warm(names) => Response::Warmed(
                names
                    .into_iter()
                    .map(|name| {
                        let compiled = match library::get(&name) {
                            Some(k) => executor
                                .1
                                .warm(k.source, k.entry_point)
                                .map_err(|e| e.to_string()),
                            None => Err(format!("no library kernel is called {name:?}")),
                        };
                        Warmed { name, compiled }
                    })
                    .collect(),
            ),
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
    use crate::sandbox::{Layer, ResourceLimits};
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
    use crate::sandbox::{Layer, ResourceLimits};
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

    use crate::sandbox::Layer;

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
    use crate::sandbox::Layer;
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

    use crate::sandbox::Layer;

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
    use crate::sandbox::Layer;
    pub(super) fn deny() -> Layer {
        Layer::Unavailable("the network filter needs Linux seccomp on x86_64 or aarch64".into())
    }
}
