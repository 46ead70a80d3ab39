//! Behind real NATs, in network namespaces the test builds (see
//! `alliance_tests::netns`): two labs, each behind its own masquerading
//! NAT that lets nothing in that the lab did not ask for, and the
//! alliance's bootstrap node on the wide-area network between them. Each
//! lab's node finds itself private, reserves a relayed address on the
//! bootstrap node, reaches the other lab through it, DCUtR punches a
//! direct connection, and a job submitted in one lab runs in the other.
//! Then one lab's link fails for 60 s mid-job: the labs find each other
//! again, and the job ends with every result the kernel's.

use std::time::{Duration, Instant};

use alliance_kernels::library::{self, monte_carlo_pi};
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::wait_for;
use alliance_tests::netns::{Labs, direct};

const LIMIT: Duration = Duration::from_secs(60);

/// The labs, or none (and why, said) where this machine cannot build them.
fn labs(name: &str) -> Option<Labs> {
    Labs::start(name)
        .map_err(|why| eprintln!("skipped: cannot build the NAT namespaces here: {why}"))
        .ok()
}

#[test]
fn labs_behind_nats_punch_through_and_run_a_job_across() {
    let _scenario = alliance_tests::scenario(module_path!());
    let Some(labs) = labs("Alliance Behind NATs") else {
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
    let deadline = Instant::now() + LIMIT;
    while !direct(&sub, &worker_dir.peer()) {
        if Instant::now() > deadline {
            let said = |r: &alliance_tests::alliance::Running| {
                r.log()
                    .lines()
                    .filter(|l| {
                        ["hole", "dcutr", "direct", "external", "observed", "relay"]
                            .iter()
                            .any(|w| l.to_lowercase().contains(w))
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "no direct connection within {LIMIT:?}\nlab A:\n{}\nlab B:\n{}",
                said(&sub),
                said(&worker)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
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
    let Some(labs) = labs("Alliance Cut in Two") else {
        return;
    };
    let sub_dir = labs.node(0, Roles::SUBMIT);
    let worker_dir = labs.node(1, Roles::WORK);
    let sub = labs.run(0, &sub_dir);
    let worker = labs.run(1, &worker_dir);
    wait_for(LIMIT, "lab A to see lab B's GPU", || {
        sub.advertisers().contains(&worker_dir.peer())
    });

    // Tasks that run for seconds on lab B's software GPU.
    let (tasks, steps) = (2, 3000);
    let job = serde_json::json!({
        "job": alliance_tests::jobs::pi_job(5, tasks, 64, 256, steps),
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
    // kernel's: nothing lab B computed or lab A acknowledged was lost.
    let detail = alliance_tests::jobs::wait_end(&sub, &id);
    assert_eq!(detail["summary"]["state"], "done", "{detail}");
    let out = labs.alliance.dir.path().join("partition-results");
    let o = labs.cli(
        0,
        &sub_dir,
        &[
            "job",
            "results",
            &id,
            "--out",
            out.to_str().unwrap(),
            "--concat",
        ],
    );
    assert!(o.status.success(), "{}", alliance_tests::jobs::text(&o));
    let got = alliance_tests::jobs::read_npy(&out.join("out2.npy"));
    let want: Vec<u32> = (0..tasks)
        .flat_map(|t| monte_carlo_pi::cpu(5, 64, 256, t))
        .map(|c| c * steps)
        .collect();
    assert_eq!(library::to_u32(&got.data), want);
}
