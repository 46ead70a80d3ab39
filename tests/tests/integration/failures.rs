//! Jobs survive their nodes: a worker killed mid-task has its task run
//! elsewhere; a submitter killed mid-job and restarted finishes the job
//! with every task's output exactly once; an input shared by 50 tasks
//! crosses the network once per worker.

use std::path::PathBuf;
use std::time::Duration;

use alliance_kernels::library::{self, monte_carlo_pi, reduce};
use alliance_node::submit::npy;
use alliance_protocol::task::ElemType;
use alliance_tests::alliance::wait_for;
use alliance_tests::jobs::{
    LIMIT, Net, alliance, alliance_of_three, alliance_of_three_with, pi_job, read_npy, replicas,
    results, submit, text, wait_end, write,
};
use serde_json::Value;

/// A Monte Carlo π job whose tasks repeat their dispatch `steps` times, so
/// they run for seconds on a software GPU; counts add up over the steps.
fn long_pi(tasks: u32, steps: u32) -> String {
    pi_job(5, tasks, 64, 256, steps)
}

fn pi_reference(task: u32, steps: u32) -> Vec<u32> {
    monte_carlo_pi::cpu(5, 64, 256, task)
        .into_iter()
        .map(|c| c * steps)
        .collect()
}

#[test]
fn a_task_whose_worker_is_killed_completes_elsewhere() {
    let _scenario = alliance_tests::scenario(module_path!());
    let mut net = alliance_of_three();
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let steps = 4000;
    let job = write(&dir, "long.toml", long_pi(2, steps));
    let id = submit(&net.sub_dir.path, &job);

    // Wait until a worker runs a task, then kill -9 that worker.
    let mut victim = String::new();
    wait_for(LIMIT, "a worker to run a task", || {
        let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
        match replicas(&d).iter().find(|r| r["state"] == "running") {
            Some(r) => {
                victim = r["worker"].as_str().unwrap().to_owned();
                true
            }
            None => false,
        }
    });
    let at = net
        .workers
        .iter()
        .position(|(d, _)| d.peer() == victim)
        .unwrap();
    let (_, running) = net.workers.remove(at);
    running.kill();

    wait_for(
        Duration::from_secs(300),
        "the job to finish without that worker",
        || {
            net.sub
                .get(&format!("/v1/jobs/{id}"))
                .is_some_and(|d| d["summary"]["state"] == "done")
        },
    );
    let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
    let all = replicas(&d);
    assert!(
        all.iter()
            .any(|r| r["worker"] == victim.as_str() && r["state"] == "lost"),
        "the killed worker's replica is not marked lost: {d}"
    );
    assert!(
        all.iter()
            .filter(|r| r["state"] == "verified")
            .all(|r| r["worker"] != victim.as_str()),
        "{d}"
    );
    let out = dir.join("out");
    results(&net.sub_dir, &id, &out, false);
    for t in 0..2 {
        let a = read_npy(&out.join(format!("out2-task{t}.npy")));
        assert_eq!(library::to_u32(&a.data), pi_reference(t, steps), "task {t}");
    }
}

/// Submits a job of `tasks` tasks that would run for minutes, waits until
/// they all run and cancels it; returns the folder of job files.
fn cancel_once_running(net: &Net, tasks: u32) -> PathBuf {
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let job = write(&dir, "endless.toml", long_pi(tasks, 500_000));
    let id = submit(&net.sub_dir.path, &job);
    wait_for(LIMIT, "every task to run", || {
        let running = net
            .sub
            .get(&format!("/v1/jobs/{id}"))
            .and_then(|d| d["summary"]["progress"]["running"].as_u64());
        running == Some(u64::from(tasks))
    });
    let out = alliance(&["job", "cancel", &id], &net.sub_dir.path);
    assert!(text(&out).contains("cancelled"), "{}", text(&out));
    dir
}

#[test]
fn cancelling_a_job_stops_its_running_tasks_at_the_workers() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_of_three();
    cancel_once_running(&net, 2);
    // The next progress report is refused, and each worker stops its task.
    wait_for(LIMIT, "the workers to stop the cancelled tasks", || {
        let stats: Vec<Value> = net
            .workers
            .iter()
            .map(|(_, w)| w.get("/v1/worker").unwrap())
            .collect();
        stats
            .iter()
            .map(|s| s["stopped"].as_u64().unwrap())
            .sum::<u64>()
            == 2
            && stats.iter().all(|s| s["busy"] == 0)
    });
}

