//! The network actor.
//!
//! - One [`EventLoop`] owns the [`Swarm`]; nothing else touches it.
//! - The rest of the node holds a cheap, cloneable [`Client`] whose methods
//!   send a [`Command`] with a `oneshot` for the answer.
//! - Membership: each new peer must present a chain for this charter within
//!   [`MEMBERSHIP_DEADLINE`]; until then it is in no table; on failure it is
//!   disconnected, blocked and the reason logged.
//! - Adverts: the node republishes its own signed advert on a timer, when
//!   its state changes and when a peer subscribes; received adverts are
//!   checked (chain, signature, publisher, expiry, sequence) before they
//!   enter the live table, and gossipsub penalises peers that forward bad ones.
//! - Reachability: verified members are the node's AutoNAT servers; a node
//!   that AutoNAT finds private, or that listens nowhere, reserves a relayed
//!   address on each bootstrap node it is connected to, and DCUtR turns
//!   relayed connections into direct ones where it can.
//! - The loop ends when every `Client` is dropped or shutdown is signalled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::credits::{Balance, Credits};
use alliance_protocol::advert::{GpuAdvert, GpuInfo, GpuState};
use alliance_protocol::cert::{
    Chain, Institution, Member, RevocationSet, Revocations, Roles, TrustedCharter,
};
use alliance_protocol::task::Credit;
use alliance_protocol::wire::{
    Ack, Acks, AdvertGossip, CreditGossip, CreditsPage, CreditsRequest, DeclineReason, Hello,
    MAX_GOSSIP_CREDITS, Message, OfferAnswers, OfferRequest, Progress, Reports, RevocationGossip,
};
use alliance_protocol::{Identity, Signed, Timestamp};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::Registry;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, kad, mdns, relay,
    request_response,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::codec::{Codec, Inbound as CodecInbound};

use super::{Behaviour, BehaviourEvent, Network};
use crate::store::Store;

/// How long a new peer has to present a valid chain.
pub const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(5);
/// Rejections remembered for the status page.
const MAX_REJECTED: usize = 256;
/// Verified advert chains remembered.
const MAX_CACHED_CHAINS: usize = 4096;
/// Revocation lists of not-yet-met institutions kept for later.
const MAX_DEFERRED_LISTS: usize = 64;
/// How long a rejected peer stays connected, so our answer reaches it.
const REJECT_GRACE: Duration = Duration::from_millis(300);

/// What the actor needs to start.
#[derive(Debug)]
pub struct Setup {
    pub identity: Arc<Identity>,
    pub charter: TrustedCharter,
    pub chain: Chain,
    pub member: Member,
    pub revocations: RevocationSet,
    pub bootstrap: Vec<Multiaddr>,
    pub store: Store,
    /// The GPUs this node lends (empty for a node without the work role).
    pub gpus: Vec<GpuInfo>,
    pub paused: bool,
    /// Where requests from members for the worker and the job scheduler
    /// go; `None` refuses them.
    pub inbound: Option<mpsc::Sender<Inbound>>,
}

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

/// An answer the node's parts produced, on its way back to the peer.
enum Answer {
    Offer(Option<OfferAnswers>, ResponseChannel<OfferAnswers>),
    Report(Option<Acks>, ResponseChannel<Acks>),
    Progress(Option<Ack>, ResponseChannel<Ack>),
}

/// Outcome of a request to a peer: its answer, or why there is none.
pub type Reply<T> = Result<T, String>;

/// The node's own status.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub peer_id: String,
    pub reason: String,
}

/// A verified, connected member.
#[derive(Debug, Clone, Serialize)]
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
#[derive(Debug, Clone, Serialize)]
pub struct AdvertView {
    pub peer_id: String,
    pub institution: String,
    pub local: bool,
    pub sequence: u64,
    /// When this node accepted the advert (or published it, if local),
    /// microseconds since the Unix epoch.
    pub received_at_us: u64,
    pub expires_at: String,
    pub gpus: Vec<GpuInfo>,
}

/// Requests to the actor.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    Metrics(oneshot::Sender<String>),
    Peers(oneshot::Sender<Vec<PeerView>>),
    Gpus(oneshot::Sender<Vec<AdvertView>>),
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
}

/// The handle the rest of the node uses.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    streams: libp2p_stream::Control,
    /// The credit totals the actor keeps, read here directly: a worker
    /// asks for a balance for every task that waits for its GPU.
    credits: Credits,
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
}

