//! The node on the network: one libp2p swarm, owned by one actor; the
//! protocol ids and topic names every part of it shares.
//!
//! - [`swarm`], construction and config: the [`Behaviour`] (identify,
//!   ping, Kademlia under the alliance's own protocol name, gossipsub with
//!   signed messages and strict validation, the membership exchange,
//!   AutoNAT, the relay client and, on bootstrap nodes, the relay server,
//!   DCUtR hole punching, connection and memory limits, a block list, mDNS
//!   for labs on one LAN) and [`build_swarm`] (TCP behind the alliance's
//!   pre-shared key when it has one, QUIC, noise, yamux, DNS, relayed
//!   circuits, byte counters on every connection).
//! - [`actor`]: the [`EventLoop`](actor::EventLoop) that owns the swarm and
//!   the cloneable [`Client`](actor::Client) the rest of the node uses; its
//!   files hold the handlers of each concern (admission, adverts,
//!   revocations, credits, requests, reachability).
//! - [`blobs`]: `/alliance/blob/2`, ranges of content-addressed blobs
//!   streamed between members.
//! - [`codec`]: framed, size-capped request-response codecs.
//!
//! Membership gates everything: a peer enters Kademlia's routing table, the
//! advert table, the peers list and the set of AutoNAT servers only after
//! its certificate chain for this charter has been verified; a peer that
//! fails (or stays silent) is disconnected, blocked, and the reason logged.

pub mod actor;
pub mod blobs;
pub mod codec;
pub mod swarm;

pub use swarm::{
    Behaviour, BehaviourEvent, Limits, Network, Options, build_swarm, build_swarm_with, gossip,
    metrics_text, read_psk, traffic, transport,
};

use alliance_protocol::Hash;
use libp2p::{StreamProtocol, gossipsub};

/// The membership exchange protocol.
pub const MEMBERSHIP_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/membership/1");

/// Task offers in batches, submitter to worker.
pub const TASK_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/task/3");

/// Task results and failures in batches, worker to submitter.
pub const RESULT_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/result/3");

/// Progress of running tasks, worker to submitter (renews the lease).
pub const PROGRESS_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/progress/1");

/// The advert table, paged from a member to a node that joins.
pub const ADVERTS_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/adverts/1");

/// Credits a node missed, paged from a member that holds them.
pub const CREDITS_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/credits/1");

/// Blob ranges, either way: one stream per range (see [`blobs`]).
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/alliance/blob/2");

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
