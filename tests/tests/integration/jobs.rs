//! Jobs end to end, with real `alliance node run` processes on 127.0.0.1:
//! a submitter and three workers of two institutions run library kernels
//! (an array job, a split input, a tolerance-compared replicated SGEMM),
//! the outputs match CPU references, bad jobs are refused at submit with
//! the reason, and a job no member can take says why it waits.

use alliance_kernels::library::{self, monte_carlo_pi, saxpy, sgemm};
use alliance_node::submit::npy;
use alliance_protocol::task::ElemType;
use alliance_tests::alliance::wait_for;
use alliance_tests::jobs::{
    LIMIT, alliance, alliance_of_three, alliance_of_three_with, pi_job, read_npy, results, run_job,
    text, wait_end, write,
};

#[test]
fn library_jobs_run_across_three_workers_and_match_the_cpu() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_of_three();
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    // Workers advertise their GPUs' self-benchmark, which the scheduler
    // ranks them by.
    let adverts = net.sub.get("/v1/gpus").unwrap();
    for a in adverts.as_array().unwrap() {
        assert!(
            a["gpus"][0]["bench"]["fma_mflops"].as_u64().unwrap() > 0,
            "{a}"
        );
    }

    // Monte Carlo π as an array job: every task its own stream.
    let (seed, wg, samples, tasks) = (11u32, 4u32, 32u32, 6u32);
    let pi = write(&dir, "pi.toml", pi_job(seed, tasks, wg, samples, 1));
    let id = run_job(&net.sub_dir, &pi);
    let out = dir.join("pi-out");
    results(&net.sub_dir, &id, &out, false);
    for t in 0..tasks {
        let a = read_npy(&out.join(format!("out2-task{t}.npy")));
        assert_eq!(a.elem, ElemType::U32);
        assert_eq!(
            library::to_u32(&a.data),
            monte_carlo_pi::cpu(seed, wg, samples, t),
            "task {t}"
        );
    }
    // Who computed what: the tasks went to more than one worker.
    let status = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
    let workers: std::collections::BTreeSet<String> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["replicas"].as_array().unwrap().clone())
        .filter(|r| r["state"] == "verified")
        .map(|r| r["worker"].as_str().unwrap().to_owned())
        .collect();
    assert!(workers.len() >= 2, "all tasks on {workers:?}");
    // These workers warm no kernels at start, so the first task each ran
    // compiled its kernel, and said so apart from its GPU time.
    let summary = &status["summary"];
    assert!(
        summary["compile_time_us"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(summary["gpu_time_us"].as_u64().unwrap() > 0, "{summary}");

    // saxpy with x and y split across 4 tasks from .npy files; y is a
    // state buffer and comes back updated.
    let n = 1024usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    write(
        &dir,
        "x.npy",
        npy::write(ElemType::F32, &[n as u64], &library::f32_bytes(&x)),
    );
    write(
        &dir,
        "y.npy",
        npy::write(ElemType::F32, &[n as u64], &library::f32_bytes(&y)),
    );
    let mut params = library::f32_bytes(&[3.0]);
    params.extend(library::u32_bytes(&[u32::try_from(n / 4).unwrap()]));
    write(&dir, "params.bin", params);
    // No [[outputs]]: the state buffer comes back.
    let sx = write(
        &dir,
        "saxpy.toml",
        r#"
kernel = "library:saxpy"
dispatch = [1, 1, 1]
tasks = 4
[[inputs]]
binding = 0
kind = "uniform"
file = "params.bin"
[[inputs]]
binding = 1
file = "x.npy"
type = "f32"
split = true
[[inputs]]
binding = 2
kind = "state"
file = "y.npy"
type = "f32"
split = true
"#,
    );
    let id = run_job(&net.sub_dir, &sx);
    let out = dir.join("saxpy-out");
    results(&net.sub_dir, &id, &out, true);
    let all = read_npy(&out.join("out2.npy"));
    assert_eq!(all.shape, vec![4, (n / 4) as u64]);
    assert_eq!(library::to_f32(&all.data), saxpy::cpu(3.0, &x, &y));

    // A 64×64 SGEMM run twice on different workers, compared with a
    // tolerance.
    let m = 64usize;
    let a: Vec<f32> = (0..m * m).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
    let b: Vec<f32> = (0..m * m).map(|i| ((i * 5) % 11) as f32 / 11.0).collect();
    write(
        &dir,
        "a.npy",
        npy::write(
            ElemType::F32,
            &[m as u64, m as u64],
            &library::f32_bytes(&a),
        ),
    );
    write(
        &dir,
        "b.npy",
        npy::write(
            ElemType::F32,
            &[m as u64, m as u64],
            &library::f32_bytes(&b),
        ),
    );
    let sg = write(
        &dir,
        "sgemm.toml",
        format!(
            r#"
kernel = "library:sgemm"
dispatch = [1, 1, 1]
redundancy = 2
compare = {{ rel = 1e-5, abs = 1e-6 }}
[[inputs]]
binding = 0
kind = "uniform"
type = "u32"
values = [{m}, {m}, {m}]
[[inputs]]
binding = 1
file = "a.npy"
[[inputs]]
binding = 2
file = "b.npy"
[[outputs]]
binding = 3
type = "f32"
len = {}
"#,
            m * m
        ),
    );
    let id = run_job(&net.sub_dir, &sg);
    let out = dir.join("sgemm-out");
    results(&net.sub_dir, &id, &out, false);
    let c = library::to_f32(&read_npy(&out.join("out3-task0.npy")).data);
    let want = sgemm::cpu(m, m, m, &a, &b);
    for (i, (g, w)) in c.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "element {i}: {g} vs {w}"
        );
    }
    let status = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
    let verified = status["tasks"][0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "verified")
        .count();
    assert_eq!(verified, 2, "{status}");

    // The committed examples run as they are and match their references.
    let examples = alliance_tests::workspace_root().join("examples");
    for name in ["pi", "saxpy", "sgemm"] {
        let id = run_job(&net.sub_dir, &examples.join(name).join("job.toml"));
        let out = dir.join(format!("example-{name}"));
        results(&net.sub_dir, &id, &out, true);
        let f32s = |f: &str| library::to_f32(&read_npy(&examples.join(name).join(f)).data);
        match name {
            "pi" => {
                let got = library::to_u32(&read_npy(&out.join("out2.npy")).data);
                let want: Vec<u32> = (0..16)
                    .flat_map(|t| monte_carlo_pi::cpu(2026, 64, 256, t))
                    .collect();
                assert_eq!(got, want);
            }
            "saxpy" => {
                let got = library::to_f32(&read_npy(&out.join("out2.npy")).data);
                assert_eq!(got, saxpy::cpu(2.0, &f32s("x.npy"), &f32s("y.npy")));
            }
            _ => {
                let got = library::to_f32(&read_npy(&out.join("out3.npy")).data);
                let want = sgemm::cpu(128, 128, 128, &f32s("a.npy"), &f32s("b.npy"));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
    }

    // What the submitter and the workers counted of all that, scraped as
    // Prometheus would.
    let sub = net.sub.metrics();
    for (series, at_least) in [
        ("alliance_jobs{state=\"done\"}", 4.0),
        ("alliance_tasks_offered_total", 10.0),
        ("alliance_tasks_accepted_total", 10.0),
        ("alliance_replicas_total{outcome=\"verified\"}", 10.0),
        (
            "alliance_api_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"200\"}",
            4.0,
        ),
        (
            "alliance_blob_bytes_total{direction=\"in\",via=\"api\"}",
            1.0,
        ),
        (
            "alliance_blob_bytes_total{direction=\"out\",via=\"api\"}",
            1.0,
        ),
        ("alliance_reputation_events_total{event=\"agreed\"}", 1.0),
    ] {
        let got = sample(&sub, series);
        assert!(
            got >= at_least,
            "{series} = {got}, not ≥ {at_least}:\n{sub}"
        );
    }
    assert!(
        sub.contains("# UNIT alliance_task_run_seconds seconds"),
        "{sub}"
    );
    // libp2p's own, beside: traffic, connections, and the protocols'.
    for name in [
        "libp2p_bandwidth_bytes_total",
        "libp2p_swarm_connections_established_total",
        "libp2p_identify_received_total",
        "libp2p_gossipsub_messages_total",
        "libp2p_ping_rtt_seconds_count",
    ] {
        let got = sum(&sub, name);
        assert!(got >= 1.0, "{name} = {got}:\n{sub}");
    }
    // The DHT's, though this node may not have queried it yet.
    assert!(sub.contains("\nlibp2p_kad_query_result_"), "{sub}");
    let workers: Vec<String> = net.workers.iter().map(|(_, r)| r.metrics()).collect();
    for series in [
        "alliance_worker_offers_total{answer=\"accepted\"}",
        "alliance_task_run_seconds_count",
        "alliance_task_compile_seconds_count",
        "alliance_task_queue_wait_seconds_count",
    ] {
        let total: f64 = workers.iter().map(|w| sample(w, series)).sum();
        assert!(total >= 10.0, "{series} = {total} over the workers");
    }
    drop(net.workers);
}

/// The value of one series (`name{labels}`) in Prometheus text; 0 when
/// absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every series of metric `name`, whatever its labels.
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn bad_jobs_are_refused_at_submit_and_waiting_jobs_say_why() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_of_three();
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    write(
        &dir,
        "texture.wgsl",
        "@group(0) @binding(0) var t: texture_2d<f32>;\n@group(0) @binding(1) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1) fn main() { o[0] = u32(textureDimensions(t).x); }\n",
    );
    let cases = [
        (
            "syntax.toml",
            "kernel = \"library:saxpy\"\ndispatch = [1, 1\n",
            "not a valid job file",
        ),
        (
            "texture.toml",
            "kernel = \"texture.wgsl\"\ndispatch = [1, 1, 1]\n[[outputs]]\nbinding = 1\ntype = \"u32\"\nlen = 1\n",
            "texture",
        ),
        (
            "big.toml",
            "kernel = \"library:mandelbrot\"\ndispatch = [1, 1, 1]\n[[outputs]]\nbinding = 1\ntype = \"u32\"\nlen = 4000000000\n",
            "max_buffer_bytes",
        ),
        (
            "missing.toml",
            "kernel = \"library:saxpy\"\ndispatch = [1, 1, 1]\n[[inputs]]\nbinding = 1\nfile = \"nope.npy\"\n[[outputs]]\nbinding = 2\ntype = \"f32\"\nlen = 1\n",
            "nope.npy",
        ),
    ];
    for (name, body, expect) in cases {
        let job = write(&dir, name, body);
        let out = alliance(&["submit", job.to_str().unwrap()], &net.sub_dir.path);
        let t = text(&out);
        assert!(!out.status.success(), "{name} was accepted: {t}");
        assert!(t.contains(expect), "{name}: {t}");
    }
    // Nothing was sent: the node holds no job.
    assert_eq!(
        net.sub.get("/v1/jobs").unwrap()["jobs"],
        serde_json::json!([])
    );

    // A job whose requirements no member meets waits, and says why.
    let job = write(
        &dir,
        "huge.toml",
        "kernel = \"library:monte_carlo_pi\"\ndispatch = [1, 1, 1]\ninfo_binding = 0\n[requirements]\nmin_memory_mib = 10000000\n[[inputs]]\nbinding = 1\nkind = \"uniform\"\ntype = \"u32\"\nvalues = [1, 1]\n[[outputs]]\nbinding = 2\ntype = \"u32\"\nlen = 1\n",
    );
    let out = alliance(&["submit", job.to_str().unwrap()], &net.sub_dir.path);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(LIMIT, "the job to say why it waits", || {
        let list = alliance(&["job", "list"], &net.sub_dir.path);
        text(&list).contains("no member advertises a GPU with 10000000 MiB buffers")
    });

    // Paused workers: the job says they are paused.
    for (_, w) in &net.workers {
        w.post("/v1/worker/pause", "").unwrap();
    }
    wait_for(LIMIT, "the submitter to see every worker paused", || {
        net.workers
            .iter()
            .all(|(d, _)| net.sub.gpu_state(&d.peer()).as_deref() == Some("Paused"))
    });
    let job = write(
        &dir,
        "small.toml",
        "kernel = \"library:monte_carlo_pi\"\ndispatch = [1, 1, 1]\ninfo_binding = 0\n[[inputs]]\nbinding = 1\nkind = \"uniform\"\ntype = \"u32\"\nvalues = [1, 1]\n[[outputs]]\nbinding = 2\ntype = \"u32\"\nlen = 1\n",
    );
    let out = alliance(&["submit", job.to_str().unwrap()], &net.sub_dir.path);
    assert!(out.status.success(), "{}", text(&out));
    wait_for(LIMIT, "the job to say every worker is paused", || {
        text(&alliance(&["job", "list"], &net.sub_dir.path)).contains("(3 paused)")
    });
    // Resuming brings the work back.
    for (_, w) in &net.workers {
        w.post("/v1/worker/resume", "").unwrap();
    }
    let id = text(&out).split_whitespace().nth(1).unwrap().to_owned();
    wait_for(LIMIT, "the job to finish once the workers resume", || {
        net.sub
            .get(&format!("/v1/jobs/{id}"))
            .is_some_and(|d| d["summary"]["state"] == "done")
    });
}

