//! Jobs across the network against the same work done locally, each pair
//! measured side by side in one run:
//!
//! 1. Remote efficiency: a job of 20 tasks of about 100 ms of kernel time
//!    each, through a submitter and one remote worker (processes of the
//!    real binary), against the same tasks run one after another through a
//!    local sandbox. Target ≥ 0.9.
//! 2. Small-task rate: tiny tasks per second through one submitter and
//!    three workers, against a local sandbox's rate for the same tasks.
//!    Target ≥ 0.5. Jobs of 300 and of 3000 tasks, on the same nodes
//!    (`SMALL_TASKS=N,M,…` sets the sizes; `SMALL_QUEUE=N` the workers'
//!    `tasks_per_gpu`.)
//! 3. Blob transfer: a 1 GiB input fetched between two nodes (blob
//!    protocol, hashed and written to the blob store), against one bare
//!    libp2p stream between the same two nodes' stacks. Target ≥ 0.9 of
//!    bare libp2p. For reference also a bare stream between two minimal
//!    swarms (the same transport, no other behaviour) and raw TCP on
//!    loopback.
//!
//! Run: `cargo bench -p alliance-tests --bench jobs`
//! (`JOBS_BENCH=remote,small,blob` picks the parts; `BLOB_DST=/dev/shm/x`
//! fetches the blob into memory instead of the disk.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use alliance_kernels::gpu::Selection;
use alliance_kernels::intake::Limits;
use alliance_kernels::sandbox::{ChildConfig, Config, ResourceLimits, Sandbox};
use alliance_node::net::blobs;
use alliance_node::store::blobs::Blobs;
use alliance_node::submit::Job;
use alliance_protocol::Hash;
use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;
use alliance_tests::jobs::{submitter_and_workers, time_job, write};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};

fn local_sandbox(scratch: &Path) -> Sandbox {
    Sandbox::start(Config {
        program: alliance_tests::alliance_bin(),
        args: vec!["sandbox".into()],
        env: vec![],
        child: ChildConfig {
            adapter: Selection::All,
            limits: Limits::default(),
            rlimits: ResourceLimits::default(),
            scratch: scratch.to_owned(),
        },
        start_timeout: Duration::from_secs(120),
        compile_timeout: Duration::from_secs(300),
    })
    .unwrap()
}

fn pi_job(tasks: u32, wg: u32, samples: u32, steps: u32) -> String {
    alliance_tests::jobs::pi_job(9, tasks, wg, samples, steps)
}

/// Seconds to run every task of the job file at `path` through `sb`, one
/// after another.
fn run_locally(sb: &mut Sandbox, path: &Path) -> f64 {
    let job = Job::load(path, &Limits::default()).unwrap();
    let start = Instant::now();
    for i in 0..job.tasks {
        sb.run(&job.task(i).unwrap(), Duration::from_secs(600), &mut |_| {
            Ok(())
        })
        .unwrap();
    }
    start.elapsed().as_secs_f64()
}

fn remote_efficiency() {
    println!("remote efficiency: 20 tasks of about 100 ms, one remote worker vs a local sandbox");
    let net = submitter_and_workers(1, |_, _| {});
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut sb = local_sandbox(&scratch);
    // Calibrate the steps for about 100 ms per task on this machine.
    let probe = write(&dir, "probe.toml", pi_job(3, 64, 256, 20));
    run_locally(&mut sb, &probe);
    let per_step = run_locally(&mut sb, &probe) / 60.0;
    let steps = ((0.1 / per_step).round() as u32).max(1);
    let job = write(&dir, "job.toml", pi_job(20, 64, 256, steps));
    let warm = write(&dir, "warm.toml", pi_job(1, 64, 256, 1));
    time_job(&net.sub_dir, &net.sub, &warm);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        local.push(run_locally(&mut sb, &job));
        remote.push(time_job(&net.sub_dir, &net.sub, &job));
    }
    local.sort_by(f64::total_cmp);
    remote.sort_by(f64::total_cmp);
    let (l, r) = (local[1], remote[1]);
    println!(
        "  {steps} steps per task; median of 3: local {l:.2} s ({:.0} ms per task), remote {r:.2} s; efficiency {:.3} (target >= 0.9)",
        l / 20.0 * 1e3,
        l / r
    );
}

