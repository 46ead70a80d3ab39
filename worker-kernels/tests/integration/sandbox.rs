//! The sandbox as the node uses it: a real child process on the software
//! adapter, killed at deadlines, confined, and replaced after crashes.
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use std::path::Path;
use std::time::{Duration, Instant};

use alliance_kernels::executor::{Binding, Checkpoint, Data, ElemType, Executor, Task, TaskError};
use alliance_kernels::gpu::{self, Selection};
use alliance_kernels::intake::Limits;
use alliance_kernels::library::{self, saxpy};
use alliance_kernels::sandbox::{
    ChildConfig, Config, Layer, ProbeRequest, ResourceLimits, Sandbox,
};

fn config(scratch: &Path, rlimits: ResourceLimits) -> Config {
    Config {
        program: env!("CARGO_BIN_EXE_alliance-sandbox").into(),
        args: vec![],
        // Mesa's on-disk shader cache would count against the tiny file
        // size limits some tests set.
        env: vec![("MESA_SHADER_CACHE_DISABLE".into(), "true".into())],
        child: ChildConfig {
            adapter: Selection::All,
            limits: Limits::default(),
            rlimits,
            scratch: scratch.to_owned(),
        },
        start_timeout: Duration::from_secs(60),
        compile_timeout: Duration::from_secs(300),
    }
}

fn sandbox(scratch: &Path) -> Sandbox {
    Sandbox::start(config(scratch, ResourceLimits::default())).unwrap()
}

fn none(_: Checkpoint) -> Result<(), TaskError> {
    Ok(())
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

const DOUBLE: &str = "
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&out)) { out[id.x] = 2u * x[id.x] + 1u; }
}";

fn double_task(n: u32) -> Task {
    let x: Vec<u32> = (0..n).collect();
    Task::new(
        DOUBLE,
        "main",
        vec![
            Binding::Input {
                binding: 0,
                data: u32s(&x).into(),
            },
            Binding::Output {
                binding: 1,
                len: u64::from(n),
                elem: ElemType::U32,
            },
        ],
        [n.div_ceil(64), 1, 1],
    )
}

fn expected(n: u32) -> Vec<u8> {
    u32s(&(0..n).map(|i| 2 * i + 1).collect::<Vec<_>>())
}

// Atomics give every iteration an effect the compiler must keep, so the
// loop cannot be folded away. The counter equals x[0] = 0 only after 2^32
// adds, so this is a data-dependent loop that outlives any test deadline on
// a real GPU. llvmpipe ends any one invocation's loops after 65535
// iterations, so the task also dispatches 2^18 invocations: about 2^34
// atomic adds, minutes of work for a software GPU.
const SPIN: &str = "
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<atomic<u32>>;
@compute @workgroup_size(64)
fn main() {
    loop {
        atomicAdd(&out[0], 1u);
        if (atomicLoad(&out[0]) == x[0]) { break; }
    }
}";

fn spin_task() -> Task {
    Task::new(
        SPIN,
        "main",
        vec![
            Binding::Input {
                binding: 0,
                data: vec![0; 4].into(),
            },
            Binding::Output {
                binding: 1,
                len: 1,
                elem: ElemType::U32,
            },
        ],
        [4096, 1, 1],
    )
}

#[test]
fn warmed_library_kernels_cost_their_tasks_no_compile_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let warmed = sb.warm(&["saxpy", "no_such_kernel"]).unwrap();
    assert_eq!(warmed[0].name, "saxpy");
    assert!(warmed[0].compiled.as_ref().unwrap() > &Duration::ZERO);
    let why = warmed[1].compiled.as_ref().unwrap_err();
    assert!(why.contains("no library kernel is called"), "{why}");
    let (x, y) = ([1.0f32, 2.0], [3.0f32, 4.0]);
    let out = sb
        .run(
            &saxpy::task(2.0, &x, &y),
            Duration::from_secs(60),
            &mut none,
        )
        .unwrap();
    assert_eq!(out.compile_time, Duration::ZERO);
    assert_eq!(
        library::to_f32(&out.outputs[0].data),
        saxpy::cpu(2.0, &x, &y)
    );
    // A kernel not warmed is compiled before the task's deadline starts,
    // and its compile time comes back with the outcome.
    let out = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap();
    assert!(out.compile_time > Duration::ZERO);
}

