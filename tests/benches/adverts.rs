//! Advert propagation: time from a member publishing a changed advert to
//! every other member holding it, p50 and p99, for 10, 50 and 100
//! in-process nodes on loopback TCP, as a ratio to one direct
//! request-response round trip (the membership exchange between two nodes)
//! measured in the same run.
//!
//! Then gossip cost: bytes each node sends per second at steady state
//! (adverts republished every quarter of the charter's default advert
//! lifetime, gossipsub heartbeats and gossip, pings, DHT walks, AutoNAT
//! probes), from the libp2p traffic counters of every node over one minute.
//!
//! All nodes share this machine's cores, so at 50 nodes and more the
//! delays mostly measure how long the cores take to do every node's share
//! of one publish (receiving, checking two signatures, passing it on); the
//! `CPU/publ.` column says how much that is.
//!
//! Beside each size runs a baseline: as many bare swarms with nothing but
//! the node's own gossipsub behaviour ([`net::gossip`]: the same signing,
//! strict checks, scoring and mesh) on the node's own transport, each
//! connected to as many others as the members held on average (at 50
//! nodes a node keeps at most 16), publishing messages of an advert's
//! size and accepting them unread. Its delays are what libp2p's gossip
//! costs on this machine; the `vs bare` columns say what the node adds.
//!
//! With `ADVERT_BENCH=cost` it draws the cost curve instead: for 50, 200
//! and 500 nodes (`ADVERT_BENCH_NODES`), the time until every member's
//! table holds every advert, then over the traffic window at steady state
//! the CPU seconds per node per minute, the bytes per node per second and
//! the memory per node (this process's resident growth over the nodes).
//!
//! Run: `cargo bench -p alliance-tests --bench adverts`
//! (`ADVERT_BENCH_NODES=10,50` picks the sizes, `ADVERT_BENCH_ROUNDS` the
//! number of publishes per size, `ADVERT_BENCH_COST_SECS` the length of the
//! traffic window.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::time::{Duration, Instant};