#[test]
fn workers_that_ran_a_cancelled_job_take_the_next_one() {
    let _scenario = alliance_tests::scenario(module_path!());
    // One task at a time per GPU: a cancelled task still counted as held
    // would leave its worker looking full to the submitter for good.
    let net = alliance_of_three_with(|d| d.edit_config("tasks_per_gpu = 32", "tasks_per_gpu = 1"));
    let dir = cancel_once_running(&net, 3);
    wait_for(LIMIT, "the workers to stop the cancelled tasks", || {
        net.workers
            .iter()
            .all(|(_, w)| w.get("/v1/worker").is_some_and(|s| s["busy"] == 0))
    });
    let next = write(&dir, "next.toml", long_pi(3, 1));
    let next = submit(&net.sub_dir.path, &next);
    let d = wait_end(&net.sub, &next);
    assert_eq!(d["summary"]["state"], "done", "{d}");
    let out = dir.join("out");
    results(&net.sub_dir, &next, &out, false);
    for t in 0..3 {
        let a = read_npy(&out.join(format!("out2-task{t}.npy")));
        assert_eq!(library::to_u32(&a.data), pi_reference(t, 1), "task {t}");
    }
}

#[test]
fn a_submitter_killed_mid_job_finishes_it_after_a_restart() {
    let _scenario = alliance_tests::scenario(module_path!());
    // One task per worker at a time: at the kill, half the tasks were
    // never offered, and only the job's record stands for them.
    let mut net =
        alliance_of_three_with(|d| d.edit_config("tasks_per_gpu = 32", "tasks_per_gpu = 1"));
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let (tasks, steps) = (6u32, 1500u32);
    let job = write(&dir, "long.toml", long_pi(tasks, steps));
    let id = submit(&net.sub_dir.path, &job);
    wait_for(LIMIT, "some tasks to run", || {
        net.sub
            .get(&format!("/v1/jobs/{id}"))
            .is_some_and(|d| d["summary"]["progress"]["running"].as_u64().unwrap_or(0) >= 2)
    });
    let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
    let never_offered = d["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["replicas"].as_array().is_some_and(Vec::is_empty))
        .count();
    assert!(
        never_offered > 0,
        "every task was offered before the kill: {d}"
    );
    // kill -9, then start it again on the same data directory.
    net.sub.kill_in_place();
    net.sub = net.sub_dir.start(false);

    wait_for(
        Duration::from_secs(300),
        "the restarted submitter to finish the job",
        || {
            net.sub
                .get(&format!("/v1/jobs/{id}"))
                .is_some_and(|d| d["summary"]["state"] == "done")
        },
    );
    let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
    for t in d["tasks"].as_array().unwrap() {
        let verified = t["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "verified")
            .count();
        assert_eq!(
            verified, 1,
            "task {} verified {verified} times: {t}",
            t["index"]
        );
    }
    let out = dir.join("out");
    results(&net.sub_dir, &id, &out, true);
    let all = read_npy(&out.join("out2.npy"));
    assert_eq!(all.shape, vec![u64::from(tasks), 64]);
    let want: Vec<u32> = (0..tasks).flat_map(|t| pi_reference(t, steps)).collect();
    assert_eq!(library::to_u32(&all.data), want);
    // Each verified task earned one credit, and the restart lost none:
    // the workers count every one.
    wait_for(LIMIT, "the workers to count a credit per task", || {
        net.workers.iter().all(|(_, w)| {
            w.get("/v1/credits").is_some_and(|c| {
                c.as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b["credits"].as_u64().unwrap())
                    .max()
                    == Some(u64::from(tasks))
            })
        })
    });
}

#[test]
fn an_input_shared_by_fifty_tasks_crosses_the_network_once_per_worker() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_of_three();
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let x: Vec<u32> = (0..65_536u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();
    let bytes = library::u32_bytes(&x);
    write(
        &dir,
        "x.npy",
        npy::write(ElemType::U32, &[x.len() as u64], &bytes),
    );
    let job = write(
        &dir,
        "shared.toml",
        r#"
kernel = "library:reduce_u32"
dispatch = [128, 1, 1]
tasks = 50
[[inputs]]
binding = 0
kind = "uniform"
type = "u32"
values = [65536]
[[inputs]]
binding = 1
file = "x.npy"
[[outputs]]
binding = 2
type = "u32"
len = 128
"#,
    );
    let out = alliance(
        &["submit", job.to_str().unwrap(), "--wait"],
        &net.sub_dir.path,
    );
    assert!(out.status.success(), "{}", text(&out));
    let id = text(&out).split_whitespace().nth(1).unwrap().to_owned();
    let o = dir.join("out");
    results(&net.sub_dir, &id, &o, true);
    let all = library::to_u32(&read_npy(&o.join("out2.npy")).data);
    let want = reduce::u32_cpu(&x);
    for t in 0..50 {
        assert_eq!(all[t * 128..(t + 1) * 128], want[..], "task {t}");
    }
    let mut ran = 0;
    for (d, w) in &net.workers {
        let s = w.get("/v1/worker").unwrap();
        let succeeded = s["succeeded"].as_u64().unwrap();
        if succeeded > 0 {
            ran += 1;
            assert_eq!(s["blobs_fetched"], 1, "{}: {s}", d.path.display());
            assert_eq!(s["bytes_fetched"], bytes.len() as u64, "{s}");
            assert_eq!(s["blobs_cached"].as_u64().unwrap(), succeeded - 1, "{s}");
        }
    }
    assert!(ran >= 2, "the 50 tasks ran on {ran} worker(s)");
}