#[test]
fn a_kernel_slower_to_compile_than_the_compile_timeout_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), ResourceLimits::default());
    // No kernel compiles in a microsecond, not even the smallest.
    cfg.compile_timeout = Duration::from_micros(1);
    let mut sb = Sandbox::start(cfg).unwrap();
    let err = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap_err();
    assert_eq!(err, TaskError::CompileTimeout(Duration::from_micros(1)));
    assert!(err.to_string().contains("to compile"), "{err}");
}

#[test]
fn results_through_the_sandbox_match_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let ready = sb.ready().unwrap();
    assert!(!ready.adapter.name.is_empty());
    let out = sb
        .run(&double_task(1000), Duration::from_secs(60), &mut none)
        .unwrap();
    assert_eq!(out.outputs[0].data, expected(1000));

    let gpu = gpu::discover(&Selection::All).unwrap().remove(0);
    let mut ex = Executor::open(&gpu.adapter, Limits::default()).unwrap();
    let local = ex.run(&double_task(1000), &mut none).unwrap();
    assert_eq!(local.outputs[0].hash, out.outputs[0].hash);
}

#[test]
fn file_inputs_and_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let mut sb = sandbox(&scratch);
    let input = dir.path().join("blob");
    std::fs::write(&input, u32s(&(0..4096).collect::<Vec<_>>())).unwrap();
    let out_dir = scratch.join("task-1");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut t = double_task(4096);
    t.bindings[0] = Binding::Input {
        binding: 0,
        data: Data::File {
            path: input.clone(),
            len: 4 * 4096,
        },
    };
    t.output_dir = Some(out_dir.clone());
    let out = sb.run(&t, Duration::from_secs(60), &mut none).unwrap();
    let o = &out.outputs[0];
    assert!(o.data.is_empty());
    let written = std::fs::read(o.file.as_ref().unwrap()).unwrap();
    assert_eq!(written, expected(4096));
    assert_eq!(o.hash, *blake3::hash(&written).as_bytes());
    // A file that does not hold what the task says is refused with the reason.
    t.bindings[0] = Binding::Input {
        binding: 0,
        data: Data::File {
            path: input,
            len: 99,
        },
    };
    let err = sb.run(&t, Duration::from_secs(60), &mut none).unwrap_err();
    assert!(
        err.to_string()
            .contains("holds 16384 bytes, but the task says 99"),
        "{err}"
    );
}

#[test]
fn endless_kernels_are_killed_at_the_deadline_and_the_next_task_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let started = Instant::now();
    let err = sb
        .run(&spin_task(), Duration::from_secs(3), &mut none)
        .unwrap_err();
    assert_eq!(err, TaskError::Timeout(Duration::from_secs(3)));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the parent did not block"
    );
    assert!(err.to_string().contains("deadline"), "{err}");
    // A plain infinite loop too.
    let mut forever = spin_task();
    forever.kernel = "@group(0) @binding(0) var<storage, read> x: array<u32>;
        @group(0) @binding(1) var<storage, read_write> out: array<atomic<u32>>;
        @compute @workgroup_size(64) fn main() { loop { atomicAdd(&out[0], x[0] + 1u); } }"
        .into();
    let err = sb
        .run(&forever, Duration::from_secs(3), &mut none)
        .unwrap_err();
    assert!(matches!(err, TaskError::Timeout(_)), "{err}");
    // The next task on the same sandbox succeeds, in a fresh child.
    let out = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap();
    assert_eq!(out.outputs[0].data, expected(64));
    assert_eq!(sb.starts, 3);
}

