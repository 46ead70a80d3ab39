//! Behind real NATs, in network namespaces the test builds (see
//! `alliance_tests::netns`): two labs, each behind its own masquerading
//! NAT that lets nothing in that the lab did not ask for, and the
//! alliance's bootstrap node on the wide-area network between them. Each
//! lab's node finds itself private, reserves a relayed address on the
//! bootstrap node, reaches the other lab through it, DCUtR punches a
//! direct connection, and a job submitted in one lab runs in the other.
//! Then one lab's link fails for 60 s mid-job: the labs find each other
//! again, and the job ends with every result the kernel's. Behind NATs
//! that give every connection a new port (symmetric), hole punching
//! cannot work: the labs stay relayed, and a job with a 12 MiB input
//! still crosses through the bootstrap node's relay.

use std::time::{Duration, Instant};

use alliance_kernels::library::{self, monte_carlo_pi};
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{NodeDir, Running, wait_for};
use alliance_tests::netns::{Labs, Nat, direct};
use std::path::PathBuf;

const LIMIT: Duration = Duration::from_secs(60);
/// The tasks and steps of [`start_long_job`]'s job.
const LONG_TASKS: u32 = 2;
const LONG_STEPS: u32 = 3000;

/// The labs, or none (and why, said) where this machine cannot build them.
fn labs(name: &str, nat: Nat) -> Option<Labs> {
    Labs::start(name, nat)
        .map_err(|why| eprintln!("skipped: cannot build the NAT namespaces here: {why}"))
        .ok()
}

/// A 2-task π job of 3000 steps from lab A, each task running for seconds
/// on lab B's software GPU; its id once lab B runs one of them.
fn start_long_job(sub: &Running, seed: u32) -> String {
    let job = serde_json::json!({
        "job": alliance_tests::jobs::pi_job(seed, LONG_TASKS, 64, 256, LONG_STEPS),
        "files": {}
    });
    let id = sub.post("/v1/jobs", &job.to_string()).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for(LIMIT, "lab B to run a task", || {
        sub.get(&format!("/v1/jobs/{id}")).is_some_and(|d| {
            alliance_tests::jobs::replicas(&d)
                .iter()
                .any(|r| r["state"] == "running")
        })
    });
    id
}