struct Advert {
    advert: GpuAdvert,
    member: Member,
    chain: Chain,
    received_at_us: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The actor: owns the swarm and all membership and advert state.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    metrics: Registry,
    commands: mpsc::Receiver<Command>,
    setup: Setup,
    adverts_topic: gossipsub::IdentTopic,
    credits_topic: gossipsub::IdentTopic,
    /// Every credit this node has checked: the alliance's accounts.
    credits: Credits,
    /// The member this node fetches the credits it missed from, while it
    /// does; and whether it has since starting.
    credit_sync: Option<PeerId>,
    credits_synced: bool,
    revocations_topic: gossipsub::IdentTopic,
    institutions: HashMap<alliance_protocol::PublicKey, Institution>,
    members: HashMap<PeerId, (Member, Chain)>,
    /// Open connections per peer, and whether each is relayed.
    connected: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// The address each peer was last reached at.
    reached_at: HashMap<PeerId, Multiaddr>,
    /// Relayed listeners, by the bootstrap node that relays them.
    relayed: HashMap<PeerId, ListenerId>,
    pending: HashMap<PeerId, Instant>,
    rejected: Vec<Rejection>,
    doomed: Vec<(PeerId, Instant, bool)>,
    identified: HashMap<PeerId, Vec<Multiaddr>>,
    adverts: HashMap<PeerId, Advert>,
    /// The signed revocation lists in force, to hand to members that lack them.
    signed_lists: HashMap<alliance_protocol::PublicKey, Signed<Revocations>>,
    /// Institution-signed lists whose institution this node has not met
    /// yet; applied when a member of it presents its certificate.
    deferred: Vec<Signed<Revocations>>,
    /// Chains of advert publishers already verified (against the current
    /// revocation lists), by the hashes of their two certificates.
    verified_chains: HashMap<(alliance_protocol::Hash, alliance_protocol::Hash), Member>,
    sequence: u64,
    publish_due: bool,
    last_publish: Instant,
    last_discovery: Instant,
    redial_backoff: Duration,
    last_redial: Instant,
    offers_out: HashMap<OutboundRequestId, oneshot::Sender<Reply<OfferAnswers>>>,
    reports_out: HashMap<OutboundRequestId, oneshot::Sender<Reply<Acks>>>,
    progress_out: HashMap<OutboundRequestId, oneshot::Sender<Reply<Ack>>>,
    answers: FuturesUnordered<BoxFuture<'static, Answer>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("peer", self.swarm.local_peer_id())
            .field("members", &self.members.len())
            .field("adverts", &self.adverts.len())
            .finish_non_exhaustive()
    }
}

/// Creates the actor and its client.
pub fn new(network: Network, setup: Setup) -> (Client, EventLoop) {
    let Network { swarm, metrics } = network;
    let streams = swarm.behaviour().streams.new_control();
    let (tx, rx) = mpsc::channel(64);
    let adverts_topic = super::topic(&setup.charter.id, "adverts");
    let credits_topic = super::topic(&setup.charter.id, "credits");
    let (credit_table, credit_issuers) = setup.store.credits();
    let credits = Credits::new(credit_table, credit_issuers);
    let revocations_topic = super::topic(&setup.charter.id, "revocations");
    let now = Instant::now();
    let sequence = Timestamp::now().as_secs().saturating_mul(1_000_000);
    let (in_force, deferred): (Vec<_>, Vec<_>) = setup
        .store
        .revocations()
        .iter()
        .filter_map(|b| Signed::<Revocations>::from_bytes(b).ok())
        .partition(|l| setup.revocations.sequence(&l.signer()).is_some());
    let signed_lists = in_force.into_iter().map(|l| (l.signer(), l)).collect();
    (
        Client {
            commands: tx,
            streams,
            credits: credits.clone(),
        },
        EventLoop {
            swarm,
            metrics,
            commands: rx,
            setup,
            adverts_topic,
            credits_topic,
            credits,
            credit_sync: None,
            credits_synced: false,
            revocations_topic,
            institutions: HashMap::new(),
            members: HashMap::new(),
            connected: HashMap::new(),
            reached_at: HashMap::new(),
            relayed: HashMap::new(),
            pending: HashMap::new(),
            rejected: Vec::new(),
            doomed: Vec::new(),
            identified: HashMap::new(),
            adverts: HashMap::new(),
            verified_chains: HashMap::new(),
            signed_lists,
            deferred,
            sequence,
            publish_due: true,
            last_publish: now,
            last_discovery: now,
            redial_backoff: Duration::from_secs(1),
            last_redial: now,
            offers_out: HashMap::new(),
            reports_out: HashMap::new(),
            progress_out: HashMap::new(),
            answers: FuturesUnordered::new(),
        },
    )
}

impl EventLoop {
    fn hello(&self) -> Hello {
        let revocations = self.setup.revocations.held();
        Hello {
            alliance: self.setup.charter.id,
            chain: self.setup.chain.clone(),
            revocations,
            lists: Vec::new(),
        }
    }

    /// The answer to `asked`: our hello, with the revocation lists it lacks.
    fn answer(&self, asked: &Hello) -> Hello {
        let held: HashMap<_, _> = asked.revocations.iter().copied().collect();
        let lists = self
            .signed_lists
            .iter()
            .filter(|(signer, _)| {
                let ours = self.setup.revocations.sequence(signer);
                held.get(*signer).is_none_or(|theirs| ours > Some(*theirs))
            })
            .map(|(_, l)| l.clone())
            .take(alliance_protocol::wire::MAX_HELLO_LISTS)
            .collect();
        Hello {
            lists,
            ..self.hello()
        }
    }

