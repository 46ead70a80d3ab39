//! Peers that are not members, driven by hand from the test: each is
//! disconnected, kept out of every table, and the reason recorded; garbage
//! on the listening port, and garbage or oversized frames on an open
//! membership stream, do not stop the node serving. Blob streams serve
//! members what they ask for and drop a member that sends garbage.

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
    let mut swarm = net::build_swarm(&id, &a.charter.id, &net::Options::default())
        .unwrap()
        .swarm;
    swarm.dial(target.clone()).unwrap();
    (id, swarm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_are_disconnected_with_a_reason() {
    let _scenario = alliance_tests::scenario(module_path!());
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
            lists: vec![],
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

/// A codec that writes whatever bytes it is given: the frames of a peer
/// that does not follow the protocol.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = libp2p::StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_some(io).await
    }

    async fn read_response<T: futures::AsyncRead + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> std::io::Result<Vec<u8>> {
        read_some(io).await
    }

    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        use futures::AsyncWriteExt;
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        use futures::AsyncWriteExt;
        io.write_all(&res).await?;
        io.close().await
    }
}

async fn read_some<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    use futures::AsyncReadExt;
    let mut buf = Vec::new();
    io.take(64 * 1024).read_to_end(&mut buf).await?;
    Ok(buf)
}

/// A libp2p peer whose only behaviour sends `frame` as a membership
/// request once connected to `target`; true when the node disconnects it.
async fn send_raw_frame(target: &Multiaddr, frame: Vec<u8>) -> (PeerId, bool) {
    let id = Identity::generate();
    let behaviour = request_response::Behaviour::<RawCodec>::new(
        [(
            net::MEMBERSHIP_PROTOCOL,
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default(),
    );
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(id.to_libp2p_keypair())
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default(),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .build();
    swarm.dial(target.clone()).unwrap();
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    let mut frame = Some(frame);
    let mut held = Vec::new(); // the node's own hello stays unanswered
    loop {
        tokio::select! {
            _ = &mut deadline => return (id.peer_id(), false),
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                    if let Some(f) = frame.take() {
                        swarm.behaviour_mut().send_request(&peer_id, f);
                    }
                }
                SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                    return (id.peer_id(), true);
                }
                SwarmEvent::Behaviour(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. }, ..
                }) => held.push(channel),
                _ => {}
            },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_on_a_membership_stream_get_the_peer_dropped() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Frames Test", &[("North", Roles::ALL)], 60);
    let node = a.spawn(0, vec![]).await;

    // A length prefix of 1 GiB (far over the cap): refused from the
    // prefix, before the body is read.
    let mut oversized = (1u32 << 30).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 4096]);
    // A frame of the right length whose body is not a hello.
    let mut garbage = 512u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xa5; 512]);
    for (what, frame) in [("oversized", oversized), ("garbage", garbage)] {
        let (peer, dropped) = send_raw_frame(&node.address, frame).await;
        assert!(dropped, "{what}: the peer was not disconnected");
        let reasons = rejected(&node, peer).await;
        assert!(
            reasons.iter().any(|r| r.contains("bad membership request")),
            "{what}: {reasons:?}"
        );
    }
    assert!(node.client.peers().await.unwrap().is_empty());

    // The node still serves members.
    let member = a.spawn(0, vec![node.address.clone()]).await;
    let mut joined = false;
    for _ in 0..100 {
        let peers = node.client.peers().await.unwrap();
        if peers.iter().any(|p| p.peer_id == member.peer.to_string()) {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "a real member still joins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_streams_serve_members_and_drop_garbage() {
    let _scenario = alliance_tests::scenario(module_path!());
    use alliance_node::net::blobs::{self, BlobError};
    use alliance_node::store::blobs::Blobs;
    use futures::AsyncWriteExt;

    let a = TestAlliance::new("Blob Stream Test", &[("North", Roles::ALL)], 60);
    let dir = tempfile::tempdir().unwrap();
    let held = Blobs::open(&dir.path().join("held")).unwrap();
    // Three chunks and a bit: page-aligned writes and a tail.
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 1234u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let hash = held.put(&data).unwrap();
    let node = a.spawn(0, vec![]).await;
    tokio::spawn(blobs::serve(
        node.client.clone(),
        held,
        alliance_node::metrics::Metrics::default(),
    ));
    let member = a.spawn(0, vec![node.address.clone()]).await;
    let mut joined = false;
    for _ in 0..100 {
        if matches!(member.client.member(node.peer).await, Ok(Some(_)))
            && matches!(node.client.member(member.peer).await, Ok(Some(_)))
        {
            joined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(joined, "the member joins");

    let fetched = Blobs::open(&dir.path().join("fetched")).unwrap();
    let len = data.len() as u64;
    let moved = blobs::fetch(&member.client, &fetched, node.peer, hash, len)
        .await
        .unwrap();
    assert_eq!(moved, len);
    assert_eq!(fetched.read(&hash).unwrap(), data, "the bytes on disk");
    // Held already: nothing crosses the network.
    let again = blobs::fetch(&member.client, &fetched, node.peer, hash, len);
    assert_eq!(again.await.unwrap(), 0);

    let absent = alliance_protocol::Hash::of(b"nobody has this");
    let e = blobs::fetch(&member.client, &fetched, node.peer, absent, 10).await;
    assert!(matches!(e, Err(BlobError::NotFound { .. })), "{e:?}");
    // Asking for the wrong length is caught from the answer's header.
    let other = Blobs::open(&dir.path().join("other")).unwrap();
    let e = blobs::fetch(&member.client, &other, node.peer, hash, len + 1).await;
    let why = e.unwrap_err().to_string();
    assert!(why.contains("when 3146963 of 3146963 were asked"), "{why}");
    assert!(!other.has(&hash, len + 1) && !other.has(&hash, len));

    // A member that sends garbage on a blob stream is dropped.
    let mut stream = member
        .client
        .open_stream(node.peer, net::BLOB_PROTOCOL)
        .await
        .unwrap();
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0x5a; 64]);
    stream.write_all(&garbage).await.unwrap();
    stream.flush().await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = rejected(&node, member.peer).await;
        if !reasons.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        reasons.iter().any(|r| r.contains("malformed blob request")),
        "{reasons:?}"
    );
}
