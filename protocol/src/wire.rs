//! Messages of the node protocols, each with a size cap.
//!
//! | protocol | request | response | cap (request / response) |
//! |---|---|---|---|
//! | `/alliance/membership/1` | [`Hello`] | [`Hello`] | about 1 MiB each (hello plus up to 4 revocation lists) |
//! | `/alliance/task/2` | [`OfferRequest`] | [`OfferAnswers`] | 8 MiB / 257 KiB |
//! | `/alliance/result/2` | [`Reports`] | [`Acks`] | 8 MiB / 65 KiB |
//! | `/alliance/blob/2` (a stream) | [`BlobRequest`] | [`BlobResponse`], then raw bytes | 1 KiB / 4 KiB |
//! | `/alliance/progress/1` | [`Progress`] | [`Ack`] | 1 MiB + 64 KiB / 1 KiB |
//! | gossip `alliance/<id>/adverts/1` | [`AdvertGossip`] | | 32 KiB |
//! | gossip `alliance/<id>/revocations/1` | [`RevocationGossip`] | | 257 KiB |
//! | `/alliance/credits/1` | [`CreditsRequest`] | [`CreditsPage`] | 1 KiB / 1 MiB |
//! | gossip `alliance/<id>/credits/1` | [`CreditGossip`] | | 128 KiB |
//!
//! On a stream each message is a frame: a 4-byte big-endian length, then the
//! message's canonical bytes. [`frame_len`] checks the length against the
//! message's cap *before* the reader allocates, and [`Message::decode`]
//! checks it again, so no peer can make a node allocate more than the cap.
//! Decoders return errors on bad bytes; none panics.
//!
//! Offers and reports travel in batches of up to [`MAX_BATCH`] tasks: a
//! scheduler that places many small tasks on one worker sends them in one
//! request, and a worker that finishes several while a report is on its
//! way sends them together in the next. Each offer, receipt and failure in
//! a batch is still a record signed on its own, so each stays evidence by
//! itself.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cert::{Chain, Revocations};
use crate::encoding::{self, DecodeError, EncodeError};
use crate::hash::Hash;
use crate::signed::Signed;
use crate::task::{CheckpointRecord, Data, JobId, Receipt, TaskOffer};
use crate::time::Timestamp;

/// A message type with a protocol and a size cap.
pub trait Message: Serialize + DeserializeOwned {
    /// Name for errors and logs.
    const NAME: &'static str;
    /// Largest encoded message, in bytes.
    const MAX_SIZE: usize;

    /// Canonical bytes, refused above the cap.
    fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encoding::encode(Self::NAME, self, Self::MAX_SIZE)
    }

    /// Decodes canonical bytes, checking the cap before decoding.
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        encoding::decode(Self::NAME, bytes, Self::MAX_SIZE)
    }
}

/// The length of a frame from its 4-byte prefix, refused above `M`'s cap.
pub fn frame_len<M: Message>(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > M::MAX_SIZE {
        return Err(DecodeError::TooLarge {
            what: M::NAME,
            size: len,
            max: M::MAX_SIZE,
        });
    }
    Ok(len)
}

