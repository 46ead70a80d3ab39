//! The network actor: one [`EventLoop`] owns the swarm and every table the
//! network keeps; it dispatches swarm events, commands and ticks to the
//! handlers of each concern.
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
//!
//! - [`client`]: the [`Client`] handle, its commands and the views it
//!   returns.
//! - [`admission`]: connections, the membership exchange, turning peers
//!   away.
//! - [`adverts`]: publishing this node's advert and checking others'.
//! - [`revocations`]: revocation lists received and applied.
//! - [`credits`]: credits gossiped and fetched after a restart.
//! - [`requests`]: task offers, reports and progress between members, and
//!   the answers the node's parts send back.
//! - [`reach`]: dialling, AutoNAT, relayed addresses.

mod admission;
mod adverts;
mod client;
mod credits;
mod degree;
mod reach;
mod requests;
mod revocations;

use adverts::Advert;
pub use adverts::now_us;
pub use client::{
    AdvertView, Client, Command, Gpu, GpuStateName, Inbound, PeerView, Rejection, Reply, Status,
    Stopped,
};
use requests::Answer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::trust::credits::Credits;
use alliance_protocol::advert::{GpuInfo, GpuState};
use alliance_protocol::cert::{
    Chain, Institution, Member, RevocationSet, Revocations, TrustedCharter,
};
use alliance_protocol::wire::{
    Ack, Acks, CreditGossip, MAX_GOSSIP_CREDITS, Message, OfferAnswers, RevocationGossip,
};
use alliance_protocol::{Identity, Signed, Timestamp};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::Registry;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::Blocked;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, kad, mdns, relay};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::net::{Behaviour, BehaviourEvent, Network};
use crate::store::Store;

/// How long a new peer has to present a valid chain.
pub const MEMBERSHIP_DEADLINE: Duration = Duration::from_secs(5);

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

/// Longest wait between redials of a node that lost every connection. A
/// link that failed for a minute is back within this of healing (the
/// partition test measures it); a dial of the bootstrap and remembered
/// peers this often costs nothing worth saving.
const MAX_REDIAL_BACKOFF: Duration = Duration::from_secs(15);

