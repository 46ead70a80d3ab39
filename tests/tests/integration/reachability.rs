//! Reachability, with real `alliance node run` processes on 127.0.0.1:
//! a private network keeps out every node without the alliance's
//! pre-shared key, and a member that listens nowhere is still reached,
//! through a relayed address on the bootstrap node, which DCUtR then turns
//! into a direct connection.

use std::path::Path;
use std::time::Duration;

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{NodeDir, TestAlliance, wait_for};

const LIMIT: Duration = Duration::from_secs(90);

fn make_psk(path: &Path) {
    let out = std::process::Command::new(alliance_tests::alliance_bin())
        .args(["charter", "psk", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn use_psk(node: &NodeDir, key: &Path) {
    std::fs::copy(key, node.path.join("swarm.key")).unwrap();
    node.edit_config("# psk_file = \"swarm.key\"", "psk_file = \"swarm.key\"");
}

#[test]
fn a_private_network_admits_only_nodes_with_its_key() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Private Alliance", &[("North", Roles::ALL)], 20);
    let key = a.dir.path().join("alliance.key");
    let other_key = a.dir.path().join("other.key");
    make_psk(&key);
    make_psk(&other_key);

    let boot_dir = a.node("boot", 0, Roles::BOOTSTRAP);
    use_psk(&boot_dir, &key);
    let boot = boot_dir.start(true);
    let boot_addr = boot.address();

    let with_key = a.node("with-key", 0, Roles::WORK);
    let wrong_key = a.node("wrong-key", 0, Roles::WORK);
    let no_key = a.node("no-key", 0, Roles::WORK);
    use_psk(&with_key, &key);
    use_psk(&wrong_key, &other_key);
    for d in [&with_key, &wrong_key, &no_key] {
        d.set_bootstrap(std::slice::from_ref(&boot_addr));
    }
    let runs: Vec<_> = [&with_key, &wrong_key, &no_key]
        .iter()
        .map(|d| d.start(false))
        .collect();

    wait_for(LIMIT, "the member with the key to join", || {
        boot.members().contains(&with_key.peer()) && runs[0].advertisers().len() == 1
    });
    // Give the others as long as the first took, and more.
    std::thread::sleep(Duration::from_secs(5));
    for (d, r) in [(&wrong_key, &runs[1]), (&no_key, &runs[2])] {
        assert!(
            !boot.members().contains(&d.peer()),
            "{} got in",
            d.path.display()
        );
        assert!(r.members().is_empty(), "{} has members", d.path.display());
        let status = r.get("/v1/status").unwrap();
        assert_eq!(status["connected_peers"], 0, "{status}");
    }
    // The members with a key still cannot be dialled over QUIC: they do not listen on it.
    let status = boot.get("/v1/status").unwrap();
    assert!(
        !status["listen_addrs"].to_string().contains("quic"),
        "{status}"
    );
}

#[test]
fn members_that_listen_nowhere_reach_each_other_through_the_relay() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Relay Alliance", &[("North", Roles::ALL)], 20);
    let boot = a.node("boot", 0, Roles::BOOTSTRAP).start(true);
    let boot_addr = boot.address();
    let boot_peer = boot_addr.rsplit('/').next().unwrap().to_owned();

    let open = a.node("open", 0, Roles::WORK);
    let hidden: Vec<NodeDir> = (0..2)
        .map(|i| a.node(&format!("hidden{i}"), 0, Roles::WORK))
        .collect();
    for d in &hidden {
        d.edit_config("listen = [\"/ip4/127.0.0.1/tcp/0\"]", "listen = []");
    }
    for d in hidden.iter().chain([&open]) {
        d.set_bootstrap(std::slice::from_ref(&boot_addr));
    }
    let open_run = open.start(false);
    let runs: Vec<_> = hidden.iter().map(|d| d.start(false)).collect();

    // AutoNAT, asked of verified members only, finds the open member
    // reachable.
    wait_for(LIMIT, "AutoNAT to find the open member public", || {
        open_run
            .get("/v1/status")
            .is_some_and(|s| s["nat"].as_str().unwrap_or("").starts_with("public"))
    });
    for r in &runs {
        wait_for(
            LIMIT,
            "each hidden member to hold a relayed address",
            || {
                r.get("/v1/status")
                    .is_some_and(|s| s["relayed_via"].to_string().contains(&boot_peer))
            },
        );
    }
    // Neither hidden member can be dialled directly, so when they verify
    // each other it is over a circuit through the bootstrap node, found in
    // the DHT under the relayed address.
    wait_for(LIMIT, "the hidden members to reach each other", || {
        runs[0].members().contains(&hidden[1].peer())
            && runs[1].members().contains(&hidden[0].peer())
    });
    let peers = runs[0].get("/v1/peers").unwrap();
    let entry = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == hidden[1].peer())
        .unwrap();
    assert_eq!(entry["direct"], false, "{entry}");
    // And they see each other's adverts.
    for r in &runs {
        wait_for(LIMIT, "the hidden members to see all three adverts", || {
            r.advertisers().len() == 3
        });
    }
}

#[test]
fn a_member_asks_only_relays_for_a_relayed_address_and_says_once_it_has_none() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Relayless Alliance", &[("North", Roles::ALL)], 20);
    // A bootstrap node's certificate, run as a plain member (as after a
    // restart without --bootstrap): it serves no relay.
    let boot = a.node("boot", 0, Roles::BOOTSTRAP).start(false);
    let boot_addr = boot.address();
    let hidden = a.node("hidden", 0, Roles::WORK);
    hidden.edit_config("listen = [\"/ip4/127.0.0.1/tcp/0\"]", "listen = []");
    hidden.set_bootstrap(std::slice::from_ref(&boot_addr));
    let run = hidden.start(false);
    wait_for(LIMIT, "the hidden member to be verified", || {
        boot.members().contains(&hidden.peer())
    });
    // The node retries relays every 10 s: two rounds and more.
    std::thread::sleep(Duration::from_secs(25));
    let log = run.log();
    assert!(
        !log.contains("asking for a relayed address") && !log.contains("relayed address closed"),
        "asked a node that serves no relay:\n{log}"
    );
    assert_eq!(
        log.matches("no connected bootstrap node relays for it")
            .count(),
        1,
        "{log}"
    );
}
