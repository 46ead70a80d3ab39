//! The handle the rest of the node holds: a cheap, cloneable [`Client`]
//! whose methods send a [`Command`] with a `oneshot` for the answer; the
//! views it answers with; [`Inbound`], the requests from members the actor
//! hands to the worker and the submitter.

use crate::trust::credits::{Balance, Credits};
use alliance_protocol::advert::GpuInfo;
use alliance_protocol::cert::{Member, Revocations};
use alliance_protocol::task::Credit;
use alliance_protocol::wire::{Ack, Acks, OfferAnswers, OfferRequest, Progress, Reports};
use alliance_protocol::{Signed, Timestamp};
use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// A request from a verified member, for the part of the node that answers
/// it; dropping `reply` fails the request.
#[derive(Debug)]
pub enum Inbound {
    Offer {
        peer: PeerId,
        member: Member,
        request: Box<OfferRequest>,
        reply: oneshot::Sender<OfferAnswers>,
    },
    Report {
        peer: PeerId,
        member: Member,
        reports: Box<Reports>,
        reply: oneshot::Sender<Acks>,
    },
    Progress {
        peer: PeerId,
        member: Member,
        progress: Box<Progress>,
        reply: oneshot::Sender<Ack>,
    },
}

/// Outcome of a request to a peer: its answer, or why there is none.
pub type Reply<T> = Result<T, String>;

/// The node's own status.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Status {
    pub peer_id: String,
    pub alliance: String,
    pub alliance_id: String,
    pub institution: String,
    pub roles: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    /// What AutoNAT found: "public", "private" or "unknown", with the
    /// number of agreeing probes.
    pub nat: String,
    /// Bootstrap nodes this node holds a relayed address on.
    pub relayed_via: Vec<String>,
    pub connected_peers: usize,
    /// Bytes received and sent over all connections since start.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub members: usize,
    pub paused: bool,
    pub rejected: Vec<Rejection>,
    /// Revocation lists in force: signer and sequence number.
    pub revocation_lists: Vec<(String, u64)>,
}

/// A peer that was turned away, and why.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Rejection {
    pub peer_id: String,
    pub reason: String,
}

/// A verified, connected member.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PeerView {
    pub peer_id: String,
    pub institution: String,
    pub roles: String,
    pub addresses: Vec<String>,
    /// Whether at least one connection to the peer is direct (not relayed).
    pub direct: bool,
    pub valid_until: String,
}

/// A live advert.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AdvertView {
    pub peer_id: String,
    pub institution: String,
    pub local: bool,
    pub sequence: u64,
    /// When this node accepted the advert (or published it, if local),
    /// microseconds since the Unix epoch.
    pub received_at_us: u64,
    pub expires_at: String,
    #[schema(value_type = Vec<Gpu>)]
    pub gpus: Vec<GpuInfo>,
}

/// How a protocol [`GpuInfo`] reads in the API's JSON (the protocol crate
/// knows nothing of the API; this is its schema).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Gpu {
    /// Index of the GPU on its node.
    index: u16,
    /// Adapter name.
    name: String,
    /// PCI vendor and device ids (0 when unknown).
    vendor: u32,
    device: u32,
    backend: GpuBackend,
    device_type: GpuDeviceType,
    driver: String,
    limits: GpuLimitsSchema,
    /// The self-benchmark's figures, once it ran.
    bench: Option<GpuBenchSchema>,
    state: GpuStateName,
    /// Why it takes no work now (empty when idle).
    reason: String,
    /// How many more tasks it accepts now.
    free_slots: u16,
    terms: GpuTerms,
}

/// The graphics API a GPU is driven through.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) enum GpuBackend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    Other,
}

/// What kind of device an adapter is (`Cpu`: a software rasteriser).
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) enum GpuDeviceType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    Cpu,
    Other,
}

/// Whether a GPU takes work now.
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = GpuState)]
#[allow(dead_code)]
pub enum GpuStateName {
    Idle,
    Busy,
    Paused,
}

