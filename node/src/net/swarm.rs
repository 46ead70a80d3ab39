//! The swarm and how it is built: the [`Behaviour`] with one field per
//! protocol, the transport (TCP behind the pre-shared key where there is
//! one, QUIC, noise, yamux, DNS, relayed circuits), gossipsub's settings,
//! and the traffic counters on every connection.

use std::time::Duration;

use alliance_protocol::Hash;
use alliance_protocol::wire::{
    Ack, Acks, AdvertsPage, AdvertsRequest, CreditsPage, CreditsRequest, Hello, OfferAnswers,
    OfferRequest, Progress, Reports,
};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OptionalTransport};
use libp2p::core::upgrade::Version;
use libp2p::metrics::Registry;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, Transport, allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify,
    kad, mdns, memory_connection_limits, noise, ping, quic, relay, request_response, tcp, yamux,
};

use super::codec;
use super::{
    ADVERTS_PROTOCOL, CREDITS_PROTOCOL, MEMBERSHIP_PROTOCOL, PROGRESS_PROTOCOL, RESULT_PROTOCOL,
    TASK_PROTOCOL, kad_protocol,
};

/// The network behaviour of an alliance node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub memory: memory_connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub membership: request_response::Behaviour<codec::Codec<Hello, Hello>>,
    pub credit_sync: request_response::Behaviour<codec::Codec<CreditsRequest, CreditsPage>>,
    pub advert_sync: request_response::Behaviour<codec::Codec<AdvertsRequest, AdvertsPage>>,
    pub tasks: request_response::Behaviour<codec::Codec<OfferRequest, OfferAnswers>>,
    pub results: request_response::Behaviour<codec::Codec<Reports, Acks>>,
    pub progress: request_response::Behaviour<codec::Codec<Progress, Ack>>,
    /// Raw streams: blob ranges.
    pub streams: libp2p_stream::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub autonat: autonat::Behaviour,
    pub relay_client: relay::client::Behaviour,
    pub relay: Toggle<relay::Behaviour>,
    pub dcutr: dcutr::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

/// Connection limits a node enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_established: u32,
    pub max_established_incoming: u32,
    pub max_pending: u32,
    pub max_per_peer: u32,
    /// Refuse new connections above this share of system memory.
    pub max_memory_fraction: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_established: 256,
            max_established_incoming: 192,
            max_pending: 64,
            max_per_peer: 2,
            max_memory_fraction: 0.9,
        }
    }
}

/// How a swarm is built.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Discover alliance nodes on the local network.
    pub mdns: bool,
    /// Run as a bootstrap node: Kademlia server mode at once, and a relay
    /// server for members that cannot be reached directly.
    pub bootstrap: bool,
    /// The alliance's pre-shared key: connections are only possible between
    /// nodes that hold the same key. QUIC cannot carry it, so a node with a
    /// key speaks TCP only.
    pub psk: Option<PreSharedKey>,
    pub limits: Limits,
    /// What a bootstrap node's relay allows.
    pub relay: crate::config::RelayLimits,
}

/// A built swarm and the registry of its traffic counters.
pub struct Network {
    pub swarm: libp2p::Swarm<Behaviour>,
    pub metrics: Registry,
    /// libp2p's own protocol metrics (connections, Kademlia, gossipsub,
    /// identify, ping, relay, DCUtR), registered in `metrics`; the actor
    /// records the swarm's events in it.
    pub protocols: libp2p::metrics::Metrics,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("peer", self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

/// Reads a pre-shared key file (the `/key/swarm/psk/1.0.0/` format that
/// `alliance charter psk` writes).
pub fn read_psk(text: &str) -> Result<PreSharedKey, String> {
    text.trim().parse::<PreSharedKey>().map_err(|e| {
        format!(
            "{e}; a key file has three lines: /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits"
        )
    })
}

type Transported = Boxed<(PeerId, StreamMuxerBox)>;

/// TCP (through the pre-shared key's handshake when there is one), noise
/// and yamux; QUIC beside it when there is no key.
pub fn transport(
    key: &libp2p::identity::Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Transported, noise::Error> {
    let tcp_config = tcp::Config::default().nodelay(true);
    let tcp = match psk {
        Some(psk) => tcp::tokio::Transport::new(tcp_config)
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp::tokio::Transport::new(tcp_config)
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    let quic = match psk {
        Some(_) => OptionalTransport::none(),
        None => OptionalTransport::some(quic::tokio::Transport::new(quic::Config::new(key))),
    };
    Ok(tcp
        .or_transport(quic)
        .map(|either, _| match either {
            futures::future::Either::Left(out) => out,
            futures::future::Either::Right((peer, muxer)) => (peer, StreamMuxerBox::new(muxer)),
        })
        .boxed())
}

/// The gossipsub behaviour of a node with `key`: messages signed by their
/// publisher and checked strictly (every copy, before duplicates are
/// dropped), each one held back until the node has validated its content,
/// and peer scoring on.
pub fn gossip(key: &libp2p::identity::Keypair) -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .heartbeat_interval(Duration::from_secs(1))
        .max_transmit_size(300 * 1024)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))?;
    let mut gossipsub =
        gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), config)
            .map_err(|e| format!("gossipsub: {e}"))?;
    // Many members of one lab can share a university NAT address, so
    // sharing an IP is not held against a peer.
    let score = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    gossipsub
        .with_peer_score(score, gossipsub::PeerScoreThresholds::default())
        .map_err(|e| format!("gossipsub scoring: {e}"))?;
    Ok(gossipsub)
}