use alliance_node::net::{self, BehaviourEvent};
use alliance_protocol::cert::Roles;
use alliance_protocol::wire::Hello;
use alliance_protocol::{Identity, Timestamp};
use alliance_tests::alliance::{InProcess, TestAlliance};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, gossipsub, request_response};
use tokio::sync::{mpsc, oneshot};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Median of 200 membership request-response round trips between two nodes.
async fn round_trip(a: &TestAlliance) -> f64 {
    let hello = |id: &Identity| Hello {
        alliance: a.charter.id,
        chain: a.chain(id, 0, Roles::WORK, Timestamp::now(), 30),
        revocations: vec![],
        lists: vec![],
    };
    let (ia, ib) = (Identity::generate(), Identity::generate());
    let (ha, hb) = (hello(&ia), hello(&ib));
    let mut sa = net::build_swarm(&ia, &a.charter.id, &net::Options::default())
        .unwrap()
        .swarm;
    let mut sb = net::build_swarm(&ib, &a.charter.id, &net::Options::default())
        .unwrap()
        .swarm;
    sb.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = sb.select_next_some().await {
            break address;
        }
    };
    sa.dial(addr).unwrap();
    let peer_b = ib.peer_id();
    let mut times = Vec::new();
    let mut sent: Option<Instant> = None;
    let mut connected = false;
    while times.len() < 200 {
        if connected && sent.is_none() {
            sa.behaviour_mut()
                .membership
                .send_request(&peer_b, ha.clone().into());
            sent = Some(Instant::now());
        }
        tokio::select! {
            e = sa.select_next_some() => match e {
                SwarmEvent::ConnectionEstablished { .. } => connected = true,
                SwarmEvent::Behaviour(BehaviourEvent::Membership(request_response::Event::Message {
                    message: request_response::Message::Response { .. }, ..
                })) => {
                    if let Some(t) = sent.take() {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                _ => {}
            },
            e = sb.select_next_some() => {
                if let SwarmEvent::Behaviour(BehaviourEvent::Membership(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. }, ..
                })) = e {
                    let _ = sb.behaviour_mut().membership.send_response(channel, hb.clone());
                }
            }
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

async fn converge(nodes: &[InProcess]) -> Duration {
    let start = Instant::now();
    loop {
        let mut full = true;
        for n in nodes {
            if n.client.gpus().await.unwrap().len() < nodes.len() {
                full = false;
                break;
            }
        }
        if full {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(600), "no convergence");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until AutoNAT has an answer on every node.
async fn settle(nodes: &[InProcess]) {
    let start = Instant::now();
    loop {
        let mut unknown = 0;
        for n in nodes {
            if n.client.status().await.unwrap().nat.starts_with("unknown") {
                unknown += 1;
            }
        }
        if unknown == 0 {
            return;
        }
        if start.elapsed() > Duration::from_secs(180) {
            println!("  ({unknown} nodes still without a reachability answer after 180 s)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Delays (seconds) from publish to acceptance at every other node, for the
/// advert `publisher` publishes when its owner pauses or resumes it.
async fn propagation(nodes: &[InProcess], publisher: usize) -> Vec<f64> {
    let paused = nodes[publisher].client.status().await.unwrap().paused;
    nodes[publisher].client.set_paused(!paused).await.unwrap();
    let own = nodes[publisher]
        .client
        .advert(nodes[publisher].peer)
        .await
        .unwrap()
        .unwrap();
    let (seq, published) = (own.sequence, own.received_at_us);
    let start = Instant::now();
    let mut delays = vec![None; nodes.len()];
    delays[publisher] = Some(0.0);
    while delays.iter().any(Option::is_none) {
        // The delays come from the nodes' own timestamps; reading every
        // node's table while the advert spreads would only take CPU from
        // the nodes being measured (and each read asks for the one advert,
        // not the whole table).
        tokio::time::sleep(Duration::from_millis(200)).await;
        if start.elapsed() > Duration::from_secs(60) {
            let missing = delays.iter().filter(|d| d.is_none()).count();
            println!(
                "  ({missing} of {} nodes did not receive the advert within 60 s)",
                nodes.len() - 1
            );
            break;
        }
        for (i, n) in nodes.iter().enumerate() {
            if delays[i].is_some() {
                continue;
            }
            let held = n.client.advert(nodes[publisher].peer).await.unwrap();
            if let Some(a) = held.filter(|a| a.sequence >= seq) {
                delays[i] = Some(a.received_at_us.saturating_sub(published) as f64 / 1e6);
            }
        }
    }
    delays
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != publisher)
        .map(|(_, d)| d.unwrap_or(f64::INFINITY))
        .collect()
}

/// Mean number of hops between two nodes of the graph `edges` over `n`
/// nodes (breadth first from each; pairs with no path left out).
fn mean_hops(n: usize, edges: &[(usize, usize)]) -> f64 {
    let mut next = vec![Vec::new(); n];
    for &(a, b) in edges {
        next[a].push(b);
        next[b].push(a);
    }
    let (mut total, mut pairs) = (0usize, 0usize);
    for from in 0..n {
        let mut hops = vec![usize::MAX; n];
        hops[from] = 0;
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(at) = queue.pop_front() {
            for &to in &next[at] {
                if hops[to] == usize::MAX {
                    hops[to] = hops[at] + 1;
                    total += hops[to];
                    pairs += 1;
                    queue.push_back(to);
                }
            }
        }
    }
    total as f64 / pairs.max(1) as f64
}

/// The members' connection graph, as index pairs.
async fn member_edges(nodes: &[InProcess]) -> Vec<(usize, usize)> {
    let index: std::collections::HashMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.peer.to_string(), i))
        .collect();
    let mut edges = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for p in n.client.peers().await.unwrap() {
            if let Some(&j) = index.get(&p.peer_id)
                && i < j
            {
                edges.push((i, j));
            }
        }
    }
    edges
}

/// What the test drives a bare gossip swarm with.
enum Bare {
    /// Publish this; answer with the moment the publish returned.
    Publish(Vec<u8>, oneshot::Sender<Instant>),
    /// Answer with the number of peers subscribed to the topic, and of
    /// peers connected.
    Subscribed(oneshot::Sender<(usize, usize)>),
    Dial(Multiaddr),
}

/// A behaviour a bare swarm can gossip with: gossipsub alone, or the
/// node's whole behaviour (every protocol, no actor behind it).
trait Gossiping: libp2p::swarm::NetworkBehaviour + Send {
    fn gossip(&mut self) -> &mut gossipsub::Behaviour;
    fn message(event: Self::ToSwarm) -> Option<gossipsub::Event>;
}

impl Gossiping for gossipsub::Behaviour {
    fn gossip(&mut self) -> &mut gossipsub::Behaviour {
        self
    }
    fn message(event: gossipsub::Event) -> Option<gossipsub::Event> {
        Some(event)
    }
}

impl Gossiping for net::Behaviour {
    fn gossip(&mut self) -> &mut gossipsub::Behaviour {
        &mut self.gossipsub
    }
    fn message(event: BehaviourEvent) -> Option<gossipsub::Event> {
        match event {
            BehaviourEvent::Gossipsub(e) => Some(e),
            _ => None,
        }
    }
}

/// Runs `swarm` on its own task, subscribed to `topic`, every message
/// accepted unread and its arrival sent to `delivered`; returns its
/// commands and its address.
async fn start_bare<B: Gossiping + 'static>(
    mut swarm: libp2p::Swarm<B>,
    topic: &gossipsub::IdentTopic,
    delivered: mpsc::UnboundedSender<(u64, Instant)>,
) -> (mpsc::UnboundedSender<Bare>, Multiaddr)
where
    B::ToSwarm: Send,
{
    swarm.behaviour_mut().gossip().subscribe(topic).unwrap();
    swarm
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let (tx, mut commands) = mpsc::unbounded_channel::<Bare>();
    let topic = topic.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Bare::Publish(data, done)) => {
                        swarm.behaviour_mut().gossip().publish(topic.clone(), data).unwrap();
                        let _ = done.send(Instant::now());
                    }
                    Some(Bare::Subscribed(answer)) => {
                        let count = swarm.behaviour_mut().gossip().all_peers().filter(|(_, t)| !t.is_empty()).count();
                        let _ = answer.send((count, swarm.connected_peers().count()));
                    }
                    Some(Bare::Dial(addr)) => swarm.dial(addr).unwrap(),
                    None => return,
                },
                event = swarm.select_next_some() => {
                    if let SwarmEvent::Behaviour(event) = event
                        && let Some(gossipsub::Event::Message { propagation_source, message_id, message }) = B::message(event)
                    {
                        let at = Instant::now();
                        let round = u64::from_le_bytes(message.data[..8].try_into().unwrap());
                        let _ = delivered.send((round, at));
                        swarm.behaviour_mut().gossip().report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            gossipsub::MessageAcceptance::Accept,
                        );
                    }
                }
            }
        }
    });
    (tx, addr)
}

