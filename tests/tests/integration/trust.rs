//! Trust in results, with real processes: a worker that returns wrong
//! outputs (with valid receipts) is outvoted, every task still ends with
//! the right answer, its reputation drops and `redundancy = "auto"` keeps
//! replicating it while honest workers earn the right to run tasks alone;
//! two lying workers of one institution cannot form a quorum against an
//! honest worker of another.

use alliance_kernels::library::{self, monte_carlo_pi};
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{NodeDir, Running, TestAlliance, wait_for};
use alliance_tests::jobs::{
    LIMIT, pi_job, read_npy, replicas, reputation, results, submit_text, wait_end,
};
use serde_json::Value;

/// Makes a worker lie: wrong outputs, consistent hashes, valid signatures
/// (`"1"`: always; `"after:N"`: after N honest results).
const LIE: &str = "ALLIANCE_TEST_CORRUPT_RESULTS";

struct Net {
    a: TestAlliance,
    _boot: Running,
    /// (directory, process, lies)
    workers: Vec<(NodeDir, Running, Option<&'static str>)>,
    sub_dir: NodeDir,
    sub: Running,
}

/// A bootstrap node, a submitter of institution 0 and one worker per
/// entry of `workers`: (institution, how it lies, if it does).
fn alliance_with(institutions: &[&str], workers: &[(usize, Option<&'static str>)]) -> Net {
    let insts: Vec<(&str, Roles)> = institutions.iter().map(|n| (*n, Roles::ALL)).collect();
    let a = TestAlliance::new("Trust Test", &insts, 30);
    let boot_dir = a.node("boot", 0, Roles::BOOTSTRAP);
    let boot = boot_dir.start(true);
    let addr = boot.address();
    let workers: Vec<(NodeDir, Running, Option<&'static str>)> = workers
        .iter()
        .enumerate()
        .map(|(i, &(inst, lies))| {
            let d = a.node(&format!("w{i}"), inst, Roles::WORK);
            d.set_bootstrap(std::slice::from_ref(&addr));
            let r = match lies {
                Some(how) => d.start_with_env(false, &[(LIE, how)]),
                None => d.start(false),
            };
            (d, r, lies)
        })
        .collect();
    let sub_dir = a.node("sub", 0, Roles::SUBMIT);
    sub_dir.set_bootstrap(std::slice::from_ref(&addr));
    let sub = sub_dir.start(false);
    let n = workers.len();
    wait_for(LIMIT, "the submitter to see every worker", || {
        sub.advertisers().len() == n
    });
    Net {
        a,
        _boot: boot,
        workers,
        sub_dir,
        sub,
    }
}

impl Net {
    /// `alliance reputation --json` on the submitter.
    fn reputation(&self) -> Value {
        reputation(&self.sub_dir.path)
    }

    fn liars(&self) -> Vec<String> {
        self.workers
            .iter()
            .filter(|w| w.2.is_some())
            .map(|w| w.0.peer())
            .collect()
    }

    /// Submits `job` (a file's text) and waits for it to end; its detail.
    fn run(&self, name: &str, job: &str) -> (String, Value) {
        let jobs = self.a.dir.path().join("jobs");
        let id = submit_text(&self.sub_dir.path, &jobs, name, job);
        let detail = wait_end(&self.sub, &id);
        (id, detail)
    }
}

fn pi(tasks: u32) -> String {
    pi_job(7, tasks, 4, 16, 1).replace("steps = 1", "steps = 1\nredundancy = 2")
}

fn pi_auto(seed: u32, tasks: u32) -> String {
    pi_job(seed, tasks, 4, 16, 1).replace("steps = 1", "steps = 1\nredundancy = \"auto\"")
}

/// Every task's output against the CPU reference.
fn check_outputs(net: &Net, id: &str, seed: u32, tasks: u32) {
    let out = net.a.dir.path().join(format!("out-{id}"));
    results(&net.sub_dir, id, &out, false);
    for t in 0..tasks {
        let got = read_npy(&out.join(format!("out2-task{t}.npy")));
        assert_eq!(
            library::to_u32(&got.data),
            monte_carlo_pi::cpu(seed, 4, 16, t),
            "task {t}"
        );
    }
}

/// The replicas of a task that counted for its result.
fn verified(task: &Value) -> Vec<&Value> {
    task["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "verified")
        .collect()
}

#[test]
fn a_lying_worker_is_outvoted_and_every_task_ends_right() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_with(
        &["University North", "University South", "University East"],
        &[(0, Some("1")), (1, None), (2, None)],
    );
    let tasks = 4;
    let (id, d) = net.run("pi.toml", &pi(tasks));
    assert_eq!(d["summary"]["state"], "done", "{d}");
    let liar = &net.liars()[0];
    let all = replicas(&d);
    assert!(
        all.iter()
            .any(|r| r["worker"] == liar.as_str() && r["state"] == "outvoted"),
        "the liar took part and lost a vote: {d}"
    );
    assert!(
        !all.iter()
            .any(|r| r["worker"] == liar.as_str() && r["state"] == "verified"),
        "{d}"
    );
    check_outputs(&net, &id, 7, tasks);

    // The submitter's record: the liar lost, the others agreed (counts
    // fade from the moment they are made, hence "> 0.99").
    let r = net.reputation();
    for w in r["workers"].as_array().unwrap() {
        if w["peer_id"] == liar.as_str() {
            assert!(w["wrong"].as_f64().unwrap() > 0.99, "{w}");
            assert!(w["score"].as_f64().unwrap() < 0.0, "{w}");
            assert_eq!(w["trusted"], false, "{w}");
        } else {
            assert!(w["agreed"].as_f64().unwrap() > 0.99, "{w}");
            assert_eq!(w["wrong"].as_f64().unwrap(), 0.0, "{w}");
        }
    }
    let north = r["institutions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["institution"] == "University North")
        .unwrap();
    assert!(north["wrong"].as_f64().unwrap() > 0.99, "{north}");

    // redundancy = "auto": the honest workers have earned their record
    // (ten agreeing results in a row) by the end of this job...
    let (id, d) = net.run("auto1.toml", &pi_auto(8, 30));
    assert_eq!(d["summary"]["state"], "done", "{d}");
    check_outputs(&net, &id, 8, 30);
    let r = net.reputation();
    for w in r["workers"].as_array().unwrap() {
        let trusted = w["trusted"].as_bool().unwrap();
        assert_eq!(trusted, w["peer_id"] != liar.as_str(), "{w}");
    }
    // ...so in the next one they run tasks alone (with spot checks),
    // while every result the liar returns is replicated and outvoted.
    let (id, d) = net.run("auto2.toml", &pi_auto(9, 16));
    assert_eq!(d["summary"]["state"], "done", "{d}");
    check_outputs(&net, &id, 9, 16);
    let tasks = d["tasks"].as_array().unwrap();
    assert!(
        tasks.iter().any(|t| verified(t).len() == 1),
        "no task ran alone on a trusted worker: {d}"
    );
    for t in tasks {
        assert!(
            verified(t).iter().all(|r| r["worker"] != liar.as_str()),
            "{t}"
        );
        if verified(t).len() == 1 {
            assert_eq!(t["spot_check"], false, "{t}");
        }
    }
}

#[test]
fn two_liars_of_one_institution_cannot_outvote_another() {
    let _scenario = alliance_tests::scenario(module_path!());
    let net = alliance_with(
        &["University North", "University South"],
        &[(0, Some("1")), (0, Some("1")), (1, None)],
    );
    let (_, d) = net.run("pi.toml", &pi(2));
    assert_eq!(d["summary"]["state"], "failed", "{d}");
    let liars = net.liars();
    for t in d["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "failed", "{t}");
        let why = t["failure"].as_str().unwrap_or_default();
        assert!(
            why.contains("replicas disagree and no other worker can break the tie"),
            "{why}"
        );
        assert!(t["result"].is_null(), "no result was accepted: {t}");
        let reps = t["replicas"].as_array().unwrap();
        // Both liars answered, the honest worker too: a 2-to-1 vote of
        // workers, yet one institution against one.
        for liar in &liars {
            assert!(reps.iter().any(|r| r["worker"] == liar.as_str()), "{t}");
        }
        assert!(reps.iter().all(|r| r["state"] != "verified"), "{t}");
    }
}

/// A worker inside the test process that accepts the first offer it gets
/// and answers it with the report `answer` makes; the submitter's
/// acknowledgement.
struct Rogue {
    node: alliance_tests::alliance::InProcess,
    offers: tokio::sync::mpsc::Receiver<alliance_node::net::actor::Inbound>,
    /// Offers accepted and not yet handed out by `accept`.
    accepted: std::collections::VecDeque<alliance_protocol::task::TaskOffer>,
    submitter: alliance_protocol::PublicKey,
    /// What its receipts say it ran on.
    adapter: String,
}

impl Rogue {
    async fn join(a: &TestAlliance, sub: &Running) -> Self {
        Self::join_as(a, sub, 1, "rogue").await
    }

    async fn join_as(a: &TestAlliance, sub: &Running, inst: usize, adapter: &str) -> Self {
        let (tx, offers) = tokio::sync::mpsc::channel(16);
        let addr: libp2p::Multiaddr = sub.address().parse().unwrap();
        let Some(libp2p::multiaddr::Protocol::P2p(peer)) = addr.iter().last() else {
            panic!("{addr} names no peer");
        };
        let submitter = alliance_protocol::PublicKey::from_peer_id(&peer).unwrap();
        let node = a.spawn_with(inst, vec![addr], Some(tx)).await;
        Self {
            node,
            offers,
            accepted: std::collections::VecDeque::new(),
            submitter,
            adapter: adapter.to_owned(),
        }
    }

    /// The next offer, accepted (a request's offers are all accepted
    /// together, and handed out one per call).
    async fn accept(&mut self) -> alliance_protocol::task::TaskOffer {
        use alliance_node::net::actor::Inbound;
        use alliance_protocol::wire::{OfferAnswer, OfferAnswers};
        loop {
            if let Some(offer) = self.accepted.pop_front() {
                return offer;
            }
            let next = tokio::time::timeout(LIMIT, self.offers.recv()).await;
            if let Ok(Some(Inbound::Offer { request, reply, .. })) = next {
                let lease_until = alliance_protocol::Timestamp::now().saturating_add_secs(60);
                let mut answers = Vec::new();
                for o in request.offers.verify().unwrap().0 {
                    self.accepted.push_back(o);
                    answers.push(OfferAnswer::Accept { lease_until });
                }
                reply.send(OfferAnswers(answers)).unwrap();
                continue;
            }
            assert!(next.is_ok(), "no offer came");
        }
    }

    /// A report of `offer` with `outputs` (binding 2), signed by `key`, its
    /// digest computed from `digest_of`.
    fn report(
        &self,
        offer: &alliance_protocol::task::TaskOffer,
        key: &alliance_protocol::Identity,
        outputs: Vec<u8>,
        digest_of: &[u8],
    ) -> alliance_protocol::wire::Reports {
        use alliance_protocol::task::{Data, Outcome, Outcomes, OutputDigest, Receipt};
        use alliance_protocol::{Hash, Signed, Timestamp};
        let receipt = Receipt {
            job: offer.spec.job,
            task: offer.spec.task,
            attempt: offer.attempt,
            kernel: offer.spec.kernel,
            inputs: Vec::new(),
            outputs: vec![OutputDigest {
                binding: 2,
                hash: Hash::of(digest_of),
                len: digest_of.len() as u64,
            }],
            gpu_time_us: 10,
            compile_time_us: 0,
            adapter: self.adapter.clone(),
            worker: self.node.identity.public(),
            submitter: self.submitter,
            finished_at: Timestamp::now(),
        };
        alliance_protocol::wire::Reports {
            outcomes: Signed::sign(&Outcomes(vec![Outcome::Done(receipt)]), key).unwrap(),
            outputs: vec![vec![(2, Data::Inline(outputs))]],
        }
    }

    async fn send(&self, sub: &libp2p::PeerId, report: alliance_protocol::wire::Reports) -> String {
        let acks = self.node.client.report(*sub, report).await.unwrap();
        // The one report's acknowledgement, as `Ok(Ok)` or `Ok(Refused(..))`.
        let ack = acks.map(|a| a.0.into_iter().next().expect("one acknowledgement"));
        format!("{ack:?}")
    }
}

fn pi_bytes(seed: u32, task: u32) -> Vec<u8> {
    monte_carlo_pi::cpu(seed, 4, 16, task)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_mismatched_and_replayed_reports_are_refused_and_counted() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Rogue Test",
        &[
            ("University North", Roles::ALL),
            ("University South", Roles::ALL),
        ],
        30,
    );
    let sub_dir = a.node("sub", 0, Roles::SUBMIT);
    let sub = sub_dir.start(false);
    let sub_peer: libp2p::PeerId = sub_dir.peer().parse().unwrap();
    let jobs = a.dir.path().join("jobs");
    let submit = |name: &str, tasks: u32| {
        submit_text(&sub_dir.path, &jobs, name, &pi_job(7, tasks, 4, 16, 1))
    };
    let record = |peer: &libp2p::PeerId| -> Value {
        reputation(&sub_dir.path)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["peer_id"] == peer.to_string().as_str())
            .cloned()
            .unwrap_or(Value::Null)
    };
    let rejected = |peer: &libp2p::PeerId| -> String {
        let s = sub.get("/v1/status").unwrap();
        s["rejected"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["peer_id"] == peer.to_string().as_str())
            .map(|r| r["reason"].to_string())
            .collect()
    };

    // A receipt signed with a key that is not the worker's own.
    submit("a.toml", 1);
    let mut rogue = Rogue::join(&a, &sub).await;
    let offer = rogue.accept().await;
    let right = pi_bytes(7, offer.spec.task);
    let other = alliance_protocol::Identity::generate();
    let ack = rogue
        .send(
            &sub_peer,
            rogue.report(&offer, &other, right.clone(), &right),
        )
        .await;
    assert!(ack.contains("not its own"), "{ack}");
    let r = record(&rogue.node.peer);
    assert!(r["wrong"].as_f64().unwrap_or(0.0) > 0.99, "{r}");
    assert!(rejected(&rogue.node.peer).contains("not its own"));

    // Outputs that do not match the hashes its receipt signs.
    submit("b.toml", 1);
    let mut rogue = Rogue::join(&a, &sub).await;
    let offer = rogue.accept().await;
    let right = pi_bytes(7, offer.spec.task);
    let mut wrong = right.clone();
    wrong[0] ^= 1;
    let key = std::sync::Arc::clone(&rogue.node.identity);
    let ack = rogue
        .send(&sub_peer, rogue.report(&offer, &key, wrong, &right))
        .await;
    assert!(ack.contains("does not match its hash"), "{ack}");
    let r = record(&rogue.node.peer);
    assert!(r["wrong"].as_f64().unwrap_or(0.0) > 0.99, "{r}");
    assert!(rejected(&rogue.node.peer).contains("does not match its hash"));

    // An old receipt replayed for a new task: refused, and the new task is
    // not done by it.
    let id = submit("c.toml", 2);
    let mut rogue = Rogue::join(&a, &sub).await;
    let first = rogue.accept().await;
    let key = std::sync::Arc::clone(&rogue.node.identity);
    let right = pi_bytes(7, first.spec.task);
    let honest = rogue.report(&first, &key, right.clone(), &right);
    assert_eq!(rogue.send(&sub_peer, honest.clone()).await, "Ok(Ok)");
    let second = rogue.accept().await;
    assert_ne!(second.spec.task, first.spec.task);
    let ack = rogue.send(&sub_peer, honest).await;
    assert!(ack.contains("was already reported"), "{ack}");
    // Counted as a lapse: it may be an honest retry after a lost answer.
    let r = record(&rogue.node.peer);
    assert!(r["lapses"].as_f64().unwrap_or(0.0) > 0.99, "{r}");
    assert_eq!(r["wrong"].as_f64().unwrap_or(1.0), 0.0, "{r}");
    let d = sub.get(&format!("/v1/jobs/{id}")).unwrap();
    let t = &d["tasks"][second.spec.task as usize];
    assert_eq!(t["state"], "waiting", "{t}");
    assert!(verified(t).is_empty(), "{t}");
    assert_eq!(
        d["tasks"][first.spec.task as usize]["state"], "verified",
        "{d}"
    );
}

#[test]
fn a_worker_that_turns_liar_after_earning_trust_is_caught_and_rechecked() {
    let _scenario = alliance_tests::scenario(module_path!());
    // Honest for its first 30 results, then always wrong.
    let net = alliance_with(
        &["University North", "University South", "University East"],
        &[(0, Some("after:30")), (1, None), (2, None)],
    );
    let turncoat = net.liars()[0].clone();
    let caught = || {
        net.reputation()["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["peer_id"] == turncoat.as_str() && w["wrong"].as_f64().unwrap() > 0.5)
    };
    let tasks = 20;
    let mut jobs = Vec::new();
    for round in 0..15 {
        let seed = 20 + round;
        let (id, _) = net.run(&format!("auto{round}.toml"), &pi_auto(seed, tasks));
        jobs.push((id, seed));
        if caught() {
            break;
        }
    }
    assert!(caught(), "the turncoat was never caught");
    // What it ran alone is checked again in the scheduler's next pass,
    // which may make finished jobs active again for a moment.
    std::thread::sleep(std::time::Duration::from_secs(1));
    wait_for(LIMIT, "every job to end after the rechecks", || {
        jobs.iter().all(|(id, _)| {
            net.sub.get(&format!("/v1/jobs/{id}")).unwrap()["summary"]["state"] == "done"
        })
    });
    // Every accepted answer is right: lies it told alone before it was
    // caught were found and replaced.
    let mut rechecked = 0;
    for (id, seed) in &jobs {
        check_outputs(&net, id, *seed, tasks);
        let d = net.sub.get(&format!("/v1/jobs/{id}")).unwrap();
        for t in d["tasks"].as_array().unwrap() {
            // (A rechecked result from its honest days is confirmed and
            // stands; a lie is outvoted and replaced.)
            if t["rechecked"] == true {
                rechecked += 1;
                assert!(verified(t).len() >= 2, "{t}");
            }
        }
    }
    eprintln!("{} jobs; {rechecked} tasks checked again", jobs.len());
    let r = net.reputation();
    let w = r["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["peer_id"] == turncoat.as_str())
        .unwrap()
        .clone();
    assert_eq!(w["trusted"], false, "{w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_other_gpu_models_are_not_held_against_them() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Model Test",
        &[
            ("University North", Roles::ALL),
            ("University South", Roles::ALL),
            ("University East", Roles::ALL),
        ],
        30,
    );
    let sub_dir = a.node("sub", 0, Roles::SUBMIT);
    let sub = sub_dir.start(false);
    let sub_peer: libp2p::PeerId = sub_dir.peer().parse().unwrap();
    // Two workers with GPU model X, one with model Y whose floats round
    // otherwise: its answers differ, honestly.
    let mut peers = Vec::new();
    for (inst, model, differs) in [(1, "GPU X", false), (2, "GPU Y", true), (0, "GPU X", false)] {
        let mut rogue =
            Rogue::join_as(&a, &sub, inst, &format!("{model} (Vulkan, test 1.0)")).await;
        peers.push((rogue.node.peer, differs));
        tokio::spawn(async move {
            loop {
                let offer = rogue.accept().await;
                let mut out = pi_bytes(7, offer.spec.task);
                if differs {
                    out[0] ^= 1;
                }
                let key = std::sync::Arc::clone(&rogue.node.identity);
                let report = rogue.report(&offer, &key, out.clone(), &out);
                let _ = rogue.send(&sub_peer, report).await;
            }
        });
    }
    wait_for(LIMIT, "the three workers' adverts", || {
        sub.advertisers().len() == 3
    });
    let text_of = pi_job(7, 3, 4, 16, 1).replace("steps = 1", "steps = 1\nredundancy = 2")
        + "[requirements]\ngroup_by_gpu = true\n";
    let jobs = a.dir.path().join("jobs");
    let id = submit_text(&sub_dir.path, &jobs, "models.toml", &text_of);
    let d = wait_end(&sub, &id);
    assert_eq!(d["summary"]["state"], "done", "{d}");
    let (model_y, _) = peers.iter().find(|p| p.1).unwrap();
    let y = model_y.to_string();
    let all = replicas(&d);
    assert!(
        all.iter()
            .all(|r| r["worker"] != y.as_str() || r["state"] == "unmatched"),
        "the model-Y worker was compared with model X: {d}"
    );
    assert!(
        all.iter().any(|r| r["worker"] == y.as_str()),
        "the model-Y worker took no replica: {d}"
    );
    for t in d["tasks"].as_array().unwrap() {
        let winners = verified(t);
        assert_eq!(winners.len(), 2, "{t}");
        assert!(
            winners
                .iter()
                .all(|r| r["adapter"].as_str().unwrap().starts_with("GPU X"))
        );
    }
    // Its record holds nothing against it.
    for w in reputation(&sub_dir.path)["workers"].as_array().unwrap() {
        assert_eq!(w["wrong"].as_f64().unwrap(), 0.0, "{w}");
    }
}
