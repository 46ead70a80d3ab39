//! The lab's GPU stays the lab's: owner policy keeps work away and says
//! why, the owner's own work preempts alliance tasks, and checkpointed
//! tasks resume elsewhere with the answer an uninterrupted run gives.
//! Real processes of the `alliance` binary on 127.0.0.1.

use std::path::Path;
use std::time::Duration;

use alliance_kernels::library;
use alliance_tests::alliance::{NodeDir, Running, wait_for};
use alliance_tests::jobs::{
    LIMIT, Net, alliance, alliance_of_three_with, read_npy, results, submit_text, text, wait_end,
};
use serde_json::Value;

/// A deliberately slow iterative kernel with an exact answer: every step
/// applies a linear congruential map to each cell `iters` times. Slow
/// enough on a software GPU that a test can act in the middle of a task,
/// while the CPU checks it in a few multiplications (the map composed with
/// itself by squaring).
const SLOW: &str = r"
struct Info { step: u32, steps: u32, task: u32, task_count: u32 }
struct Params { iters: u32 }
@group(0) @binding(0) var<uniform> info: Info;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> state: array<u32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= arrayLength(&state)) { return; }
    var x = state[i] ^ (info.step * 0x9E3779B9u);
    // Mesa's software rasterisers stop any loop after 65535 iterations:
    // the work is in the number of cells instead.
    for (var k = 0u; k < params.iters; k = k + 1u) {
        x = x * 1664525u + 1013904223u;
    }
    state[i] = x;
}
";

const CELLS: u32 = 4096;
const ITERS: u32 = 60_000;
const STEPS: u32 = 100;
const EVERY: u32 = 10;

fn initial() -> Vec<u32> {
    (0..CELLS).map(|i| i.wrapping_mul(2_654_435_761)).collect()
}

/// `x ↦ a·x + c` (mod 2³²) applied `n` times, as one map `x ↦ A·x + C`.
fn lcg_power(mut n: u32) -> (u32, u32) {
    let (mut a, mut c) = (1_664_525u32, 1_013_904_223u32);
    let (mut big_a, mut big_c) = (1u32, 0u32);
    while n > 0 {
        if n & 1 == 1 {
            // Apply (a, c) after (A, C).
            big_a = a.wrapping_mul(big_a);
            big_c = a.wrapping_mul(big_c).wrapping_add(c);
        }
        // (a, c) after itself.
        c = a.wrapping_mul(c).wrapping_add(c);
        a = a.wrapping_mul(a);
        n >>= 1;
    }
    (big_a, big_c)
}

/// What an uninterrupted run of [`SLOW`] gives.
fn uninterrupted() -> Vec<u32> {
    let (a, c) = lcg_power(ITERS);
    let mut s = initial();
    for step in 0..STEPS {
        for x in &mut s {
            *x = a
                .wrapping_mul(*x ^ step.wrapping_mul(0x9E37_79B9))
                .wrapping_add(c);
        }
    }
    s
}

#[test]
fn the_cpu_check_composes_the_map_right() {
    let _scenario = alliance_tests::scenario(module_path!());
    let mut x = 12_345u32;
    for _ in 0..1000 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
    }
    let (a, c) = lcg_power(1000);
    assert_eq!(a.wrapping_mul(12_345).wrapping_add(c), x);
}

fn slow_job(dir: &Path) -> String {
    std::fs::write(dir.join("slow.wgsl"), SLOW).unwrap();
    let values: Vec<String> = initial().iter().map(u32::to_string).collect();
    let job = format!(
        r#"kernel = "slow.wgsl"
dispatch = [{}, 1, 1]
steps = {STEPS}
checkpoint_every = {EVERY}
info_binding = 0
timeout_secs = 600
[[inputs]]
binding = 1
kind = "uniform"
type = "u32"
values = [{ITERS}]
[[inputs]]
binding = 2
kind = "state"
type = "u32"
values = [{}]
"#,
        CELLS / 64,
        values.join(", ")
    );
    job
}