/// Waits for job `id` to end `done` and returns its outputs, fetched
/// from lab A with `alliance job results --concat` into `name`.
fn done_results(labs: &Labs, sub_dir: &NodeDir, sub: &Running, id: &str, name: &str) -> PathBuf {
    let detail = alliance_tests::jobs::wait_end(sub, id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    let out = labs.alliance.dir.path().join(name);
    let o = labs.cli(
        0,
        sub_dir,
        &[
            "job",
            "results",
            id,
            "--out",
            out.to_str().unwrap(),
            "--concat",
        ],
    );
    assert!(o.status.success(), "{}", alliance_tests::jobs::text(&o));
    out
}

/// The long job's results are the kernel's: nothing lab B computed or
/// lab A acknowledged was lost.
fn assert_long_job_results(out: &std::path::Path, seed: u32) {
    let got = alliance_tests::jobs::read_npy(&out.join("out2.npy"));
    let want: Vec<u32> = (0..LONG_TASKS)
        .flat_map(|t| monte_carlo_pi::cpu(seed, 64, 256, t))
        .map(|c| c * LONG_STEPS)
        .collect();
    assert_eq!(library::to_u32(&got.data), want);
}

/// What a lab's node said about hole punching and relays.
fn punch_log(r: &Running) -> String {
    r.log()
        .lines()
        .filter(|l| {
            [
                "hole", "dcutr", "direct", "external", "observed", "relay", "punch",
            ]
            .iter()
            .any(|w| l.to_lowercase().contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `done` until it holds, or panics after [`LIMIT`] with what both
/// labs said about hole punching.
fn wait_punched(what: &str, sub: &Running, worker: &Running, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(
            Instant::now() <= deadline,
            "no {what} within {LIMIT:?}\nlab A:\n{}\nlab B:\n{}",
            punch_log(sub),
            punch_log(worker)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn labs_behind_nats_punch_through_and_run_a_job_across() {
    let _scenario = alliance_tests::scenario(module_path!());
    let Some(labs) = labs("Alliance Behind NATs", Nat::Cone) else {
        return;
    };
    let boot_peer = labs.boot_addr.rsplit('/').next().unwrap().to_owned();
    // Lab A submits, lab B lends its GPU: the job has to cross.
    let sub_dir = labs.node(0, Roles::SUBMIT);
    let worker_dir = labs.node(1, Roles::WORK);
    let started = Instant::now();
    let sub = labs.run(0, &sub_dir);
    let worker = labs.run(1, &worker_dir);

    for (name, r) in [("lab A", &sub), ("lab B", &worker)] {
        wait_for(LIMIT, &format!("{name} to find itself private"), || {
            r.get("/v1/status")
                .is_some_and(|s| s["nat"].as_str().unwrap_or("").starts_with("private"))
        });
        wait_for(LIMIT, &format!("{name} to hold a relayed address"), || {
            r.get("/v1/status")
                .is_some_and(|s| s["relayed_via"].to_string().contains(&boot_peer))
        });
    }
    wait_for(LIMIT, "the labs to verify each other", || {
        sub.members().contains(&worker_dir.peer()) && worker.members().contains(&sub_dir.peer())
    });
    wait_punched("direct connection", &sub, &worker, || {
        direct(&sub, &worker_dir.peer())
    });
    println!(
        "direct connection between the labs {:.1} s after they started",
        started.elapsed().as_secs_f64()
    );
    assert!(
        sub.log()
            .contains("relayed connection upgraded to a direct one")
            || worker
                .log()
                .contains("relayed connection upgraded to a direct one"),
        "the direct connection did not come from hole punching"
    );

    // A job from lab A runs on lab B's GPU.
    wait_for(LIMIT, "lab A to see lab B's GPU", || {
        sub.advertisers().contains(&worker_dir.peer())
    });
    let job =
        serde_json::json!({ "job": alliance_tests::jobs::pi_job(7, 2, 2, 8, 1), "files": {} });
    let submitted = sub.post("/v1/jobs", &job.to_string()).unwrap();
    let id = submitted["id"].as_str().unwrap().to_owned();
    let detail = alliance_tests::jobs::wait_end(&sub, &id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    for r in alliance_tests::jobs::replicas(&detail) {
        if r["state"] == "verified" {
            assert_eq!(r["worker"], worker_dir.peer(), "{r}");
        }
    }
}

#[test]
fn a_partition_between_the_labs_heals_and_loses_no_result() {
    let _scenario = alliance_tests::scenario(module_path!());
    let Some(labs) = labs("Alliance Cut in Two", Nat::Cone) else {
        return;
    };
    let sub_dir = labs.node(0, Roles::SUBMIT);
    let worker_dir = labs.node(1, Roles::WORK);
    let sub = labs.run(0, &sub_dir);
    let worker = labs.run(1, &worker_dir);
    wait_for(LIMIT, "lab A to see lab B's GPU", || {
        sub.advertisers().contains(&worker_dir.peer())
    });

    let id = start_long_job(&sub, 5);

    // Lab A's campus link fails for 60 s.
    labs.net.cut(0);
    std::thread::sleep(Duration::from_secs(60));
    let healed = Instant::now();
    labs.net.heal(0);
    let together = || {
        sub.members().contains(&worker_dir.peer())
            && worker.members().contains(&sub_dir.peer())
            && sub.advertisers().contains(&worker_dir.peer())
    };
    while !together() {
        assert!(
            healed.elapsed() < LIMIT,
            "the labs did not find each other again within {LIMIT:?}: lab A has {:?} and adverts of {:?}; lab B has {:?}\nlab A's log:\n{}",
            sub.members(),
            sub.advertisers(),
            worker.members(),
            sub.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "reconverged {:.1} s after the 60 s partition healed",
        healed.elapsed().as_secs_f64()
    );

    // The job ends with every task verified, and its results are the
    // kernel's.
    let out = done_results(&labs, &sub_dir, &sub, &id, "partition-results");
    assert_long_job_results(&out, 5);
}

#[test]
fn behind_symmetric_nats_a_job_runs_through_the_relay() {
    let _scenario = alliance_tests::scenario(module_path!());
    let Some(labs) = labs("Alliance Behind Symmetric NATs", Nat::Symmetric) else {
        return;
    };
    let sub_dir = labs.node(0, Roles::SUBMIT);
    let worker_dir = labs.node(1, Roles::WORK);
    let sub = labs.run(0, &sub_dir);
    let worker = labs.run(1, &worker_dir);
    wait_for(LIMIT, "the labs to verify each other", || {
        sub.members().contains(&worker_dir.peer()) && worker.members().contains(&sub_dir.peer())
    });
    wait_for(LIMIT, "lab A to see lab B's GPU", || {
        sub.advertisers().contains(&worker_dir.peer())
    });
    // 12 MiB: more than a circuit carried before its limit was raised.
    let n = 3 << 20;
    let files = labs.alliance.dir.path().join("sample-job");
    std::fs::create_dir_all(&files).unwrap();
    let (job, want) = alliance_tests::jobs::sample_job(&files, n);
    let o = labs.cli(0, &sub_dir, &["submit", job.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", alliance_tests::jobs::text(&o));
    let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = done_results(&labs, &sub_dir, &sub, &id, "sample-results");
    assert!(
        !direct(&sub, &worker_dir.peer()),
        "a direct connection through symmetric NATs"
    );
    assert!(
        !sub.log()
            .contains("relayed connection upgraded to a direct one")
            && !worker
                .log()
                .contains("relayed connection upgraded to a direct one"),
        "hole punching got through symmetric NATs"
    );
    let fetched = worker
        .log()
        .lines()
        .find(|l| l.contains("input fetched"))
        .map(str::to_owned);
    println!("through the relay: {fetched:?}");
    assert!(fetched.is_some(), "lab B fetched no input");
    let got = alliance_tests::jobs::read_npy(&out.join("out1.npy"));
    let got: Vec<f32> = got
        .data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_partition_between_institutions_goes_through_the_relay() {
    let _scenario = alliance_tests::scenario(module_path!());
    let Some(labs) = labs("Alliance Split Between Campuses", Nat::Cone) else {
        return;
    };
    let sub_dir = labs.node(0, Roles::SUBMIT);
    let worker_dir = labs.node(1, Roles::WORK);
    let sub = labs.run(0, &sub_dir);
    let worker = labs.run(1, &worker_dir);
    let peer = worker_dir.peer();
    wait_punched("direct connection between the labs", &sub, &worker, || {
        direct(&sub, &peer) && sub.advertisers().contains(&peer)
    });
    let id = start_long_job(&sub, 9);

    // The link between the campuses fails; both still reach the bootstrap
    // node. The dead direct connection is closed when its pings go
    // unanswered, and the labs reach each other through the relay.
    labs.net.split();
    let split = Instant::now();
    let relayed = || {
        sub.get("/v1/peers").is_some_and(|p| {
            p.as_array().is_some_and(|p| {
                p.iter()
                    .any(|e| e["peer_id"] == peer.as_str() && e["direct"] == false)
            })
        }) && worker.members().contains(&sub_dir.peer())
    };
    while !relayed() {
        assert!(
            split.elapsed() < Duration::from_secs(90),
            "the labs did not reach each other through the relay: lab A's log:\n{}",
            sub.log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "through the relay {:.1} s after the campuses were split",
        split.elapsed().as_secs_f64()
    );
    assert!(sub.advertisers().contains(&peer), "lab B's advert was lost");
    std::thread::sleep(Duration::from_secs(60).saturating_sub(split.elapsed()));
    labs.net.join();
    let out = done_results(&labs, &sub_dir, &sub, &id, "split-results");
    assert_long_job_results(&out, 9);
}
