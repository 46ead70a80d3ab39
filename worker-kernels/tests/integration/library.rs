//! Every library kernel against its CPU reference, on the software adapter.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)] // small test sizes

use alliance_kernels::compare::{self, Tolerance};
use alliance_kernels::executor::{Checkpoint, Executor, Outcome, Task, TaskError};
use alliance_kernels::gpu::{self, Selection};
use alliance_kernels::intake::{self, Limits};
use alliance_kernels::library::{self, *};

fn executor() -> Executor {
    let gpu = gpu::discover(&Selection::All).unwrap().remove(0);
    Executor::open(&gpu.adapter, Limits::default()).unwrap()
}

fn run(ex: &mut Executor, t: &Task) -> Outcome {
    ex.run(t, &mut |_: Checkpoint| Ok(())).unwrap()
}

fn output(o: &Outcome, binding: u32) -> &[u8] {
    &o.outputs
        .iter()
        .find(|x| x.binding == binding)
        .unwrap()
        .data
}

/// Deterministic pseudo-random values for test inputs.
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1 << 24) as f32
                - 0.5
        })
        .collect()
}

const ULPS: Tolerance = Tolerance {
    abs: 0.0,
    rel: 0.0,
    ulps: 4,
};

#[test]
fn every_library_kernel_passes_intake() {
    for k in library::KERNELS {
        intake::check_kernel(k.source, k.entry_point, &Limits::default(), None)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
    }
}

#[test]
fn saxpy() {
    let mut ex = executor();
    let (x, y) = (values(3000, 1), values(3000, 2));
    let o = run(&mut ex, &saxpy::task(1.5, &x, &y));
    // The GPU may fuse the multiply-add; one rounding apart at most.
    compare::f32_within(
        output(&o, 2),
        &f32_bytes(&saxpy::cpu(1.5, &x, &y)),
        &Tolerance { ulps: 1, ..ULPS },
    )
    .unwrap();
}

#[test]
fn reductions_are_bit_exact() {
    let mut ex = executor();
    let x = values(5000, 3);
    let o = run(&mut ex, &reduce::f32_task(&x));
    compare::exact(output(&o, 2), &f32_bytes(&reduce::f32_cpu(&x))).unwrap();
    let total: f32 = reduce::f32_cpu(&x).iter().sum();
    let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
    assert!((f64::from(total) - exact).abs() < 1e-3);

    let u: Vec<u32> = (0..5000u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let o = run(&mut ex, &reduce::u32_task(&u));
    assert_eq!(to_u32(output(&o, 2)), reduce::u32_cpu(&u));
    let total = reduce::u32_cpu(&u)
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(b));
    assert_eq!(total, u.iter().fold(0u32, |a, &b| a.wrapping_add(b)));
}

#[test]
fn prefix_scan() {
    let mut ex = executor();
    let x: Vec<u32> = (0..1000u32).map(|i| i % 7 + 1).collect();
    let o = run(&mut ex, &scan::task(&x));
    assert_eq!(to_u32(output(&o, 2)), scan::cpu(&x));
}

#[test]
fn histogram_with_atomics() {
    let mut ex = executor();
    let v: Vec<u32> = (0..4000u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 1000)
        .collect();
    let o = run(&mut ex, &histogram::task(&v, 16, 64));
    let got = to_u32(output(&o, 2));
    assert_eq!(got, histogram::cpu(&v, 16, 64));
    assert_eq!(got.iter().sum::<u32>(), 4000);
}

#[test]
fn sgemm_tiled_and_naive() {
    let mut ex = executor();
    let (m, n, k) = (70, 50, 40); // not multiples of the tile, on purpose
    let (a, b) = (values(m * k, 4), values(k * n, 5));
    let want = f32_bytes(&sgemm::cpu(m, n, k, &a, &b));
    let tol = Tolerance {
        abs: 1e-5,
        rel: 1e-5,
        ulps: 0,
    };
    let tiled = run(&mut ex, &sgemm::tiled(m, n, k, &a, &b));
    compare::f32_within(output(&tiled, 3), &want, &tol).unwrap();
    let naive = run(&mut ex, &sgemm::naive(m, n, k, &a, &b));
    compare::f32_within(output(&naive, 3), &want, &tol).unwrap();
}