/// `msg` as a frame: length prefix and canonical bytes.
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, EncodeError> {
    let body = msg.encode()?;
    let len = u32::try_from(body.len()).map_err(|_| EncodeError::TooLarge {
        what: M::NAME,
        size: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("reading a frame: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads one frame of `M` from a blocking reader.
pub fn read_frame<M: Message, R: Read>(reader: &mut R) -> Result<M, FrameError> {
    let mut prefix = [0u8; 4];
    reader.read_exact(&mut prefix)?;
    let len = frame_len::<M>(prefix)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(M::decode(&body)?)
}

/// Membership exchange: each side presents its chain and the newest
/// revocation lists it holds, for the charter both must share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Id of the charter the sender belongs to.
    pub alliance: Hash,
    pub chain: Chain,
    /// Sequence numbers of the revocation lists the sender holds, so the
    /// other side can send it newer ones.
    pub revocations: Vec<(crate::keys::PublicKey, u64)>,
    /// In an answer: revocation lists the asker lacks or holds an older
    /// sequence of, at most [`MAX_HELLO_LISTS`]. Empty in a request.
    pub lists: Vec<Signed<crate::cert::Revocations>>,
}

/// Revocation lists one hello carries at most.
pub const MAX_HELLO_LISTS: usize = 4;

impl Message for Hello {
    const NAME: &'static str = "membership hello";
    const MAX_SIZE: usize = 16 * 1024 + MAX_HELLO_LISTS * RevocationGossip::MAX_SIZE;
}

/// Most offers one [`OfferRequest`] carries, and most reports one
/// [`Reports`] carries.
pub const MAX_BATCH: usize = 64;

/// Offers of tasks of one job to one worker, at most [`MAX_BATCH`], with
/// the kernel source when the worker may lack it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferRequest {
    pub offers: Vec<Signed<TaskOffer>>,
    /// The WGSL source; its blake3 hash must equal every spec's kernel
    /// hash.
    pub kernel_source: Option<String>,
}

impl Message for OfferRequest {
    const NAME: &'static str = "task offer request";
    const MAX_SIZE: usize = 8 * 1024 * 1024;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = encoding::decode(Self::NAME, bytes, Self::MAX_SIZE)?;
        batch_cap(Self::NAME, m.offers.len())?;
        Ok(m)
    }
}

impl OfferRequest {
    /// The same answer, `reason`, to every offer.
    pub fn decline_all(&self, reason: &DeclineReason) -> OfferAnswers {
        OfferAnswers(
            self.offers
                .iter()
                .map(|_| OfferAnswer::Decline(reason.clone()))
                .collect(),
        )
    }
}

/// Refuses a batch of more than [`MAX_BATCH`] items.
fn batch_cap(what: &'static str, items: usize) -> Result<(), DecodeError> {
    if items > MAX_BATCH {
        return Err(DecodeError::Malformed {
            what,
            detail: format!("{items} items; at most {MAX_BATCH} travel together"),
        });
    }
    Ok(())
}

/// Offers a scheduler puts in one request while their encoded size stays
/// under this (a single offer may be larger, up to the request's cap).
pub const OFFER_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Why a worker declines an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// No free slot.
    Busy,
    /// The owner paused sharing or the sharing window is closed.
    Paused,
    /// The owner's policy refuses this submitter's institution.
    PolicyRefuses,
    /// The kernel or task breaks the worker's limits.
    Limits(String),
    /// The offer is malformed, expired or not for this worker.
    BadOffer(String),
    /// No GPU of the worker takes work now, and why (its owner uses it,
    /// its sharing window is closed, it is not shared).
    Unavailable(String),
}

/// A worker's answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferAnswer {
    /// Accepted; the lease lapses at `lease_until` without progress.
    Accept {
        lease_until: Timestamp,
    },
    Decline(DeclineReason),
}

impl Message for OfferAnswer {
    const NAME: &'static str = "task offer answer";
    const MAX_SIZE: usize = 4 * 1024;
}

/// The worker's answers to an [`OfferRequest`], one per offer in the
/// order of the offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferAnswers(pub Vec<OfferAnswer>);

impl Message for OfferAnswers {
    const NAME: &'static str = "task offer answers";
    const MAX_SIZE: usize = MAX_BATCH * OfferAnswer::MAX_SIZE + 1024;
}

/// The longest reason a decline or a refusal carries; longer ones are cut
/// (see [`short_reason`]), so that a batch of answers stays under its cap.
pub const MAX_REASON: usize = 900;

/// `reason` cut to at most [`MAX_REASON`] bytes, at a character boundary.
pub fn short_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON - 3;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    reason
}

/// A finished task: the signed receipt and the outputs, inline when small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub receipt: Signed<Receipt>,
    /// Output bytes by binding; large ones as blobs to fetch.
    pub outputs: Vec<(u32, Data)>,
}

impl Message for TaskResult {
    const NAME: &'static str = "task result";
    const MAX_SIZE: usize = 5 * 1024 * 1024;
}

/// What a worker reports at the end of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskReport {
    Done(TaskResult),
    /// The task could not run or did not finish; the signed reason.
    Failed(Signed<crate::task::TaskFailure>),
    /// The worker's owner took the GPU back (paused it, the sharing window
    /// closed, or the owner's own work started): the task was stopped and
    /// is handed back to be offered elsewhere, from its last checkpoint.
    /// Not a failure of the worker's: the signed reason says why.
    HandedBack(Signed<crate::task::TaskFailure>),
}

impl Message for TaskReport {
    const NAME: &'static str = "task report";
    const MAX_SIZE: usize = TaskResult::MAX_SIZE;
}

/// Reports of tasks to their submitter: at most [`MAX_BATCH`], and more
/// than one only while their encoded size stays under
/// [`REPORT_BATCH_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reports(pub Vec<TaskReport>);

impl Message for Reports {
    const NAME: &'static str = "task reports";
    const MAX_SIZE: usize = 8 * 1024 * 1024;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = encoding::decode(Self::NAME, bytes, Self::MAX_SIZE)?;
        batch_cap(Self::NAME, m.0.len())?;
        Ok(m)
    }
}

impl Reports {
    /// The same refusal, `why`, to every report.
    pub fn refuse_all(&self, why: &str) -> Acks {
        Acks(
            self.0
                .iter()
                .map(|_| Ack::Refused(why.to_owned()))
                .collect(),
        )
    }
}

