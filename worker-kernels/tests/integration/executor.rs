//! The executor on the software adapter: results, steps, checkpoints,
//! caching, and the memory-safety guarantees a hostile kernel meets.
#![allow(clippy::cast_possible_truncation)] // test sizes are small

use alliance_kernels::executor::{
    Binding, Checkpoint, ElemType, Executor, Task, TaskError, Timing,
};
use alliance_kernels::gpu::{self, Selection};
use alliance_kernels::intake::{IntakeError, Limits};
use alliance_kernels::library::{self, saxpy};
use std::time::Duration;

fn executor() -> Executor {
    let gpu = gpu::discover(&Selection::All).unwrap().remove(0);
    Executor::open(&gpu.adapter, Limits::default()).unwrap()
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn to_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn no_checkpoints(_: Checkpoint) -> Result<(), TaskError> {
    panic!("no checkpoint expected")
}

const SAXPY: &str = "
@group(0) @binding(0) var<uniform> a: f32;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&out)) { out[id.x] = a * x[id.x] + y[id.x]; }
}";

fn saxpy_task(n: usize) -> Task {
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| 1.0 - i as f32).collect();
    Task::new(
        SAXPY,
        "main",
        vec![
            Binding::Uniform {
                binding: 0,
                data: f32s(&[2.0]).into(),
            },
            Binding::Input {
                binding: 1,
                data: f32s(&x).into(),
            },
            Binding::Input {
                binding: 2,
                data: f32s(&y).into(),
            },
            Binding::Output {
                binding: 3,
                len: n as u64,
                elem: ElemType::F32,
            },
        ],
        [(n as u32).div_ceil(64), 1, 1],
    )
}

#[test]
fn saxpy_gives_the_right_answer_and_hashes_it() {
    let mut ex = executor();
    let out = ex.run(&saxpy_task(1000), &mut no_checkpoints).unwrap();
    assert_eq!(out.outputs.len(), 1);
    let o = &out.outputs[0];
    assert_eq!(o.binding, 3);
    let got = to_f32(&o.data);
    let want: Vec<f32> = (0..1000)
        .map(|i| 2.0 * i as f32 + (1.0 - i as f32))
        .collect();
    assert_eq!(got, want);
    assert_eq!(o.hash, *blake3::hash(&o.data).as_bytes());
    assert!(out.gpu_time > std::time::Duration::ZERO);
    assert!(matches!(
        out.timing,
        Timing::GpuTimestamps | Timing::WallClock
    ));
}

#[test]
fn pipelines_are_cached_and_pooled_buffers_come_back_clean() {
    let mut ex = executor();
    ex.run(&saxpy_task(256), &mut no_checkpoints).unwrap();
    ex.run(&saxpy_task(256), &mut no_checkpoints).unwrap();
    assert_eq!(ex.cache.compiled, 1, "the second run reuses the pipeline");
    // A kernel that writes nothing reads back zeros, even in a buffer of the
    // size saxpy's output just had.
    let idle = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;
        @compute @workgroup_size(1) fn main() { if (arrayLength(&out) == 0u) { out[0] = 1.0; } }";
    let t = Task::new(
        idle,
        "main",
        vec![Binding::Output {
            binding: 0,
            len: 256,
            elem: ElemType::F32,
        }],
        [1, 1, 1],
    );
    let out = ex.run(&t, &mut no_checkpoints).unwrap();
    assert!(out.outputs[0].data.iter().all(|&b| b == 0));
}

#[test]
fn compile_time_is_counted_apart_from_gpu_time() {
    let mut ex = executor();
    let first = ex.run(&saxpy_task(256), &mut no_checkpoints).unwrap();
    assert!(
        first.compile_time > Duration::ZERO,
        "a new kernel is compiled"
    );
    let again = ex.run(&saxpy_task(256), &mut no_checkpoints).unwrap();
    assert_eq!(again.compile_time, Duration::ZERO, "a cached kernel is not");
    assert_eq!(first.outputs[0].hash, again.outputs[0].hash);

    // A library kernel warmed ahead of its first task costs that task
    // nothing, and the warm-up's scratch buffers leave the task's alone.
    let k = library::get("saxpy").unwrap();
    assert!(ex.warm(k.source, k.entry_point).unwrap() > Duration::ZERO);
    let (x, y) = ([1.0f32, 2.0, 3.0], [10.0f32, 20.0, 30.0]);
    let out = ex
        .run(&saxpy::task(2.0, &x, &y), &mut no_checkpoints)
        .unwrap();
    assert_eq!(out.compile_time, Duration::ZERO);
    assert_eq!(to_f32(&out.outputs[0].data), saxpy::cpu(2.0, &x, &y));
    assert_eq!(ex.cache.compiled, 2);

    // Warming a kernel that does not compile says why.
    let err = ex.warm("@compute @workgroup_size(1) fn main( {}", "main");
    assert!(matches!(err, Err(TaskError::Intake(_))), "{err:?}");
}

const COUNTER: &str = "
struct Info { step: u32, steps: u32, task: u32, count: u32 }
@group(0) @binding(0) var<uniform> info: Info;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@compute @workgroup_size(1)
fn main() {
    state[0] = state[0] + 1u;          // steps run
    state[1] = state[1] + info.step;   // sum of step indices
    state[2] = info.steps;
    state[3] = info.task * 1000u + info.count;
}";