/// The baseline: `n` swarms with only the node's gossipsub behaviour,
/// each connected to about `degree` others (every new one dials half that
/// many of those before it, picked at random: the members' measured
/// average), `rounds` publishes of `size` bytes; with `full`, swarms of
/// the node's whole behaviour for that alliance instead (every protocol,
/// no actor: what the protocol stack adds to gossip by itself). Returns
/// the delays from
/// publish to delivery at every other swarm, the CPU time one publish
/// cost all swarms (measured as the members' is) and the mean hops
/// between two swarms.
async fn bare_gossip(
    n: usize,
    rounds: usize,
    size: usize,
    degree: usize,
    full: Option<&TestAlliance>,
) -> (Vec<f64>, Option<f64>, f64) {
    let topic = gossipsub::IdentTopic::new("bare");
    let (delivered_tx, mut delivered) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut swarms = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    let mut edges = Vec::new();
    let mut pick: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..n {
        let (tx, addr) = match full {
            None => {
                let swarm = libp2p::SwarmBuilder::with_new_identity()
                    .with_tokio()
                    .with_other_transport(|key| net::transport(key, None).unwrap())
                    .unwrap()
                    .with_behaviour(|key| net::gossip(key).unwrap())
                    .unwrap()
                    .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
                    .build();
                start_bare(swarm, &topic, delivered_tx.clone()).await
            }
            Some(alliance) => {
                let swarm = net::build_swarm(
                    &Identity::generate(),
                    &alliance.charter.id,
                    &net::Options::default(),
                )
                .unwrap()
                .swarm;
                start_bare(swarm, &topic, delivered_tx.clone()).await
            }
        };
        let mut earlier: Vec<(usize, &Multiaddr)> = addrs.iter().enumerate().collect();
        let dials = degree.div_ceil(2).max(1).min(earlier.len());
        for k in 0..dials {
            // xorshift: a fixed sequence, the same each run.
            pick ^= pick << 13;
            pick ^= pick >> 7;
            pick ^= pick << 17;
            let i = k + (pick as usize) % (earlier.len() - k);
            earlier.swap(k, i);
            edges.push((earlier[k].0, addrs.len()));
            tx.send(Bare::Dial(earlier[k].1.clone())).unwrap();
        }
        addrs.push(addr);
        swarms.push(tx);
    }
    // Every swarm knows each connected peer's subscription, and the mesh
    // is past its first heartbeats.
    let start = Instant::now();
    for s in &swarms {
        loop {
            let (tx, rx) = oneshot::channel();
            s.send(Bare::Subscribed(tx)).unwrap();
            let (subscribed, connected) = rx.await.unwrap();
            if connected > 0 && subscribed == connected {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "bare swarms never connected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut delays = Vec::new();
    let (cpu_before, started) = (cpu_time(), Instant::now());
    for round in 0..rounds {
        let mut data = vec![0; size.max(8)];
        data[..8].copy_from_slice(&(round as u64).to_le_bytes());
        let (tx, rx) = oneshot::channel();
        swarms[1 + round % (n - 1)]
            .send(Bare::Publish(data, tx))
            .unwrap();
        let published = rx.await.unwrap();
        let mut seen = 0;
        let deadline = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(deadline);
        while seen < n - 1 {
            tokio::select! {
                Some((r, at)) = delivered.recv() => if r == round as u64 {
                    seen += 1;
                    delays.push(at.saturating_duration_since(published).as_secs_f64());
                },
                () = &mut deadline => break,
            }
        }
        delays.extend(std::iter::repeat_n(f64::INFINITY, n - 1 - seen));
        // The members' rounds are as far apart (their tables are read
        // every 200 ms).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (
        delays,
        per_publish(cpu_before, started, rounds).await,
        mean_hops(n, &edges),
    )
}

/// CPU time one of `rounds` publishes since `started` cost beyond what the
/// process uses at rest: the time since then is waited again, idle, and
/// taken off.
async fn per_publish(cpu_before: Option<Duration>, started: Instant, rounds: usize) -> Option<f64> {
    let (cpu_rounds, took) = (cpu_time(), started.elapsed());
    tokio::time::sleep(took).await;
    let (a, b, c) = (cpu_before?, cpu_rounds?, cpu_time()?);
    Some(((b - a).as_secs_f64() - (c - b).as_secs_f64()) / rounds as f64)
}

/// The size of the gossip message a member of `a` with one GPU publishes.
fn advert_size(a: &TestAlliance) -> usize {
    use alliance_protocol::Signed;
    use alliance_protocol::advert::GpuAdvert;
    use alliance_protocol::wire::{AdvertGossip, Message};
    let id = Identity::generate();
    let now = Timestamp::now();
    let advert = GpuAdvert {
        peer: id.public(),
        institution: a.institutions[1].1.public(),
        gpus: vec![alliance_tests::alliance::test_gpu()],
        sequence: 1,
        issued_at: now,
        expires_at: now.saturating_add_secs(120),
    };
    let advert = Signed::sign(&advert, &id).unwrap();
    let chain = a.chain(&id, 1, Roles::WORK, now, 30);
    AdvertGossip { chain, advert }.encode().unwrap().len()
}

/// CPU time this process has used so far, from the kernel's per-thread
/// scheduler statistics (`None` where there are none).
fn cpu_time() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(Duration::from_nanos(total))
}

/// Bytes sent and received by all `nodes` so far, and their connections.
async fn traffic(nodes: &[InProcess]) -> (u64, u64, usize) {
    let mut total = (0, 0, 0);
    for n in nodes {
        let s = n.client.status().await.unwrap();
        total.0 += s.bytes_out;
        total.1 += s.bytes_in;
        total.2 += s.connected_peers;
    }
    total
}

/// This process's resident memory, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Until every node's table holds `n` adverts; a full node is not read
/// again (reading every table takes CPU from the nodes being measured).
async fn converge_all(nodes: &[InProcess], limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut full = vec![false; nodes.len()];
    let mut report = Duration::from_secs(60);
    while full.iter().any(|f| !f) {
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut held = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if !full[i] {
                let len = n.client.gpus().await.unwrap().len();
                full[i] = len >= nodes.len();
                held.push(len);
            }
        }
        if start.elapsed() > report {
            report = start.elapsed() + Duration::from_secs(60);
            let edges = member_edges(nodes).await;
            println!(
                "  ({:.0} s: {} tables short of {}, holding {:?}; the connection graph has {} parts)",
                start.elapsed().as_secs_f64(),
                held.iter().filter(|&&l| l < nodes.len()).count(),
                nodes.len(),
                &held[..held.len().min(8)],
                parts(nodes.len(), &edges)
            );
        }
    }
    Some(start.elapsed())
}

/// Connected components of the graph `edges` over `n` nodes.
fn parts(n: usize, edges: &[(usize, usize)]) -> usize {
    let mut root: Vec<usize> = (0..n).collect();
    fn find(root: &mut [usize], mut i: usize) -> usize {
        while root[i] != i {
            root[i] = root[root[i]];
            i = root[i];
        }
        i
    }
    for &(a, b) in edges {
        let (ra, rb) = (find(&mut root, a), find(&mut root, b));
        root[ra] = rb;
    }
    (0..n).filter(|&i| find(&mut root, i) == i).count()
}

/// The cost curve: per size, convergence and the steady-state cost per node.
async fn cost_curve(sizes: &[usize], window: Duration) {
    println!(
        "cost per node at steady state over {} s (in-process nodes on loopback TCP; each joins through the first node and one joined before it)",
        window.as_secs()
    );
    println!(
        "{:>6} {:>9} {:>11} {:>15} {:>14} {:>14} {:>12} {:>10} {:>10} {:>6}",
        "nodes",
        "joined",
        "converged",
        "CPU s/node/min",
        "sent B/node/s",
        "recv B/node/s",
        "MiB/node",
        "CPU vs 1st",
        "peers/node",
        "cores"
    );
    let mut first: Option<f64> = None;
    for &n in sizes {
        let ttl = alliance_protocol::cert::CharterDefaults::default().advert_ttl_secs;
        let a = TestAlliance::new(
            "Cost",
            &[("North", Roles::ALL), ("South", Roles::WORK)],
            ttl,
        );
        let before = rss();
        let mut nodes = vec![a.spawn(0, vec![]).await];
        let started = Instant::now();
        for i in 1..n {
            // The first node and one joined earlier: no single node takes
            // every join (its connection limits would turn the rest away).
            let boot = vec![nodes[0].address.clone(), nodes[i / 2].address.clone()];
            nodes.push(a.spawn(i % 2, boot).await);
        }
        let joined = started.elapsed();
        if converge_all(&nodes, Duration::from_secs(900))
            .await
            .is_none()
        {
            println!("{n:>6} did not converge within 900 s");
            return;
        }
        let converged = started.elapsed();
        // Past the joining: AutoNAT probes, the first DHT walks, and the
        // connections nothing needs closed (20 s of grace, then a round
        // every 10 s).
        tokio::time::sleep(Duration::from_secs(90)).await;
        let memory = rss().saturating_sub(before) as f64 / n as f64 / f64::from(1u32 << 20);
        let (t0, c0, w0) = (traffic(&nodes).await, cpu_time(), Instant::now());
        tokio::time::sleep(window).await;
        let (t1, c1) = (traffic(&nodes).await, cpu_time());
        // The time that passed, not the window asked for: a loaded
        // machine answers the status calls late.
        let secs = w0.elapsed().as_secs_f64();
        // Cores busy over the window: near this machine's count, the
        // figure per node is a floor (the nodes wanted more than there was).
        let cores = match (c0, c1) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() / secs,
            _ => f64::NAN,
        };
        let cpu = cores * 60.0 / n as f64;
        let sent = (t1.0 - t0.0) as f64 / n as f64 / secs;
        let recv = (t1.1 - t0.1) as f64 / n as f64 / secs;
        let base = *first.get_or_insert(cpu);
        println!(
            "{n:>6} {:>8.1}s {:>10.1}s {cpu:>15.3} {sent:>14.0} {recv:>14.0} {memory:>12.2} {:>9.2}x {:>10.1} {cores:>6.2}",
            joined.as_secs_f64(),
            converged.as_secs_f64(),
            cpu / base,
            t1.2 as f64 / n as f64
        );
        drop(nodes);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!(
        "joined: from the first node's start until the last one is listening; converged: until every table holds every advert; cores: CPU busy over the window"
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var("ADVERT_BENCH").is_ok_and(|v| v == "cost") {
        let sizes: Vec<usize> = std::env::var("ADVERT_BENCH_NODES")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![50, 200, 500]);
        let window = Duration::from_secs(
            std::env::var("ADVERT_BENCH_COST_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(cost_curve(&sizes, window));
        return;
    }
    let sizes: Vec<usize> = std::env::var("ADVERT_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10, 50, 100]);
    let rounds: usize = std::env::var("ADVERT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .max(1);
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "advert propagation on loopback TCP, {threads} threads (p50/p99 over {rounds} publishes, every receiving node)"
        );
        println!(
            "{:>6} {:>12} {:>10} {:>10} {:>10} {:>9} {:>9} {:>10}",
            "nodes", "converged", "RR", "p50", "p99", "p50/RR", "p99/RR", "CPU/publ."
        );
        let window = Duration::from_secs(
            std::env::var("ADVERT_BENCH_COST_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60),
        );
        let mut costs = Vec::new();
        let mut baselines = Vec::new();
        for &n in &sizes {
            let ttl = alliance_protocol::cert::CharterDefaults::default().advert_ttl_secs;
            let a = TestAlliance::new(
                "Bench",
                &[("North", Roles::ALL), ("South", Roles::WORK)],
                ttl,
            );
            let first = a.spawn(0, vec![]).await;
            let boot = vec![first.address.clone()];
            let mut nodes = vec![first];
            for i in 1..n {
                nodes.push(a.spawn(i % 2, boot.clone()).await);
            }
            let converged = converge(&nodes).await;
            // Steady state: every node has had its reachability probed
            // (AutoNAT dial-backs are new connections with full handshakes,
            // a start-up cost), and the mesh is past its first heartbeats.
            settle(&nodes).await;
            // And past the first minute, by when a node has closed the
            // connections it does not need beyond its limit.
            tokio::time::sleep(Duration::from_secs(75)).await;
            let degree = traffic(&nodes).await.2.div_ceil(n);
            let hops = mean_hops(n, &member_edges(&nodes).await);
            let rr = round_trip(&a).await;
            let (cpu_before, started) = (cpu_time(), Instant::now());
            let mut all = Vec::new();
            for round in 0..rounds {
                let publisher = 1 + round % (n - 1);
                all.extend(propagation(&nodes, publisher).await);
            }
            // As long again at rest, to tell the CPU the publishes took from
            // what the nodes use anyway.
            let per_publish = per_publish(cpu_before, started, rounds).await;
            all.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
            println!(
                "{n:>6} {:>11.1}s {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>9.1} {:>9.1} {:>10}",
                converged.as_secs_f64(),
                rr * 1e3,
                p50 * 1e3,
                p99 * 1e3,
                p50 / rr,
                p99 / rr,
                per_publish.map_or("-".into(), |c| format!("{:.1}ms", c * 1e3)),
            );
            let before = traffic(&nodes).await;
            tokio::time::sleep(window).await;
            let after = traffic(&nodes).await;
            let per_node = |b: u64, a: u64| (a - b) as f64 / n as f64 / window.as_secs_f64();
            costs.push((
                n,
                per_node(before.0, after.0),
                per_node(before.1, after.1),
            ));
            // The baseline runs alone: the members stop first.
            drop(nodes);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (mut bare, bare_cpu, bare_hops) =
                bare_gossip(n, rounds, advert_size(&a), degree, None).await;
            bare.sort_by(f64::total_cmp);
            if std::env::var_os("ADVERT_BENCH_FULL").is_some() {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (mut stack, cpu, _) =
                    bare_gossip(n, rounds, advert_size(&a), degree, Some(&a)).await;
                stack.sort_by(f64::total_cmp);
                println!(
                    "{n:>6}: swarms of the node's whole behaviour, no actor: p50 {:.2}ms, p99 {:.2}ms, CPU/publ. {}",
                    percentile(&stack, 0.5) * 1e3,
                    percentile(&stack, 0.99) * 1e3,
                    cpu.map_or("-".into(), |c| format!("{:.1}ms", c * 1e3)),
                );
            }
            baselines.push((
                n,
                (degree, hops, bare_hops),
                rr,
                (p50, p99, per_publish),
                (percentile(&bare, 0.5), percentile(&bare, 0.99), bare_cpu),
            ));
        }
        println!("targets at 50 nodes: p50/RR <= 3, p99/RR <= 10");
        println!(
            "CPU/publ.: CPU time all nodes spent per publish beyond what they use at rest (rough: \
             periodic republishing and probes fall in either window)"
        );
        println!();
        println!(
            "baseline: bare gossipsub swarms (the node's gossip settings and transport, as many peers each as the members held)"
        );
        println!(
            "{:>6} {:>7} {:>12} {:>10} {:>10} {:>9} {:>9} {:>10} {:>12} {:>12} {:>12}",
            "nodes", "peers", "hops (node)", "p50", "p99", "p50/RR", "p99/RR", "CPU/publ.", "p50 vs bare", "p99 vs bare", "CPU vs bare"
        );
        let ms = |c: Option<f64>| c.map_or("-".into(), |c| format!("{:.1}ms", c * 1e3));
        for (n, (degree, hops, bare_hops), rr, (p50, p99, cpu), (b50, b99, bare_cpu)) in &baselines {
            let cpu_ratio = match (cpu, bare_cpu) {
                (Some(c), Some(b)) if *b > 0.0 => format!("{:.2}x", c / b),
                _ => "-".into(),
            };
            println!(
                "{n:>6} {degree:>7} {:>12} {:>8.2}ms {:>8.2}ms {:>9.1} {:>9.1} {:>10} {:>11.2}x {:>11.2}x {cpu_ratio:>12}",
                format!("{bare_hops:.2} ({hops:.2})"),
                b50 * 1e3,
                b99 * 1e3,
                b50 / rr,
                b99 / rr,
                ms(*bare_cpu),
                p50 / b50,
                p99 / b99,
            );
        }
        println!();
        println!(
            "gossip cost at steady state ({} s, adverts republished every 30 s)",
            window.as_secs()
        );
        println!(
            "{:>6} {:>14} {:>14} {:>12}",
            "nodes", "sent B/node/s", "recv B/node/s", "vs smallest"
        );
        for (n, out, inb) in &costs {
            println!(
                "{n:>6} {out:>14.0} {inb:>14.0} {:>11.2}x",
                out / costs[0].1
            );
        }
    });
}