/// The device limits that decide whether a kernel fits.
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = GpuLimits)]
#[allow(dead_code)]
pub(crate) struct GpuLimitsSchema {
    max_buffer_size: u64,
    max_storage_buffer_binding_size: u64,
    max_storage_buffers_per_shader_stage: u32,
    max_uniform_buffer_binding_size: u64,
    max_compute_invocations_per_workgroup: u32,
    max_compute_workgroup_size: [u32; 3],
    max_compute_workgroups_per_dimension: u32,
    max_compute_workgroup_storage_size: u32,
}

/// Self-benchmark figures.
#[derive(Debug, utoipa::ToSchema)]
#[schema(as = GpuBench)]
#[allow(dead_code)]
pub(crate) struct GpuBenchSchema {
    /// Streaming copy bandwidth, MB/s.
    copy_mb_per_s: u64,
    /// Fused multiply-add throughput, MFLOP/s.
    fma_mflops: u64,
}

/// The owner's terms for work on a GPU, as its advert tells schedulers.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct GpuTerms {
    /// Largest GPU memory one task may use, bytes (0: the device's limits).
    max_task_bytes: u64,
    /// Longest a task may run, seconds (0: no cap).
    max_task_secs: u64,
    allow: Vec<String>,
    deny: Vec<String>,
}

/// Requests to the actor.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    Metrics(oneshot::Sender<String>),
    Peers(oneshot::Sender<Vec<PeerView>>),
    Gpus(oneshot::Sender<Vec<AdvertView>>),
    /// One member's advert, where this node holds one.
    Advert(PeerId, oneshot::Sender<Option<AdvertView>>),
    SetPaused(bool, oneshot::Sender<()>),
    /// The lent GPUs' advert entries changed (state, reason, free slots).
    SetGpus(Vec<GpuInfo>, oneshot::Sender<()>),
    Revoke(
        Box<Signed<Revocations>>,
        oneshot::Sender<Result<(), String>>,
    ),
    Offer(
        PeerId,
        Box<OfferRequest>,
        oneshot::Sender<Reply<OfferAnswers>>,
    ),
    Report(PeerId, Box<Reports>, oneshot::Sender<Reply<Acks>>),
    Progress(PeerId, Box<Progress>, oneshot::Sender<Reply<Ack>>),
    /// The verified member behind a peer, if it is one and connected.
    Member(PeerId, oneshot::Sender<Option<Member>>),
    /// Keep and gossip credits this node issued.
    PublishCredits(Vec<Signed<Credit>>),
    /// Every institution's account.
    Credits(oneshot::Sender<Vec<Balance>>),
    /// One institution's balance, GPU seconds.
    /// A member misbehaved (a bad result, a blob that fails its hash):
    /// disconnect and block it, with the reason.
    Punish(PeerId, String),
    /// A peer left a request frame unfinished (what, how far it got):
    /// disconnect it, and block it when it keeps doing so.
    Unfinished(PeerId, &'static str, String),
}

/// The handle the rest of the node uses.
#[derive(Clone)]
pub struct Client {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) streams: libp2p_stream::Control,
    /// The credit totals the actor keeps, read here directly: a worker
    /// asks for a balance for every task that waits for its GPU.
    pub(super) credits: Credits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// The actor has stopped.
#[derive(Debug, thiserror::Error)]
#[error("the network actor has stopped")]
pub struct Stopped;

impl Client {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    pub async fn status(&self) -> Result<Status, Stopped> {
        self.ask(Command::Status).await
    }

