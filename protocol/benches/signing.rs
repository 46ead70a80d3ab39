//! Signed-record throughput against raw ed25519-dalek on the same bytes.
//!
//! For three record sizes, each round times a batch of raw operations and
//! a batch of signed-record operations back to back, so both see the same
//! machine state; the figure reported is the median over rounds of the
//! per-round ratio (signed throughput / raw throughput).
//!
//! - sign: `Signed::sign(&record, &key)` (canonical encoding, domain
//!   separation, signature) vs `SigningKey::sign(payload)`.
//! - verify: `Signed::from_bytes(wire)?.verify()` (envelope decode, strict
//!   key checks, `verify_strict`, canonical record decode) vs
//!   `VerifyingKey::from_bytes(key)?.verify_strict(payload, sig)`, the least
//!   a receiver of raw key and signature bytes must do.
//!
//! Run: `cargo bench -p alliance-protocol --bench signing`

use std::hint::black_box;
use std::time::{Duration, Instant};

use alliance_protocol::advert::{
    Backend, DeviceType, GpuAdvert, GpuBench, GpuInfo, GpuLimits, GpuState, Terms,
};
use alliance_protocol::task::{
    Binding, BindingKind, Comparison, Credit, Data, ElemType, JobId, TaskOffer, TaskOffers,
    TaskSpec,
};
use alliance_protocol::{Hash, Identity, Record, Signed, Timestamp};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

const ROUNDS: usize = 21;
const BATCH_TIME: Duration = Duration::from_millis(40);

fn credit(k: &Identity) -> Credit {
    Credit {
        job: JobId([7; 16]),
        tasks: vec![alliance_protocol::task::CreditedTask {
            task: 12,
            receipt: Hash::of(b"receipt"),
        }],
        worker: k.public(),
        worker_institution: Identity::from_secret_bytes([2; 32]).public(),
        submitter_institution: Identity::from_secret_bytes([3; 32]).public(),
        gpu_time_us: 1_234_567,
        issued_at: Timestamp::from_secs(1_800_000_000),
    }
}

fn advert(k: &Identity) -> GpuAdvert {
    let gpu = |i| GpuInfo {
        index: i,
        name: "NVIDIA H200".into(),
        vendor: 0x10de,
        device: 0x2335,
        backend: Backend::Vulkan,
        device_type: DeviceType::DiscreteGpu,
        driver: "NVIDIA 570.86".into(),
        limits: GpuLimits {
            max_buffer_size: 1 << 40,
            max_storage_buffer_binding_size: 1 << 31,
            max_storage_buffers_per_shader_stage: 16,
            max_uniform_buffer_binding_size: 65536,
            max_compute_invocations_per_workgroup: 1024,
            max_compute_workgroup_size: [1024, 1024, 64],
            max_compute_workgroups_per_dimension: 65535,
            max_compute_workgroup_storage_size: 49152,
        },
        bench: Some(GpuBench {
            copy_mb_per_s: 4_000_000,
            fma_mflops: 60_000_000,
        }),
        state: GpuState::Idle,
        reason: String::new(),
        free_slots: 4,
        terms: Terms {
            max_task_bytes: 8 << 30,
            max_task_secs: 3600,
            allow: Vec::new(),
            deny: vec!["University of Elsewhere".into()],
        },
    };
    GpuAdvert {
        peer: k.public(),
        institution: Identity::from_secret_bytes([2; 32]).public(),
        gpus: (0..4).map(gpu).collect(),
        sequence: 42,
        issued_at: Timestamp::from_secs(1_800_000_000),
        expires_at: Timestamp::from_secs(1_800_000_120),
    }
}

fn offer(k: &Identity) -> TaskOffer {
    TaskOffer {
        spec: TaskSpec {
            job: JobId([7; 16]),
            task: 3,
            task_count: 100,
            kernel: Hash::of(b"kernel"),
            entry_point: "main".into(),
            bindings: vec![
                Binding {
                    binding: 0,
                    kind: BindingKind::Input {
                        data: Data::Inline((0..64 * 1024).map(|i| (i % 251) as u8).collect()),
                    },
                },
                Binding {
                    binding: 1,
                    kind: BindingKind::Output {
                        len: 16384,
                        elem: ElemType::F32,
                    },
                },
            ],
            dispatch: [64, 1, 1],
            steps: 1,
            start_step: 0,
            checkpoint_every: None,
            timeout_ms: 60_000,
            comparison: Comparison::Exact,
            info_binding: None,
        },
        worker: k.public(),
        attempt: 0,
        expires_at: Timestamp::from_secs(1_800_000_060),
    }
}

