//! Properties of every record and message: round trips, canonical bytes,
//! signatures, and refusal of damaged, foreign or hostile input.

use alliance_protocol::advert::{
    Backend, DeviceType, GpuAdvert, GpuBench, GpuInfo, GpuLimits, GpuState,
};
use alliance_protocol::cert::{
    Charter, CharterDefaults, InstitutionCert, NodeCert, Revocations, Revoked, Roles,
};
use alliance_protocol::encoding::DecodeError;
use alliance_protocol::signed::RecordError;
use alliance_protocol::task::{
    Binding, BindingKind, CheckpointRecord, Comparison, Credit, Data, ElemType, JobId, Outcome,
    Outcomes, OutputDigest, Receipt, TaskFailure, TaskOffer, TaskOffers, TaskSpec,
};
use alliance_protocol::wire::{
    self, Ack, Acks, BlobRequest, BlobResponse, DeclineReason, Hello, Message, OfferAnswer,
    OfferAnswers, OfferRequest, Progress, Reports, RevocationGossip,
};
use alliance_protocol::{Hash, Identity, PublicKey, Record, Signed, Timestamp};
use proptest::prelude::*;
use serde::Serialize;

fn key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(|seed| Identity::from_secret_bytes(seed).public())
}
fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash::from_bytes)
}
fn ts() -> impl Strategy<Value = Timestamp> {
    any::<u64>().prop_map(Timestamp::from_secs)
}
fn roles() -> impl Strategy<Value = Roles> {
    (0u8..8).prop_map(|r| Roles::try_from(r).unwrap())
}
fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,40}"
}
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}
fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        bytes(64).prop_map(Data::Inline),
        (hash(), any::<u64>()).prop_map(|(hash, len)| Data::Blob { hash, len }),
    ]
}
fn elem() -> impl Strategy<Value = ElemType> {
    prop_oneof![
        Just(ElemType::F32),
        Just(ElemType::U32),
        Just(ElemType::I32),
        Just(ElemType::Bytes)
    ]
}
fn binding() -> impl Strategy<Value = Binding> {
    let kind = prop_oneof![
        data().prop_map(|data| BindingKind::Input { data }),
        data().prop_map(|data| BindingKind::Uniform { data }),
        (any::<u64>(), elem()).prop_map(|(len, elem)| BindingKind::Output { len, elem }),
        (data(), elem()).prop_map(|(data, elem)| BindingKind::State { data, elem }),
    ];
    (any::<u32>(), kind).prop_map(|(binding, kind)| Binding { binding, kind })
}
fn comparison() -> impl Strategy<Value = Comparison> {
    prop_oneof![
        Just(Comparison::Exact),
        (0.0f64..1.0, 0.0f64..1.0, any::<u32>())
            .prop_map(|(abs, rel, ulps)| Comparison::Tolerance { abs, rel, ulps }),
    ]
}
fn digest() -> impl Strategy<Value = OutputDigest> {
    (any::<u32>(), hash(), any::<u64>()).prop_map(|(binding, hash, len)| OutputDigest {
        binding,
        hash,
        len,
    })
}

