//! Peers that are not members, driven by hand from the test: each is
//! disconnected, kept out of every table, and the reason recorded; garbage
//! on the listening port does not stop the node serving.

use std::io::Write;
use std::time::Duration;

use alliance_node::net::{self, BehaviourEvent};
use alliance_protocol::cert::{Chain, Roles};
use alliance_protocol::wire::Hello;
use alliance_protocol::{Identity, Timestamp};
use alliance_tests::alliance::{InProcess, TestAlliance};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, request_response};

/// Drives `swarm` (already dialling `target`) until it is disconnected or
/// `limit` passes; answers membership requests with `hello`, or never.
async fn drive(swarm: &mut Swarm<net::Behaviour>, hello: Option<Hello>, limit: Duration) -> bool {
    let mut held = Vec::new(); // unanswered requests stay open
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    let mut was_connected = false;
    loop {
        tokio::select! {
            _ = &mut deadline => return false,
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { .. } => was_connected = true,
                SwarmEvent::ConnectionClosed { num_established: 0, .. } if was_connected => return true,
                SwarmEvent::Behaviour(BehaviourEvent::Membership(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. }, ..
                })) => match &hello {
                    Some(h) => {
                        let _ = swarm.behaviour_mut().membership.send_response(channel, h.clone());
                    }
                    None => held.push(channel),
                },
                _ => {}
            },
        }
    }
}

async fn rejected(node: &InProcess, peer: PeerId) -> Vec<String> {
    let status = node.client.status().await.expect("status");
    status
        .rejected
        .into_iter()
        .filter(|r| r.peer_id == peer.to_string())
        .map(|r| r.reason)
        .collect()
}

fn chain(a: &TestAlliance, id: &Identity, from: Timestamp, days: u64) -> Chain {
    a.chain(id, 0, Roles::WORK, from, days)
}

async fn stranger(a: &TestAlliance, target: &Multiaddr) -> (Identity, Swarm<net::Behaviour>) {
    let id = Identity::generate();
    let mut swarm = net::build_swarm(&id, &a.charter.id, false).unwrap();
    swarm.dial(target.clone()).unwrap();
    (id, swarm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_are_disconnected_with_a_reason() {
    let a = TestAlliance::new("Hostile Test", &[("North", Roles::ALL)], 60);
    let node = a.spawn(0, vec![]).await;

    // Silent: speaks the protocol, never presents a chain.
    let (id, mut swarm) = stranger(&a, &node.address).await;
    assert!(
        drive(&mut swarm, None, Duration::from_secs(20)).await,
        "the silent peer was not disconnected"
    );
    let reasons = rejected(&node, id.peer_id()).await;
    assert!(
        reasons.iter().any(|r| r.contains("no certificate chain")),
        "{reasons:?}"
    );

    // An expired chain, and somebody else's valid chain (a replayed certificate).
    let past = Timestamp::from_secs(Timestamp::now().as_secs() - 40 * 86_400);
    let victim = Identity::generate();
    for cause in ["expired", "chain of another node"] {
        let (id, mut swarm) = stranger(&a, &node.address).await;
        let presented = if cause == "expired" {
            chain(&a, &id, past, 30)
        } else {
            chain(&a, &victim, Timestamp::now(), 30)
        };
        let hello = Hello {
            alliance: a.charter.id,
            chain: presented,
            revocations: vec![],
        };
        assert!(
            drive(&mut swarm, Some(hello), Duration::from_secs(20)).await,
            "{cause}: not disconnected"
        );
        let reasons = rejected(&node, id.peer_id()).await;
        assert!(
            reasons.iter().any(|r| r.contains(cause)),
            "{cause}: {reasons:?}"
        );
    }

    // Garbage on the listening port.
    let port = node.address.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
        _ => None,
    });
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port.unwrap())).unwrap();
    let _ = raw.write_all(&[0xff; 4096]);
    let _ = raw.write_all(&u32::MAX.to_be_bytes());
    drop(raw);

    // None of them is a member or advertiser, and the node still serves.
    let peers = node.client.peers().await.unwrap();
    assert!(peers.is_empty(), "{peers:?}");
    assert_eq!(
        node.client.gpus().await.unwrap().len(),
        1,
        "only its own advert"
    );
    let member = a.spawn(0, vec![node.address.clone()]).await;
    let mut joined = false;
    for _ in 0..100 {
        if node
            .client
            .peers()
            .await
            .unwrap()
            .iter()
            .any(|p| p.peer_id == member.peer.to_string())
        {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "a real member still joins");
}
