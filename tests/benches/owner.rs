//! The owner's GPU and long tasks, measured with processes of the release
//! binary on 127.0.0.1:
//!
//! 1. Checkpoint overhead: a 200-step heat-equation task (the standard
//!    library's stencil on a 1024×1024 grid, two 4 MiB state buffers) with a
//!    checkpoint every 10, 50 and 200 steps, each as a ratio to the same
//!    task without checkpoints; the four jobs run interleaved, five rounds,
//!    medians compared. A checkpoint here is the state read back from the
//!    GPU, hashed, signed, sent to the submitter (as blobs: 8 MiB), fetched,
//!    stored and acknowledged.
//! 2. Preemption latency: from the owner's signal file appearing on the
//!    worker that runs a task to the task being stopped and handed back at
//!    the submitter, and to it running again on another worker, three
//!    times (signals read every 100 ms).
//!
//! Run: `cargo bench -p alliance-tests --bench owner`
//! (`OWNER_BENCH=checkpoint,preempt` picks the parts).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::path::Path;
use std::time::{Duration, Instant};

use alliance_kernels::library;
use alliance_node::submit::npy;
use alliance_protocol::task::ElemType;
use alliance_tests::alliance::{NodeDir, wait_for};
use alliance_tests::jobs::{alliance, submit, submitter_and_workers, text, time_job, write};

const GRID: u32 = 1024;
const STEPS: u32 = 200;

