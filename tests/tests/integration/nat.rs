//! Behind real NATs, in network namespaces the test builds (see
//! `alliance_tests::netns`): two labs, each behind its own masquerading
//! NAT that lets nothing in that the lab did not ask for, and the
//! alliance's bootstrap node on the wide-area network between them. Each
//! lab's node finds itself private, reserves a relayed address on the
//! bootstrap node, reaches the other lab through it, DCUtR punches a
//! direct connection, and a job submitted in one lab runs in the other.

use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::wait_for;
use alliance_tests::netns::{Labs, direct};

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn labs_behind_nats_punch_through_and_run_a_job_across() {
    let _scenario = alliance_tests::scenario(module_path!());
    let labs = match Labs::start("Alliance Behind NATs") {
        Ok(l) => l,
        Err(why) => {
            eprintln!("skipped: cannot build the NAT namespaces here: {why}");
            return;
        }
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
