//! Executor benchmarks, measured side by side in one run on the first
//! adapter found (the software one on a machine without a GPU).
//!
//! 1. Sandbox overhead: a task through the sandbox (child process, files
//!    for large data) against the same kernel and data through a bare wgpu
//!    program (one device, pipeline and buffers made once, then write,
//!    dispatch, read back), for a large saxpy and a 512×512 SGEMM.
//!    Target: sandboxed / bare time ≤ 1.10.
//! 2. Small-task throughput: tasks per second through a warm sandbox
//!    against bare dispatch-and-readback round trips. Target ≥ 0.5.
//! 3. SGEMM: GFLOP/s of the tiled library kernel, the naive kernel and a
//!    plain CPU loop on the same matrices.
//! 4. The adapter's self-benchmark.
//!
//! Run: `cargo bench -p alliance-kernels --bench executor`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::time::{Duration, Instant};

use alliance_kernels::executor::{Binding, Data, ElemType, Executor, Task};
use alliance_kernels::gpu::{self, Gpu, Selection};
use alliance_kernels::intake::Limits;
use alliance_kernels::library::{self, f32_bytes, saxpy, sgemm, u32_bytes};
use alliance_kernels::sandbox::{ChildConfig, Config, ResourceLimits, Sandbox};
use alliance_kernels::selfbench;

const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A plain wgpu program: everything made once, then write, dispatch, read.
struct Bare {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<(u32, wgpu::Buffer)>,
    out: wgpu::Buffer,
    staging: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    dispatch: [u32; 3],
}

impl Bare {
    /// `inputs`: (binding, uniform?, bytes); `out`: (binding, bytes).
    fn new(
        gpu: &Gpu,
        source: &str,
        inputs: &[(u32, bool, usize)],
        out: (u32, usize),
        dispatch: [u32; 3],
    ) -> Self {
        let (device, queue) =
            pollster::block_on(gpu.adapter.request_device(&wgpu::DeviceDescriptor {
                required_limits: gpu.adapter.limits(),
                ..Default::default()
            }))
            .unwrap();
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: None,
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        use wgpu::BufferUsages as U;
        let make = |size: usize, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: (size.max(4).div_ceil(4) * 4) as u64,
                usage,
                mapped_at_creation: false,
            })
        };
        let buffers: Vec<(u32, wgpu::Buffer)> = inputs
            .iter()
            .map(|&(b, uniform, size)| {
                (
                    b,
                    make(
                        size,
                        if uniform {
                            U::UNIFORM | U::COPY_DST
                        } else {
                            U::STORAGE | U::COPY_DST
                        },
                    ),
                )
            })
            .collect();
        let out_buf = make(out.1, U::STORAGE | U::COPY_SRC | U::COPY_DST);
        let staging = make(out.1, U::MAP_READ | U::COPY_DST);
        let mut entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .map(|(b, buf)| wgpu::BindGroupEntry {
                binding: *b,
                resource: buf.as_entire_binding(),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: out.0,
            resource: out_buf.as_entire_binding(),
        });
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Self {
            device,
            queue,
            pipeline,
            buffers,
            out: out_buf,
            staging,
            bind_group,
            dispatch,
        }
    }

    /// One round trip: upload `data` (in the order of `inputs`), dispatch, read back.
    fn run(&self, data: &[&[u8]], init_out: Option<&[u8]>) -> Vec<u8> {
        for ((_, buf), d) in self.buffers.iter().zip(data) {
            self.queue.write_buffer(buf, 0, d);
        }
        if let Some(d) = init_out {
            self.queue.write_buffer(&self.out, 0, d);
        }
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.bind_group, &[]);
            let [x, y, z] = self.dispatch;
            pass.dispatch_workgroups(x, y, z);
        }
        enc.copy_buffer_to_buffer(&self.out, 0, &self.staging, 0, self.out.size());
        self.queue.submit([enc.finish()]);
        self.staging
            .map_async(wgpu::MapMode::Read, .., |r| r.unwrap());
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
        let bytes = self.staging.get_mapped_range(..).unwrap().to_vec();
        self.staging.unmap();
        bytes
    }
}

fn sandbox(scratch: &Path) -> Sandbox {
    Sandbox::start(Config {
        program: env!("CARGO_BIN_EXE_alliance-sandbox").into(),
        args: vec![],
        env: vec![],
        child: ChildConfig {
            adapter: Selection::Indices(vec![0]),
            limits: Limits::default(),
            rlimits: ResourceLimits::default(),
            scratch: scratch.to_owned(),
        },
        start_timeout: Duration::from_secs(120),
        compile_timeout: Duration::from_secs(300),
    })
    .unwrap()
}

fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