    /// Runs until every client is dropped or `shutdown` fires.
    pub async fn run(mut self, mut shutdown: oneshot::Receiver<()>) {
        let gs = &mut self.swarm.behaviour_mut().gossipsub;
        for t in [
            &self.adverts_topic,
            &self.revocations_topic,
            &self.credits_topic,
        ] {
            if let Err(e) = gs.subscribe(t) {
                warn!("cannot subscribe to {t}: {e}");
            }
        }
        self.redial();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
                Some(answer) = self.answers.next(), if !self.answers.is_empty() => self.on_answer(answer),
                _ = &mut shutdown => break,
            }
        }
        info!("network stopped");
    }

    fn redial(&mut self) {
        let mut targets: Vec<Multiaddr> = self.setup.bootstrap.clone();
        for (_, addrs) in self.setup.store.peers() {
            targets.extend(addrs);
        }
        for addr in targets {
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!("dial {addr}: {e}");
            }
        }
        self.last_redial = Instant::now();
    }

    /// Turns a peer away: out of every table and the gossip mesh at once;
    /// blocked and disconnected a moment later, so that the answer to its
    /// membership request (which tells it why) still reaches it.
    fn reject(&mut self, peer: PeerId, reason: String) {
        self.turn_away(peer, reason, true);
    }

    /// Like [`Self::reject`]; `block` false only disconnects, for peers
    /// that may simply have been slow (a busy bootstrap node must not lock
    /// out members that join all at once).
    fn turn_away(&mut self, peer: PeerId, reason: String, block: bool) {
        warn!(%peer, %reason, blocked = block, "peer rejected");
        let b = self.swarm.behaviour_mut();
        if block {
            b.gossipsub.blacklist_peer(&peer);
        }
        b.kad.remove_peer(&peer);
        b.autonat.remove_server(&peer);
        self.pending.remove(&peer);
        self.members.remove(&peer);
        self.adverts.remove(&peer);
        self.doomed
            .push((peer, Instant::now() + REJECT_GRACE, block));
        if self.rejected.len() >= MAX_REJECTED {
            self.rejected.remove(0);
        }
        self.rejected.push(Rejection {
            peer_id: peer.to_string(),
            reason,
        });
    }

    /// Checks a peer's hello: same alliance, valid chain, and the chain is
    /// the peer's own.
    fn check_hello(&mut self, peer: PeerId, hello: &Hello) -> Result<Member, String> {
        if hello.alliance != self.setup.charter.id {
            return Err(format!(
                "belongs to another alliance ({})",
                hello.alliance.short()
            ));
        }
        let now = Timestamp::now();
        let member = hello
            .chain
            .verify(
                &self.setup.charter,
                &self.setup.revocations,
                now,
                Roles::NONE,
            )
            .map_err(|e| e.to_string())?;
        if member.peer_id != peer {
            return Err(format!(
                "presented the certificate chain of another node ({})",
                member.peer_id
            ));
        }
        if let Ok(inst) = hello.chain.institution.verify_institution(
            &self.setup.charter,
            &self.setup.revocations,
            now,
        ) {
            let key = inst.cert.key;
            if self.institutions.insert(key, inst).is_none() {
                let (now_known, still): (Vec<_>, Vec<_>) =
                    self.deferred.drain(..).partition(|l| l.signer() == key);
                self.deferred = still;
                for list in now_known {
                    if let Err(e) = self.apply_revocations(&list) {
                        debug!("stored revocation list not applied: {e}");
                    }
                }
            }
        }
        Ok(member)
    }

    fn accept(&mut self, peer: PeerId, member: Member, chain: Chain) {
        if self.members.contains_key(&peer) {
            return;
        }
        self.pending.remove(&peer);
        info!(%peer, institution = %member.institution_name, roles = %member.roles, "member verified");
        self.members.insert(peer, (member, chain));
        if let Some(addrs) = self.identified.get(&peer).cloned() {
            self.remember(peer, &addrs);
        }
        let addr = self.reached_at.get(&peer).cloned();
        self.swarm.behaviour_mut().autonat.add_server(peer, addr);
        self.reserve_relays();
        if self.members.len() == 1 {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        self.publish_due = true;
        // The credits gossiped while this node was away: from the first
        // member it meets.
        if !self.credits_synced && self.credit_sync.is_none() {
            self.swarm
                .behaviour_mut()
                .credit_sync
                .send_request(&peer, CreditsRequest { after: None }.into());
            self.credit_sync = Some(peer);
        }
    }

    /// Pages of credits: served to members; fetched from one after start.
    fn on_credit_sync(
        &mut self,
        event: request_response::Event<CodecInbound<CreditsRequest>, CreditsPage>,
    ) {
        use request_response::{Event, Message as M};
        match event {
            Event::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let Some((_, request)) = self.gate(peer, "credits request", request) else {
                    return;
                };
                let page = self.credits.page(request.after);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .credit_sync
                    .send_response(channel, page);
            }
            Event::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => {
                let added = self.take_credits(&response);
                match response.next {
                    Some(after) if !response.credits.is_empty() => {
                        self.swarm
                            .behaviour_mut()
                            .credit_sync
                            .send_request(&peer, CreditsRequest { after: Some(after) }.into());
                    }
                    _ => {
                        self.credits_synced = true;
                        self.credit_sync = None;
                    }
                }
                if added > 0 {
                    info!(%peer, added, "credits this node missed, fetched");
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "credit sync failed; trying the next member met");
                self.credit_sync = None;
            }
            _ => {}
        }
    }

    /// Keeps the credits of a page that check out as gossiped ones must;
    /// how many were new.
    fn take_credits(&mut self, page: &CreditsPage) -> u32 {
        let now = Timestamp::now();
        let mut issuers = HashMap::new();
        for chain in &page.issuers {
            if let Ok(m) = self.chain_member(chain, Roles::SUBMIT, now) {
                issuers.insert(m.node_key, (m, chain.clone()));
            }
        }
        let mut added = 0u32;
        for signed in &page.credits {
            let Some((member, chain)) = issuers.get(&signed.signer()) else {
                continue;
            };
            if let Ok(true) = self.credits.add(signed, Some((member, chain))) {
                added += 1;
            }
        }
        added
    }

    /// Adds a verified peer's addresses to Kademlia and the peer store.
    fn remember(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        let usable: Vec<Multiaddr> = addrs
            .iter()
            .filter(|a| !is_unspecified(a))
            .cloned()
            .collect();
        for a in &usable {
            self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        if !usable.is_empty() {
            self.setup.store.save_peer(&peer, &usable);
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let relayed = endpoint.is_relayed();
                self.connected
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, relayed);
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !relayed
                {
                    self.reached_at.insert(peer_id, address.clone());
                }
                if num_established.get() == 1 && !self.members.contains_key(&peer_id) {
                    self.pending
                        .insert(peer_id, Instant::now() + MEMBERSHIP_DEADLINE);
                    let hello = self.hello();
                    self.swarm
                        .behaviour_mut()
                        .membership
                        .send_request(&peer_id, hello.into());
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(conns) = self.connected.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                }
                if num_established == 0 {
                    self.connected.remove(&peer_id);
                    self.pending.remove(&peer_id);
                    self.swarm.behaviour_mut().autonat.remove_server(&peer_id);
                    if let Some(listener) = self.relayed.remove(&peer_id) {
                        self.swarm.remove_listener(listener);
                    }
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                self.relayed.retain(|relay, l| {
                    if *l == listener_id {
                        info!(%relay, ?reason, "relayed address closed");
                    }
                    *l != listener_id
                });
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(%send_back_addr, %error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(autonat::Event::StatusChanged {
                old,
                new,
            })) => {
                info!(?old, ?new, "reachability changed");
                self.reserve_relays();
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(event)) => {
                debug!(?event, "reachability probe");
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(
                relay::client::Event::ReservationReqAccepted { relay_peer_id, .. },
            )) => {
                info!(relay = %relay_peer_id, "relayed address reserved");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(
                relay::Event::ReservationReqAccepted { src_peer_id, .. },
            )) => {
                debug!(peer = %src_peer_id, "relaying for a member");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one")
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Membership(e)) => self.on_membership(e),
            SwarmEvent::Behaviour(BehaviourEvent::CreditSync(e)) => self.on_credit_sync(e),
            SwarmEvent::Behaviour(BehaviourEvent::Tasks(e)) => self.on_service(
                e,
                "task offer",
                |b| &mut b.tasks,
                |me| &mut me.offers_out,
                |peer, member, request, reply| Inbound::Offer {
                    peer,
                    member,
                    request: Box::new(request),
                    reply,
                },
                Answer::Offer,
                |_: &OfferRequest| {
                    OfferRequest::decline_all(&DeclineReason::BadOffer(
                        "this node runs no worker".into(),
                    ))
                },
            ),
            SwarmEvent::Behaviour(BehaviourEvent::Results(e)) => self.on_service(
                e,
                "task report",
                |b| &mut b.results,
                |me| &mut me.reports_out,
                |peer, member, reports, reply| Inbound::Report {
                    peer,
                    member,
                    reports: Box::new(reports),
                    reply,
                },
                Answer::Report,
                |r: &Reports| r.refuse_all("this node has no jobs"),
            ),
            SwarmEvent::Behaviour(BehaviourEvent::Progress(e)) => self.on_service(
                e,
                "progress report",
                |b| &mut b.progress,
                |me| &mut me.progress_out,
                |peer, member, progress, reply| Inbound::Progress {
                    peer,
                    member,
                    progress: Box::new(progress),
                    reply,
                },
                Answer::Progress,
                |_: &Progress| Ack::Refused("this node has no jobs".into()),
            ),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if self.members.contains_key(&peer_id) {
                    self.remember(peer_id, &info.listen_addrs);
                }
                self.identified.insert(peer_id, info.listen_addrs);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            })) => {
                for p in ok.peers {
                    if p.peer_id != *self.swarm.local_peer_id()
                        && !self.connected.contains_key(&p.peer_id)
                    {
                        let opts = DialOpts::peer_id(p.peer_id).addresses(p.addrs).build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.connected.contains_key(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_membership(&mut self, event: request_response::Event<CodecInbound<Hello>, Hello>) {
        use request_response::{Event, Message as M, OutboundFailure};
        match event {
            Event::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let request = match request {
                    CodecInbound::Message(hello) => hello,
                    CodecInbound::Refused(why) => {
                        return self.reject(peer, format!("sent a bad membership request: {why}"));
                    }
                };
                let verdict = self.check_hello(peer, &request);
                let hello = self.answer(&request);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .membership
                    .send_response(channel, hello);
                match verdict {
                    Ok(member) => self.accept(peer, member, request.chain),
                    Err(reason) => self.reject(peer, reason),
                }
            }
            Event::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => {
                match self.check_hello(peer, &response) {
                    Ok(member) => self.accept(peer, member, response.chain),
                    Err(reason) => return self.reject(peer, reason),
                }
                // Lists we lacked, from a member: each is verified on its own.
                for list in &response.lists {
                    match self.apply_revocations(list) {
                        Ok(()) => {
                            info!(%peer, signer = %list.signer(), "newer revocation list received from a member")
                        }
                        Err(e) => {
                            debug!(%peer, "revocation list from a hello not applied: {e}");
                            if !self.institutions.contains_key(&list.signer())
                                && list.signer() != self.setup.charter.charter.root
                                && self.deferred.len() < MAX_DEFERRED_LISTS
                            {
                                self.deferred.push(list.clone());
                            }
                        }
                    }
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                if self.members.contains_key(&peer) {
                    return;
                }
                match error {
                    OutboundFailure::ConnectionClosed | OutboundFailure::DialFailure => {}
                    OutboundFailure::UnsupportedProtocols => {
                        self.reject(
                            peer,
                            "does not speak the alliance membership protocol".into(),
                        );
                    }
                    OutboundFailure::Timeout => {
                        self.turn_away(peer, "the membership exchange timed out".into(), false);
                    }
                    other => self.reject(peer, format!("membership exchange failed: {other}")),
                }
            }
            Event::InboundFailure { peer, error, .. } if !self.members.contains_key(&peer) => {
                self.reject(peer, format!("sent a bad membership request: {error}"));
            }
            _ => {}
        }
    }

    /// The member behind `peer` if it may use the job protocols; otherwise
    /// the peer is rejected (a refused frame or no verified membership).
    fn gate<T>(
        &mut self,
        peer: PeerId,
        what: &str,
        request: CodecInbound<T>,
    ) -> Option<(Member, T)> {
        match request {
            CodecInbound::Refused(why) => {
                self.reject(peer, format!("sent a bad {what}: {why}"));
                None
            }
            CodecInbound::Message(m) => match self.members.get(&peer) {
                Some((member, _)) => Some((member.clone(), m)),
                None => {
                    self.reject(peer, format!("sent a {what} before proving membership"));
                    None
                }
            },
        }
    }

    /// One of the job protocols: a request from a member goes to the part
    /// of the node that answers it (or is refused at once when there is
    /// none); an answer to our own request goes to whoever asked.
    #[allow(clippy::too_many_arguments)]
    fn on_service<Req, Resp>(
        &mut self,
        event: request_response::Event<CodecInbound<Req>, Resp>,
        what: &str,
        behaviour: fn(&mut Behaviour) -> &mut request_response::Behaviour<Codec<Req, Resp>>,
        waiting: fn(&mut Self) -> &mut HashMap<OutboundRequestId, oneshot::Sender<Reply<Resp>>>,
        inbound: fn(PeerId, Member, Req, oneshot::Sender<Resp>) -> Inbound,
        answer: fn(Option<Resp>, ResponseChannel<Resp>) -> Answer,
        refusal: fn(&Req) -> Resp,
    ) where
        Req: alliance_protocol::wire::Message + Send + Sync + 'static,
        Resp: alliance_protocol::wire::Message + Send + Sync + 'static,
    {
        use request_response::{Event, Message as M};
        match event {
            Event::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let Some((member, request)) = self.gate(peer, what, request) else {
                    return;
                };
                // A place in the queue first: the refusal is built only
                // when there is none.
                match self.setup.inbound.as_ref().map(mpsc::Sender::try_reserve) {
                    Some(Ok(permit)) => {
                        let (reply, rx) = oneshot::channel();
                        permit.send(inbound(peer, member, request, reply));
                        self.answers
                            .push(Box::pin(async move { answer(rx.await.ok(), channel) }));
                    }
                    _ => {
                        let refused = refusal(&request);
                        let _ =
                            behaviour(self.swarm.behaviour_mut()).send_response(channel, refused);
                    }
                }
            }
            Event::Message {
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(tx) = waiting(self).remove(&request_id) {
                    let _ = tx.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(tx) = waiting(self).remove(&request_id) {
                    let _ = tx.send(Err(error.to_string()));
                }
            }
            _ => {}
        }
    }

    fn on_answer(&mut self, answer: Answer) {
        let b = self.swarm.behaviour_mut();
        match answer {
            Answer::Offer(Some(a), ch) => {
                let _ = b.tasks.send_response(ch, a);
            }
            Answer::Report(Some(a), ch) => {
                let _ = b.results.send_response(ch, a);
            }
            Answer::Progress(Some(a), ch) => {
                let _ = b.progress.send_response(ch, a);
            }
            // The part that should answer gave up: the peer sees the
            // stream close.
            Answer::Offer(None, _) | Answer::Report(None, _) | Answer::Progress(None, _) => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = if message.topic == self.adverts_topic.hash() {
                    self.on_advert(message.source, &message.data)
                } else if message.topic == self.revocations_topic.hash() {
                    self.on_revocations(&message.data)
                } else if message.topic == self.credits_topic.hash() {
                    self.on_credit(message.source, &message.data)
                } else {
                    gossipsub::MessageAcceptance::Reject
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            gossipsub::Event::Subscribed { topic, .. } if topic == self.adverts_topic.hash() => {
                self.publish_due = true;
            }
            _ => {}
        }
    }

    /// The member behind `chain`, checked once and then cached.
    fn chain_member(
        &mut self,
        chain: &Chain,
        role: Roles,
        now: Timestamp,
    ) -> Result<Member, String> {
        let key = (chain.institution.payload_hash(), chain.node.payload_hash());
        if let Some(m) = self.verified_chains.get(&key)
            && m.valid_until > now
            && m.roles.contains(role)
        {
            return Ok(m.clone());
        }
        let m = chain
            .verify(&self.setup.charter, &self.setup.revocations, now, role)
            .map_err(|e| e.to_string())?;
        if self.verified_chains.len() >= MAX_CACHED_CHAINS {
            self.verified_chains.clear();
        }
        self.verified_chains.insert(key, m.clone());
        Ok(m)
    }

    /// A credit from the gossip: signed by a submitting member for its own
    /// institution, kept once.
    fn on_credit(&mut self, source: Option<PeerId>, data: &[u8]) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let now = Timestamp::now();
        let checked = (|| {
            let g = CreditGossip::decode(data).map_err(|e| e.to_string())?;
            if g.credits.is_empty() || g.credits.len() > MAX_GOSSIP_CREDITS {
                return Err(format!("{} credits in one message", g.credits.len()));
            }
            let member = self.chain_member(&g.chain, Roles::SUBMIT, now)?;
            if source != Some(member.peer_id) {
                return Err(format!(
                    "published by {source:?} with the chain of {}",
                    member.peer_id
                ));
            }
            let mut new = false;
            for signed in &g.credits {
                new |= self
                    .credits
                    .add(signed, Some((&member, &g.chain)))
                    .map_err(|e| e.to_string())?;
            }
            Ok(new)
        })();
        match checked {
            Ok(true) => A::Accept,
            Ok(false) => A::Ignore,
            Err(why) => {
                debug!(?source, %why, "credit refused");
                A::Reject
            }
        }
    }

    /// Institution names this node knows, by key.
    fn institution_names(&self) -> HashMap<alliance_protocol::PublicKey, String> {
        let mut names: HashMap<_, _> = self
            .verified_chains
            .values()
            .chain(self.members.values().map(|(m, _)| m))
            .map(|m| (m.institution_key, m.institution_name.clone()))
            .collect();
        names.insert(
            self.setup.member.institution_key,
            self.setup.member.institution_name.clone(),
        );
        names
    }

    fn on_advert(&mut self, source: Option<PeerId>, data: &[u8]) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let now = Timestamp::now();
        let checked = (|| {
            let g = AdvertGossip::decode(data).map_err(|e| (A::Reject, e.to_string()))?;
            let member = self
                .chain_member(&g.chain, Roles::WORK, now)
                .map_err(|e| (A::Reject, e))?;
            if source != Some(member.peer_id) {
                return Err((
                    A::Reject,
                    format!(
                        "published by {source:?} with the chain of {}",
                        member.peer_id
                    ),
                ));
            }
            let advert = g.advert.verify().map_err(|e| (A::Reject, e.to_string()))?;
            if advert.peer != member.node_key || advert.institution != member.institution_key {
                return Err((
                    A::Reject,
                    "the advert names another node or institution than its chain".into(),
                ));
            }
            let held = self.adverts.get(&member.peer_id).map(|a| a.advert.sequence);
            advert
                .check(g.advert.signer(), now, held)
                .map_err(|e| match e {
                    alliance_protocol::advert::AdvertError::Stale { .. } => {
                        (A::Ignore, e.to_string())
                    }
                    other => (A::Reject, other.to_string()),
                })?;
            Ok((member, g.chain, advert))
        })();
        match checked {
            Ok((member, chain, advert)) => {
                debug!(peer = %member.peer_id, sequence = advert.sequence, "advert accepted");
                self.adverts.insert(
                    member.peer_id,
                    Advert {
                        advert,
                        member,
                        chain,
                        received_at_us: now_us(),
                    },
                );
                A::Accept
            }
            Err((acceptance, reason)) => {
                if acceptance == A::Reject {
                    warn!(?source, %reason, "advert refused");
                }
                acceptance
            }
        }
    }

    fn on_revocations(&mut self, data: &[u8]) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let Ok(g) = RevocationGossip::decode(data) else {
            return A::Reject;
        };
        match self.apply_revocations(&g.list) {
            Ok(()) => A::Accept,
            Err(reason) if reason.contains("not newer") => A::Ignore,
            Err(reason) => {
                warn!(%reason, "revocation list refused");
                A::Reject
            }
        }
    }

    /// Verifies and applies a revocation list, persists it, and drops every
    /// member and advert it revokes.
    fn apply_revocations(&mut self, list: &Signed<Revocations>) -> Result<(), String> {
        let inst = self.institutions.get(&list.signer()).cloned();
        self.setup
            .revocations
            .insert(list, inst.as_ref())
            .map_err(|e| e.to_string())?;
        self.verified_chains.clear();
        self.setup
            .store
            .save_revocations(&list.signer(), &list.to_bytes());
        self.signed_lists.insert(list.signer(), list.clone());
        let now = Timestamp::now();
        let revoked: Vec<(PeerId, String)> = self
            .members
            .iter()
            .filter_map(|(peer, (_, chain))| {
                chain
                    .verify(
                        &self.setup.charter,
                        &self.setup.revocations,
                        now,
                        Roles::NONE,
                    )
                    .err()
                    .map(|e| (*peer, e.to_string()))
            })
            .collect();
        for (peer, reason) in revoked {
            self.reject(peer, reason);
        }
        let charter = &self.setup.charter;
        let revocations = &self.setup.revocations;
        self.adverts.retain(|_, a| {
            a.chain
                .verify(charter, revocations, now, Roles::WORK)
                .is_ok()
        });
        info!(signer = %list.signer(), "revocation list applied");
        Ok(())
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.doomed.drain(..).partition(|(_, at, _)| *at <= now);
        self.doomed = later;
        for (peer, _, block) in due {
            if block {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let late: Vec<PeerId> = self
            .pending
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            let reason = format!("presented no certificate chain within {MEMBERSHIP_DEADLINE:?}");
            self.turn_away(peer, reason, false);
        }
        let wall = Timestamp::now();
        let expired: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, (m, _))| m.valid_until <= wall)
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            self.reject(peer, "its certificate chain expired".into());
        }
        self.adverts.retain(|_, a| a.advert.expires_at > wall);

        let ttl = u64::from(self.setup.charter.charter.defaults.advert_ttl_secs.max(4));
        let republish = Duration::from_secs(ttl / 4);
        if (self.publish_due && now.duration_since(self.last_publish) >= Duration::from_secs(1))
            || now.duration_since(self.last_publish) >= republish
        {
            self.publish_advert();
        }
        if now.duration_since(self.last_discovery) >= Duration::from_secs(10) {
            self.last_discovery = now;
            self.reserve_relays();
            if !self.members.is_empty() {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .get_closest_peers(PeerId::random());
            }
        }
        if self.connected.is_empty() && now.duration_since(self.last_redial) >= self.redial_backoff
        {
            self.redial_backoff = (self.redial_backoff * 2).min(Duration::from_secs(60));
            self.redial();
        } else if !self.connected.is_empty() {
            self.redial_backoff = Duration::from_secs(1);
        }
    }

    fn publish_advert(&mut self) {
        self.publish_due = false;
        self.last_publish = Instant::now();
        if self.setup.gpus.is_empty() {
            return;
        }
        self.sequence += 1;
        let now = Timestamp::now();
        let ttl = u64::from(self.setup.charter.charter.defaults.advert_ttl_secs);
        // The worker keeps each GPU's state; a node paused as a whole
        // shows every GPU paused.
        let gpus = self
            .setup
            .gpus
            .iter()
            .map(|g| {
                if self.setup.paused {
                    GpuInfo {
                        state: GpuState::Paused,
                        reason: "paused by its owner".into(),
                        free_slots: 0,
                        ..g.clone()
                    }
                } else {
                    g.clone()
                }
            })
            .collect();
        let advert = GpuAdvert {
            peer: self.setup.member.node_key,
            institution: self.setup.member.institution_key,
            gpus,
            sequence: self.sequence,
            issued_at: now,
            expires_at: now.saturating_add_secs(ttl),
        };
        let signed = match Signed::sign(&advert, &self.setup.identity) {
            Ok(s) => s,
            Err(e) => return warn!("cannot sign the advert: {e}"),
        };
        let gossip = AdvertGossip {
            chain: self.setup.chain.clone(),
            advert: signed,
        };
        match gossip.encode() {
            Ok(bytes) => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.adverts_topic.clone(), bytes)
                {
                    debug!("advert not published yet: {e}");
                }
            }
            Err(e) => warn!("advert too large: {e}"),
        }
        let me = *self.swarm.local_peer_id();
        self.adverts.insert(
            me,
            Advert {
                advert,
                member: self.setup.member.clone(),
                chain: self.setup.chain.clone(),
                received_at_us: now_us(),
            },
        );
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Status(tx) => {
                let _ = tx.send(self.status());
            }
            Command::Metrics(tx) => {
                let _ = tx.send(super::metrics_text(&self.metrics));
            }
            Command::Peers(tx) => {
                let mut peers: Vec<PeerView> = self
                    .members
                    .iter()
                    .filter(|(p, _)| self.connected.contains_key(p))
                    .map(|(p, (m, _))| PeerView {
                        peer_id: p.to_string(),
                        institution: m.institution_name.clone(),
                        roles: m.roles.to_string(),
                        addresses: self
                            .identified
                            .get(p)
                            .map(|a| a.iter().map(ToString::to_string).collect())
                            .unwrap_or_default(),
                        direct: self
                            .connected
                            .get(p)
                            .is_some_and(|c| c.values().any(|relayed| !relayed)),
                        valid_until: m.valid_until.to_string(),
                    })
                    .collect();
                peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = tx.send(peers);
            }
            Command::Gpus(tx) => {
                let me = *self.swarm.local_peer_id();
                let mut list: Vec<AdvertView> = self
                    .adverts
                    .iter()
                    .map(|(p, a)| AdvertView {
                        peer_id: p.to_string(),
                        institution: a.member.institution_name.clone(),
                        local: *p == me,
                        sequence: a.advert.sequence,
                        received_at_us: a.received_at_us,
                        expires_at: a.advert.expires_at.to_string(),
                        gpus: a.advert.gpus.clone(),
                    })
                    .collect();
                list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = tx.send(list);
            }
            Command::SetPaused(paused, tx) => {
                if self.setup.paused != paused {
                    self.setup.paused = paused;
                    self.publish_advert();
                }
                let _ = tx.send(());
            }
            Command::SetGpus(gpus, tx) => {
                if self.setup.gpus != gpus {
                    self.setup.gpus = gpus;
                    self.publish_advert();
                }
                let _ = tx.send(());
            }
            Command::Offer(peer, req, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .tasks
                    .send_request(&peer, (*req).into());
                self.offers_out.insert(id, tx);
            }
            Command::Report(peer, reports, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .results
                    .send_request(&peer, (*reports).into());
                self.reports_out.insert(id, tx);
            }
            Command::Progress(peer, p, tx) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .progress
                    .send_request(&peer, (*p).into());
                self.progress_out.insert(id, tx);
            }
            Command::PublishCredits(credits) => {
                let own = (&self.setup.member, &self.setup.chain);
                for c in &credits {
                    if let Err(e) = self.credits.add_own(c, &self.setup.identity, own) {
                        warn!("cannot keep a credit this node issued: {e}");
                    }
                }
                for batch in credits.chunks(MAX_GOSSIP_CREDITS) {
                    let gossip = CreditGossip {
                        chain: self.setup.chain.clone(),
                        credits: batch.to_vec(),
                    };
                    if let Ok(bytes) = gossip.encode()
                        && let Err(e) = self
                            .swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(self.credits_topic.clone(), bytes)
                    {
                        debug!("credits not gossiped now: {e}");
                    }
                }
            }
            Command::Credits(tx) => {
                let _ = tx.send(
                    self.credits
                        .table(&self.institution_names(), Timestamp::now()),
                );
            }
            Command::Member(peer, tx) => {
                let member = self
                    .members
                    .get(&peer)
                    .filter(|_| self.connected.contains_key(&peer))
                    .map(|(m, _)| m.clone());
                let _ = tx.send(member);
            }
            Command::Punish(peer, reason) => self.reject(peer, reason),
            Command::Revoke(list, tx) => {
                let result = self.apply_revocations(&list);
                if result.is_ok() {
                    let gossip = RevocationGossip { list: *list };
                    if let Ok(bytes) = gossip.encode()
                        && let Err(e) = self
                            .swarm
                            .behaviour_mut()
                            .gossipsub
                            .publish(self.revocations_topic.clone(), bytes)
                    {
                        warn!("revocation list not gossiped: {e}");
                    }
                }
                let _ = tx.send(result);
            }
        }
    }

    fn status(&self) -> Status {
        let m = &self.setup.member;
        let (bytes_in, bytes_out) = super::traffic(&self.metrics);
        Status {
            peer_id: self.swarm.local_peer_id().to_string(),
            alliance: self.setup.charter.charter.name.clone(),
            alliance_id: self.setup.charter.id.to_string(),
            institution: m.institution_name.clone(),
            roles: m.roles.to_string(),
            listen_addrs: self.swarm.listeners().map(ToString::to_string).collect(),
            external_addrs: self
                .swarm
                .external_addresses()
                .map(ToString::to_string)
                .collect(),
            nat: self.nat(),
            relayed_via: self.relayed.keys().map(ToString::to_string).collect(),
            connected_peers: self.connected.len(),
            bytes_in,
            bytes_out,
            members: self
                .members
                .keys()
                .filter(|p| self.connected.contains_key(p))
                .count(),
            paused: self.setup.paused
                || (!self.setup.gpus.is_empty()
                    && self.setup.gpus.iter().all(|g| g.state == GpuState::Paused)),
            rejected: self.rejected.clone(),
            revocation_lists: self
                .setup
                .revocations
                .held()
                .into_iter()
                .map(|(k, seq)| (k.to_string(), seq))
                .collect(),
        }
    }
}

