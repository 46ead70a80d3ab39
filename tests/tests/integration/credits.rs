//! Credits and fair share, with real processes: verified work earns the
//! worker's institution signed credits that every node receives and
//! counts alike (a node that joins later fetches them); a busy worker then
//! runs the queued task of an institution that gave before the
//! earlier-queued task of one that only took.

use std::collections::BTreeMap;

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{NodeDir, Running, TestAlliance, wait_for};
use alliance_tests::jobs::{LIMIT, alliance, pi_job, submit_text, text, wait_end};
use serde_json::Value;

struct Node {
    dir: NodeDir,
    run: Running,
}

fn start(a: &TestAlliance, name: &str, inst: usize, roles: Roles, boot: &str) -> Node {
    let dir = a.node(name, inst, roles);
    dir.set_bootstrap(&[boot.to_owned()]);
    let run = dir.start(false);
    Node { dir, run }
}

fn submit(a: &TestAlliance, sub: &Node, name: &str, job: &str) -> String {
    submit_text(&sub.dir.path, &a.dir.path().join("jobs"), name, job)
}

fn job(sub: &Node, id: &str) -> Value {
    sub.run.get(&format!("/v1/jobs/{id}")).unwrap()
}

fn wait_done(sub: &Node, id: &str) {
    let d = wait_end(&sub.run, id);
    assert_eq!(d["summary"]["state"], "done", "{d}");
}

/// Waits until the job's only task runs (or waits its turn) at a worker.
fn wait_accepted(sub: &Node, id: &str) {
    wait_for(LIMIT, &format!("job {id}'s task to be accepted"), || {
        job(sub, id)["tasks"][0]["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["state"] == "running"))
    });
}

fn pause(node: &Node, paused: bool) {
    let cmd = if paused { "pause" } else { "resume" };
    let out = alliance(&[cmd], &node.dir.path);
    assert!(out.status.success(), "{}", text(&out));
}

/// A node's accounts: institution → (given, taken, credits), rounded to
/// milliseconds of GPU time (decay over a test's seconds is far below).
fn accounts(node: &Node) -> BTreeMap<String, (i64, i64, u64)> {
    let v = node.run.get("/v1/credits").unwrap();
    #[allow(clippy::cast_possible_truncation)]
    let ms = |x: &Value| (x.as_f64().unwrap() * 1000.0).round() as i64;
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["institution"].as_str().unwrap().to_owned(),
                (
                    ms(&b["given_s"]),
                    ms(&b["taken_s"]),
                    b["credits"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn contributors_are_served_first_and_every_node_counts_alike() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Credits Test",
        &[
            ("University A", Roles::ALL),
            ("University B", Roles::ALL),
            ("University C", Roles::ALL),
        ],
        30,
    );
    let boot_dir = a.node("boot", 0, Roles::BOOTSTRAP);
    let boot_run = boot_dir.start(true);
    let boot_addr = boot_run.address();
    let worker_a = start(&a, "wa", 0, Roles::WORK, &boot_addr);
    let busy = start(&a, "wc", 2, Roles::WORK, &boot_addr);
    let sub_a = start(&a, "sa", 0, Roles::SUBMIT, &boot_addr);
    let sub_b = start(&a, "sb", 1, Roles::SUBMIT, &boot_addr);
    for s in [&sub_a, &sub_b] {
        wait_for(LIMIT, "both workers' adverts", || {
            s.run.advertisers().len() == 2
        });
    }

    // B takes: four tasks run by A's worker while C's worker is paused.
    pause(&busy, true);
    wait_for(LIMIT, "C's worker to be seen paused", || {
        sub_b
            .run
            .get("/v1/gpus")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["peer_id"] == busy.dir.peer().as_str() && g["gpus"][0]["state"] == "Paused")
    });
    let taken = submit(&a, &sub_b, "b1.toml", &pi_job(3, 4, 4, 16, 1));
    wait_done(&sub_b, &taken);

    // Every node holds the same four credits: A gave, B took.
    let everyone = [&worker_a, &busy, &sub_a, &sub_b];
    let mut first = BTreeMap::new();
    wait_for(LIMIT, "every node to count the four credits alike", || {
        first = accounts(&sub_b);
        first.get("University A").is_some_and(|x| x.2 == 4)
            && everyone.iter().all(|n| accounts(n) == first)
    });
    let (given, _, _) = first["University A"];
    let (_, took, _) = first["University B"];
    assert!(given > 0 && given == took, "{first:?}");
    let out = alliance(&["credits"], &busy.dir.path);
    assert!(text(&out).contains("University A"), "{}", text(&out));
    // A node that was not there when they were gossiped fetches them from
    // the first member it meets.
    let late = start(&a, "late", 2, Roles::SUBMIT, &boot_addr);
    wait_for(LIMIT, "a late node to count the credits alike", || {
        accounts(&late) == first
    });
    drop(late);

    // C's worker gets busy with a long task of B's; B queues a short one,
    // then A queues one. A gave, B only took: A's runs first.
    pause(&worker_a, true);
    pause(&busy, false);
    wait_for(LIMIT, "C's worker to be seen lending again", || {
        [&sub_a, &sub_b].iter().all(|s| {
            s.run
                .get("/v1/gpus")
                .unwrap()
                .as_array()
                .unwrap()
                .iter()
                .any(|g| {
                    g["peer_id"] == busy.dir.peer().as_str() && g["gpus"][0]["state"] != "Paused"
                })
        })
    });
    // Far longer than the test: it is cancelled once both short ones wait.
    let long = submit(&a, &sub_b, "long.toml", &pi_job(5, 1, 64, 256, 200_000));
    wait_accepted(&sub_b, &long);
    let b_short = submit(&a, &sub_b, "b2.toml", &pi_job(6, 1, 4, 16, 1));
    wait_accepted(&sub_b, &b_short);
    let a_short = submit(&a, &sub_a, "a1.toml", &pi_job(7, 1, 4, 16, 1));
    wait_accepted(&sub_a, &a_short);
    // Cancelling the long job stops its task and hands the GPU to the
    // best-placed task waiting for it.
    let out = alliance(&["job", "cancel", &long], &sub_b.dir.path);
    assert!(out.status.success(), "{}", text(&out));
    wait_done(&sub_b, &b_short);
    wait_done(&sub_a, &a_short);
    let log = std::fs::read_to_string(busy.dir.path.join("node.log")).unwrap();
    let started: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("task started"))
        .filter_map(|l| {
            [&long, &b_short, &a_short]
                .into_iter()
                .find(|id| l.contains(id.as_str()))
                .map(String::as_str)
        })
        .collect();
    assert_eq!(
        started,
        [long.as_str(), a_short.as_str(), b_short.as_str()],
        "long = {long}, B's short = {b_short}, A's short = {a_short}"
    );
}

