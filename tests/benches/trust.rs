//! The trust simulation: many model workers, a share of them saboteurs
//! that lie on half their tasks (all with the same wrong answer), for
//! saboteur shares 0–30 %. For plain two-way voting and for the adaptive
//! policy of `redundancy = "auto"`, the share of accepted answers that are
//! wrong and the GPU time spent against running each task once, both over
//! the tasks after a warm-up. Target for the adaptive policy at 10 %
//! saboteurs: under 1 wrong answer in 10 000 at ≤ 1.3× the GPU time.
//!
//! Then the cost of verifying one result, as the submitter does it (the
//! receipt's signature, the worker's certificate chain, the hash of 64 KiB
//! of outputs, and a tolerance comparison of two replicas' outputs), as a
//! share of a task that takes 10 ms end to end.
//!
//! Run: `cargo bench -p alliance-tests --bench trust`
//! (`TRUST_SIM_DOCS=docs` also writes `docs/trust-simulation.md` and
//! `docs/trust-simulation.svg`).

#![allow(
    clippy::unwrap_used,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation
)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use alliance_node::trust::sim::{self, Outcome, Params, Policy};

const FRACTIONS: [f64; 7] = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3];

fn params(saboteurs: f64) -> Params {
    Params {
        workers: 200,
        saboteurs,
        lie_rate: 0.5,
        tasks: 1_000_000,
        warmup: 200_000,
        seed: 2026,
    }
}

fn main() {
    let p = params(0.0);
    let mut table = format!(
        "{} workers, {} tasks ({} of warm-up, not counted), saboteurs lie on {:.0} % of their tasks, all with the same wrong answer.\n\n\
         | saboteurs | voting: wrong accepted | voting: GPU time | adaptive: wrong accepted | adaptive: GPU time |\n\
         |---:|---:|---:|---:|---:|\n",
        p.workers,
        p.tasks,
        p.warmup,
        p.lie_rate * 100.0
    );
    println!("trust simulation: wrong answers accepted and GPU time (x one run per task)");
    println!(
        "  {:>9}  {:>14} {:>8}  {:>14} {:>8}",
        "saboteurs", "voting wrong", "time", "adaptive wrong", "time"
    );
    let mut rows: Vec<(f64, Outcome, Outcome)> = Vec::new();
    for f in FRACTIONS {
        let v = sim::run(Policy::Voting, params(f));
        let a = sim::run(Policy::Adaptive, params(f));
        println!(
            "  {:>8.0}%  {:>14.2e} {:>7.3}x  {:>14.2e} {:>7.3}x",
            f * 100.0,
            v.error_rate(),
            v.overhead(),
            a.error_rate(),
            a.overhead()
        );
        let _ = writeln!(
            table,
            "| {:.0} % | {:.2e} ({} of {}) | {:.3}× | {:.2e} ({} of {}) | {:.3}× |",
            f * 100.0,
            v.error_rate(),
            v.wrong,
            v.tasks,
            v.overhead(),
            a.error_rate(),
            a.wrong,
            a.tasks,
            a.overhead()
        );
        rows.push((f, v, a));
    }
    let at10 = rows.iter().find(|r| (r.0 - 0.1).abs() < 1e-9).unwrap().2;
    println!(
        "  adaptive at 10 %: {:.2e} wrong (target < 1e-4), {:.3}x GPU time (target <= 1.3)",
        at10.error_rate(),
        at10.overhead()
    );
    verification_cost();
    if let Some(dir) = std::env::var_os("TRUST_SIM_DOCS") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::write(dir.join("trust-simulation.md"), &table).unwrap();
        std::fs::write(dir.join("trust-simulation.svg"), svg(&rows)).unwrap();
        println!("  wrote {}", dir.display());
    }
}

