//! Fifty nodes in one process, on loopback TCP, converge on a full advert
//! table: every node holds every node's advert; and once the joining is
//! over they hold connections to a part of the alliance, not to all of it.

use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_converge_on_a_full_advert_table() {
    let _scenario = alliance_tests::scenario(module_path!());
    const N: usize = 50;
    let a = TestAlliance::new(
        "Scale Test",
        &[("North", Roles::ALL), ("South", Roles::WORK)],
        120,
    );
    let first = a.spawn(0, vec![]).await;
    let boot = vec![first.address.clone()];
    let mut nodes = vec![first];
    for i in 1..N {
        nodes.push(a.spawn(i % 2, boot.clone()).await);
    }
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        let mut sizes = Vec::new();
        for n in &nodes {
            sizes.push(n.client.gpus().await.expect("gpus").len());
        }
        let complete = sizes.iter().filter(|&&s| s == N).count();
        if complete == N {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "after {limit:?} only {complete} of {N} nodes hold all {N} adverts; table sizes {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{N} nodes converged in {:?}", start.elapsed());

    // Joining through one node and walking the DHT connects a node to
    // many; past a new connection's grace each closes what it does not
    // need, down to a bounded degree (16 at most, 12 after a trim).
    let limit = Duration::from_secs(180);
    loop {
        let mut peers = Vec::new();
        for n in &nodes {
            peers.push(n.client.status().await.expect("status").connected_peers);
        }
        let mean = peers.iter().sum::<usize>() as f64 / N as f64;
        if mean <= 16.0 {
            eprintln!("{mean:.1} peers a node on average: {peers:?}");
            break;
        }
        assert!(
            start.elapsed() < limit,
            "after {limit:?} the nodes hold {mean:.1} connections on average (each at most 16 wanted): {peers:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // And the tables stay full.
    for n in &nodes {
        assert_eq!(n.client.gpus().await.expect("gpus").len(), N);
    }
}