/// Interleaved rounds of `bare` and `boxed`; returns medians (bare s, boxed s, ratio).
fn side_by_side(mut bare: impl FnMut() -> f64, mut boxed: impl FnMut() -> f64) -> (f64, f64, f64) {
    bare();
    boxed(); // warm both
    let (mut b, mut s, mut r) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        let (tb, ts) = if round % 2 == 0 {
            let tb = bare();
            (tb, boxed())
        } else {
            let ts = boxed();
            (bare(), ts)
        };
        b.push(tb);
        s.push(ts);
        r.push(ts / tb);
    }
    (median(b), median(s), median(r))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let gpu = gpu::discover(&Selection::Indices(vec![0]))
        .unwrap()
        .remove(0);
    println!(
        "adapter: {} ({}, {})",
        gpu.report.name, gpu.report.backend, gpu.report.device_type
    );
    let work = tempfile::tempdir().unwrap();
    let scratch = work.path().join("scratch");
    let mut sb = sandbox(&scratch);
    let mut rows: Vec<(String, String, String, f64, f64)> = Vec::new();

    // 1a. Large saxpy: inputs as blob files, output written to a file and read back.
    let n: usize = if gpu.report.software {
        8 << 20
    } else {
        // The most saxpy reaches along x alone: 65535 workgroups of 256.
        65_535 * 256
    };
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let (xb, yb) = (f32_bytes(&x), f32_bytes(&y));
    let mut params = f32_bytes(&[2.0]);
    params.extend(u32_bytes(&[n as u32]));
    let (xf, yf) = (work.path().join("x.blob"), work.path().join("y.blob"));
    std::fs::write(&xf, &xb).unwrap();
    std::fs::write(&yf, &yb).unwrap();
    let saxpy_src = library::get("saxpy").unwrap().source;
    let dispatch = [
        (n as u32).div_ceil(256).min(65_535),
        (n as u32).div_ceil(256 * 65_535).max(1),
        1,
    ];
    assert_eq!(dispatch[1], 1, "saxpy indexes along x only");
    let bare = Bare::new(
        &gpu,
        saxpy_src,
        &[(0, true, 8), (1, false, xb.len())],
        (2, yb.len()),
        dispatch,
    );
    let out_dir = scratch.join("saxpy-out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut task = saxpy::task(2.0, &[], &[]);
    task.bindings = vec![
        Binding::Uniform {
            binding: 0,
            data: params.clone().into(),
        },
        Binding::Input {
            binding: 1,
            data: Data::File {
                path: xf,
                len: xb.len() as u64,
            },
        },
        Binding::State {
            binding: 2,
            data: Data::File {
                path: yf,
                len: yb.len() as u64,
            },
            elem: ElemType::F32,
        },
    ];
    task.dispatch = dispatch;
    task.output_dir = Some(out_dir);
    let want = f32_bytes(&saxpy::cpu(2.0, &x, &y));
    let got = bare.run(&[&params, &xb], Some(&yb));
    assert_eq!(got, want);
    let (tb, ts, ratio) = side_by_side(
        || time(|| bare.run(&[&params, &xb], Some(&yb))).0,
        || {
            time(|| {
                let out = sb
                    .run(&task, Duration::from_secs(600), &mut |_| Ok(()))
                    .unwrap();
                // The output stays a file (the node serves it as a blob);
                // its hash is already in the outcome.
                assert_eq!(out.outputs[0].len, want.len() as u64);
            })
            .0
        },
    );
    rows.push((
        format!("saxpy, {} M elements", n >> 20),
        format!("{:.1} ms", tb * 1e3),
        format!("{:.1} ms", ts * 1e3),
        ratio,
        1.10,
    ));

    // 1b. 512×512 SGEMM, data inline through the pipe.
    let m = 512;
    let a: Vec<f32> = (0..m * m).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
    let b: Vec<f32> = (0..m * m).map(|i| ((i * 5) % 11) as f32 / 11.0).collect();
    let tiled = sgemm::tiled(m, m, m, &a, &b);
    let dims = u32_bytes(&[m as u32; 3]);
    let (ab, bb) = (f32_bytes(&a), f32_bytes(&b));
    let bare_gemm = Bare::new(
        &gpu,
        library::get("sgemm").unwrap().source,
        &[(0, true, 12), (1, false, ab.len()), (2, false, bb.len())],
        (3, m * m * 4),
        tiled.dispatch,
    );
    let reference = bare_gemm.run(&[&dims, &ab, &bb], None);
    let boxed = sb
        .run(&tiled, Duration::from_secs(600), &mut |_| Ok(()))
        .unwrap();
    assert_eq!(
        boxed.outputs[0].data, reference,
        "same kernel, same device kind, same bits"
    );
    let (tb, ts, ratio) = side_by_side(
        || time(|| bare_gemm.run(&[&dims, &ab, &bb], None)).0,
        || {
            time(|| {
                sb.run(&tiled, Duration::from_secs(600), &mut |_| Ok(()))
                    .unwrap()
            })
            .0
        },
    );
    rows.push((
        "SGEMM 512×512".into(),
        format!("{:.1} ms", tb * 1e3),
        format!("{:.1} ms", ts * 1e3),
        ratio,
        1.10,
    ));

    // 2. Small tasks: 256-element saxpy round trips.
    let (sx, sy) = (vec![1.0f32; 256], vec![2.0f32; 256]);
    let small = saxpy::task(3.0, &sx, &sy);
    let mut sp = f32_bytes(&[3.0]);
    sp.extend(u32_bytes(&[256]));
    let (sxb, syb) = (f32_bytes(&sx), f32_bytes(&sy));
    let bare_small = Bare::new(
        &gpu,
        saxpy_src,
        &[(0, true, 8), (1, false, 1024)],
        (2, 1024),
        [1, 1, 1],
    );
    let batch = 200;
    let (tb, ts, _) = side_by_side(
        || time(|| (0..batch).for_each(|_| drop(bare_small.run(&[&sp, &sxb], Some(&syb))))).0,
        || {
            time(|| {
                (0..batch).for_each(|_| {
                    drop(
                        sb.run(&small, Duration::from_secs(60), &mut |_| Ok(()))
                            .unwrap(),
                    )
                })
            })
            .0
        },
    );
    let (bare_rate, boxed_rate) = (f64::from(batch) / tb, f64::from(batch) / ts);
    let mut local = Executor::open(&gpu.adapter, Limits::default()).unwrap();
    local.run(&small, &mut |_| Ok(())).unwrap();
    let t_local = median(
        (0..ROUNDS)
            .map(|_| {
                time(|| (0..batch).for_each(|_| drop(local.run(&small, &mut |_| Ok(())).unwrap())))
                    .0
            })
            .collect(),
    );
    println!(
        "(small tasks through the executor in this process, no sandbox: {:.0} /s)",
        f64::from(batch) / t_local
    );
    rows.push((
        "small tasks (256-element saxpy)".into(),
        format!("{bare_rate:.0} /s"),
        format!("{boxed_rate:.0} /s"),
        boxed_rate / bare_rate,
        0.5,
    ));

    println!("\nsandboxed vs bare wgpu, median of {ROUNDS} interleaved rounds");
    println!(
        "{:<34} {:>12} {:>12} {:>8} {:>8}",
        "", "bare", "sandboxed", "ratio", "target"
    );
    for (name, b, s, r, target) in &rows {
        let ok = if *target >= 1.0 {
            *r <= *target
        } else {
            *r >= *target
        };
        println!(
            "{name:<34} {b:>12} {s:>12} {r:>8.3} {:>8}",
            format!("{}{target}", if *target >= 1.0 { "≤" } else { "≥" })
                + if ok { "" } else { " MISSED" }
        );
    }

    // 3. SGEMM GFLOP/s: tiled vs naive vs CPU.
    let mut ex = Executor::open(&gpu.adapter, Limits::default()).unwrap();
    let naive = sgemm::naive(m, m, m, &a, &b);
    let flops = 2.0 * (m * m * m) as f64;
    let gpu_time = |ex: &mut Executor, t: &Task| {
        ex.run(t, &mut |_| Ok(())).unwrap();
        median(
            (0..3)
                .map(|_| time(|| ex.run(t, &mut |_| Ok(())).unwrap()).0)
                .collect(),
        )
    };
    let t_tiled = gpu_time(&mut ex, &tiled);
    let t_naive = gpu_time(&mut ex, &naive);
    let t_cpu = median(
        (0..3)
            .map(|_| time(|| sgemm::cpu(m, m, m, &a, &b)).0)
            .collect(),
    );
    println!("\nSGEMM 512×512×512 (wall time per task, upload and read-back included)");
    println!("  tiled kernel  {:>8.2} GFLOP/s", flops / t_tiled / 1e9);
    println!(
        "  naive kernel  {:>8.2} GFLOP/s   tiled/naive {:.2}×",
        flops / t_naive / 1e9,
        t_naive / t_tiled
    );
    println!(
        "  CPU loop      {:>8.2} GFLOP/s   tiled/CPU   {:.2}×",
        flops / t_cpu / 1e9,
        t_cpu / t_tiled
    );

    // 4. Self-benchmark.
    let f = selfbench::measure(&mut ex, selfbench::Sizes::for_adapter(&gpu.report)).unwrap();
    println!(
        "\nself-benchmark: copy {:.1} GB/s, FMA {:.1} GFLOP/s",
        f.copy_gb_per_s, f.fma_gflop_per_s
    );
}
