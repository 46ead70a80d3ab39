//! The node on the network: one libp2p swarm, owned by one actor.
//!
//! - [`Behaviour`]: identify, ping, Kademlia under the alliance's own
//!   protocol name, gossipsub (signed messages, strict validation), the
//!   membership exchange (request-response), connection and memory limits,
//!   a block list, and mDNS for labs on one LAN.
//! - [`actor`]: the [`EventLoop`](actor::EventLoop) that owns the swarm and
//!   the cloneable [`Client`](actor::Client) the rest of the node uses.
//! - [`codec`]: framed, size-capped request-response codecs.
//!
//! Membership gates everything: a peer enters Kademlia's routing table, the
//! advert table and the peers list only after its certificate chain for
//! this charter has been verified; a peer that fails (or stays silent) is
//! disconnected, blocked, and the reason logged.

pub mod actor;
pub mod codec;

use std::time::Duration;

use alliance_protocol::Hash;
use alliance_protocol::wire::Hello;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, allow_block_list, connection_limits, gossipsub, identify, kad, mdns,
    memory_connection_limits, ping, request_response,
};

/// The membership exchange protocol.
pub const MEMBERSHIP_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/membership/1");

/// The network behaviour of an alliance node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub memory: memory_connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub membership: request_response::Behaviour<codec::Codec<Hello, Hello>>,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
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

/// The Kademlia protocol of one alliance: two alliances (or an alliance and
/// IPFS) never share a DHT.
pub fn kad_protocol(alliance: &Hash) -> StreamProtocol {
    StreamProtocol::try_from_owned(format!("/alliance/{}/kad/1", alliance.short()))
        .unwrap_or(StreamProtocol::new("/alliance/kad/1"))
}

/// Gossip topic names of one alliance.
pub fn topic(alliance: &Hash, what: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("alliance/{}/{what}/1", alliance.short()))
}

/// A swarm for `identity` in the alliance `alliance`: TCP and QUIC, noise,
/// yamux, DNS, and the [`Behaviour`].
pub fn build_swarm(
    identity: &alliance_protocol::Identity,
    alliance: &Hash,
    mdns_on: bool,
) -> Result<libp2p::Swarm<Behaviour>, String> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(identity.to_libp2p_keypair())
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_quic()
        .with_dns()
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            Behaviour::new(key, alliance, Limits::default(), mdns_on)
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

impl Behaviour {
    /// The behaviour for `key`'s node in the alliance `alliance`.
    pub fn new(
        key: &libp2p::identity::Keypair,
        alliance: &Hash,
        limits: Limits,
        mdns_on: bool,
    ) -> Result<Self, String> {
        let peer = key.public().to_peer_id();
        let mut kad_config = kad::Config::new(kad_protocol(alliance));
        // Only peers whose membership was verified enter the routing table.
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kad =
            kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
        kad.set_mode(Some(kad::Mode::Server));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .heartbeat_interval(Duration::from_millis(500))
            .max_transmit_size(300 * 1024)
            .build()
            .map_err(|e| format!("gossipsub config: {e}"))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
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

        let conn = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(limits.max_established))
            .with_max_established_incoming(Some(limits.max_established_incoming))
            .with_max_pending_incoming(Some(limits.max_pending))
            .with_max_pending_outgoing(Some(limits.max_pending))
            .with_max_established_per_peer(Some(limits.max_per_peer));
        let mdns = if mdns_on {
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
            identify: identify::Behaviour::new(identify::Config::new(
                "/alliance/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
            membership: request_response::Behaviour::new(
                [(MEMBERSHIP_PROTOCOL, request_response::ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            ),
            kad,
            gossipsub,
            mdns: Toggle::from(mdns),
        })
    }
}