fn small_task_rate() {
    println!(
        "small-task rate: tiny tasks through one submitter and three workers vs a local sandbox"
    );
    let net = submitter_and_workers(3, |_, d| {
        if let Ok(q) = std::env::var("SMALL_QUEUE") {
            d.edit_config("tasks_per_gpu = 32", &format!("tasks_per_gpu = {q}"));
        }
    });
    let dir = net.a.dir.path().join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut sb = local_sandbox(&scratch);
    // A short job shows what a researcher waits for, start-up and tail
    // included; a long one the rate the alliance sustains once tasks flow.
    let sizes: Vec<u32> = std::env::var("SMALL_TASKS")
        .unwrap_or_else(|_| "300,3000".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("SMALL_TASKS: {v:?} is not a task count"))
        })
        .collect();
    let warm = write(&dir, "warm.toml", pi_job(6, 1, 1, 1));
    run_locally(&mut sb, &warm);
    time_job(&net.sub_dir, &net.sub, &warm);
    for n in sizes {
        let job = write(&dir, &format!("tiny-{n}.toml"), pi_job(n, 1, 1, 1));
        // A 300-task job lasts a fraction of a second, so one hiccup of
        // this shared machine moves a run: seven interleaved pairs,
        // medians of each.
        let runs = 7;
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            local.push(f64::from(n) / run_locally(&mut sb, &job));
            remote.push(f64::from(n) / time_job(&net.sub_dir, &net.sub, &job));
        }
        local.sort_by(f64::total_cmp);
        remote.sort_by(f64::total_cmp);
        let (l, r) = (local[runs / 2], remote[runs / 2]);
        println!(
            "  median of {runs} jobs of {n} tasks: local {l:.0} tasks/s ({:.0}-{:.0}), remote {r:.0} tasks/s ({:.0}-{:.0}); ratio {:.3} (target >= 0.5)",
            local[0],
            local[runs - 1],
            remote[0],
            remote[runs - 1],
            r / l
        );
    }
}

const GIB: usize = 1 << 30;

