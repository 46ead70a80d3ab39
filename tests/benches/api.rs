//! The researcher's API, measured side by side in one run:
//!
//! 1. Upload: a 1 GiB input uploaded to a running node's API (`PUT
//!    /v1/blobs/HASH` through the CLI's client, hashed and written to the
//!    blob store as it streams), against the blob store ingesting the same
//!    file on this process's side (`Blobs::put_range`: read, hash, write,
//!    sync). Target ≥ 0.8.
//! 2. Memory: the node's peak resident memory while that upload streams,
//!    above its resident memory at idle just before. Target < 256 MiB.
//! 3. Submit to first result: the same small job through the CLI
//!    (`alliance submit --wait`, then `alliance job results`) and through
//!    the Python client (`Client.submit`, `wait`, `result`), alternating,
//!    against one local alliance. Target Python / CLI ≤ 1.1. Needs the
//!    client installed in `target/python-venv` (`python/run-tests` puts it
//!    there); skipped with a message without it.
//! 4. GPU time as billed: the demo's SGEMM job (`library:sgemm`, 128×128,
//!    two replicas) on a local alliance whose workers warm the library at
//!    start, as the demo's do: each replica's GPU time in the job's record
//!    against the bare executor's time for the same task on the same
//!    adapter, warm. Target ≤ 1.5: compile time is reported apart, and a
//!    replica's GPU time is the kernel's. The job records' compile time is
//!    shown beside.
//!
//! Run: `cargo bench -p alliance-tests --bench api`
//! (`API_BENCH=upload,submit,sgemm` picks the parts; `UPLOAD_MIB=N` the
//! size; `SUBMIT_ROUNDS=N` the rounds of part 3, `SGEMM_ROUNDS=N` of 4.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alliance_node::api::Api;
use alliance_node::store::blobs::Blobs;
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;
use alliance_tests::jobs::{
    alliance, alliance_of_three, alliance_of_three_with, run_job, text, write,
};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn upload() {
    let mib: u64 = std::env::var("UPLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let a = TestAlliance::new("Upload Bench", &[("University North", Roles::ALL)], 30);
    let dir = a.node("boot", 0, Roles::BOOTSTRAP);
    let node = dir.start(true);
    let scratch = tempfile::tempdir_in(&dir.path).unwrap();
    let file = scratch.path().join("input.bin");
    {
        let mut f = std::fs::File::create(&file).unwrap();
        let mut block = vec![0u8; 4 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..mib / 4 {
            for b in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let bytes = mib << 20;
    let api = Api::local(&dir.path).unwrap();
    let store = Blobs::open(&scratch.path().join("ingest")).unwrap();
    let pid = node.pid();
    println!("upload: {mib} MiB, the node's API against the blob store's own ingest");
    println!(
        "{:>5} {:>12} {:>12} {:>7} {:>14}",
        "round", "upload MB/s", "ingest MB/s", "ratio", "peak RSS +MiB"
    );
    let mut ratios = Vec::new();
    let mut peaks = Vec::new();
    for round in 0..3 {
        // Ingest: the same bytes, read, hashed, written and synced.
        let t = Instant::now();
        let h = store.put_range(&file, 0, bytes).unwrap();
        let ingest = t.elapsed();
        std::fs::remove_file(store.path(&h)).unwrap();

        // Upload: a fresh blob each round (the node answers at once for
        // one it has), so the file is touched to change its hash.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
            f.write_all_at(&[round as u8 + 1; 8], 0).unwrap();
        }
        std::thread::sleep(Duration::from_secs(1));
        let idle = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(idle));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        // The client hashes the file first, as `alliance submit` does;
        // that is the client's time, not the upload's, and is not timed.
        let hash = alliance_node::api::hash_file(&file).unwrap();
        let t = Instant::now();
        api.upload_hashed(&file, hash, &|_, _| {}).unwrap();
        let up = t.elapsed();
        done.store(true, Ordering::Relaxed);
        sampler.join().unwrap();
        assert_eq!(
            api.get(&format!("/v1/blobs/{hash}")).unwrap()["complete"],
            true
        );
        let mbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
        let ratio = ingest.as_secs_f64() / up.as_secs_f64();
        let above = (peak.load(Ordering::Relaxed).saturating_sub(idle)) as f64 / 1024.0;
        println!(
            "{round:>5} {:>12.0} {:>12.0} {ratio:>7.2} {above:>14.1}",
            mbps(up),
            mbps(ingest)
        );
        ratios.push(ratio);
        peaks.push(above);
        let _ = std::fs::remove_file(dir.path.join("blobs").join(hash.to_string()));
    }
    ratios.sort_by(f64::total_cmp);
    let worst_peak = peaks.iter().copied().fold(0.0, f64::max);
    println!(
        "upload / ingest (median of 3): {:.2} (target ≥ 0.8); peak RSS above idle, worst: {worst_peak:.1} MiB (target < 256)",
        ratios[1]
    );
}

fn submit() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-venv/bin/python");
    if !python.exists() {
        println!(
            "submit: skipped, no Python client in {} (run python/run-tests once)",
            python.display()
        );
        return;
    }
    let rounds: usize = std::env::var("SUBMIT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let net = alliance_of_three();
    let jobs = net.sub_dir.path.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let x: Vec<u8> = (0..4096u32)
        .flat_map(|v| (v as f32).to_le_bytes())
        .collect();
    write(
        &jobs,
        "x.npy",
        alliance_node::submit::npy::write(alliance_protocol::task::ElemType::F32, &[4096], &x),
    );
    let job = write(
        &jobs,
        "job.toml",
        "kernel = \"library:saxpy\"\ndispatch = [16, 1, 1]\n[[inputs]]\nbinding = 0\nkind = \"uniform\"\nfile = \"p.bin\"\n[[inputs]]\nbinding = 1\nfile = \"x.npy\"\n[[inputs]]\nbinding = 2\nfile = \"x.npy\"\nkind = \"state\"\n",
    );
    let mut p = 2.0f32.to_le_bytes().to_vec();
    p.extend_from_slice(&4096u32.to_le_bytes());
    write(&jobs, "p.bin", p);
    let token = std::fs::read_to_string(net.sub_dir.path.join("api.token")).unwrap();
    let url = format!(
        "http://{}",
        std::fs::read_to_string(net.sub_dir.path.join("api.addr"))
            .unwrap()
            .trim()
    );
    let script = format!(
        "import sys, time, alliance\nc = alliance.Client({url:?}, {token:?})\nt = time.monotonic()\nj = c.submit({job:?})\nj.wait()\nr = j.result(2, task=0)\nprint(time.monotonic() - t)\n",
        job = job.display().to_string(),
        token = token.trim()
    );
    let py = |s: &str| -> Duration {
        let o = std::process::Command::new(&python)
            .args(["-c", s])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Duration::from_secs_f64(String::from_utf8_lossy(&o.stdout).trim().parse().unwrap())
    };
    let out = jobs.join("out");
    let cli = || -> Duration {
        let t = Instant::now();
        let o = alliance(
            &["submit", job.to_str().unwrap(), "--wait"],
            &net.sub_dir.path,
        );
        assert!(o.status.success(), "{}", text(&o));
        let id = text(&o)
            .split_whitespace()
            .skip_while(|w| *w != "job")
            .nth(1)
            .unwrap()
            .to_owned();
        let o = alliance(
            &["job", "results", &id, "--out", out.to_str().unwrap()],
            &net.sub_dir.path,
        );
        assert!(o.status.success(), "{}", text(&o));
        t.elapsed()
    };
    // One of each first, to warm the workers' kernel caches.
    cli();
    py(&script);
    println!("submit to first result: the same saxpy job through the CLI and through Python");
    println!(
        "{:>5} {:>9} {:>12} {:>7}",
        "round", "CLI s", "Python s", "ratio"
    );
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let c = cli();
        let p = py(&script);
        let ratio = p.as_secs_f64() / c.as_secs_f64();
        println!(
            "{round:>5} {:>9.3} {:>12.3} {ratio:>7.2}",
            c.as_secs_f64(),
            p.as_secs_f64()
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "Python / CLI, submit to first result (median of {rounds}): {:.2} (target ≤ 1.1)",
        ratios[rounds / 2]
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sgemm() {
    use alliance_kernels::executor::{Checkpoint, Executor, TaskError};
    use alliance_kernels::gpu::{self, Selection};
    use alliance_kernels::intake::Limits;
    use alliance_node::cli::demo;

    let rounds: usize = std::env::var("SGEMM_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let m = demo::SGEMM_M;
    let net = alliance_of_three_with(|d| d.warm_library());
    let jobs = net.sub_dir.path.join("jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    let (a, b) = demo::write_sgemm_job(&jobs, m).unwrap();
    let job = jobs.join("sgemm.toml");
    let (mut billed, mut compiled) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let id = run_job(&net.sub_dir, &job);
        let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
        for r in d["tasks"][0]["replicas"].as_array().unwrap() {
            if r["state"] == "verified" {
                billed.push(r["gpu_time_us"].as_f64().unwrap() / 1000.0);
                compiled.push(r["compile_time_us"].as_f64().unwrap() / 1000.0);
            }
        }
    }
    // The bare executor: the same task on the same adapter, warm.
    let gpu = gpu::discover(&Selection::All).unwrap().remove(0);
    let mut ex = Executor::open(&gpu.adapter, Limits::default()).unwrap();
    let task = alliance_kernels::library::sgemm::tiled(m, m, m, &a, &b);
    let mut none = |_: Checkpoint| -> Result<(), TaskError> { Ok(()) };
    let cold = ex.run(&task, &mut none).unwrap();
    let bare: Vec<f64> = (0..rounds.max(5))
        .map(|_| ex.run(&task, &mut none).unwrap().gpu_time.as_secs_f64() * 1000.0)
        .collect();
    println!(
        "sgemm: the demo's {m}×{m} job on {} ({} replicas in {rounds} jobs)",
        gpu.report.name,
        billed.len()
    );
    println!(
        "  replica GPU time, median {:.2} ms (max {:.2}); compile time in the records, max {:.1} ms",
        median(billed.clone()),
        billed.iter().copied().fold(0.0, f64::max),
        compiled.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "  bare executor, warm: median {:.2} ms; its first run compiled for {:.1} ms",
        median(bare.clone()),
        cold.compile_time.as_secs_f64() * 1000.0
    );
    println!(
        "demo SGEMM GPU time / bare executor time (medians): {:.2} (target ≤ 1.5)",
        median(billed) / median(bare)
    );
}

fn main() {
    let parts = std::env::var("API_BENCH").unwrap_or_else(|_| "upload,submit,sgemm".into());
    for part in parts.split(',') {
        match part {
            "upload" => upload(),
            "submit" => submit(),
            "sgemm" => sgemm(),
            other => eprintln!("API_BENCH: no part {other:?} (upload, submit, sgemm)"),
        }
    }
}