fn charter() -> impl Strategy<Value = Charter> {
    (
        text(),
        key(),
        prop::collection::vec(text(), 0..3),
        any::<(u32, u8, u32)>(),
        ts(),
    )
        .prop_map(|(name, root, bootstrap, (a, r, m), at)| Charter {
            name,
            root,
            bootstrap,
            defaults: CharterDefaults {
                advert_ttl_secs: a,
                default_redundancy: r,
                max_node_cert_days: m,
            },
            created_at: at,
        })
}
fn institution_cert() -> impl Strategy<Value = InstitutionCert> {
    (hash(), text(), key(), roles(), ts(), ts()).prop_map(|(alliance, name, key, roles, nb, na)| {
        InstitutionCert {
            alliance,
            name,
            key,
            roles,
            not_before: nb,
            not_after: na,
        }
    })
}
fn node_cert() -> impl Strategy<Value = NodeCert> {
    (hash(), key(), key(), roles(), ts(), ts()).prop_map(
        |(alliance, institution, node, roles, nb, na)| NodeCert {
            alliance,
            institution,
            node,
            roles,
            not_before: nb,
            not_after: na,
        },
    )
}
fn revocations() -> impl Strategy<Value = Revocations> {
    let revoked = (key(), text(), ts()).prop_map(|(key, reason, at)| Revoked { key, reason, at });
    (
        hash(),
        any::<u64>(),
        ts(),
        prop::collection::vec(revoked, 0..4),
    )
        .prop_map(|(alliance, sequence, issued_at, revoked)| Revocations {
            alliance,
            sequence,
            issued_at,
            revoked,
        })
}
fn gpu_info() -> impl Strategy<Value = GpuInfo> {
    let backend = prop_oneof![
        Just(Backend::Vulkan),
        Just(Backend::Gl),
        Just(Backend::Metal)
    ];
    let device_type = prop_oneof![Just(DeviceType::DiscreteGpu), Just(DeviceType::Cpu)];
    let state = prop_oneof![
        Just(GpuState::Idle),
        Just(GpuState::Busy),
        Just(GpuState::Paused)
    ];
    let limits = (
        any::<(u64, u64, u32, u64)>(),
        any::<(u32, [u32; 3], u32, u32)>(),
    )
        .prop_map(|((a, b, c, d), (e, f, g, h))| GpuLimits {
            max_buffer_size: a,
            max_storage_buffer_binding_size: b,
            max_storage_buffers_per_shader_stage: c,
            max_uniform_buffer_binding_size: d,
            max_compute_invocations_per_workgroup: e,
            max_compute_workgroup_size: f,
            max_compute_workgroups_per_dimension: g,
            max_compute_workgroup_storage_size: h,
        });
    let bench = prop::option::of(any::<(u64, u64)>().prop_map(|(c, f)| GpuBench {
        copy_mb_per_s: c,
        fma_mflops: f,
    }));
    (
        any::<(u16, u32, u32, u16)>(),
        text(),
        text(),
        backend,
        device_type,
        limits,
        bench,
        (
            state,
            text(),
            any::<(u64, u64)>(),
            prop::collection::vec(text(), 0..2),
        ),
    )
        .prop_map(
            |(
                (index, vendor, device, free_slots),
                name,
                driver,
                backend,
                device_type,
                limits,
                bench,
                (state, reason, (max_task_bytes, max_task_secs), names),
            )| GpuInfo {
                index,
                name,
                vendor,
                device,
                backend,
                device_type,
                driver,
                limits,
                bench,
                state,
                reason,
                free_slots,
                terms: alliance_protocol::advert::Terms {
                    max_task_bytes,
                    max_task_secs,
                    allow: names.clone(),
                    deny: names,
                },
            },
        )
}
fn advert() -> impl Strategy<Value = GpuAdvert> {
    (
        key(),
        key(),
        prop::collection::vec(gpu_info(), 0..3),
        any::<u64>(),
        ts(),
        ts(),
    )
        .prop_map(
            |(peer, institution, gpus, sequence, issued_at, expires_at)| GpuAdvert {
                peer,
                institution,
                gpus,
                sequence,
                issued_at,
                expires_at,
            },
        )
}
fn job() -> impl Strategy<Value = JobId> {
    any::<[u8; 16]>().prop_map(JobId)
}
fn spec() -> impl Strategy<Value = TaskSpec> {
    (
        (job(), any::<u32>(), any::<u32>(), hash(), "[a-z_]{1,12}"),
        prop::collection::vec(binding(), 0..4),
        (
            any::<[u32; 3]>(),
            any::<u32>(),
            any::<u32>(),
            any::<Option<u32>>(),
            any::<u64>(),
            comparison(),
            any::<Option<u32>>(),
        ),
    )
        .prop_map(
            |(
                (job, task, task_count, kernel, entry_point),
                bindings,
                (
                    dispatch,
                    steps,
                    start_step,
                    checkpoint_every,
                    timeout_ms,
                    comparison,
                    info_binding,
                ),
            )| {
                TaskSpec {
                    job,
                    task,
                    task_count,
                    kernel,
                    entry_point,
                    bindings,
                    dispatch,
                    steps,
                    start_step,
                    checkpoint_every,
                    timeout_ms,
                    comparison,
                    info_binding,
                }
            },
        )
}
fn offer() -> impl Strategy<Value = TaskOffer> {
    (spec(), key(), any::<u32>(), ts()).prop_map(|(spec, worker, attempt, expires_at)| TaskOffer {
        spec,
        worker,
        attempt,
        expires_at,
    })
}
/// A failure of the task `r` is a receipt of.
fn failure_of(r: &Receipt, reason: String) -> TaskFailure {
    TaskFailure {
        job: r.job,
        task: r.task,
        attempt: r.attempt,
        kernel: r.kernel,
        worker: r.worker,
        submitter: r.submitter,
        reason,
        failed_at: r.finished_at,
    }
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (
        (job(), any::<u32>(), any::<u32>(), hash()),
        prop::collection::vec(hash(), 0..4),
        prop::collection::vec(digest(), 0..4),
        (any::<u64>(), any::<u64>(), text(), key(), key(), ts()),
    )
        .prop_map(
            |(
                (job, task, attempt, kernel),
                inputs,
                outputs,
                (gpu_time_us, compile_time_us, adapter, worker, submitter, finished_at),
            )| Receipt {
                job,
                task,
                attempt,
                kernel,
                inputs,
                outputs,
                gpu_time_us,
                compile_time_us,
                adapter,
                worker,
                submitter,
                finished_at,
            },
        )
}
fn checkpoint() -> impl Strategy<Value = CheckpointRecord> {
    (
        (job(), any::<u32>(), any::<u32>(), hash(), any::<u32>()),
        prop::collection::vec(digest(), 0..3),
        key(),
        ts(),
    )
        .prop_map(
            |((job, task, attempt, kernel, step), state, worker, made_at)| CheckpointRecord {
                job,
                task,
                attempt,
                kernel,
                step,
                state,
                worker,
                made_at,
            },
        )
}
fn credit() -> impl Strategy<Value = Credit> {
    (
        (
            job(),
            proptest::collection::vec(
                (any::<u32>(), hash()),
                1..=alliance_protocol::task::MAX_CREDIT_TASKS,
            ),
        ),
        (key(), key(), key()),
        any::<u64>(),
        ts(),
    )
        .prop_map(
            |(
                (job, tasks),
                (worker, worker_institution, submitter_institution),
                gpu_time_us,
                issued_at,
            )| Credit {
                job,
                tasks: tasks
                    .into_iter()
                    .map(|(task, receipt)| alliance_protocol::task::CreditedTask { task, receipt })
                    .collect(),
                worker,
                worker_institution,
                submitter_institution,
                gpu_time_us,
                issued_at,
            },
        )
}