#[test]
fn credit_pages_hand_on_every_credit_once_with_its_issuer() {
    let _scenario = alliance_tests::scenario(module_path!());
    use alliance_node::trust::credits::Credits;
    use alliance_protocol::task::{Credit, JobId};
    use alliance_protocol::wire::{MAX_PAGE_CREDITS, MAX_PAGE_ISSUERS};
    use alliance_protocol::{Hash, Identity, Signed, Timestamp};

    let a = TestAlliance::new(
        "Pages Test",
        &[("University A", Roles::ALL), ("University B", Roles::ALL)],
        30,
    );
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let credits = Credits::new(
        db.open_tree("credits").unwrap(),
        db.open_tree("issuers").unwrap(),
    );
    // More issuers than a page may name, and more credits than it holds.
    let revocations = alliance_protocol::cert::RevocationSet::new(&a.charter);
    let issuers: Vec<_> = (0..MAX_PAGE_ISSUERS + 6)
        .map(|_| {
            let id = Identity::generate();
            let chain = a.chain(&id, 1, Roles::SUBMIT, Timestamp::now(), 30);
            let member = chain
                .verify(&a.charter, &revocations, Timestamp::now(), Roles::SUBMIT)
                .unwrap();
            (id, member, chain)
        })
        .collect();
    let total = 700u32;
    for task in 0..total {
        let (id, member, chain) = &issuers[task as usize % issuers.len()];
        let c = Credit {
            job: JobId([3; 16]),
            tasks: vec![alliance_protocol::task::CreditedTask {
                task,
                receipt: Hash::of(&task.to_le_bytes()),
            }],
            worker: Identity::generate().public(),
            worker_institution: a.institutions[0].1.public(),
            submitter_institution: a.institutions[1].1.public(),
            gpu_time_us: 1000,
            issued_at: Timestamp::now(),
        };
        let signed = Signed::sign(&c, id).unwrap();
        assert!(credits.add(&signed, Some((member, chain))).unwrap());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = credits.page(after);
        pages += 1;
        assert!(page.credits.len() <= MAX_PAGE_CREDITS);
        assert!(page.issuers.len() <= MAX_PAGE_ISSUERS);
        for c in &page.credits {
            let key = c.signer();
            assert!(
                page.issuers.iter().any(|ch| {
                    ch.verify(&a.charter, &revocations, Timestamp::now(), Roles::SUBMIT)
                        .is_ok_and(|m| m.node_key == key)
                }),
                "a credit without its issuer's chain"
            );
            assert!(
                seen.insert(c.verify().unwrap().tasks[0].task),
                "handed on twice"
            );
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
        assert!(pages < 100, "paging does not end");
    }
    assert_eq!(seen.len(), total as usize);
    assert!(pages >= 3, "{pages} pages");
}