/// The job's only task in the submitter's detail.
fn task0(sub: &Running, id: &str) -> Value {
    sub.get(&format!("/v1/jobs/{id}"))
        .map(|d| d["tasks"][0].clone())
        .unwrap_or_default()
}

/// Waits until the replica on `worker` has a checkpoint at `step` or
/// later; returns that step.
fn wait_checkpoint(sub: &Running, id: &str, worker: &str, step: u64) -> u64 {
    let mut seen = 0;
    wait_for(LIMIT, &format!("a checkpoint at step {step}"), || {
        let t = task0(sub, id);
        assert_ne!(
            t["state"], "verified",
            "the task ended before the test could act: {t}"
        );
        seen = t["replicas"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["worker"] == worker)
            .filter_map(|r| r["checkpoint"].as_u64())
            .max()
            .unwrap_or(0);
        seen >= step
    });
    seen
}

fn check_answer(net: &Net, id: &str, dir: &Path) {
    let out = dir.join(format!("out-{id}"));
    results(&net.sub_dir, id, &out, false);
    let got = library::to_u32(&read_npy(&out.join("out2-task0.npy")).data);
    assert_eq!(got, uninterrupted(), "the resumed task's answer");
}

fn set_paused(node: &NodeDir, paused: bool) {
    let o = alliance(&[if paused { "pause" } else { "resume" }], &node.path);
    assert!(o.status.success(), "{}", text(&o));
}

/// Every worker but the first starts paused (kept from "before").
fn only_w0_lends(d: &NodeDir) {
    if !d.path.ends_with("w0") {
        std::fs::write(d.path.join("paused.json"), "[0]").unwrap();
    }
}