#[test]
fn workers_that_decline_everything_are_named_and_the_job_fails_with_their_reasons() {
    let _scenario = alliance_tests::scenario(module_path!());
    // Every worker's owner allows one step per task.
    let net = alliance_of_three_with(|d| d.edit_config("max_steps = 1000000", "max_steps = 1"));
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let job = write(
        &dir,
        "steps.toml",
        "kernel = \"library:monte_carlo_pi\"\ndispatch = [1, 1, 1]\nsteps = 4\ninfo_binding = 0\n[[inputs]]\nbinding = 1\nkind = \"uniform\"\ntype = \"u32\"\nvalues = [1, 1]\n[[outputs]]\nbinding = 2\ntype = \"u32\"\nlen = 1\n",
    );
    let out = alliance(&["submit", job.to_str().unwrap()], &net.sub_dir.path);
    assert!(out.status.success(), "{}", text(&out));
    let id = text(&out).split_whitespace().nth(1).unwrap().to_owned();
    // Asked for the job's end with no patience, the node answers at once
    // that it still runs.
    let now = net.sub.get(&format!("/v1/jobs/{id}/end?secs=0")).unwrap();
    assert_eq!(now["state"], "active", "{now}");
    wait_for(LIMIT, "the job to name the declines", || {
        text(&alliance(&["job", "list"], &net.sub_dir.path))
            .contains("declined: the task breaks its limits")
    });
    let d = wait_end(&net.sub, &id);
    assert_eq!(d["summary"]["state"], "failed", "{d}");
    let status = text(&alliance(&["job", "status", &id], &net.sub_dir.path));
    assert!(status.contains("task 0 failed: gave up after"), "{status}");
    assert!(status.contains("max_steps"), "{status}");
}