impl EventLoop {
    fn nat(&self) -> String {
        let autonat = &self.swarm.behaviour().autonat;
        let confidence = autonat.confidence();
        match autonat.nat_status() {
            autonat::NatStatus::Public(addr) => {
                format!("public at {addr} ({} agreeing probes)", confidence + 1)
            }
            autonat::NatStatus::Private => {
                format!("private ({} agreeing probes)", confidence + 1)
            }
            autonat::NatStatus::Unknown => "unknown (not probed yet)".into(),
        }
    }

    /// Whether others may be unable to dial this node: AutoNAT found it
    /// private, or it listens on no direct address at all.
    fn needs_relay(&self) -> bool {
        let private = matches!(
            self.swarm.behaviour().autonat.nat_status(),
            autonat::NatStatus::Private
        );
        let listens = self.swarm.listeners().any(|a| !is_relayed(a));
        private || !listens
    }

    /// Reserves a relayed address on each connected bootstrap node when
    /// this node needs one, and gives them up when it no longer does.
    fn reserve_relays(&mut self) {
        if self.swarm.behaviour().relay.is_enabled() {
            return;
        }
        if !self.needs_relay() {
            for (_, listener) in self.relayed.drain() {
                self.swarm.remove_listener(listener);
            }
            return;
        }
        let relays: Vec<(PeerId, Multiaddr)> = self
            .members
            .iter()
            .filter(|(p, (m, _))| {
                m.roles.contains(Roles::BOOTSTRAP)
                    && !self.relayed.contains_key(p)
                    && self
                        .connected
                        .get(p)
                        .is_some_and(|c| c.values().any(|relayed| !relayed))
            })
            .filter_map(|(p, _)| {
                let addr = self.reached_at.get(p).cloned().or_else(|| {
                    self.identified.get(p).and_then(|a| {
                        a.iter()
                            .find(|a| !is_unspecified(a) && !is_relayed(a))
                            .cloned()
                    })
                })?;
                Some((*p, addr))
            })
            .collect();
        for (relay, addr) in relays {
            let Ok(addr) = addr.with_p2p(relay) else {
                continue;
            };
            let circuit = addr.with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(listener) => {
                    info!(%relay, "asking for a relayed address");
                    self.relayed.insert(relay, listener);
                }
                Err(e) => warn!(%circuit, "cannot listen through the relay: {e}"),
            }
        }
    }
}

fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