/// Runs `f` `n` times and returns operations per second.
fn rate(n: u32, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    f64::from(n) / start.elapsed().as_secs_f64()
}

/// How many calls of `f` fill one batch.
fn calibrate(mut f: impl FnMut()) -> u32 {
    let mut n = 1u32;
    loop {
        let start = Instant::now();
        for _ in 0..n {
            f();
        }
        if start.elapsed() >= BATCH_TIME / 4 || n >= 1 << 20 {
            return n.saturating_mul(4);
        }
        n = n.saturating_mul(2);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    raw: f64,
    signed: f64,
    ratio: f64,
}

fn compare(mut raw: impl FnMut(), mut signed: impl FnMut()) -> Row {
    let n = calibrate(&mut raw);
    let (mut raws, mut signeds, mut ratios) = (vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // Alternate which goes first, so neither always gets the warm cache.
        let (r, s) = if round % 2 == 0 {
            let r = rate(n, &mut raw);
            (r, rate(n, &mut signed))
        } else {
            let s = rate(n, &mut signed);
            (rate(n, &mut raw), s)
        };
        raws.push(r);
        signeds.push(s);
        ratios.push(s / r);
    }
    Row {
        raw: median(raws),
        signed: median(signeds),
        ratio: median(ratios),
    }
}

fn bench<T: Record>(
    name: &str,
    record: &T,
    key: &Identity,
    results: &mut Vec<(String, &'static str, Row)>,
) {
    let signing = SigningKey::from_bytes(&[1; 32]);
    assert_eq!(signing.verifying_key().to_bytes(), *key.public().as_bytes());
    let signed = Signed::sign(record, key).expect("record fits");
    let payload = signed.payload().to_vec();
    let wire = signed.to_bytes();
    let raw_sig: Signature = signing.sign(&payload);
    let raw_key = signing.verifying_key().to_bytes();
    let label = format!("{name} ({} B)", payload.len());

    let sign = compare(
        || {
            black_box(signing.sign(black_box(&payload)));
        },
        || {
            black_box(Signed::sign(black_box(record), key).expect("sign"));
        },
    );
    results.push((label.clone(), "sign", sign));

    let verify = compare(
        || {
            let k = VerifyingKey::from_bytes(black_box(&raw_key)).expect("key");
            k.verify_strict(black_box(&payload), &raw_sig)
                .expect("raw verify");
        },
        || {
            let s = Signed::<T>::from_bytes(black_box(&wire)).expect("decode");
            black_box(s.verify().expect("verify"));
        },
    );
    results.push((label, "verify", verify));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` probes with --list; nothing to list.
    }
    let key = Identity::from_secret_bytes([1; 32]);
    let mut results = Vec::new();
    bench("credit", &credit(&key), &key, &mut results);
    bench("GPU advert, 4 GPUs", &advert(&key), &key, &mut results);
    bench(
        "task offer, 64 KiB inline",
        &TaskOffers(vec![offer(&key)]),
        &key,
        &mut results,
    );

    println!("signed records vs raw ed25519-dalek on the same payload bytes");
    println!(
        "median of {ROUNDS} interleaved rounds; ratio = signed / raw throughput (target >= 0.80)\n"
    );
    println!(
        "{:<34} {:<7} {:>12} {:>12} {:>7}",
        "record", "op", "raw op/s", "signed op/s", "ratio"
    );
    let mut worst = f64::INFINITY;
    for (label, op, row) in &results {
        println!(
            "{label:<34} {op:<7} {:>12.0} {:>12.0} {:>7.3}",
            row.raw, row.signed, row.ratio
        );
        worst = worst.min(row.ratio);
    }
    println!(
        "\nlowest ratio: {worst:.3} ({})",
        if worst >= 0.8 {
            "meets the 0.80 target"
        } else {
            "BELOW the 0.80 target"
        }
    );
}