async fn blob_transfer() {
    println!(
        "blob transfer: 1 GiB between two nodes vs a bare libp2p stream vs raw TCP (loopback)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..GIB as u64)
        .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
        .collect();

    // Raw TCP.
    let tcp = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0usize;
            loop {
                let k = s.read(&mut buf).unwrap();
                if k == 0 {
                    break n;
                }
                n += k;
            }
        });
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        for chunk in data.chunks(1 << 20) {
            s.write_all(chunk).unwrap();
        }
        drop(s);
        assert_eq!(reader.join().unwrap(), GIB);
        GIB as f64 / start.elapsed().as_secs_f64()
    };

    // A bare libp2p stream between two minimal swarms with the same
    // transport stack (TCP, noise, yamux), for reference.
    let minimal = {
        let protocol = libp2p::StreamProtocol::new("/bench/bytes/1");
        let swarm = || {
            libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    libp2p::tcp::Config::default().nodelay(true),
                    libp2p::noise::Config::new,
                    libp2p::yamux::Config::default,
                )
                .unwrap()
                .with_behaviour(|_| libp2p_stream::Behaviour::new())
                .unwrap()
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build()
        };
        let (mut a, mut b) = (swarm(), swarm());
        b.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let libp2p::swarm::SwarmEvent::NewListenAddr { address, .. } =
                b.select_next_some().await
            {
                break address;
            }
        };
        let b_peer = *b.local_peer_id();
        let incoming = b
            .behaviour()
            .new_control()
            .accept(protocol.clone())
            .unwrap();
        let control = a.behaviour().new_control();
        a.dial(addr.with(libp2p::multiaddr::Protocol::P2p(b_peer)))
            .unwrap();
        tokio::spawn(async move {
            loop {
                a.select_next_some().await;
            }
        });
        tokio::spawn(async move {
            loop {
                b.select_next_some().await;
            }
        });
        let open = |peer| {
            let (mut control, protocol) = (control.clone(), protocol.clone());
            async move { control.open_stream(peer, protocol).await }
        };
        bare_stream(&data, incoming, || open(b_peer)).await
    };

    // Two alliance nodes: a bare stream between their own stacks (every
    // behaviour of the node on the connection), and the blob protocol:
    // a range request, hashed and written to the fetching node's blob
    // store. Each twice, interleaved; the better of each counts.
    let a = TestAlliance::new("Blob Bench", &[("North", Roles::ALL)], 60);
    let src_blobs = Blobs::open(&tmp.path().join("src")).unwrap();
    let hash: Hash = src_blobs.put(&data).unwrap();
    let src = a.spawn(0, vec![]).await;
    tokio::spawn(blobs::serve(
        src.client.clone(),
        src_blobs.clone(),
        alliance_node::metrics::Metrics::default(),
    ));
    let dst = a.spawn(0, vec![src.address.clone()]).await;
    loop {
        if dst.client.member(src.peer).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bench_protocol = libp2p::StreamProtocol::new("/alliance-bench/bytes/1");
    let dst_dir = std::env::var_os("BLOB_DST").map_or_else(|| tmp.path().join("dst"), Into::into);
    let (mut bare, mut blob) = (0f64, 0f64);
    for _ in 0..2 {
        let incoming = dst.client.accept_streams(bench_protocol.clone()).unwrap();
        let open = || src.client.open_stream(dst.peer, bench_protocol.clone());
        bare = bare.max(bare_stream(&data, incoming, open).await);

        let dst_blobs = Blobs::open(&dst_dir).unwrap();
        let start = Instant::now();
        let moved = blobs::fetch(&dst.client, &dst_blobs, src.peer, hash, GIB as u64)
            .await
            .unwrap();
        blob = blob.max(GIB as f64 / start.elapsed().as_secs_f64());
        assert_eq!(moved, GIB as u64);
        assert!(dst_blobs.has(&hash, GIB as u64));
        std::fs::remove_dir_all(&dst_dir).unwrap();
    }
    let mb = |r: f64| r / 1e6;
    println!("  raw TCP                      {:>6.0} MB/s", mb(tcp));
    println!(
        "  bare libp2p, minimal swarms  {:>6.0} MB/s  ({:.3} of raw TCP)",
        mb(minimal),
        minimal / tcp
    );
    println!(
        "  bare libp2p, the nodes' own  {:>6.0} MB/s  ({:.3} of raw TCP)",
        mb(bare),
        bare / tcp
    );
    println!(
        "  blob protocol                {:>6.0} MB/s  ({:.3} of bare libp2p, target >= 0.9; {:.3} of the minimal swarms; {:.3} of raw TCP)",
        mb(blob),
        blob / bare,
        blob / minimal,
        blob / tcp
    );
}

/// Throughput of `data` written down one stream that `open` opens and read
/// (and dropped) on the other side from `incoming`.
async fn bare_stream<F, Fut, E>(
    data: &[u8],
    mut incoming: libp2p_stream::IncomingStreams,
    open: F,
) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<libp2p::Stream, E>>,
{
    let reader = tokio::spawn(async move {
        let (_, mut stream) = incoming.next().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0usize;
        loop {
            let k = stream.read(&mut buf).await.unwrap();
            if k == 0 {
                break n;
            }
            n += k;
        }
    });
    let mut stream = loop {
        match open().await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let start = Instant::now();
    for chunk in data.chunks(1 << 20) {
        stream.write_all(chunk).await.unwrap();
    }
    stream.close().await.unwrap();
    assert_eq!(reader.await.unwrap(), data.len());
    data.len() as f64 / start.elapsed().as_secs_f64()
}

/// Builds the release `alliance` binary the node processes run; where
/// there is no cargo (a machine the benchmark was copied to), the binary
/// beside this one is used as it is.
fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let parts = std::env::var("JOBS_BENCH").unwrap_or_else(|_| "remote,small,blob".into());
    // The node processes must be this build's.
    if parts.contains("remote") || parts.contains("small") {
        alliance_tests::build_release_alliance();
    }
    if parts.contains("remote") {
        remote_efficiency();
    }
    if parts.contains("small") {
        small_task_rate();
    }
    if parts.contains("blob") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(blob_transfer());
    }
}