/// A swarm for `identity` in the alliance `alliance`: the transports of
/// [`transport`], DNS, relayed circuits, traffic counters and the
/// [`Behaviour`].
pub fn build_swarm(
    identity: &alliance_protocol::Identity,
    alliance: &Hash,
    options: &Options,
) -> Result<Network, String> {
    build_swarm_with(identity, alliance, options, Registry::default())
}

/// [`build_swarm`], its traffic counters added to `metrics` (which holds
/// the node's own): the one registry `GET /metrics` renders.
pub fn build_swarm_with(
    identity: &alliance_protocol::Identity,
    alliance: &Hash,
    options: &Options,
    mut metrics: Registry,
) -> Result<Network, String> {
    let psk = options.psk;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.to_libp2p_keypair())
        .with_tokio()
        .with_other_transport(|key| {
            transport(key, psk)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
        })
        .map_err(|e| e.to_string())?
        .with_dns()
        .map_err(|e| e.to_string())?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| e.to_string())?
        .with_bandwidth_metrics(&mut metrics)
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, alliance, options, relay_client)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    let protocols = libp2p::metrics::Metrics::new(&mut metrics);
    Ok(Network {
        swarm,
        metrics,
        protocols,
    })
}

impl Behaviour {
    /// The behaviour for `key`'s node in the alliance `alliance`.
    pub fn new(
        key: &libp2p::identity::Keypair,
        alliance: &Hash,
        options: &Options,
        relay_client: relay::client::Behaviour,
    ) -> Result<Self, String> {
        let peer = key.public().to_peer_id();
        let limits = options.limits;
        let mut kad_config = kad::Config::new(kad_protocol(alliance));
        // Only peers whose membership was verified enter the routing table.
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        kad_config.set_query_timeout(Duration::from_secs(30));
        // A bootstrap walk dials many members, each connection to be
        // trimmed again a moment later; a node walks every 10 s anyway
        // while it holds few connections.
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(30 * 60)));
        let mut kad =
            kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
        // Bootstrap nodes answer queries from the start; members switch to
        // server mode once AutoNAT confirms that others can reach them.
        if options.bootstrap {
            kad.set_mode(Some(kad::Mode::Server));
        }

        let gossipsub = gossip(key)?;
        // One memory budget for the request frames of every peer.
        let budget = codec::Budget::default();

        // Probes go only to verified members (added by the actor), and
        // campus networks are private address space: a member on the same
        // campus network is a fair judge of reachability.
        let autonat = autonat::Behaviour::new(
            peer,
            autonat::Config {
                use_connected: false,
                only_global_ips: false,
                boot_delay: Duration::from_secs(5),
                retry_interval: Duration::from_secs(30),
                ..autonat::Config::default()
            },
        );
        let relay = options.bootstrap.then(|| {
            let r = options.relay;
            relay::Behaviour::new(
                peer,
                relay::Config {
                    max_reservations: r.max_reservations as usize,
                    max_circuits: r.max_circuits as usize,
                    max_circuit_duration: Duration::from_secs(r.max_circuit_secs),
                    max_circuit_bytes: r.max_circuit_bytes,
                    ..relay::Config::default()
                },
            )
        });

        let conn = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(limits.max_established))
            .with_max_established_incoming(Some(limits.max_established_incoming))
            .with_max_pending_incoming(Some(limits.max_pending))
            .with_max_pending_outgoing(Some(limits.max_pending))
            .with_max_established_per_peer(Some(limits.max_per_peer));
        let mdns = if options.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer)
                    .map_err(|e| format!("mDNS: {e}"))?,
            )
        } else {
            None
        };
        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(conn),
            memory: memory_connection_limits::Behaviour::with_max_percentage(
                limits.max_memory_fraction,
            ),
            // Pushing new listen addresses tells peers at once about a
            // relayed address, so the DHT offers it to others.
            identify: identify::Behaviour::new(
                identify::Config::new("/alliance/1".into(), key.public())
                    .with_push_listen_addr_updates(true),
            ),
            // Dead connections are closed when a ping goes unanswered
            // (see the actor), so a partition is noticed within 25 s.
            ping: ping::Behaviour::new(
                ping::Config::new()
                    .with_interval(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(15)),
            ),
            membership: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(MEMBERSHIP_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            ),
            credit_sync: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(CREDITS_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            advert_sync: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(ADVERTS_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            tasks: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(TASK_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            // A submitter fetches large outputs before it acknowledges.
            results: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(RESULT_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(600)),
            ),
            progress: request_response::Behaviour::with_codec(
                codec::Codec::new(budget.clone()),
                [(PROGRESS_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(30)),
            ),
            streams: libp2p_stream::Behaviour::new(),
            kad,
            gossipsub,
            autonat,
            relay_client,
            relay: Toggle::from(relay),
            dcutr: dcutr::Behaviour::new(peer),
            mdns: Toggle::from(mdns),
        })
    }
}

/// Bytes received and sent over every connection so far, from the traffic
/// counters in `metrics`.
pub fn traffic(metrics: &Registry) -> (u64, u64) {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, metrics).is_err() {
        return (0, 0);
    }
    let (mut inbound, mut outbound) = (0u64, 0u64);
    for line in text.lines() {
        if !line.starts_with("libp2p_bandwidth_bytes_total{") {
            continue;
        }
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let value = value as u64;
        if line.contains("direction=\"Inbound\"") {
            inbound += value;
        } else if line.contains("direction=\"Outbound\"") {
            outbound += value;
        }
    }
    (inbound, outbound)
}

/// The traffic counters as Prometheus text, for `GET /metrics`.
pub fn metrics_text(metrics: &Registry) -> String {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, metrics);
    text
}
