//! The node on the network, with real `alliance node run` processes on
//! 127.0.0.1: a bootstrap node and five members of two institutions find
//! each other and each other's adverts; strangers are turned away with a
//! logged reason; revocation, pausing, losing the bootstrap node and
//! restarting a member all behave.

use std::time::Duration;

use alliance_protocol::Timestamp;
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{Running, TestAlliance, wait_for};

const LIMIT: Duration = Duration::from_secs(90);

/// Whether `node` holds revocation list `sequence` signed by `signer`.
fn holds_list(node: &Running, signer: &str, sequence: u64) -> bool {
    node.get("/v1/status").is_some_and(|s| {
        s["revocation_lists"]
            .as_array()
            .is_some_and(|l| l.iter().any(|e| e[0] == signer && e[1] == sequence))
    })
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn an_alliance_forms_keeps_strangers_out_and_survives_its_bootstrap_node() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Alliance of Test Universities",
        &[
            ("University North", Roles::ALL),
            ("University South", Roles::WORK | Roles::SUBMIT),
        ],
        20,
    );
    let boot_dir = a.node("boot", 0, Roles::BOOTSTRAP);
    let boot = boot_dir.start(true);
    let boot_addr = boot.address();

    // The API answers only requests that carry the node's token.
    let raw = |path: &str, auth: &str| {
        use std::io::{Read, Write};
        let addr = std::fs::read_to_string(boot_dir.path.join("api.addr")).unwrap();
        let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let refused = raw("/v1/status", "");
    assert!(
        refused.starts_with("HTTP/1.1 401") && refused.contains("api.token"),
        "{refused}"
    );
    let wrong = raw("/v1/worker/pause", "Authorization: Bearer 00\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let token = std::fs::read_to_string(boot_dir.path.join("api.token")).unwrap();
    let ok = raw("/v1/status", &format!("Authorization: Bearer {token}\r\n"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(raw("/metrics", "").starts_with("HTTP/1.1 200"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(boot_dir.path.join("api.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let dirs: Vec<_> = (0..5)
        .map(|i| a.node(&format!("m{i}"), i % 2, Roles::WORK))
        .collect();
    for d in &dirs {
        d.set_bootstrap(std::slice::from_ref(&boot_addr));
    }
    let mut members: Vec<_> = dirs.iter().map(|d| Some(d.start(false))).collect();
    let ids = sorted(dirs.iter().map(|d| d.peer()).collect());

    // Every member sees every member's advert (its own included).
    for (i, m) in members.iter().enumerate() {
        let m = m.as_ref().unwrap();
        wait_for(
            LIMIT,
            &format!("member {i} to see all five adverts"),
            || sorted(m.advertisers()) == ids,
        );
    }

    // Strangers: a node of another alliance, a node whose certificate has
    // expired, and a node whose certificate its institution revokes.
    let other = TestAlliance::new("Some Other Alliance", &[("Elsewhere", Roles::ALL)], 20);
    let foreign = other.node("foreign", 0, Roles::WORK);
    foreign.set_bootstrap(std::slice::from_ref(&boot_addr));
    let foreign_run = foreign.start(false);
    wait_for(
        LIMIT,
        "the bootstrap node to reject the foreign node",
        || {
            boot.rejections(&foreign.peer())
                .iter()
                .any(|r| r.contains("another alliance"))
        },
    );

    // A node whose chain was valid when it started, tested by moving its
    // validity into the past: it cannot even start, and says why.
    let stale = a.node_with(
        "stale",
        1,
        Roles::WORK,
        Timestamp::from_secs(Timestamp::now().as_secs() - 40 * 86_400),
        30,
    );
    let out = std::process::Command::new(alliance_tests::alliance_bin())
        .args(["node", "run", "--data-dir"])
        .arg(&stale.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expired"), "{err}");

    // Revoking a connected member removes it everywhere.
    let victim = &dirs[4];
    let list = a.revoke(0, victim, "laptop stolen");
    let answer = members[0]
        .as_ref()
        .unwrap()
        .post("/v1/revocations", &std::fs::read_to_string(&list).unwrap());
    assert!(answer.is_ok(), "{answer:?}");
    for (i, m) in members.iter().enumerate().take(4) {
        let m = m.as_ref().unwrap();
        wait_for(
            LIMIT,
            &format!("member {i} to drop the revoked member"),
            || !m.advertisers().contains(&victim.peer()) && !m.members().contains(&victim.peer()),
        );
    }
    members[4] = None;

    // A member that joins after the revocation was gossiped gets the list
    // in the membership exchange.
    let late_dir = a.node("late", 1, Roles::WORK);
    late_dir.set_bootstrap(std::slice::from_ref(&boot_addr));
    let late = late_dir.start(false);
    let revoker = a.institutions[0].1.public().to_string();
    wait_for(LIMIT, "the late member to hold the revocation list", || {
        holds_list(&late, &revoker, 1)
    });
    assert!(
        late.log()
            .contains("newer revocation list received from a member"),
        "the list came by gossip, not in the hello"
    );
    drop(late);

    // No stranger ever shows up as a member or advertiser.
    for m in members.iter().flatten().chain([&boot]) {
        assert!(!m.members().contains(&foreign.peer()));
        assert!(!m.advertisers().contains(&foreign.peer()));
    }
    assert!(
        foreign_run.log().contains("rejected"),
        "the foreign node logs why it dropped the alliance too"
    );
    drop(foreign_run);

    // Pausing is seen by the others.
    let m1 = members[1].as_ref().unwrap();
    m1.post("/v1/worker/pause", "").unwrap();
    let paused_peer = dirs[1].peer();
    wait_for(LIMIT, "member 0 to see member 1 paused", || {
        members[0]
            .as_ref()
            .unwrap()
            .gpu_state(&paused_peer)
            .as_deref()
            == Some("Paused")
    });

    // Once the members know each other, the bootstrap node can go.
    for (i, m) in members.iter().enumerate().take(4) {
        let m = m.as_ref().unwrap();
        wait_for(
            LIMIT,
            &format!("member {i} to connect to the other members"),
            || m.members().len() >= 3,
        );
    }
    boot.kill();
    m1.post("/v1/worker/resume", "").unwrap();
    wait_for(
        LIMIT,
        "member 3 to see member 1 resume without the bootstrap node",
        || {
            members[3]
                .as_ref()
                .unwrap()
                .gpu_state(&paused_peer)
                .as_deref()
                == Some("Idle")
        },
    );

    // A member restarted now rejoins through the peers it remembered.
    let restarted = dirs[2].peer();
    members[2] = None; // stops the process
    std::thread::sleep(Duration::from_secs(1));
    members[2] = Some(dirs[2].start(false));
    let again = members[2].as_ref().unwrap();
    wait_for(LIMIT, "the restarted member to rejoin", || {
        again.members().len() >= 2
    });
    wait_for(
        LIMIT,
        "member 0 to see the restarted member's advert",
        || {
            members[0]
                .as_ref()
                .unwrap()
                .advertisers()
                .contains(&restarted)
        },
    );
}

#[test]
fn a_member_offline_while_a_node_was_revoked_learns_it_on_return_and_drops_the_node() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Alliance of Returning Members",
        &[("University North", Roles::ALL)],
        20,
    );
    let boot = a.node("boot", 0, Roles::BOOTSTRAP).start(true);
    let boot_addr = boot.address();
    let away_dir = a.node("away", 0, Roles::WORK);
    let victim_dir = a.node("victim", 0, Roles::WORK);
    for d in [&away_dir, &victim_dir] {
        d.set_bootstrap(std::slice::from_ref(&boot_addr));
    }
    let mut away = away_dir.start(false);
    let victim = victim_dir.start(false);
    wait_for(LIMIT, "the member to know the victim", || {
        away.members().contains(&victim_dir.peer())
    });

    // The member goes away; meanwhile the victim is revoked, and the
    // bootstrap node drops it. The victim keeps running.
    away.kill_in_place();
    let list = a.revoke(0, &victim_dir, "key leaked");
    boot.post("/v1/revocations", &std::fs::read_to_string(&list).unwrap())
        .unwrap();
    wait_for(LIMIT, "the bootstrap node to drop the victim", || {
        !boot.members().contains(&victim_dir.peer())
    });

    // Back, it redials the peers it remembers (the victim among them) and
    // learns the list in the membership exchange, verified as it would be
    // by gossip, and drops the victim.
    let back = away_dir.start(false);
    let revoker = a.institutions[0].1.public().to_string();
    wait_for(LIMIT, "the returning member to hold the list", || {
        holds_list(&back, &revoker, 1)
    });
    wait_for(LIMIT, "the returning member to drop the victim", || {
        !back.members().contains(&victim_dir.peer())
            && !back.advertisers().contains(&victim_dir.peer())
    });
    assert!(
        back.log()
            .contains("newer revocation list received from a member"),
        "{}",
        back.log()
    );
    assert!(
        back.members()
            .contains(&boot_addr.rsplit('/').next().unwrap().to_owned())
    );
    drop(victim);
}