/// The actor: owns the swarm and all membership and advert state.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    metrics: Registry,
    protocols: libp2p::metrics::Metrics,
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
    /// The member this node fetches the advert table from, while it does;
    /// how many adverts it has had so far; and whether it has since it
    /// started or last lost every connection.
    advert_sync: Option<PeerId>,
    advert_skip: usize,
    adverts_synced: bool,
    /// Whether this node's latest advert went out to at least one peer:
    /// until it has, a new subscriber to the adverts makes the node
    /// publish it again. Once one member holds it, gossip carries it to
    /// the rest.
    advert_out: bool,
    /// The lifetime of the advert this node published last, seconds: it
    /// is refreshed every quarter of that. Worked out again from the
    /// table as it is now, a lifetime set while the table was small would
    /// run out before the refresh once the table had grown.
    advert_ttl: u64,
    revocations_topic: gossipsub::IdentTopic,
    institutions: HashMap<alliance_protocol::PublicKey, Institution>,
    members: HashMap<PeerId, (Member, Chain)>,
    /// Open connections per peer, and whether each is relayed.
    connected: HashMap<PeerId, HashMap<ConnectionId, bool>>,
    /// The address each peer was last reached at.
    reached_at: HashMap<PeerId, Multiaddr>,
    /// Relayed listeners, by the bootstrap node that relays them.
    relayed: HashMap<PeerId, ListenerId>,
    /// Which peers relay, and which refused lately.
    relays: reach::Relays,
    /// Where the next round of dialling unconnected advertisers starts.
    advertiser_turn: usize,
    /// Which connections to keep once there are too many, and where to
    /// dial the peers this node is not connected to.
    degree: degree::Degree,
    pending: HashMap<PeerId, Instant>,
    rejected: Vec<Rejection>,
    /// Unfinished request frames per peer since it was last blocked: the
    /// third gets it blocked.
    strikes: HashMap<PeerId, u32>,
    /// Peers turned away, by whether they were blocked.
    turned_away: Family<Blocked, Counter>,
    doomed: Vec<(PeerId, Instant, bool)>,
    /// Peers whose relayed connections close at the instant given, now
    /// that a direct one is up.
    retiring: Vec<(PeerId, Instant)>,
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
    let Network {
        swarm,
        mut metrics,
        protocols,
    } = network;
    let turned_away = Family::<Blocked, Counter>::default();
    metrics.register(
        "alliance_peers_turned_away",
        "Peers turned away (failed membership, a bad, unfinished or stalled frame); blocked or only disconnected",
        turned_away.clone(),
    );
    let streams = swarm.behaviour().streams.new_control();
    let (tx, rx) = mpsc::channel(64);
    let adverts_topic = crate::net::topic(&setup.charter.id, "adverts");
    let credits_topic = crate::net::topic(&setup.charter.id, "credits");
    let (credit_table, credit_issuers) = setup.store.credits();
    let credits = Credits::new(credit_table, credit_issuers);
    let revocations_topic = crate::net::topic(&setup.charter.id, "revocations");
    let advert_ttl = u64::from(setup.charter.charter.defaults.advert_ttl_secs);
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
            protocols,
            commands: rx,
            setup,
            adverts_topic,
            credits_topic,
            credits,
            credit_sync: None,
            credits_synced: false,
            advert_sync: None,
            advert_skip: 0,
            adverts_synced: false,
            advert_out: false,
            advert_ttl,
            revocations_topic,
            institutions: HashMap::new(),
            members: HashMap::new(),
            connected: HashMap::new(),
            reached_at: HashMap::new(),
            relayed: HashMap::new(),
            relays: reach::Relays::default(),
            advertiser_turn: 0,
            pending: HashMap::new(),
            rejected: Vec::new(),
            strikes: HashMap::new(),
            turned_away,
            doomed: Vec::new(),
            retiring: Vec::new(),
            identified: HashMap::new(),
            degree: degree::Degree::default(),
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

    /// Counts the event in libp2p's protocol metrics.
    fn record(&self, event: &SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.protocols.record(event);
        if let SwarmEvent::Behaviour(event) = event {
            match event {
                BehaviourEvent::Kad(e) => self.protocols.record(e),
                BehaviourEvent::Gossipsub(e) => self.protocols.record(e),
                BehaviourEvent::Identify(e) => self.protocols.record(e),
                BehaviourEvent::Ping(e) => self.protocols.record(e),
                BehaviourEvent::Relay(e) => self.protocols.record(e),
                BehaviourEvent::Dcutr(e) => self.protocols.record(e),
                _ => {}
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.record(&event);
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            SwarmEvent::NewListenAddr { address, .. } => info!(%address, "listening"),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint, num_established.get()),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.on_disconnected(peer_id, connection_id, num_established),
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                let closed = self
                    .relayed
                    .iter()
                    .find(|(_, l)| **l == listener_id)
                    .map(|(relay, _)| *relay);
                if let Some(relay) = closed {
                    self.relayed.remove(&relay);
                    let wait = self.relays.refused(relay, Instant::now());
                    info!(%relay, ?reason, retry_in_s = wait.as_secs(), "relayed address closed");
                }
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
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                info!(?old, ?new, "reachability changed");
                self.reserve_relays();
            }
            BehaviourEvent::Autonat(event) => {
                debug!(?event, "reachability probe");
            }
            BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                ..
            }) => {
                self.relays.reserved(relay_peer_id);
                info!(relay = %relay_peer_id, "relayed address reserved");
            }
            BehaviourEvent::Relay(relay::Event::ReservationReqAccepted { src_peer_id, .. }) => {
                debug!(peer = %src_peer_id, "relaying for a member");
            }
            // A connection that stops answering pings is dead even where
            // its transport does not notice (a link that drops packets
            // leaves TCP waiting for many minutes): closing it lets the
            // node redial, or reach the peer through a relay.
            // libp2p reports the second failure in a row: the ping timed
            // out, or a new ping stream could not even be negotiated.
            BehaviourEvent::Ping(libp2p::ping::Event {
                peer,
                connection,
                result: Err(failure),
            }) if !matches!(failure, libp2p::ping::Failure::Unsupported) => {
                info!(%peer, %failure, "a connection stopped answering pings; closing it");
                self.swarm.close_connection(connection);
            }
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    info!(peer = %remote_peer_id, "relayed connection upgraded to a direct one")
                }
                Err(e) => {
                    info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying relayed")
                }
            },
            BehaviourEvent::Membership(e) => self.on_membership(e),
            BehaviourEvent::CreditSync(e) => self.on_credit_sync(e),
            BehaviourEvent::AdvertSync(e) => self.on_advert_sync(e),
            BehaviourEvent::Tasks(e) => self.on_offers(e),
            BehaviourEvent::Results(e) => self.on_reports(e),
            BehaviourEvent::Progress(e) => self.on_progress(e),
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if self.members.contains_key(&peer_id) {
                    self.remember(peer_id, &info.listen_addrs);
                }
                let new_relay = self.relays.identified(peer_id, &info);
                self.identified.insert(peer_id, info.listen_addrs);
                if new_relay {
                    self.reserve_relays();
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => self.dial_found(ok.peers.into_iter().map(|p| (p.peer_id, p.addrs))),
            BehaviourEvent::Gossipsub(e) => self.on_gossip(e),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                self.dial_found(found.into_iter().map(|(peer, addr)| (peer, vec![addr])))
            }
            _ => {}
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
            // An advert that reached no one yet (the node has just started,
            // or has been cut off) goes out to the first subscriber. Not
            // otherwise: every member takes in every publish, so a
            // republish for each new connection would cost the whole
            // alliance in proportion to its churn; a member that joins
            // fetches the table instead.
            gossipsub::Event::Subscribed { topic, .. }
                if topic == self.adverts_topic.hash() && !self.advert_out =>
            {
                self.publish_due = true;
            }
            _ => {}
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.retire_relayed(now);
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

        let republish = Duration::from_secs(self.advert_ttl / 4);
        if (self.publish_due && now.duration_since(self.last_publish) >= Duration::from_secs(1))
            || now.duration_since(self.last_publish) >= republish
        {
            self.publish_advert();
        }
        if now.duration_since(self.last_discovery) >= Duration::from_secs(10) {
            self.last_discovery = now;
            self.reserve_relays();
            self.dial_advertisers();
            // A walk while the node holds few connections, to find more;
            // past that Kademlia's own bootstrap walks every 30 minutes.
            if !self.members.is_empty() && self.connected.len() < reach::DIAL_ADVERTISERS_BELOW {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .get_closest_peers(PeerId::random());
            }
            self.trim_connections(now);
        }
        if self.connected.is_empty() && now.duration_since(self.last_redial) >= self.redial_backoff
        {
            self.redial_backoff = (self.redial_backoff * 2).min(MAX_REDIAL_BACKOFF);
            self.redial();
        } else if !self.connected.is_empty() {
            self.redial_backoff = Duration::from_secs(1);
        }
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
                let mut list: Vec<AdvertView> = self
                    .adverts
                    .iter()
                    .map(|(p, a)| self.advert_view(*p, a))
                    .collect();
                list.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
                let _ = tx.send(list);
            }
            Command::Advert(peer, tx) => {
                let _ = tx.send(self.adverts.get(&peer).map(|a| self.advert_view(peer, a)));
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
                self.degree.used(peer, Instant::now());
                let addrs = self.addresses_for(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .tasks
                    .send_request_with_addresses(&peer, (*req).into(), addrs);
                self.offers_out.insert(id, tx);
            }
            Command::Report(peer, reports, tx) => {
                self.degree.used(peer, Instant::now());
                let addrs = self.addresses_for(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .results
                    .send_request_with_addresses(&peer, (*reports).into(), addrs);
                self.reports_out.insert(id, tx);
            }
            Command::Progress(peer, p, tx) => {
                self.degree.used(peer, Instant::now());
                let addrs = self.addresses_for(&peer);
                let id = self
                    .swarm
                    .behaviour_mut()
                    .progress
                    .send_request_with_addresses(&peer, (*p).into(), addrs);
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
            Command::Unfinished(peer, what, why) => self.unfinished(peer, what, &why),
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
