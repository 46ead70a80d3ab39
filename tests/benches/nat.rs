//! Hole punching behind real NATs: the namespaces of the NAT test (two
//! labs behind masquerading NATs, the bootstrap node and relay between
//! them), lab A's node kept up, lab B's started afresh `NAT_BENCH_TRIES`
//! times (20 by default). Each try counts as punched when lab A holds a
//! direct connection to lab B within 60 s of lab B starting, and reports
//! how long that took; and whether the direct connection came from DCUtR
//! (the relayed connection upgraded) or from a plain dial.
//!
//! Then throughput: a job whose 64 MiB input lab B fetches from lab A,
//! once behind those NATs (after hole punching, directly) and once behind
//! NATs that give every connection a new port (symmetric: no punch gets
//! through, so the blob crosses the bootstrap node's relay); the rate is
//! the worker's own `input fetched` figure, the two side by side in one
//! run.
//!
//! Run as root: `cargo bench -p alliance-tests --bench nat`
//! (`NAT_BENCH=punch` or `NAT_BENCH=throughput` runs one half,
//! `NAT_BENCH_MIB` sets the blob's size.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{Running, wait_for};
use alliance_tests::netns::{Labs, Nat, direct};

const TRY: Duration = Duration::from_secs(60);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let which = std::env::var("NAT_BENCH").unwrap_or_default();
    if which.is_empty() || which == "punch" {
        punching();
    }
    if which.is_empty() || which == "throughput" {
        throughput();
    }
}

fn punching() {
    let tries: usize = std::env::var("NAT_BENCH_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let labs = match Labs::start("Bench Behind NATs", Nat::Cone) {
        Ok(l) => l,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let (lab_a, lab_b) = (labs.node(0, Roles::WORK), labs.node(1, Roles::WORK));
    let a_run = labs.run(0, &lab_a);
    let (b_peer, a_peer) = (lab_b.peer(), lab_a.peer());
    println!("hole punching between two labs behind masquerading NATs, {tries} tries");
    println!(
        "{:>4} {:>10} {:>10} {:>8}",
        "try", "punched", "after", "how"
    );
    let mut times = Vec::new();
    for i in 0..tries {
        let upgrades = |r: &Running| r.log().matches("upgraded to a direct one").count();
        let a_before = upgrades(&a_run);
        let started = Instant::now();
        let b_run = labs.run(1, &lab_b);
        let mut punched = false;
        while started.elapsed() < TRY {
            if direct(&a_run, &b_peer) || direct(&b_run, &a_peer) {
                punched = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = started.elapsed().as_secs_f64();
        let how = if upgrades(&b_run) > 0 || upgrades(&a_run) > a_before {
            "DCUtR"
        } else if punched {
            "dial"
        } else {
            "-"
        };
        println!(
            "{:>4} {:>10} {:>9.1}s {:>8}",
            i + 1,
            if punched { "yes" } else { "no" },
            took,
            how
        );
        if punched {
            times.push(took);
        }
        b_run.kill();
        wait_for(TRY, "lab A to see lab B gone", || {
            !a_run.members().contains(&b_peer)
        });
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "punched {} of {tries} ({:.0} %); time to a direct connection from lab B's start: median {median:.1} s",
        times.len(),
        100.0 * times.len() as f64 / tries as f64
    );
}

/// Fetches of a blob of `NAT_BENCH_MIB` (64 by default) between the labs,
/// direct and relayed.
fn throughput() {
    let mib: usize = std::env::var("NAT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    println!("a {mib} MiB input fetched by lab B from lab A");
    println!("{:>10} {:>9} {:>9} {:>10}", "NATs", "path", "secs", "MiB/s");
    let mut rates = Vec::new();
    for nat in [Nat::Cone, Nat::Symmetric] {
        let labs = match Labs::start("Bench Blob Across NATs", nat) {
            Ok(l) => l,
            Err(why) => {
                println!("skipped: {why}");
                return;
            }
        };
        let (sub_dir, worker_dir) = (labs.node(0, Roles::SUBMIT), labs.node(1, Roles::WORK));
        let sub = labs.run(0, &sub_dir);
        let worker = labs.run(1, &worker_dir);
        let worker_peer = worker_dir.peer();
        wait_for(TRY, "lab A to see lab B's GPU", || {
            sub.advertisers().contains(&worker_peer) && sub.members().contains(&worker_peer)
        });
        let path = if nat == Nat::Cone {
            wait_for(TRY, "a direct connection", || direct(&sub, &worker_peer));
            // The relayed connection goes once the direct one is up.
            std::thread::sleep(Duration::from_secs(5));
            "direct"
        } else {
            "relayed"
        };
        let files = labs.alliance.dir.path().join("blob-job");
        std::fs::create_dir_all(&files).unwrap();
        let (job, _) = alliance_tests::jobs::sample_job(&files, mib << 18);
        let o = labs.cli(0, &sub_dir, &["submit", job.to_str().unwrap(), "--wait"]);
        assert!(o.status.success(), "{}", alliance_tests::jobs::text(&o));
        let log = worker.log();
        let line = log
            .lines()
            .find(|l| l.contains("input fetched"))
            .expect("lab B logged no fetch");
        let field = |name: &str| -> f64 {
            let at = line.find(&format!("{name}=")).expect(name) + name.len() + 1;
            line[at..]
                .trim_start_matches('"')
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()
                .and_then(|v| v.parse().ok())
                .expect(name)
        };
        let (secs, rate) = (field("secs"), field("mib_s"));
        let still_direct = direct(&sub, &worker_peer);
        assert_eq!(
            still_direct,
            nat == Nat::Cone,
            "the path changed during the fetch"
        );
        println!(
            "{:>10} {path:>9} {secs:>9.2} {rate:>10.1}",
            format!("{nat:?}").to_lowercase()
        );
        rates.push(rate);
    }
    println!("relayed / direct throughput: {:.2}", rates[1] / rates[0]);
}