    /// The node's traffic counters, as Prometheus text.
    pub async fn metrics(&self) -> Result<String, Stopped> {
        self.ask(Command::Metrics).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerView>, Stopped> {
        self.ask(Command::Peers).await
    }

    pub async fn gpus(&self) -> Result<Vec<AdvertView>, Stopped> {
        self.ask(Command::Gpus).await
    }

    /// `peer`'s advert as this node holds it: one entry of
    /// [`Self::gpus`], without building the whole table.
    pub async fn advert(&self, peer: PeerId) -> Result<Option<AdvertView>, Stopped> {
        self.ask(|tx| Command::Advert(peer, tx)).await
    }

    pub async fn set_paused(&self, paused: bool) -> Result<(), Stopped> {
        self.ask(|tx| Command::SetPaused(paused, tx)).await
    }

    /// Replaces the lent GPUs' advert entries; a change is published at
    /// once.
    pub async fn set_gpus(&self, gpus: Vec<GpuInfo>) -> Result<(), Stopped> {
        self.ask(|tx| Command::SetGpus(gpus, tx)).await
    }

    pub async fn revoke(&self, list: Signed<Revocations>) -> Result<Result<(), String>, Stopped> {
        self.ask(|tx| Command::Revoke(Box::new(list), tx)).await
    }

    /// Offers tasks to `peer`; the answers come one per offer.
    pub async fn offer(
        &self,
        peer: PeerId,
        req: OfferRequest,
    ) -> Result<Reply<OfferAnswers>, Stopped> {
        self.ask(|tx| Command::Offer(peer, Box::new(req), tx)).await
    }

    /// Reports tasks' ends to their submitter `peer`; the acknowledgements
    /// come one per report.
    pub async fn report(&self, peer: PeerId, reports: Reports) -> Result<Reply<Acks>, Stopped> {
        self.ask(|tx| Command::Report(peer, Box::new(reports), tx))
            .await
    }

    /// Tells the submitter `peer` that a task still runs.
    pub async fn progress(&self, peer: PeerId, p: Progress) -> Result<Reply<Ack>, Stopped> {
        self.ask(|tx| Command::Progress(peer, Box::new(p), tx))
            .await
    }

    /// Opens a raw stream of `protocol` to `peer` (blob ranges).
    pub async fn open_stream(
        &self,
        peer: PeerId,
        protocol: libp2p::StreamProtocol,
    ) -> Result<libp2p::Stream, libp2p_stream::OpenStreamError> {
        self.streams.clone().open_stream(peer, protocol).await
    }

    /// Inbound raw streams of `protocol`; `None` if something already
    /// takes them.
    pub fn accept_streams(
        &self,
        protocol: libp2p::StreamProtocol,
    ) -> Option<libp2p_stream::IncomingStreams> {
        self.streams.clone().accept(protocol).ok()
    }

    /// Keeps and gossips credits this node issued (in batches).
    pub async fn publish_credits(&self, credits: Vec<Signed<Credit>>) -> Result<(), Stopped> {
        self.commands
            .send(Command::PublishCredits(credits))
            .await
            .map_err(|_| Stopped)
    }

    /// Every institution's account, as this node's credits tell it.
    pub async fn credits(&self) -> Result<Vec<Balance>, Stopped> {
        self.ask(Command::Credits).await
    }

    /// One institution's balance in GPU seconds.
    pub fn balance(&self, institution: alliance_protocol::PublicKey) -> f64 {
        self.credits.balance(&institution, Timestamp::now())
    }

    /// The verified member behind `peer`, if connected.
    pub async fn member(&self, peer: PeerId) -> Result<Option<Member>, Stopped> {
        self.ask(|tx| Command::Member(peer, tx)).await
    }

    /// Drops and blocks a member that misbehaved.
    pub async fn punish(&self, peer: PeerId, reason: String) -> Result<(), Stopped> {
        self.commands
            .send(Command::Punish(peer, reason))
            .await
            .map_err(|_| Stopped)
    }

    /// `peer` left a `what` frame unfinished (`why`): see
    /// [`Command::Unfinished`].
    pub async fn unfinished(
        &self,
        peer: PeerId,
        what: &'static str,
        why: String,
    ) -> Result<(), Stopped> {
        self.commands
            .send(Command::Unfinished(peer, what, why))
            .await
            .map_err(|_| Stopped)
    }
}
