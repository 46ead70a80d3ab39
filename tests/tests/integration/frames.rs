//! Hostile frames on every protocol a running node speaks, from a raw
//! libp2p peer (this file's own: TCP, noise, yamux, identify and bare
//! streams) that holds a valid membership, so that nothing is turned away
//! for not being a member.
//!
//! The peer learns the node's protocols from identify and opens each one.
//! On the alliance's own protocols (membership, task offers, reports,
//! progress, credits, blobs) an oversized length prefix, a truncated frame
//! and garbage each get the peer turned away with the reason on the
//! status page, counted in `alliance_peers_turned_away_total`, and
//! disconnected. libp2p's own protocols (gossipsub, Kademlia, identify,
//! ping, AutoNAT, DCUtR, relay) close a stream that carries garbage without
//! telling the node who sent it, so there the test asks only that the node
//! keeps serving. Then two floods: thousands of streams that send nothing,
//! and a hundred report frames declaring 8 MiB that send 6 MiB each and
//! stall: the peer is cut off, and the node's resident memory stays within
//! the frame budget. Through all of it an honest member stays a member and
//! its advert stays in the table.

use std::time::{Duration, Instant};

use alliance_node::net::{
    self, ADVERTS_PROTOCOL, BLOB_PROTOCOL, CREDITS_PROTOCOL, MEMBERSHIP_PROTOCOL,
    PROGRESS_PROTOCOL, RESULT_PROTOCOL, TASK_PROTOCOL,
};
use alliance_protocol::cert::Roles;
use alliance_protocol::wire::{self, Hello, Message};
use alliance_protocol::{Identity, Timestamp};
use alliance_tests::alliance::{Running, TestAlliance, wait_for};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, noise, tcp, yamux};
use tokio::sync::mpsc;

#[derive(NetworkBehaviour)]
struct Raw {
    identify: identify::Behaviour,
    streams: libp2p_stream::Behaviour,
}

/// What the raw peer's swarm saw.
#[derive(Debug)]
enum Seen {
    Connected,
    Closed,
    Protocols(Vec<StreamProtocol>),
}

/// A raw peer, its swarm driven by a task of its own.
struct Hostile {
    peer: PeerId,
    control: libp2p_stream::Control,
    seen: mpsc::UnboundedReceiver<Seen>,
    node: PeerId,
    dropped: bool,
}

impl Hostile {
    /// Connects to `node` at `addr` and completes the membership exchange
    /// with a valid chain of institution 0.
    async fn join(a: &TestAlliance, node: &Running) -> Self {
        let id = Identity::generate();
        let key = id.to_libp2p_keypair();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, || {
                // Room to open far more streams than the node allows.
                let mut c = yamux::Config::default();
                c.set_max_num_streams(4000);
                c
            })
            .unwrap()
            .with_behaviour(|key| Raw {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/alliance/1".into(),
                    key.public(),
                )),
                streams: libp2p_stream::Behaviour::new(),
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let mut control = swarm.behaviour().streams.new_control();
        let hello = Hello {
            alliance: a.charter.id,
            chain: a.chain(&id, 0, Roles::WORK, Timestamp::now(), 30),
            revocations: vec![],
            lists: vec![],
        };
        let frame = wire::encode_frame(&hello).unwrap();
        // The node asks for our hello too: answered with the same frame.
        let mut asked = control.accept(MEMBERSHIP_PROTOCOL).unwrap();
        let answer = frame.clone();
        tokio::spawn(async move {
            while let Some((_, mut s)) = asked.next().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut prefix = [0u8; 4];
                    if s.read_exact(&mut prefix).await.is_ok() {
                        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
                        let _ = s.read_exact(&mut body).await;
                        let _ = s.write_all(&answer).await;
                        let _ = s.close().await;
                    }
                });
            }
        });
        let addr: Multiaddr = node.address().parse().unwrap();
        let node_peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
            _ => panic!("no peer id in {addr}"),
        };
        swarm.dial(addr).unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let event = swarm.select_next_some().await;
                let seen = match event {
                    SwarmEvent::ConnectionEstablished { .. } => Seen::Connected,
                    SwarmEvent::ConnectionClosed {
                        num_established: 0, ..
                    } => Seen::Closed,
                    SwarmEvent::Behaviour(RawEvent::Identify(identify::Event::Received {
                        info,
                        ..
                    })) => Seen::Protocols(info.protocols),
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        let mut hostile = Self {
            peer: id.peer_id(),
            control,
            seen,
            node: node_peer,
            dropped: false,
        };
        hostile.expect_connected().await;
        let mut s = hostile.open(MEMBERSHIP_PROTOCOL).await.unwrap();
        s.write_all(&frame).await.unwrap();
        s.close().await.unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        let me = hostile.peer.to_string();
        blocking(|| {
            wait_for(
                Duration::from_secs(20),
                "the raw peer to be a member",
                || node.members().contains(&me),
            );
        });
        hostile
    }

    async fn expect_connected(&mut self) {
        let got = tokio::time::timeout(Duration::from_secs(20), self.seen.recv()).await;
        assert!(
            matches!(got, Ok(Some(Seen::Connected))),
            "no connection: {got:?}"
        );
    }

    /// The protocols the node listed in identify.
    async fn protocols(&mut self) -> Vec<StreamProtocol> {
        let limit = tokio::time::sleep(Duration::from_secs(20));
        tokio::pin!(limit);
        loop {
            tokio::select! {
                () = &mut limit => panic!("no identify from the node"),
                seen = self.seen.recv() => match seen {
                    Some(Seen::Protocols(p)) => return p,
                    Some(_) => {}
                    None => panic!("the raw swarm stopped"),
                },
            }
        }
    }

    async fn open(&mut self, protocol: StreamProtocol) -> std::io::Result<libp2p::Stream> {
        self.control
            .open_stream(self.node, protocol)
            .await
            .map_err(std::io::Error::other)
    }

    /// True when the node has closed the connection, or does within `limit`.
    async fn dropped_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        while !self.dropped {
            tokio::select! {
                () = &mut deadline => return false,
                seen = self.seen.recv() => {
                    self.dropped = matches!(seen, Some(Seen::Closed) | None);
                }
            }
        }
        true
    }

    /// True when the node has closed the connection already.
    fn was_dropped(&mut self) -> bool {
        while let Ok(seen) = self.seen.try_recv() {
            self.dropped |= matches!(seen, Seen::Closed);
        }
        self.dropped
    }
}

