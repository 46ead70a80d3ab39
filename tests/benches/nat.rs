//! Hole punching behind real NATs: the namespaces of the NAT test (two
//! labs behind masquerading NATs, the bootstrap node and relay between
//! them), lab A's node kept up, lab B's started afresh `NAT_BENCH_TRIES`
//! times (20 by default). Each try counts as punched when lab A holds a
//! direct connection to lab B within 60 s of lab B starting, and reports
//! how long that took; and whether the direct connection came from DCUtR
//! (the relayed connection upgraded) or from a plain dial.
//!
//! Run as root: `cargo bench -p alliance-tests --bench nat`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::{Running, wait_for};
use alliance_tests::netns::{Labs, direct};

const TRY: Duration = Duration::from_secs(60);

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tries: usize = std::env::var("NAT_BENCH_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let labs = match Labs::start("Bench Behind NATs") {
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