#[test]
fn a_stopper_ends_the_running_task_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let stopper = sb.stopper();
    let started = Instant::now();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        stopper.stop();
    });
    let err = sb
        .run(&spin_task(), Duration::from_secs(60), &mut none)
        .unwrap_err();
    killer.join().unwrap();
    assert!(
        matches!(&err, TaskError::Crashed(m) if m.contains("SIGKILL")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not stopped early"
    );
    // The next task runs in a fresh child.
    let out = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap();
    assert_eq!(out.outputs[0].data, expected(64));
}

#[test]
fn checkpoints_cross_the_process_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let k = "struct Info { step: u32, steps: u32, task: u32, count: u32 }
        @group(0) @binding(0) var<uniform> info: Info;
        @group(0) @binding(1) var<storage, read_write> s: array<u32>;
        @compute @workgroup_size(1) fn main() { s[0] = s[0] + info.step; }";
    let mut t = Task::new(
        k,
        "main",
        vec![Binding::State {
            binding: 1,
            data: vec![0; 4].into(),
            elem: ElemType::U32,
        }],
        [1, 1, 1],
    );
    t.steps = 6;
    t.checkpoint_every = Some(2);
    t.info_binding = Some(0);
    let mut steps = Vec::new();
    let out = sb
        .run(&t, Duration::from_secs(60), &mut |c: Checkpoint| {
            steps.push((c.step, c.state[0].data.clone()));
            Ok(())
        })
        .unwrap();
    assert_eq!(steps, vec![(2, u32s(&[1])), (4, u32s(&[6]))]);
    assert_eq!(out.outputs[0].data, u32s(&[15]));
}

#[test]
fn the_child_has_no_network_and_reports_its_confinement() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let limits = ResourceLimits {
        cpu_seconds: 600,
        file_bytes: 64 << 20,
        open_files: 200,
    };
    let mut sb = Sandbox::start(config(&scratch, limits)).unwrap();
    let ready = sb.ready().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let outside = dir.path().join("outside.txt");
    let report = sb
        .probe(
            ProbeRequest {
                connect: Some(listener.local_addr().unwrap().to_string()),
                write_outside: Some(outside.clone()),
            },
            Duration::from_secs(30),
        )
        .unwrap();

    // Network: seccomp refuses IP sockets.
    assert!(
        ready.hardening.network.is_enforced(),
        "{:?}",
        ready.hardening.network
    );
    let tcp = report.tcp_connect.unwrap();
    assert!(
        tcp.as_ref().is_err_and(|e| e.contains("ermission denied")),
        "{tcp:?}"
    );
    assert!(listener.accept().is_err(), "nothing reached the listener");
    assert!(
        report
            .udp_bind
            .as_ref()
            .is_err_and(|e| e.contains("ermission denied")),
        "{:?}",
        report.udp_bind
    );

    // Resource limits, as the child sees them.
    assert!(
        ready.hardening.limits.is_enforced(),
        "{:?}",
        ready.hardening.limits
    );
    assert_eq!(report.cpu_seconds, (600, 600));
    assert_eq!(report.file_bytes, (64 << 20, 64 << 20));
    assert_eq!(report.open_files, (200, 200));

    // Filesystem: the scratch directory is writable; outside it, writes
    // fail wherever the kernel has Landlock, and the report says which.
    assert_eq!(report.scratch_write, Ok(()));
    let outside_write = report.outside_write.unwrap();
    match &ready.hardening.filesystem {
        Layer::Enforced(_) | Layer::Partial(_) => {
            assert!(
                outside_write.is_err(),
                "Landlock is on, yet the child wrote {}",
                outside.display()
            );
            assert!(!outside.exists());
        }
        Layer::Unavailable(why) => {
            eprintln!(
                "Landlock unavailable here ({why}); the write outside scratch was {outside_write:?}"
            );
            assert!(why.contains("Landlock"), "{why}");
        }
    }
}

