//! Messages of the node protocols, each with a size cap.
//!
//! | protocol | request | response | cap (request / response) |
//! |---|---|---|---|
//! | `/alliance/membership/1` | [`Hello`] | [`Hello`] | about 1 MiB each (hello plus up to 4 revocation lists) |
//! | `/alliance/task/3` | [`OfferRequest`] | [`OfferAnswers`] | 8 MiB / 257 KiB |
//! | `/alliance/result/3` | [`Reports`] | [`Acks`] | 8 MiB / 65 KiB |
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
//! way sends them together in the next. A batch is signed once
//! ([`TaskOffers`], [`Outcomes`]): the signed batch is the evidence for
//! each offer, receipt and failure in it.

use std::io::Read;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cert::{Chain, Revocations};
use crate::encoding::{self, DecodeError, EncodeError};
use crate::hash::Hash;
use crate::signed::Signed;
pub use crate::task::MAX_BATCH;
use crate::task::{CheckpointRecord, Data, JobId, Outcome, Outcomes, TaskOffers};
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

/// Offers of tasks of one job to one worker, at most [`MAX_BATCH`], signed
/// together, with the kernel source when the worker may lack it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferRequest {
    pub offers: Signed<TaskOffers>,
    /// The WGSL source; its blake3 hash must equal every spec's kernel
    /// hash.
    pub kernel_source: Option<String>,
}

impl Message for OfferRequest {
    const NAME: &'static str = "task offer request";
    const MAX_SIZE: usize = 8 * 1024 * 1024;
}

impl OfferRequest {
    /// The same answer, `reason`, to every offer, for a request whose
    /// offers cannot be read: a single decline, which the submitter applies
    /// to every offer it sent.
    pub fn decline_all(reason: &DeclineReason) -> OfferAnswers {
        OfferAnswers(vec![OfferAnswer::Decline(reason.clone())])
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
///
/// Answers go one per offer, in their order; a request the worker cannot
/// read at all (its signature fails, say) gets a single decline that
/// answers every offer in it.
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

/// Output bytes by binding, of one task; large ones as blobs to fetch.
pub type Outputs = Vec<(u32, Data)>;

/// Reports of tasks to their submitter: the outcomes, signed together, and
/// the output bytes of each, in the same order (none for a failure). At
/// most [`MAX_BATCH`], and more than one only while their encoded size
/// stays under [`REPORT_BATCH_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reports {
    pub outcomes: Signed<Outcomes>,
    /// The outputs of each outcome.
    pub outputs: Vec<Outputs>,
}

impl Message for Reports {
    const NAME: &'static str = "task reports";
    const MAX_SIZE: usize = 8 * 1024 * 1024;

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = encoding::decode(Self::NAME, bytes, Self::MAX_SIZE)?;
        batch_cap(Self::NAME, m.outputs.len())?;
        Ok(m)
    }
}

impl Reports {
    /// The same refusal, `why`, to every report.
    pub fn refuse_all(&self, why: &str) -> Acks {
        Acks(
            self.outputs
                .iter()
                .map(|_| Ack::Refused(why.to_owned()))
                .collect(),
        )
    }

    /// The verified outcomes, each with its outputs; refused when the
    /// signature fails or the outcomes and outputs do not pair up.
    pub fn open(self) -> Result<Vec<(Outcome, Outputs)>, String> {
        let outcomes = self
            .outcomes
            .verify()
            .map_err(|e| format!("its reports do not verify: {e}"))?;
        if outcomes.0.len() != self.outputs.len() {
            return Err(format!(
                "its reports hold {} outcomes but {} lists of outputs",
                outcomes.0.len(),
                self.outputs.len()
            ));
        }
        Ok(outcomes.0.into_iter().zip(self.outputs).collect())
    }
}

/// About the encoded size of an outcome and its outputs, without encoding
/// them: the record, the inline outputs, and room for the framing.
pub fn report_size_hint(outcome: &Outcome, outputs: &[(u32, Data)]) -> usize {
    let record = match outcome {
        Outcome::Done(r) => r.adapter.len() + 48 * (r.inputs.len() + r.outputs.len()) + 3 * 32 + 64,
        Outcome::Failed(f) | Outcome::HandedBack(f) => f.reason.len() + 3 * 32 + 64,
    };
    record + outputs.iter().map(|(_, d)| d.size_hint()).sum::<usize>() + 256
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

/// Asks a member for the GPU adverts it holds, a page at a time, skipping
/// the first `skip` (in the order of their publishers' peer ids). A node
/// that joins fetches the table from the first member it meets instead of
/// waiting for every advert's next refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertsRequest {
    pub skip: u32,
}

impl Message for AdvertsRequest {
    const NAME: &'static str = "adverts request";
    const MAX_SIZE: usize = 1024;
}

/// A page of adverts as their publishers signed them, each with its chain,
/// checked by the receiver as gossiped ones are; `more` when another page
/// follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertsPage {
    pub adverts: Vec<AdvertGossip>,
    pub more: bool,
}

/// Adverts one page carries at most.
pub const MAX_PAGE_ADVERTS: usize = 32;

impl Message for AdvertsPage {
    const NAME: &'static str = "adverts page";
    const MAX_SIZE: usize = MAX_PAGE_ADVERTS * <AdvertGossip as Message>::MAX_SIZE + 1024;
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