/// Median of `rounds` timings of `f` run `n` times, per run.
fn per_run(rounds: usize, n: u32, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed() / n
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn verification_cost() {
    use alliance_kernels::compare::{Tolerance, f32_within};
    use alliance_protocol::cert::{RevocationSet, Roles};
    use alliance_protocol::task::{JobId, Outcome as Reported, Outcomes, OutputDigest, Receipt};
    use alliance_protocol::{Hash, Identity, Signed, Timestamp};
    use alliance_tests::alliance::TestAlliance;

    let a = TestAlliance::new("Cost", &[("North", Roles::ALL)], 30);
    let worker = Identity::generate();
    let chain = a.chain(&worker, 0, Roles::WORK, Timestamp::now(), 30);
    let revocations = RevocationSet::new(&a.charter);
    let outputs: Vec<u8> = (0..16_384u32)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let other: Vec<u8> = (0..16_384u32)
        .flat_map(|i| (i as f32 * 0.5 + 1e-7).to_le_bytes())
        .collect();
    let receipt = Receipt {
        job: JobId([7; 16]),
        task: 3,
        attempt: 0,
        kernel: Hash::of(b"kernel"),
        inputs: vec![Hash::of(b"input")],
        outputs: vec![OutputDigest {
            binding: 2,
            hash: Hash::of(&outputs),
            len: outputs.len() as u64,
        }],
        gpu_time_us: 9_000,
        compile_time_us: 0,
        adapter: "bench".into(),
        worker: worker.public(),
        submitter: a.root.public(),
        finished_at: Timestamp::now(),
    };
    // A batch of one: the most a result's signature costs (a batch of
    // many pays one check for all).
    let signed = Signed::sign(&Outcomes(vec![Reported::Done(receipt)]), &worker).unwrap();
    let wire = signed.to_bytes();
    let now = Timestamp::now();
    let tol = Tolerance {
        abs: 1e-6,
        rel: 1e-5,
        ulps: 4,
    };
    let sig = per_run(9, 200, || {
        let s = Signed::<Outcomes>::from_bytes(std::hint::black_box(&wire)).unwrap();
        std::hint::black_box(s.verify().unwrap());
    });
    let chain_cost = per_run(9, 100, || {
        std::hint::black_box(
            chain
                .verify(&a.charter, &revocations, now, Roles::WORK)
                .unwrap(),
        );
    });
    let hash = per_run(9, 200, || {
        std::hint::black_box(Hash::of(std::hint::black_box(&outputs)));
    });
    let compare = per_run(9, 200, || {
        f32_within(std::hint::black_box(&outputs), &other, &tol).unwrap();
    });
    let total = sig + chain_cost + hash + compare;
    let task = Duration::from_millis(10);
    println!("verification cost per result (64 KiB of f32 outputs)");
    for (what, d) in [
        ("receipt signature", sig),
        ("certificate chain (uncached)", chain_cost),
        ("blake3 of the outputs", hash),
        ("tolerance comparison", compare),
        ("total", total),
    ] {
        println!(
            "  {what:<30} {:>8.1} us  {:.4} of a 10 ms task",
            d.as_secs_f64() * 1e6,
            d.as_secs_f64() / task.as_secs_f64()
        );
    }
}

/// Two panels: wrong answers accepted (log scale) and GPU time, against
/// the saboteurs' share, for both policies.
fn svg(rows: &[(f64, Outcome, Outcome)]) -> String {
    let (w, h, pad) = (360.0, 260.0, 50.0);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
"#,
        2.0 * w + 40.0,
        h + 60.0
    );
    let x = |f: f64, x0: f64| x0 + pad + f / 0.3 * (w - pad - 10.0);
    // Error panel: 1e-6 .. 1e-1, log scale; a rate of 0 sits on the floor.
    let ey = |r: f64| {
        let l = r.max(1e-6).log10();
        10.0 + (-1.0 - l) / 5.0 * (h - 40.0)
    };
    // GPU time panel: 1x .. 3x.
    let ty = |t: f64| 10.0 + (3.0 - t.clamp(1.0, 3.0)) / 2.0 * (h - 40.0);
    for (x0, title) in [
        (0.0, "wrong answers accepted"),
        (w + 40.0, "GPU time (x one run)"),
    ] {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-weight="bold">{title}</text>
<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{}" y1="10" x2="{}" y2="{}" stroke="black"/>
"#,
            x0 + w / 2.0 + 20.0,
            h + 45.0,
            x0 + pad,
            h - 30.0,
            x0 + w - 10.0,
            h - 30.0,
            x0 + pad,
            x0 + pad,
            h - 30.0
        );
        for f in FRACTIONS {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{:.0}%</text>"#,
                x(f, x0),
                h - 15.0,
                f * 100.0
            );
        }
    }
    for e in -6..=-1 {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">1e{e}</text><line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            pad - 4.0,
            ey(10f64.powi(e)) + 4.0,
            pad,
            w - 10.0,
            y = ey(10f64.powi(e))
        );
    }
    for t in [1.0, 1.3, 1.5, 2.0, 2.5, 3.0] {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{t}</text><line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            w + 40.0 + pad - 4.0,
            ty(t) + 4.0,
            w + 40.0 + pad,
            2.0 * w + 30.0,
            y = ty(t)
        );
    }
    for (i, (name, colour)) in [("2-way voting", "#c0392b"), ("adaptive", "#2471a3")]
        .iter()
        .enumerate()
    {
        let pick = |r: &(f64, Outcome, Outcome)| if i == 0 { r.1 } else { r.2 };
        let err: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.0, 0.0), ey(pick(r).error_rate())))
            .collect();
        let time: Vec<String> = rows
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.0, w + 40.0), ty(pick(r).overhead())))
            .collect();
        let _ = write!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>
<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>
<text x="{}" y="{}" fill="{colour}">{name}</text>
"#,
            err.join(" "),
            time.join(" "),
            pad + 10.0,
            25.0 + 14.0 * i as f64
        );
    }
    s.push_str("</svg>\n");
    s
}