/// Round trip, canonical stability, signature, and every flipped byte.
fn check_record<T: Record + Clone + PartialEq + std::fmt::Debug>(
    record: T,
    seed: [u8; 32],
) -> Result<(), TestCaseError> {
    let signer = Identity::from_secret_bytes(seed);
    let signed = Signed::sign(&record, &signer).unwrap();
    prop_assert_eq!(signed.verify().unwrap(), record.clone());
    prop_assert_eq!(signed.signer(), signer.public());
    // The same record always gives the same bytes (ed25519 is deterministic).
    let again = Signed::sign(&record, &signer).unwrap();
    prop_assert_eq!(again.to_bytes(), signed.to_bytes());
    let bytes = signed.to_bytes();
    let back = Signed::<T>::from_bytes(&bytes).unwrap();
    prop_assert_eq!(back.verify().unwrap(), record.clone());
    // One flipped bit anywhere: refused at decode or at verification.
    for i in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[i] ^= 0x01;
        if let Ok(s) = Signed::<T>::from_bytes(&damaged) {
            prop_assert!(
                s.verify().is_err(),
                "flipped byte {} of {} still verifies",
                i,
                T::NAME
            );
        }
    }
    // Truncated anywhere: refused.
    for len in 0..bytes.len() {
        prop_assert!(Signed::<T>::from_bytes(&bytes[..len]).is_err());
    }
    Ok(())
}