/// `f`, run where blocking is allowed (the harness's API calls block).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// The count of peers the node turned away, from its metrics.
fn turned_away(node: &Running) -> f64 {
    node.metrics()
        .lines()
        .filter(|l| l.starts_with("alliance_peers_turned_away_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The three bad frames: a length prefix of 4 GiB, a frame cut off after
/// 10 of its 1000 bytes, and 64 bytes of garbage under a right prefix.
fn attacks() -> [(&'static str, Vec<u8>, &'static str); 3] {
    let mut oversized = u32::MAX.to_be_bytes().to_vec();
    oversized.extend_from_slice(&[0u8; 4096]);
    let mut truncated = 1000u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0u8; 10]);
    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend((0..64u8).map(|i| i.wrapping_mul(151) ^ 0xa5));
    [
        ("oversized", oversized, "bad"),
        ("truncated", truncated, "unfinished"),
        ("garbage", garbage, "bad"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_on_every_protocol_are_refused_and_the_peer_dropped() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new(
        "Frames Test",
        &[("North", Roles::ALL), ("South", Roles::ALL)],
        60,
    );
    // A bootstrap node: Kademlia in server mode is listed too (its relay
    // serves once the node has a confirmed public address, so not here).
    let node_dir = a.node("target", 0, Roles::ALL);
    let node = blocking(|| node_dir.start(true));
    let honest_dir = a.node("honest", 1, Roles::ALL);
    honest_dir.set_bootstrap(&[blocking(|| node.address())]);
    let honest = blocking(|| honest_dir.start(false));
    let honest_peer = honest_dir.peer();
    let node_peer = node_dir.peer();
    blocking(|| {
        wait_for(Duration::from_secs(30), "the honest member to join", || {
            node.members().contains(&honest_peer) && honest.advertisers().contains(&node_peer)
        });
    });
    let honest_holds = |why: &str| {
        blocking(|| {
            assert!(
                node.members().contains(&honest_peer),
                "{why}: the honest member was lost"
            );
            assert!(
                node.advertisers().contains(&honest_peer),
                "{why}: the honest member's advert was lost"
            );
        });
    };

    let mut first = Hostile::join(&a, &node).await;
    let spoken = first.protocols().await;
    let ours = [
        MEMBERSHIP_PROTOCOL,
        TASK_PROTOCOL,
        RESULT_PROTOCOL,
        PROGRESS_PROTOCOL,
        CREDITS_PROTOCOL,
        ADVERTS_PROTOCOL,
        BLOB_PROTOCOL,
    ];
    for p in &ours {
        assert!(spoken.contains(p), "the node does not list {p}: {spoken:?}");
    }
    let theirs: Vec<_> = spoken.iter().filter(|p| !ours.contains(p)).collect();
    for p in ["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/meshsub/1.1.0"] {
        assert!(
            theirs.iter().any(|t| t.as_ref() == p),
            "the node does not list {p}: {theirs:?}"
        );
    }
    assert!(
        theirs.iter().any(|t| t.as_ref().ends_with("/kad/1")),
        "no Kademlia in {theirs:?}"
    );
    eprintln!("libp2p protocols attacked: {theirs:?}");

    // libp2p's protocols, all three frames on each from one peer: the node
    // keeps serving.
    for protocol in &theirs {
        for (what, frame, _) in attacks() {
            if let Ok(mut s) = first.open((*protocol).clone()).await {
                let _ = s.write_all(&frame).await;
                let _ = s.close().await;
            } else {
                eprintln!("{protocol}: {what}: the stream was refused");
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        blocking(|| node.get("/v1/status")).is_some(),
        "the node stopped serving"
    );
    honest_holds("after garbage on libp2p's protocols");
    drop(first);

    // The alliance's protocols: each bad frame gets its peer dropped.
    for protocol in ours {
        for (what, frame, reason) in attacks() {
            let before = blocking(|| turned_away(&node));
            let mut h = Hostile::join(&a, &node).await;
            let mut s = h.open(protocol.clone()).await.unwrap();
            let _ = s.write_all(&frame).await;
            let _ = s.close().await;
            assert!(
                h.dropped_within(Duration::from_secs(20)).await,
                "{protocol}, {what}: the peer was not dropped"
            );
            let me = h.peer.to_string();
            let reasons = blocking(|| node.rejections(&me));
            let expected = match (reason, protocol == BLOB_PROTOCOL) {
                ("bad", false) => "sent a bad",
                ("bad", true) => "malformed blob request",
                _ => "unfinished",
            };
            assert!(
                reasons.iter().any(|r| r.contains(expected)),
                "{protocol}, {what}: {reasons:?}"
            );
            assert!(
                blocking(|| turned_away(&node)) > before,
                "{protocol}, {what}: not counted"
            );
        }
    }
    honest_holds("after bad frames on the alliance's protocols");

    // A flood of streams that send nothing: cut off once they stall.
    let pid = node.pid();
    let idle_rss = rss_mib(pid);
    let mut h = Hostile::join(&a, &node).await;
    let started = Instant::now();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..3000 {
        if h.was_dropped() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(5), h.open(PROGRESS_PROTOCOL)).await {
            Ok(Ok(s)) => held.push(s),
            _ => refused += 1,
        }
    }
    eprintln!(
        "stream flood: {} opened, {refused} refused in {:.1} s",
        held.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        h.dropped_within(Duration::from_secs(40)).await,
        "the stream flood went on"
    );
    let flood_rss = rss_mib(pid);
    eprintln!(
        "stream flood cut off {:.1} s after it began; RSS {idle_rss:.0} -> {flood_rss:.0} MiB",
        started.elapsed().as_secs_f64()
    );
    drop(held);
    honest_holds("after the stream flood");

    // A hundred 8 MiB reports that send 6 MiB each and stall: the bodies
    // are held within the node's frame budget, then the peer is cut off.
    let idle_rss = rss_mib(pid);
    let mut h = Hostile::join(&a, &node).await;
    let cap = u32::try_from(wire::Reports::MAX_SIZE).unwrap();
    let piece = vec![0x5au8; 64 * 1024];
    let mut writers = Vec::new();
    for _ in 0..100 {
        if h.was_dropped() {
            break;
        }
        let Ok(mut s) = h.open(RESULT_PROTOCOL).await else {
            break;
        };
        let piece = piece.clone();
        writers.push(tokio::spawn(async move {
            let _ = s.write_all(&cap.to_be_bytes()).await;
            for _ in 0..96 {
                let w = tokio::time::timeout(Duration::from_secs(20), s.write_all(&piece));
                if !matches!(w.await, Ok(Ok(()))) {
                    break;
                }
            }
            let _ = s.flush().await;
            // Held open, sending nothing more.
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(s);
        }));
    }
    let mut peak = idle_rss;
    let watch = Instant::now();
    let mut cut = false;
    while watch.elapsed() < Duration::from_secs(90) {
        peak = peak.max(rss_mib(pid));
        if h.dropped_within(Duration::from_millis(200)).await {
            cut = true;
            break;
        }
    }
    for w in writers {
        w.abort();
    }
    eprintln!(
        "report flood: RSS {idle_rss:.0} MiB idle, {peak:.0} MiB at most ({:.0} MiB more); cut off: {cut}",
        peak - idle_rss
    );
    assert!(cut, "the stalled reports were not cut off");
    let budget = net::codec::FRAME_BUDGET as f64 / (1 << 20) as f64;
    assert!(
        peak - idle_rss < budget * 2.5,
        "resident memory grew by {:.0} MiB for a frame budget of {budget:.0} MiB",
        peak - idle_rss
    );
    honest_holds("after the report flood");
    drop(honest);
}