#[test]
fn owner_policy_keeps_work_away_and_says_why() {
    let _scenario = alliance_tests::scenario(module_path!());
    // w0 (North) is paused by its owner, w1 (South) lends only in a
    // window that is closed now, w2 (North) refuses the submitter's
    // institution (South).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = (now / 3600 + 2) % 24;
    let net = alliance_of_three_with(|d| {
        if d.path.ends_with("w1") {
            d.edit_config(
                "windows = []",
                &format!(
                    "windows = [\"daily {hour:02}:00-{:02}:00\"]",
                    (hour + 1) % 24
                ),
            );
            d.edit_config("timezone = \"\"", "timezone = \"UTC\"");
        }
        if d.path.ends_with("w2") {
            d.edit_config("deny = []", "deny = [\"University South\"]");
        }
    });
    let (w0, w1, w2) = (&net.workers[0], &net.workers[1], &net.workers[2]);
    set_paused(&w0.0, true);
    let advert = |peer: &str| -> Value {
        net.sub
            .get("/v1/gpus")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .find(|a| a["peer_id"] == peer)
            .map(|a| a["gpus"][0].clone())
            .unwrap_or_default()
    };
    wait_for(LIMIT, "the pause in w0's advert", || {
        advert(&w0.0.peer())["state"] == "Paused"
    });
    let a0 = advert(&w0.0.peer());
    assert_eq!(a0["reason"], "paused by its owner", "{a0}");
    let a1 = advert(&w1.0.peer());
    assert_eq!(a1["state"], "Paused", "{a1}");
    assert!(
        a1["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("outside its sharing window daily {hour:02}:00")),
        "{a1}"
    );
    let a2 = advert(&w2.0.peer());
    assert_eq!(a2["state"], "Idle", "{a2}");
    assert_eq!(a2["terms"]["deny"][0], "University South", "{a2}");
    // `alliance gpus` shows the reasons too.
    let table = text(&alliance(&["gpus"], &net.sub_dir.path));
    assert!(
        table.contains("paused by its owner") && table.contains("not for University South"),
        "{table}"
    );

    let dir = net.a.dir.path().join("policy-job");
    let id = submit_text(
        &net.sub_dir.path,
        &dir,
        "pi.toml",
        &alliance_tests::jobs::pi_job(5, 2, 2, 16, 1),
    );
    // Nothing takes the job, and the job says why.
    std::thread::sleep(Duration::from_secs(3));
    let summary = net.sub.get(&format!("/v1/jobs/{id}")).unwrap()["summary"].clone();
    assert_eq!(summary["progress"]["verified"], 0, "{summary}");
    let why = summary["waiting"].to_string();
    assert!(
        why.contains("paused by its owner") || why.contains("busy or paused"),
        "{why}"
    );
    for (_, w) in &net.workers {
        let s = w.get("/v1/worker").unwrap();
        assert_eq!(
            s["accepted"], 0,
            "a worker took work against its owner's policy: {s}"
        );
    }

    // Resuming brings work back within seconds.
    let resumed = std::time::Instant::now();
    set_paused(&w0.0, false);
    let detail = wait_end(&net.sub, &id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    eprintln!("resumed to done: {:?}", resumed.elapsed());
    for r in alliance_tests::jobs::replicas(&detail) {
        assert_eq!(r["worker"], w0.0.peer(), "{r}");
    }
    // The owner's pauses are kept for a restart; none is left now.
    assert_eq!(
        std::fs::read_to_string(w0.0.path.join("paused.json")).unwrap(),
        "[]"
    );
    drop(net);
}

#[test]
fn the_owners_work_preempts_a_task_that_resumes_elsewhere_from_its_checkpoint() {
    let _scenario = alliance_tests::scenario(module_path!());
    let owner_program = format!("own-{}", std::process::id());
    let net = alliance_of_three_with(|d| {
        only_w0_lends(d);
        if d.path.ends_with("w0") {
            d.edit_config("poll_ms = 1000", "poll_ms = 200");
            d.edit_config("idle_for_secs = 300", "idle_for_secs = 1");
            d.edit_config("# busy_file = ", "busy_file = ");
            d.edit_config(
                "busy_processes = []",
                &format!("busy_processes = [\"{owner_program}\"]"),
            );
        }
    });
    let (w0, w1) = (&net.workers[0], &net.workers[1]);
    let dir = net.a.dir.path().join("preempt");
    std::fs::create_dir_all(&dir).unwrap();

    // 1. The signal file, standing in for NVML, says the owner needs GPU 0.
    let id = submit_text(&net.sub_dir.path, &dir, "slow.toml", &slow_job(&dir));
    let at = wait_checkpoint(&net.sub, &id, &w0.0.peer(), 2 * u64::from(EVERY));
    set_paused(&w1.0, false);
    wait_for(LIMIT, "w1 to be seen lending again", || {
        net.sub.gpu_state(&w1.0.peer()).as_deref() == Some("Idle")
    });
    std::fs::write(w0.0.path.join("owner-busy"), "0\n").unwrap();
    let detail = wait_end(&net.sub, &id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    check_answer(&net, &id, &dir);
    let reps = detail["tasks"][0]["replicas"].as_array().unwrap().clone();
    let first = &reps[0];
    assert_eq!(first["worker"], w0.0.peer());
    assert_eq!(first["state"], "handed_back", "{first}");
    let reason = first["reason"].as_str().unwrap();
    assert!(reason.contains("owner-busy"), "{reason}");
    let last_checkpoint = first["checkpoint"].as_u64().unwrap();
    assert!(last_checkpoint >= at, "{first}");
    let resumed = reps
        .iter()
        .find(|r| r["state"] == "verified")
        .expect("a verified replica");
    assert_eq!(resumed["worker"], w1.0.peer(), "{resumed}");
    // It went on from the last checkpoint the first worker sent: the work
    // redone is what that worker did after it, under one interval.
    assert_eq!(
        resumed["start_step"].as_u64(),
        Some(last_checkpoint),
        "{resumed}"
    );
    assert!(
        reason.contains(&format!("its last checkpoint is step {last_checkpoint}")),
        "{reason}"
    );
    let s0 = w0.1.get("/v1/worker").unwrap();
    assert_eq!(s0["handed_back"], 1, "{s0}");
    assert_eq!(s0["states"][0]["state"], "Busy", "{s0}");
    // The submitter kept no checkpoint once the task was verified.
    let held = std::fs::read_dir(net.sub_dir.path.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(held, 0, "checkpoints pruned after verification");

    // 2. The owner's file goes; after its hold-off w0 lends again. A real
    // process of the owner's program then preempts the next task.
    std::fs::remove_file(w0.0.path.join("owner-busy")).unwrap();
    set_paused(&w1.0, true);
    wait_for(LIMIT, "w0 to lend again and w1 to be paused", || {
        net.sub.gpu_state(&w0.0.peer()).as_deref() == Some("Idle")
            && net.sub.gpu_state(&w1.0.peer()).as_deref() == Some("Paused")
    });
    let id = submit_text(&net.sub_dir.path, &dir, "slow2.toml", &slow_job(&dir));
    wait_checkpoint(&net.sub, &id, &w0.0.peer(), 2 * u64::from(EVERY));
    set_paused(&w1.0, false);
    wait_for(LIMIT, "w1 to be seen lending again", || {
        net.sub.gpu_state(&w1.0.peer()).as_deref() == Some("Idle")
    });
    let prog = dir.join(&owner_program);
    std::fs::copy("/bin/sleep", &prog).unwrap();
    let mut owner = std::process::Command::new(&prog)
        .arg("120")
        .spawn()
        .unwrap();
    let detail = wait_end(&net.sub, &id);
    let _ = owner.kill();
    let _ = owner.wait();
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    check_answer(&net, &id, &dir);
    let reps = detail["tasks"][0]["replicas"].as_array().unwrap().clone();
    assert_eq!(reps[0]["state"], "handed_back", "{reps:?}");
    assert!(
        reps[0]["reason"].as_str().unwrap().contains(&owner_program),
        "{reps:?}"
    );
    let resumed = reps.iter().find(|r| r["state"] == "verified").unwrap();
    assert_eq!(resumed["start_step"], reps[0]["checkpoint"], "{reps:?}");
    assert!(resumed["start_step"].as_u64().unwrap() >= 2 * u64::from(EVERY));
}

#[test]
fn a_killed_worker_s_task_resumes_from_its_last_checkpoint() {
    let _scenario = alliance_tests::scenario(module_path!());
    let mut net = alliance_of_three_with(only_w0_lends);
    let dir = net.a.dir.path().join("kill");
    std::fs::create_dir_all(&dir).unwrap();
    let w0_peer = net.workers[0].0.peer();
    let id = submit_text(&net.sub_dir.path, &dir, "slow.toml", &slow_job(&dir));
    // Halfway through the 100 steps, kill -9 the worker.
    let at = wait_checkpoint(&net.sub, &id, &w0_peer, u64::from(STEPS / 2) - 10);
    net.workers[0].1.kill_in_place();
    set_paused(&net.workers[1].0, false);
    set_paused(&net.workers[2].0, false);
    let detail = wait_end(&net.sub, &id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    check_answer(&net, &id, &dir);
    let reps = detail["tasks"][0]["replicas"].as_array().unwrap().clone();
    let first = &reps[0];
    assert_eq!(first["worker"], w0_peer);
    assert_eq!(first["state"], "lost", "{first}");
    let resumed = reps.iter().find(|r| r["state"] == "verified").unwrap();
    assert_ne!(resumed["worker"], w0_peer);
    assert!(resumed["start_step"].as_u64().unwrap() >= at, "{reps:?}");
    assert_eq!(resumed["start_step"], first["checkpoint"], "{reps:?}");
}

#[test]
fn the_heat_example_resumed_from_a_checkpoint_gives_the_uninterrupted_answer() {
    let _scenario = alliance_tests::scenario(module_path!());
    use alliance_kernels::executor::{Binding, Data, Executor};
    use alliance_node::submit::Job;
    let path = alliance_tests::workspace_root().join("examples/heat/job.toml");
    let job = Job::load(&path, &Default::default()).unwrap();
    let gpus = alliance_kernels::gpu::discover(&alliance_kernels::gpu::Selection::All).unwrap();
    let mut ex = Executor::open(&gpus[0].adapter, Default::default()).unwrap();
    let whole = job.task(0).unwrap();
    assert_eq!(whole.checkpoint_every, Some(100));
    let mut checkpoints = Vec::new();
    let uninterrupted = ex
        .run(&whole, &mut |c| {
            checkpoints.push(c);
            Ok(())
        })
        .unwrap();
    assert_eq!(checkpoints.len(), 19, "every 100 steps but the last");
    // Resume from the checkpoint at step 1200, as another worker would.
    let c = checkpoints.iter().find(|c| c.step == 1200).unwrap();
    let mut rest = whole.clone();
    rest.start_step = c.step;
    for b in &mut rest.bindings {
        if let Binding::State { binding, data, .. } = b {
            let s = c.state.iter().find(|s| s.binding == *binding).unwrap();
            *data = Data::Bytes(s.data.clone());
        }
    }
    let resumed = ex.run(&rest, &mut |_| Ok(())).unwrap();
    let out = |o: &alliance_kernels::executor::Outcome| {
        o.outputs
            .iter()
            .find(|x| x.binding == 2)
            .unwrap()
            .data
            .clone()
    };
    assert_eq!(out(&resumed), out(&uninterrupted), "bit for bit");
    // And the answer is the heat equation's: heat spread from the spot.
    let u = library::to_f32(&out(&uninterrupted));
    assert!(u[128 * 256 + 128] < 100.0 && u[128 * 256 + 100] > 0.0);
}

/// Where an NVIDIA GPU and its driver are at hand: NVML reports the GPU,
/// and idle detection sees another program computing on it. Elsewhere the
/// test says so and passes.
#[test]
fn nvml_sees_a_competing_process_where_an_nvidia_gpu_is_at_hand() {
    let _scenario = alliance_tests::scenario(module_path!());
    use alliance_node::work::policy::{GpuId, IdleConfig, Probe};
    let gpus = alliance_kernels::gpu::discover(&alliance_kernels::gpu::Selection::All).unwrap();
    let Some(nvidia) = gpus.iter().find(|g| g.report.vendor == 0x10de) else {
        eprintln!("no NVIDIA GPU here: NVML not checked");
        return;
    };
    let nvml = alliance_node::work::policy::nvml::Nvml::load().expect("an NVIDIA GPU without NVML");
    assert!(nvml.count() > 0, "NVML reports no GPU");
    let (used, total) = nvml.memory(0).expect("NVML reads the GPU's memory");
    assert!(total > 0 && used <= total, "{used} of {total} bytes");
    eprintln!("NVML: {used} of {total} bytes of GPU memory in use");
    let probe = Probe::new(
        IdleConfig {
            busy_percent: 5,
            ..IdleConfig::default()
        },
        vec![GpuId {
            index: nvidia.report.index,
            vendor: nvidia.report.vendor,
            pci_bus_id: nvidia.report.pci_bus_id.clone(),
        }],
    );
    assert!(probe.has_nvml());
    let (util, pids) = probe.nvml_view(0).expect("NVML finds the adapter");
    eprintln!("NVML: {util:?}% busy, compute processes {pids:?}");
    // Another program (not this process's child: the shell that starts it
    // exits) runs the self-benchmark on the GPU.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "setsid {} gpus --local --bench --all-backends >/dev/null 2>&1 & echo $!",
            alliance_tests::alliance_bin().display()
        ))
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut seen = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(60) && seen.is_none() {
        seen = probe.sample(&[false]).remove(0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill").arg(&pid).status();
    let why = seen.expect("idle detection never saw the competing program");
    assert!(why.contains("NVML"), "{why}");
    eprintln!("seen: {why}");
}