/// Encode/decode round trip and truncation of a wire message.
fn check_message<M: Message + PartialEq + std::fmt::Debug>(msg: M) -> Result<(), TestCaseError> {
    let bytes = msg.encode().unwrap();
    prop_assert_eq!(&M::decode(&bytes).unwrap(), &msg);
    let frame = wire::encode_frame(&msg).unwrap();
    let read: M = wire::read_frame(&mut frame.as_slice()).unwrap();
    prop_assert_eq!(&read, &msg);
    for len in 0..bytes.len() {
        prop_assert!(M::decode(&bytes[..len]).is_err());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn charter_records(r in charter(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn institution_cert_records(r in institution_cert(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn node_cert_records(r in node_cert(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn revocation_records(r in revocations(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn advert_records(r in advert(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn offer_records(r in offer(), s in offer(), seed in any::<[u8; 32]>()) { check_record(TaskOffers(vec![r, s]), seed)?; }
    #[test]
    fn outcome_records(r in receipt(), reason in text(), seed in any::<[u8; 32]>()) {
        let failure = failure_of(&r, reason);
        check_record(Outcomes(vec![Outcome::Done(r), Outcome::Failed(failure.clone()), Outcome::HandedBack(failure)]), seed)?;
    }
    #[test]
    fn checkpoint_records(r in checkpoint(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }
    #[test]
    fn credit_records(r in credit(), seed in any::<[u8; 32]>()) { check_record(r, seed)?; }

    #[test]
    fn wire_messages(o in offer(), r in receipt(), c in checkpoint(), rv in revocations(), d in data(), seed in any::<[u8; 32]>(),
                     h in hash(), off in any::<u64>(), reason in text()) {
        let k = Identity::from_secret_bytes(seed);
        let signed_offers = Signed::sign(&TaskOffers(vec![o.clone(), o]), &k).unwrap();
        check_message(OfferRequest { offers: signed_offers, kernel_source: Some(reason.clone()) })?;
        check_message(OfferAnswer::Accept { lease_until: Timestamp::from_secs(off) })?;
        check_message(OfferAnswer::Decline(DeclineReason::Limits(reason.clone())))?;
        check_message(OfferAnswers(vec![OfferAnswer::Accept { lease_until: Timestamp::from_secs(off) }, OfferAnswer::Decline(DeclineReason::Limits(wire::short_reason(reason.clone())))]))?;
        let failure = failure_of(&r, reason.clone());
        check_message(Ack::Refused(reason.clone()))?;
        let outcomes = Outcomes(vec![Outcome::Failed(failure), Outcome::Done(r)]);
        let reports = Reports { outcomes: Signed::sign(&outcomes, &k).unwrap(), outputs: vec![vec![], vec![(0, d.clone())]] };
        check_message(reports.clone())?;
        prop_assert_eq!(reports.open().unwrap().into_iter().map(|(o, _)| o).collect::<Vec<_>>(), outcomes.0);
        check_message(Acks(vec![Ack::Ok, Ack::Refused(wire::short_reason(reason.clone()))]))?;
        check_message(BlobRequest { hash: h, offset: off, len: off / 2 })?;
        check_message(BlobResponse::Sending { total_len: off, len: off / 2 })?;
        check_message(BlobResponse::Refused(reason.clone()))?;
        check_message(Progress::Running { job: JobId([1; 16]), task: 1, attempt: 0, step: 5, steps: 10 })?;
        check_message(Progress::Checkpoint { record: Signed::sign(&c, &k).unwrap(), state: vec![(1, d)] })?;
        check_message(RevocationGossip { list: Signed::sign(&rv, &k).unwrap() })?;
    }

    /// Random bytes to every decoder: an error or a value, never a panic.
    #[test]
    fn random_bytes_never_panic(input in bytes(512)) {
        fn all<M: Message>(b: &[u8]) { let _ = M::decode(b); }
        fn rec<T: Record>(b: &[u8]) { if let Ok(s) = Signed::<T>::from_bytes(b) { let _ = s.verify(); } }
        all::<Hello>(&input); all::<OfferRequest>(&input); all::<OfferAnswer>(&input);
        all::<Ack>(&input); all::<BlobRequest>(&input);
        all::<OfferAnswers>(&input); all::<Reports>(&input); all::<Acks>(&input);
        all::<BlobResponse>(&input); all::<Progress>(&input); all::<RevocationGossip>(&input);
        all::<wire::AdvertGossip>(&input); all::<wire::CreditGossip>(&input);
        all::<wire::CreditsRequest>(&input); all::<wire::CreditsPage>(&input);
        rec::<Charter>(&input); rec::<InstitutionCert>(&input); rec::<NodeCert>(&input);
        rec::<Revocations>(&input); rec::<GpuAdvert>(&input); rec::<TaskOffers>(&input);
        rec::<Outcomes>(&input); rec::<CheckpointRecord>(&input); rec::<Credit>(&input);
        let _ = alliance_protocol::armor::decode(&String::from_utf8_lossy(&input));
    }
}

#[test]
fn frame_cap_is_enforced_before_allocation() {
    // A frame that declares 4 GiB is refused from its prefix alone.
    let prefix = u32::MAX.to_be_bytes();
    assert!(matches!(
        wire::frame_len::<Hello>(prefix),
        Err(DecodeError::TooLarge { max, .. }) if max == Hello::MAX_SIZE
    ));
    let mut stream = prefix.to_vec();
    stream.extend_from_slice(&[0; 16]);
    assert!(wire::read_frame::<BlobResponse, _>(&mut stream.as_slice()).is_err());
    // Oversized bodies are refused by every decoder too.
    let big = vec![0u8; BlobRequest::MAX_SIZE + 1];
    assert!(matches!(
        BlobRequest::decode(&big),
        Err(DecodeError::TooLarge { .. })
    ));
    let big = vec![0u8; Signed::<NodeCert>::max_envelope_size() + 1];
    assert!(matches!(
        Signed::<NodeCert>::from_bytes(&big),
        Err(DecodeError::TooLarge { .. })
    ));
}

/// `n` failures signed by `k`, for `k`.
fn failures(k: &Identity, n: usize) -> Outcomes {
    let failure = TaskFailure {
        job: JobId([1; 16]),
        task: 0,
        attempt: 0,
        kernel: Hash::of(b"k"),
        worker: k.public(),
        submitter: k.public(),
        reason: "r".into(),
        failed_at: Timestamp::from_secs(1),
    };
    Outcomes(vec![Outcome::Failed(failure); n])
}

/// A batch of more offers or reports than may travel together is refused
/// by the decoder, before any part of the node sees it.
#[test]
fn batches_past_their_count_are_refused() {
    let k = Identity::generate();
    let reports = |n: usize| {
        let outcomes = failures(&k, n);
        Reports {
            outcomes: Signed::sign(&outcomes, &k).unwrap(),
            outputs: vec![vec![]; n],
        }
    };
    let full = reports(wire::MAX_BATCH);
    assert_eq!(Reports::decode(&full.encode().unwrap()).unwrap(), full);
    let over = reports(wire::MAX_BATCH + 1);
    let err = Reports::decode(&over.encode().unwrap()).unwrap_err();
    assert!(err.to_string().contains("at most 64"), "{err}");
    assert!(
        wire::read_frame::<Reports, _>(&mut wire::encode_frame(&over).unwrap().as_slice()).is_err()
    );
}

/// Outcomes and outputs that do not pair up are refused, and so is a batch
/// whose signature fails.
#[test]
fn reports_open_only_when_signed_and_paired() {
    let k = Identity::generate();
    let outcomes = failures(&k, 2);
    let unpaired = Reports {
        outcomes: Signed::sign(&outcomes, &k).unwrap(),
        outputs: vec![vec![]],
    };
    let err = unpaired.open().unwrap_err();
    assert!(err.contains("2 outcomes but 1 lists"), "{err}");
    let signed = Signed::sign(&outcomes, &k).unwrap();
    let payload = signed.payload().to_vec();
    let mut bytes = Reports {
        outcomes: signed,
        outputs: vec![vec![]; 2],
    }
    .encode()
    .unwrap();
    // A byte inside the signed payload (not in the key or signature that
    // follow it): the last failure's reason, "r", becomes "s".
    let start = bytes
        .windows(payload.len())
        .position(|w| w == payload.as_slice())
        .unwrap();
    let at = start + payload.iter().rposition(|&b| b == b'r').unwrap();
    bytes[at] = b's';
    let err = Reports::decode(&bytes).unwrap().open().unwrap_err();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn oversized_messages_cannot_be_sent() {
    let msg = Ack::Refused("x".repeat(Ack::MAX_SIZE + 1));
    assert!(msg.encode().is_err());
    assert!(wire::encode_frame(&msg).is_err());
}

/// A record signed by a small-order or non-canonical key never verifies,
/// even with a signature crafted for it.
#[test]
fn weak_and_non_canonical_signer_keys_are_refused() {
    let note = Credit {
        job: JobId([0; 16]),
        tasks: vec![alliance_protocol::task::CreditedTask {
            task: 0,
            receipt: Hash::of(b"r"),
        }],
        worker: Identity::generate().public(),
        worker_institution: Identity::generate().public(),
        submitter_institution: Identity::generate().public(),
        gpu_time_us: 1,
        issued_at: Timestamp::from_secs(1),
    };
    let signed = Signed::sign(&note, &Identity::generate()).unwrap();
    let mut identity_point = [0u8; 32];
    identity_point[0] = 1;
    let mut non_canonical = [0xffu8; 32];
    non_canonical[0] = 0xee;
    non_canonical[31] = 0x7f;
    for bad in [identity_point, non_canonical] {
        let mut bytes = signed.to_bytes();
        // The envelope is: version (1 byte), payload length and payload, key, signature.
        let key_at = bytes.len() - 64 - 32;
        bytes[key_at..key_at + 32].copy_from_slice(&bad);
        // The small-order forgery: R = identity, s = 0 satisfies the
        // cofactorless equation for the identity key.
        let sig_at = bytes.len() - 64;
        bytes[sig_at..].fill(0);
        bytes[sig_at] = 1;
        let forged = Signed::<Credit>::from_bytes(&bytes).unwrap();
        assert!(
            matches!(forged.verify(), Err(RecordError::Key { .. })),
            "{:?}",
            forged.verify()
        );
    }
}

/// Canonical encoding: the same record gives the same bytes through any
/// path, and a non-canonical payload with a valid signature is refused.
#[test]
fn non_canonical_payload_is_refused_even_when_signed() {
    #[derive(Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
    struct Loose(u64);
    impl Record for Loose {
        const NAME: &'static str = "loose";
        const CONTEXT: &'static str = "test-loose/v1";
        const VERSION: u16 = 1;
        const MAX_SIZE: usize = 16;
    }
    let signer = Identity::generate();
    let signed = Signed::sign(&Loose(1), &signer).unwrap();
    // Build the envelope of an over-long varint `81 00` (= 1), signed properly.
    let payload = vec![0x81u8, 0x00];
    let mut msg = b"alliance-signed-record\0test-loose/v1\0".to_vec();
    msg.extend_from_slice(&payload);
    let sig = signer.sign_raw(&msg).to_bytes();
    let mut bytes = vec![1u8, 2u8]; // version 1, payload length 2
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(signer.public().as_bytes());
    bytes.extend_from_slice(&sig);
    let loose = Signed::<Loose>::from_bytes(&bytes).unwrap();
    assert!(matches!(
        loose.verify(),
        Err(RecordError::Decode(DecodeError::NonCanonical { .. }))
    ));
    assert_eq!(signed.verify().unwrap(), Loose(1));
}