/// A heat job on a `GRID`² grid: `steps` steps, a checkpoint every
/// `every` (none: no checkpoints).
fn heat_job(dir: &Path, name: &str, steps: u32, every: Option<u32>) -> std::path::PathBuf {
    let n = (GRID * GRID) as usize;
    let grid: Vec<f32> = (0..n)
        .map(|i| if i % 97 == 0 { 100.0 } else { (i % 13) as f32 })
        .collect();
    std::fs::write(
        dir.join("grid.npy"),
        npy::write(
            ElemType::F32,
            &[u64::from(GRID), u64::from(GRID)],
            &library::f32_bytes(&grid),
        ),
    )
    .unwrap();
    let mut params = library::u32_bytes(&[GRID, GRID]);
    params.extend(library::f32_bytes(&[0.2]));
    std::fs::write(dir.join("params.bin"), params).unwrap();
    let every = every.map_or(String::new(), |k| format!("checkpoint_every = {k}\n"));
    write(
        dir,
        name,
        format!(
            r#"kernel = "library:heat"
dispatch = [{g}, {g}, 1]
steps = {steps}
{every}info_binding = 0
timeout_secs = 600
[[inputs]]
binding = 1
kind = "uniform"
file = "params.bin"
type = "u8"
[[inputs]]
binding = 2
kind = "state"
file = "grid.npy"
[[inputs]]
binding = 3
kind = "state"
file = "grid.npy"
"#,
            g = GRID / 16
        ),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn checkpoint_overhead() {
    println!(
        "checkpoint overhead: a {STEPS}-step heat task on a {GRID}x{GRID} grid through a submitter and one worker"
    );
    let net = submitter_and_workers(1, |_, _| {});
    let dir = net.a.dir.path().join("ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let kinds: [Option<u32>; 4] = [None, Some(10), Some(50), Some(200)];
    let jobs: Vec<_> = kinds
        .iter()
        .map(|k| heat_job(&dir, &format!("heat-{k:?}.toml"), STEPS, *k))
        .collect();
    time_job(&net.sub_dir, &net.sub, &jobs[0]);
    let mut times = vec![Vec::new(); kinds.len()];
    for _ in 0..5 {
        for (i, job) in jobs.iter().enumerate() {
            times[i].push(time_job(&net.sub_dir, &net.sub, job));
        }
    }
    let times: Vec<f64> = times.into_iter().map(median).collect();
    println!("  no checkpoints: {:.3} s (median of 5)", times[0]);
    for (k, t) in kinds.iter().zip(&times).skip(1) {
        println!(
            "  every {:>3} steps: {t:.3} s; ratio {:.3} ({} checkpoints of 8 MiB)",
            k.unwrap(),
            t / times[0],
            (STEPS - 1) / k.unwrap()
        );
    }
}

fn preemption_latency() {
    println!("preemption latency: the owner's signal file appears on the worker running a task");
    let net = submitter_and_workers(2, |i, d| {
        if i == 0 {
            d.edit_config("poll_ms = 1000", "poll_ms = 100");
            d.edit_config("idle_for_secs = 300", "idle_for_secs = 1");
            d.edit_config("# busy_file = ", "busy_file = ");
        } else {
            std::fs::write(d.path.join("paused.json"), "[0]").unwrap();
        }
    });
    let dir = net.a.dir.path().join("preempt");
    std::fs::create_dir_all(&dir).unwrap();
    let (w0, w1) = (&net.workers[0], &net.workers[1]);
    let (p0, p1) = (w0.0.peer(), w1.0.peer());
    let pause = |d: &NodeDir, on: bool| {
        let o = alliance(&[if on { "pause" } else { "resume" }], &d.path);
        assert!(o.status.success(), "{}", text(&o));
    };
    let job = heat_job(&dir, "long.toml", 20_000, Some(10));
    let (mut stop, mut again) = (Vec::new(), Vec::new());
    for round in 0..3 {
        wait_for(Duration::from_secs(60), "w0 lending, w1 paused", || {
            net.sub.gpu_state(&p0).as_deref() == Some("Idle")
                && net.sub.gpu_state(&p1).as_deref() == Some("Paused")
        });
        let id = submit(&net.sub_dir.path, &job);
        let task = || {
            net.sub
                .get(&format!("/v1/jobs/{id}"))
                .map(|d| d["tasks"][0].clone())
                .unwrap_or_default()
        };
        wait_for(Duration::from_secs(120), "a checkpoint on w0", || {
            task()["replicas"][0]["checkpoint"].as_u64().is_some()
        });
        pause(&w1.0, false);
        wait_for(Duration::from_secs(60), "w1 lending", || {
            net.sub.gpu_state(&p1).as_deref() == Some("Idle")
        });
        let t0 = Instant::now();
        std::fs::write(w0.0.path.join("owner-busy"), "").unwrap();
        let mut handed = None;
        loop {
            let t = task();
            let reps = t["replicas"].as_array().cloned().unwrap_or_default();
            if handed.is_none() && reps[0]["state"] == "handed_back" {
                handed = Some(t0.elapsed());
            }
            if reps
                .iter()
                .any(|r| r["worker"] == p1.as_str() && r["state"] == "running")
            {
                let h = handed.unwrap_or_else(|| t0.elapsed());
                let a = t0.elapsed();
                println!(
                    "  round {round}: stopped and handed back after {:.0} ms, running on another worker after {:.0} ms",
                    h.as_secs_f64() * 1e3,
                    a.as_secs_f64() * 1e3
                );
                stop.push(h.as_secs_f64());
                again.push(a.as_secs_f64());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no preemption: {t}");
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = alliance(&["job", "cancel", &id], &net.sub_dir.path);
        assert!(o.status.success(), "{}", text(&o));
        std::fs::remove_file(w0.0.path.join("owner-busy")).unwrap();
        pause(&w1.0, true);
    }
    println!(
        "  median: handed back {:.0} ms, running elsewhere {:.0} ms after the owner's signal",
        median(stop) * 1e3,
        median(again) * 1e3
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let parts = std::env::var("OWNER_BENCH").unwrap_or_else(|_| "checkpoint,preempt".into());
    alliance_tests::build_release_alliance();
    if parts.contains("checkpoint") {
        checkpoint_overhead();
    }
    if parts.contains("preempt") {
        preemption_latency();
    }
}