#[test]
fn heat_stencil_with_checkpoints_resumes_exactly() {
    let mut ex = executor();
    let (w, h, steps) = (40, 30, 21u32);
    let mut grid = vec![0f32; w * h];
    grid[15 * w + 20] = 100.0;
    let want = f32_bytes(&heat::cpu(w, h, 0.2, &grid, steps));
    let full = run(&mut ex, &heat::task(w, h, 0.2, &grid, steps));
    let result = output(&full, heat::result_binding(steps)).to_vec();
    compare::f32_within(&result, &want, &Tolerance { abs: 1e-4, ..ULPS }).unwrap();

    // Checkpoint every 5 steps; resume from the one at step 10.
    let mut t = heat::task(w, h, 0.2, &grid, steps);
    t.checkpoint_every = Some(5);
    let mut saved = Vec::new();
    let again = ex.run(&t, &mut |c: Checkpoint| {
        saved.push(c);
        Ok(())
    });
    assert_eq!(
        output(&again.unwrap(), heat::result_binding(steps)),
        &result[..]
    );
    assert_eq!(
        saved.iter().map(|c| c.step).collect::<Vec<_>>(),
        vec![5, 10, 15, 20]
    );
    let at10 = &saved[1];
    let mut resumed = heat::task(w, h, 0.2, &grid, steps);
    resumed.start_step = 10;
    for b in &mut resumed.bindings {
        if let alliance_kernels::executor::Binding::State { binding, data, .. } = b {
            *data = at10
                .state
                .iter()
                .find(|s| s.binding == *binding)
                .unwrap()
                .data
                .clone()
                .into();
        }
    }
    let resumed = run(&mut ex, &resumed);
    assert_eq!(
        output(&resumed, heat::result_binding(steps)),
        &result[..],
        "bit-exact after resuming"
    );
}

#[test]
fn monte_carlo_pi_is_bit_exact() {
    let mut ex = executor();
    let (seed, groups, samples) = (42, 16, 200);
    let o = run(&mut ex, &monte_carlo_pi::task(seed, groups, samples, 3));
    let got = to_u32(output(&o, 2));
    assert_eq!(got, monte_carlo_pi::cpu(seed, groups, samples, 3));
    let total = u64::from(groups * monte_carlo_pi::WORKGROUP * samples);
    let pi = monte_carlo_pi::estimate(&got, total);
    assert!((pi - std::f64::consts::PI).abs() < 0.05, "{pi}");
    // Another task index draws other numbers.
    let other = run(&mut ex, &monte_carlo_pi::task(seed, groups, samples, 4));
    assert_ne!(to_u32(output(&other, 2)), got);
}

#[test]
fn nbody_step() {
    let mut ex = executor();
    let n = 100;
    let r = values(n * 4, 6);
    let pos: Vec<[f32; 4]> = (0..n)
        .map(|i| [r[4 * i], r[4 * i + 1], r[4 * i + 2], 1.0 + r[4 * i + 3]])
        .collect();
    let vel: Vec<[f32; 4]> = (0..n).map(|i| [r[4 * i + 3], r[4 * i], 0.0, 0.0]).collect();
    let o = run(&mut ex, &nbody::task(&pos, &vel, 0.01, 0.1));
    let (p, v) = nbody::cpu(&pos, &vel, 0.01, 0.1);
    let tol = Tolerance {
        abs: 1e-4,
        rel: 1e-4,
        ulps: 0,
    };
    compare::f32_within(output(&o, 3), &f32_bytes(&p), &tol).unwrap();
    compare::f32_within(output(&o, 4), &f32_bytes(&v), &tol).unwrap();
}

#[test]
fn mandelbrot_counts() {
    let mut ex = executor();
    let (w, h, iters, view) = (96, 64, 200, [-2.0, -1.0, 3.0, 2.0]);
    let o = run(&mut ex, &mandelbrot::task(w, h, iters, view));
    let got = to_u32(output(&o, 1));
    let want = mandelbrot::cpu(w, h, iters, view);
    // Points on the boundary are chaotic: a fused multiply-add can change
    // their count. All but a few pixels must agree.
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert!(
        differ * 100 <= got.len(),
        "{differ} of {} pixels differ",
        got.len()
    );
    assert!(
        got.contains(&iters) && got.contains(&1),
        "the image has inside and outside"
    );
}

#[test]
fn hostile_input_to_library_tasks_is_refused_not_run() {
    let mut ex = executor();
    // An output larger than the owner's cap.
    let mut t = library::mandelbrot::task(16, 16, 10, [-2.0, -1.0, 3.0, 2.0]);
    t.bindings[1] = alliance_kernels::executor::Binding::Output {
        binding: 1,
        len: 1 << 28,
        elem: alliance_kernels::executor::ElemType::U32,
    };
    let err = ex.run(&t, &mut |_| Ok(())).unwrap_err();
    assert!(
        matches!(&err, TaskError::Intake(_)) && err.to_string().contains("max_buffer_bytes"),
        "{err}"
    );
}