#[test]
fn exceeding_the_cpu_limit_kills_the_child_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ResourceLimits {
        cpu_seconds: 2,
        ..ResourceLimits::default()
    };
    let mut sb = Sandbox::start(config(dir.path(), limits)).unwrap();
    // The software adapter runs the endless kernel on the child's CPU, so
    // the CPU limit ends it long before the 60 s deadline.
    let err = sb
        .run(&spin_task(), Duration::from_secs(60), &mut none)
        .unwrap_err();
    match &err {
        TaskError::Crashed(msg) => {
            assert!(msg.contains("SIGXCPU") || msg.contains("SIGKILL"), "{msg}")
        }
        other => panic!("expected a crash, got {other}"),
    }
    // And the sandbox recovers.
    let out = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap();
    assert_eq!(out.outputs[0].data, expected(64));
}

#[test]
fn exceeding_the_file_size_limit_kills_the_child_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ResourceLimits {
        file_bytes: 1024,
        ..ResourceLimits::default()
    };
    let mut sb = Sandbox::start(config(dir.path(), limits)).unwrap();
    let mut t = double_task(4096); // 16 KiB of output, written as a file
    t.output_dir = Some(dir.path().to_owned());
    let err = sb.run(&t, Duration::from_secs(60), &mut none).unwrap_err();
    assert!(err.to_string().contains("SIGXFSZ"), "{err}");
}

#[test]
fn hostile_kernels_get_named_errors_and_the_sandbox_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut sb = sandbox(dir.path());
    let with_kernel = |src: &str| {
        let mut t = double_task(64);
        t.kernel = src.into();
        t
    };
    let cases: Vec<(&str, Task, &str)> = vec![
        (
            "syntax error",
            with_kernel("@compute @workgroup_size(1)\nfn main( {}"),
            "line 2",
        ),
        (
            "texture binding",
            with_kernel(
                "@group(0) @binding(0) var t: texture_2d<f32>;\n@compute @workgroup_size(1) fn main() { _ = textureDimensions(t); }",
            ),
            "texture",
        ),
        (
            "1 MiB of nested parentheses",
            with_kernel(&format!(
                "const x = {}1{};",
                "(".repeat(1 << 19),
                ")".repeat(1 << 19)
            )),
            "max_source_bytes",
        ),
        (
            "huge dispatch",
            {
                let mut t = double_task(64);
                t.dispatch = [65_535, 65_535, 64];
                t
            },
            "max_workgroups",
        ),
        (
            "output larger than the cap",
            {
                let mut t = double_task(64);
                t.bindings[1] = Binding::Output {
                    binding: 1,
                    len: 1 << 30,
                    elem: ElemType::U32,
                };
                t
            },
            "max_buffer_bytes",
        ),
    ];
    for (name, task, cause) in cases {
        let err = sb
            .run(&task, Duration::from_secs(60), &mut none)
            .unwrap_err();
        assert!(matches!(err, TaskError::Intake(_)), "{name}: {err}");
        assert!(err.to_string().contains(cause), "{name}: {err}");
    }
    // Out-of-bounds reads and writes run, contained by wgpu's checks.
    let oob = with_kernel(
        "@group(0) @binding(0) var<storage, read> x: array<u32>;
        @group(0) @binding(1) var<storage, read_write> out: array<u32>;
        @compute @workgroup_size(64) fn main(@builtin(global_invocation_id) id: vec3<u32>) {
            out[id.x + 4000000000u] = 7u;
            out[id.x] = x[id.x + 3000000000u];
        }",
    );
    sb.run(&oob, Duration::from_secs(60), &mut none).unwrap();
    assert_eq!(sb.starts, 1, "no hostile kernel took the sandbox down");
    let out = sb
        .run(&double_task(64), Duration::from_secs(60), &mut none)
        .unwrap();
    assert_eq!(out.outputs[0].data, expected(64));
}