impl TaskReport {
    /// About the report's encoded size, without encoding it: its signed
    /// record and inline outputs, plus room for the framing around them.
    pub fn size_hint(&self) -> usize {
        match self {
            Self::Done(r) => {
                r.receipt.payload().len()
                    + r.outputs
                        .iter()
                        .map(|(_, d)| match d {
                            Data::Inline(b) => b.len() + 16,
                            Data::Blob { .. } => 64,
                        })
                        .sum::<usize>()
                    + 256
            }
            Self::Failed(f) | Self::HandedBack(f) => f.payload().len() + 256,
        }
    }
}

/// Reports a worker puts in one request while their encoded size stays
/// under this (a single report may be larger, up to its own cap).
pub const REPORT_BATCH_BYTES: usize = 2 * 1024 * 1024;

/// The submitter's acknowledgements of [`Reports`], one per report in
/// their order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acks(pub Vec<Ack>);

impl Message for Acks {
    const NAME: &'static str = "acknowledgements";
    const MAX_SIZE: usize = MAX_BATCH * Ack::MAX_SIZE + 1024;
}

/// Acknowledges a result or progress message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    Ok,
    /// Refused, with the reason.
    Refused(String),
}

impl Message for Ack {
    const NAME: &'static str = "acknowledgement";
    const MAX_SIZE: usize = 1024;
}

/// A request for a range of a blob: `len` bytes from `offset`.
///
/// On `/alliance/blob/2` the asker opens a stream and writes this as a
/// frame; the holder answers with a [`BlobResponse`] frame and, after
/// [`BlobResponse::Sending`], exactly the announced number of raw bytes,
/// then closes the stream. One stream carries a whole range, so the
/// transport's flow control ramps up once rather than per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub hash: Hash,
    pub offset: u64,
    pub len: u64,
}

impl Message for BlobRequest {
    const NAME: &'static str = "blob request";
    const MAX_SIZE: usize = 1024;
}

/// The answer to a [`BlobRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// `len` raw bytes of the blob from the requested offset follow;
    /// the whole blob is `total_len` bytes.
    Sending {
        total_len: u64,
        len: u64,
    },
    NotFound,
    Refused(String),
}

impl Message for BlobResponse {
    const NAME: &'static str = "blob response";
    const MAX_SIZE: usize = 4096;
}

/// Progress of a running task, optionally with a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Progress {
    /// Still running: `step` of `steps` done. Renews the lease.
    Running {
        job: JobId,
        task: u32,
        attempt: u32,
        step: u32,
        steps: u32,
    },
    /// A checkpoint: the signed record and the state buffers.
    Checkpoint {
        record: Signed<CheckpointRecord>,
        state: Vec<(u32, Data)>,
    },
}

impl Message for Progress {
    const NAME: &'static str = "progress";
    const MAX_SIZE: usize = 1024 * 1024 + 64 * 1024;
}

/// A GPU advert on the alliance's gossip topic, with the publisher's chain
/// so that members it is not connected to can check who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertGossip {
    pub chain: Chain,
    pub advert: Signed<crate::advert::GpuAdvert>,
}

/// Credits on the alliance's gossip topic, at most
/// [`MAX_GOSSIP_CREDITS`], all issued by one submitter, with its chain so
/// that every member can check who signed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditGossip {
    pub chain: Chain,
    pub credits: Vec<Signed<crate::task::Credit>>,
}

/// Asks a member for the credits it holds, a page at a time: those after
/// `after` (a credit's key in the holder's order), from the start if none.
/// A node that joins (or comes back) fetches the credits it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditsRequest {
    pub after: Option<Hash>,
}

impl Message for CreditsRequest {
    const NAME: &'static str = "credits request";
    const MAX_SIZE: usize = 1024;
}

/// A page of credits, with the chains of the submitters that issued them,
/// and where the next page starts (none: this was the last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditsPage {
    pub issuers: Vec<Chain>,
    pub credits: Vec<Signed<crate::task::Credit>>,
    pub next: Option<Hash>,
}

/// Credits one page carries at most.
pub const MAX_PAGE_CREDITS: usize = 256;
/// Issuers' chains one page carries at most.
pub const MAX_PAGE_ISSUERS: usize = 64;

impl Message for CreditsPage {
    const NAME: &'static str = "credits page";
    const MAX_SIZE: usize = 1024 * 1024;
}

/// Credits one gossip message carries at most.
pub const MAX_GOSSIP_CREDITS: usize = 64;

impl Message for CreditGossip {
    const NAME: &'static str = "credit gossip";
    const MAX_SIZE: usize = 256 * 1024;
}

impl Message for AdvertGossip {
    const NAME: &'static str = "advert gossip";
    const MAX_SIZE: usize = 32 * 1024;
}

/// A revocation list passed on by gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationGossip {
    pub list: Signed<Revocations>,
}

impl Message for RevocationGossip {
    const NAME: &'static str = "revocation gossip";
    const MAX_SIZE: usize = 256 * 1024 + 1024;
}