fn counter_task(steps: u32) -> Task {
    let mut t = Task::new(
        COUNTER,
        "main",
        vec![Binding::State {
            binding: 1,
            data: vec![0; 16].into(),
            elem: ElemType::U32,
        }],
        [1, 1, 1],
    );
    t.steps = steps;
    t.info_binding = Some(0);
    t.task_index = 7;
    t.task_count = 9;
    t
}

#[test]
fn steps_see_their_index_and_checkpoints_hand_back_state() {
    let mut ex = executor();
    let mut t = counter_task(10);
    t.checkpoint_every = Some(4);
    let mut seen = Vec::new();
    let out = ex
        .run(&t, &mut |c: Checkpoint| {
            seen.push((c.step, to_u32(&c.state[0].data)));
            Ok(())
        })
        .unwrap();
    assert_eq!(to_u32(&out.outputs[0].data), vec![10, 45, 10, 7009]);
    assert_eq!(
        seen,
        vec![(4, vec![4, 6, 10, 7009]), (8, vec![8, 28, 10, 7009])]
    );

    // Resuming from the step-8 checkpoint gives the same final state.
    let mut resumed = counter_task(10);
    resumed.start_step = 8;
    resumed.bindings = vec![Binding::State {
        binding: 1,
        data: [8u32, 28, 10, 7009]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        elem: ElemType::U32,
    }];
    let again = ex.run(&resumed, &mut no_checkpoints).unwrap();
    assert_eq!(again.outputs[0].data, out.outputs[0].data);

    // The caller may stop a task at a checkpoint.
    let err = ex
        .run(&t, &mut |c: Checkpoint| Err(TaskError::Stopped(c.step)))
        .unwrap_err();
    assert_eq!(err, TaskError::Stopped(4));
}

#[test]
fn out_of_bounds_access_is_contained() {
    let mut ex = executor();
    // Reads past the end and writes past the end: wgpu's bounds checks keep
    // both inside the buffer; nothing crashes.
    let k = "@group(0) @binding(0) var<storage, read> x: array<u32>;
        @group(0) @binding(1) var<storage, read_write> out: array<u32>;
        @compute @workgroup_size(4)
        fn main(@builtin(global_invocation_id) id: vec3<u32>) {
            let far = id.x + 1000000u;
            out[far] = 0xdeadbeefu;
            out[id.x] = x[far] + x[id.x];
        }";
    let data: Vec<u8> = [1u32, 2, 3, 4]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let t = Task::new(
        k,
        "main",
        vec![
            Binding::Input {
                binding: 0,
                data: data.into(),
            },
            Binding::Output {
                binding: 1,
                len: 4,
                elem: ElemType::U32,
            },
        ],
        [1, 1, 1],
    );
    let out = ex.run(&t, &mut no_checkpoints).unwrap();
    let got = to_u32(&out.outputs[0].data);
    // Each out-of-bounds read gives zero or an in-bounds element (wgpu's
    // defined behaviour); the in-bounds part is always there.
    for (i, v) in got.iter().enumerate() {
        assert!(
            (i as u32 + 1..=i as u32 + 5).contains(v),
            "element {i} = {v:#x}"
        );
    }
    // The host is unaffected: the next task runs normally.
    ex.run(&saxpy_task(64), &mut no_checkpoints).unwrap();
}

#[test]
fn uninitialised_memory_reads_zero() {
    let mut ex = executor();
    let k = "var<private> p: array<u32, 64>;
        var<workgroup> w: array<u32, 64>;
        @group(0) @binding(0) var<storage, read_write> out: array<u32>;
        @compute @workgroup_size(64)
        fn main(@builtin(local_invocation_index) i: u32) {
            var f: array<u32, 64>;
            out[i] = p[i] | w[63u - i] | f[i] | out[i];
        }";
    let t = Task::new(
        k,
        "main",
        vec![Binding::Output {
            binding: 0,
            len: 64,
            elem: ElemType::U32,
        }],
        [1, 1, 1],
    );
    let out = ex.run(&t, &mut no_checkpoints).unwrap();
    assert!(to_u32(&out.outputs[0].data).iter().all(|&v| v == 0));
}

#[test]
fn bad_tasks_get_named_errors() {
    let mut ex = executor();
    let mut t = saxpy_task(64);
    t.bindings.pop();
    let err = ex.run(&t, &mut no_checkpoints).unwrap_err();
    assert!(
        matches!(
            err,
            TaskError::Intake(IntakeError::MissingBinding { binding: 3, .. })
        ),
        "{err}"
    );
    let mut t = saxpy_task(64);
    t.dispatch = [100_000, 1, 1];
    let err = ex.run(&t, &mut no_checkpoints).unwrap_err();
    assert!(
        err.to_string().contains("max_workgroups_per_dimension"),
        "{err}"
    );
    let mut t = saxpy_task(64);
    t.bindings[3] = Binding::Output {
        binding: 3,
        len: 1 << 30,
        elem: ElemType::F32,
    };
    let err = ex.run(&t, &mut no_checkpoints).unwrap_err();
    assert!(
        err.to_string().contains("max_buffer_bytes"),
        "an output larger than the cap: {err}"
    );
    let mut t = saxpy_task(64);
    t.kernel = "fn main() {".into();
    let err = ex.run(&t, &mut no_checkpoints).unwrap_err();
    assert!(err.to_string().contains("syntax error at line 1"), "{err}");
}
