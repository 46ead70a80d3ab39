//! Helpers for job tests: an alliance of a bootstrap node, three workers
//! and a submitter as processes, and the `alliance` commands a researcher
//! would type.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use alliance_node::submit::npy;
use alliance_protocol::cert::Roles;

use crate::alliance::{NodeDir, Running, TestAlliance, wait_for};

/// How long job tests wait for anything.
pub const LIMIT: Duration = Duration::from_secs(120);

pub fn alliance(args: &[&str], dir: &Path) -> Output {
    std::process::Command::new(crate::alliance_bin())
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .expect("run alliance")
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Submits the job file `job` to the node in `sub` without waiting;
/// returns the job id.
pub fn submit(sub: &Path, job: &Path) -> String {
    let out = alliance(&["submit", job.to_str().unwrap()], sub);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
        .split_whitespace()
        .nth(1)
        .expect("a job id")
        .to_owned()
}

/// Writes `job_text` to `dir/name` and submits it like [`submit`].
pub fn submit_text(sub: &Path, dir: &Path, name: &str, job_text: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    submit(sub, &write(dir, name, job_text))
}

/// Waits until the job leaves the active state; returns its detail.
pub fn wait_end(node: &Running, id: &str) -> serde_json::Value {
    let mut detail = serde_json::Value::Null;
    wait_for(LIMIT, &format!("job {id} to end"), || {
        // The node answers as soon as the job ends, or after a few seconds.
        let end = node
            .get(&format!("/v1/jobs/{id}/end?secs=5"))
            .unwrap_or_default();
        if end.is_null() || end["state"] == "active" {
            return false;
        }
        detail = node.get(&format!("/v1/jobs/{id}")).unwrap_or_default();
        detail["summary"]["state"] == end["state"]
    });
    detail
}

/// `alliance reputation --json` of the node in `dir`.
pub fn reputation(dir: &Path) -> serde_json::Value {
    let out = alliance(&["reputation", "--json"], dir);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("reputation JSON")
}

/// Submits `job` and waits for it; returns the job id.
pub fn run_job(sub: &NodeDir, job: &Path) -> String {
    let out = alliance(&["submit", job.to_str().unwrap(), "--wait"], &sub.path);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    t.split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .expect("a job id")
        .to_owned()
}

pub fn results(sub: &NodeDir, id: &str, out: &Path, concat: bool) {
    let mut args = vec!["job", "results", id, "--out", out.to_str().unwrap()];
    if concat {
        args.push("--concat");
    }
    let o = alliance(&args, &sub.path);
    assert!(o.status.success(), "{}", text(&o));
}

pub fn read_npy(path: &Path) -> npy::Array {
    npy::parse(&std::fs::read(path).unwrap()).unwrap()
}

#[derive(Debug)]
pub struct Net {
    pub a: TestAlliance,
    pub boot: Running,
    pub workers: Vec<(NodeDir, Running)>,
    pub sub_dir: NodeDir,
    pub sub: Running,
}

pub fn alliance_of_three() -> Net {
    alliance_of_three_with(|_| {})
}

/// Like [`alliance_of_three`], with `prepare` applied to each worker's
/// directory before it starts.
pub fn alliance_of_three_with(prepare: impl Fn(&NodeDir)) -> Net {
    let a = TestAlliance::new(
        "Jobs Test",
        &[
            ("University North", Roles::ALL),
            ("University South", Roles::WORK | Roles::SUBMIT),
        ],
        30,
    );
    let boot_dir = a.node("boot", 0, Roles::BOOTSTRAP);
    let boot = boot_dir.start(true);
    let addr = boot.address();
    let workers: Vec<(NodeDir, Running)> = (0..3)
        .map(|i| {
            let d = a.node(&format!("w{i}"), i % 2, Roles::WORK);
            d.set_bootstrap(std::slice::from_ref(&addr));
            prepare(&d);
            let r = d.start(false);
            (d, r)
        })
        .collect();
    let sub_dir = a.node("sub", 1, Roles::SUBMIT);
    sub_dir.set_bootstrap(std::slice::from_ref(&addr));
    let sub = sub_dir.start(false);
    wait_for(LIMIT, "the submitter to see three workers", || {
        sub.advertisers().len() == 3
    });
    Net {
        a,
        boot,
        workers,
        sub_dir,
        sub,
    }
}

/// A Monte Carlo π job file: `tasks` tasks of `wg` workgroups drawing
/// `samples` per invocation from seed `seed`, repeating `steps` times
/// (counts add up over the steps, so long tasks have known answers).
pub fn pi_job(seed: u32, tasks: u32, wg: u32, samples: u32, steps: u32) -> String {
    format!(
        r#"kernel = "library:monte_carlo_pi"
dispatch = [{wg}, 1, 1]
tasks = {tasks}
steps = {steps}
info_binding = 0
timeout_secs = 600
[[inputs]]
binding = 1
kind = "uniform"
type = "u32"
values = [{seed}, {samples}]
[[outputs]]
binding = 2
type = "u32"
len = {wg}
"#
    )
}

/// Every replica of every task in a job's detail (`GET /v1/jobs/ID`).
pub fn replicas(detail: &serde_json::Value) -> Vec<serde_json::Value> {
    detail["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .flat_map(|t| t["replicas"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// A submitter and workers that dial it, for benchmarks: no bootstrap node.
#[derive(Debug)]
pub struct Small {
    pub a: TestAlliance,
    pub sub_dir: NodeDir,
    pub sub: Running,
    pub workers: Vec<(NodeDir, Running)>,
}

/// Starts a submitter and `n` workers of two institutions, logging what a
/// node logs by default (as deployed, not at the tests' debug level);
/// `prepare` edits worker `i`'s directory before it starts.
pub fn submitter_and_workers(n: usize, prepare: impl Fn(usize, &NodeDir)) -> Small {
    let a = TestAlliance::new(
        "Bench",
        &[
            ("North", Roles::ALL),
            ("South", Roles::WORK | Roles::SUBMIT),
        ],
        30,
    );
    let sub_dir = a.node("sub", 1, Roles::SUBMIT);
    let level = std::env::var("BENCH_NODE_LOG").unwrap_or(alliance_node::cli::DEFAULT_LOG.into());
    let log = [("RUST_LOG", level.as_str())];
    let sub = sub_dir.start_with_env(false, &log);
    let addr = sub.address();
    let workers = (0..n)
        .map(|i| {
            let d = a.node(&format!("w{i}"), i % 2, Roles::WORK);
            d.set_bootstrap(std::slice::from_ref(&addr));
            prepare(i, &d);
            let r = d.start_with_env(false, &log);
            (d, r)
        })
        .collect();
    wait_for(Duration::from_secs(60), "the workers' adverts", || {
        sub.advertisers().len() == n
    });
    Small {
        a,
        sub_dir,
        sub,
        workers,
    }
}

/// Seconds from submitting the job file at `path` to its end; panics if
/// it does not end done.
pub fn time_job(sub: &NodeDir, node: &Running, path: &Path) -> f64 {
    let start = std::time::Instant::now();
    let id = submit(&sub.path, path);
    // The node answers as soon as the job has ended: no polling to wait
    // out, and no load on the submitter while it works.
    loop {
        let d = node
            .get(&format!("/v1/jobs/{id}/end?secs=20"))
            .unwrap_or_default();
        match d["state"].as_str() {
            Some("done") => return start.elapsed().as_secs_f64(),
            Some("active") => {}
            None => std::thread::sleep(Duration::from_millis(10)),
            other => panic!("job {id} ended {other:?}: {d}"),
        }
    }
}

/// A kernel that reads a few elements of a large input: what crosses the
/// network is the input, not the work.
pub const SAMPLE: &str = "@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    y[id.x] = x[id.x * (arrayLength(&x) / 64u)];
}
";

/// Writes the `sample` job and its input of `n` floats in `dir`; the job
/// file's path and the output the kernel must give.
pub fn sample_job(dir: &Path, n: usize) -> (PathBuf, Vec<f32>) {
    #[allow(clippy::cast_precision_loss)]
    let x: Vec<f32> = (0..n).map(|i| (i % 10_007) as f32).collect();
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let npy = alliance_node::submit::npy::write(
        alliance_protocol::task::ElemType::F32,
        &[n as u64],
        &bytes,
    );
    write(dir, "x.npy", npy);
    write(dir, "sample.wgsl", SAMPLE);
    let job = "name = \"sample\"\nkernel = \"sample.wgsl\"\ndispatch = [1, 1, 1]\ntimeout_secs = 600\n\
               [[inputs]]\nbinding = 0\nfile = \"x.npy\"\n\
               [[outputs]]\nbinding = 1\ntype = \"f32\"\nlen = 64\n";
    let path = write(dir, "sample.toml", job);
    let want = (0..64).map(|i| x[i * (n / 64)]).collect();
    (path, want)
}
