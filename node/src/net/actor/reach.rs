//! Reachability: dialling the bootstrap nodes and remembered members,
//! AutoNAT's verdict, relayed addresses on bootstrap nodes while this node
//! cannot be reached directly.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, autonat, identify, relay};
use tracing::{debug, info, warn};

use super::EventLoop;

/// How long a relay that refused or dropped a reservation is left alone at
/// first; each refusal in a row doubles it, up to [`MAX_RELAY_BACKOFF`].
const RELAY_BACKOFF: Duration = Duration::from_secs(30);
const MAX_RELAY_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// Members [`EventLoop::dial_advertisers`] dials at most in one round: in a
/// large alliance a node holds connections to a part of the members only,
/// and their adverts must not make it dial every one of them each round.
const ADVERTISERS_A_ROUND: usize = 4;

/// [`EventLoop::dial_advertisers`] dials only while the node is connected
/// to fewer peers than this: it is there to find the far side of a
/// partition, not to connect every member to every other.
pub(super) const DIAL_ADVERTISERS_BELOW: usize = 8;

/// What this node knows of the relays it could reserve an address on.
#[derive(Debug, Default)]
pub(super) struct Relays {
    /// Peers whose identify lists the relay protocol: the only ones asked.
    serving: HashSet<PeerId>,
    /// Relays that refused or dropped a reservation: not asked again
    /// before the instant, and the wait after the next refusal.
    backoff: HashMap<PeerId, (Instant, Duration)>,
    /// Whether the node said it has no relay at hand (said once, until one
    /// takes it).
    said_none: bool,
}

impl Relays {
    /// What `peer`'s identify said it serves; true when it is a relay this
    /// node did not know of.
    pub(super) fn identified(&mut self, peer: PeerId, info: &identify::Info) -> bool {
        if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
            self.serving.insert(peer)
        } else {
            self.serving.remove(&peer);
            false
        }
    }

    fn may_ask(&self, peer: &PeerId, now: Instant) -> bool {
        self.serving.contains(peer)
            && self
                .backoff
                .get(peer)
                .is_none_or(|(until, _)| now >= *until)
    }

    /// `relay` refused a reservation or closed one: wait before asking again.
    pub(super) fn refused(&mut self, relay: PeerId, now: Instant) -> Duration {
        let wait = self
            .backoff
            .get(&relay)
            .map_or(RELAY_BACKOFF, |(_, next)| *next);
        self.backoff
            .insert(relay, (now + wait, (wait * 2).min(MAX_RELAY_BACKOFF)));
        wait
    }

    /// `relay` holds a reservation for this node.
    pub(super) fn reserved(&mut self, relay: PeerId) {
        self.backoff.remove(&relay);
        self.said_none = false;
    }
}

pub(super) fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

pub(super) fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

impl EventLoop {
    pub(super) fn redial(&mut self) {
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

    pub(super) fn nat(&self) -> String {
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
    pub(super) fn needs_relay(&self) -> bool {
        let private = matches!(
            self.swarm.behaviour().autonat.nat_status(),
            autonat::NatStatus::Private
        );
        let listens = self.swarm.listeners().any(|a| !is_relayed(a));
        private || !listens
    }

    /// The connected bootstrap nodes that serve the relay protocol, each
    /// with the direct address this node reaches it at.
    fn relays_at_hand(&self) -> Vec<(PeerId, Multiaddr)> {
        self.members
            .iter()
            .filter(|(p, (m, _))| {
                m.roles.contains(Roles::BOOTSTRAP)
                    && self.relays.serving.contains(p)
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
            .collect()
    }

    /// Dials the members whose adverts arrive by gossip but that this node
    /// holds no connection to (after a partition, the direct connection
    /// DCUtR made is gone, and their own addresses sit behind a NAT): the
    /// addresses it knows, and a circuit through each relay at hand, which
    /// DCUtR then turns direct again.
    pub(super) fn dial_advertisers(&mut self) {
        // Enough members at hand carry the gossip; dialling every
        // advertiser would end in connections to the whole alliance.
        if self.connected.len() >= DIAL_ADVERTISERS_BELOW {
            return;
        }
        let me = *self.swarm.local_peer_id();
        let mut missing: Vec<PeerId> = self
            .adverts
            .keys()
            .filter(|p| **p != me && !self.connected.contains_key(p))
            .copied()
            .collect();
        if missing.is_empty() {
            return;
        }
        // A few a round, in turn.
        missing.sort_unstable();
        let start = self.advertiser_turn % missing.len();
        self.advertiser_turn = self.advertiser_turn.wrapping_add(ADVERTISERS_A_ROUND);
        let turn: Vec<PeerId> = missing
            .iter()
            .cycle()
            .skip(start)
            .take(ADVERTISERS_A_ROUND.min(missing.len()))
            .copied()
            .collect();
        for peer in turn {
            let opts = DialOpts::peer_id(peer)
                .addresses(self.addresses_for(&peer))
                .extend_addresses_through_behaviour()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, "dial an advertiser: {e}");
            }
        }
    }

    /// Addresses of `peer` through each relay at hand (other than itself).
    pub(super) fn circuits_to(&self, peer: PeerId) -> Vec<Multiaddr> {
        self.relays_at_hand()
            .into_iter()
            .filter(|(relay, _)| *relay != peer)
            .filter_map(|(relay, addr)| {
                Some(
                    addr.with_p2p(relay)
                        .ok()?
                        .with(Protocol::P2pCircuit)
                        .with(Protocol::P2p(peer)),
                )
            })
            .collect()
    }

    /// Reserves a relayed address on each connected bootstrap node when
    /// this node needs one, and gives them up when it no longer does.
    pub(super) fn reserve_relays(&mut self) {
        if self.swarm.behaviour().relay.is_enabled() {
            return;
        }
        if !self.needs_relay() {
            for (_, listener) in self.relayed.drain() {
                self.swarm.remove_listener(listener);
            }
            return;
        }
        let now = Instant::now();
        let relays: Vec<(PeerId, Multiaddr)> = self
            .relays_at_hand()
            .into_iter()
            .filter(|(p, _)| self.relays.may_ask(p, now) && !self.relayed.contains_key(p))
            .collect();
        if relays.is_empty() && self.relayed.is_empty() && !self.relays.said_none {
            self.relays.said_none = true;
            warn!(
                "this node cannot be reached directly, and no connected bootstrap node relays for it now: members can reach it only by dialling it (check [network] listen and the firewall)"
            );
        }
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

impl EventLoop {
    /// Keeps the addresses of peers that Kademlia or mDNS found, and dials
    /// a few of those not connected while this node holds few connections
    /// (dialling every one a walk turns up would connect each member to
    /// the whole alliance).
    pub(super) fn dial_found(&mut self, found: impl Iterator<Item = (PeerId, Vec<Multiaddr>)>) {
        let me = *self.swarm.local_peer_id();
        let mut dials = DIAL_ADVERTISERS_BELOW.saturating_sub(self.connected.len());
        for (peer, addrs) in found {
            if peer == me || self.connected.contains_key(&peer) {
                continue;
            }
            self.degree.found(peer, &addrs);
            if dials > 0 {
                dials -= 1;
                let _ = self
                    .swarm
                    .dial(DialOpts::peer_id(peer).addresses(addrs).build());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_that_refuses_is_left_alone_longer_each_time_until_it_takes_one() {
        let mut r = Relays::default();
        let relay = PeerId::random();
        let now = Instant::now();
        assert!(!r.may_ask(&relay, now), "not known to relay yet");
        r.serving.insert(relay);
        assert!(r.may_ask(&relay, now));
        assert_eq!(r.refused(relay, now), RELAY_BACKOFF);
        assert!(!r.may_ask(&relay, now + RELAY_BACKOFF / 2));
        assert!(r.may_ask(&relay, now + RELAY_BACKOFF));
        assert_eq!(r.refused(relay, now), RELAY_BACKOFF * 2);
        let mut wait = RELAY_BACKOFF;
        for _ in 0..20 {
            wait = r.refused(relay, now);
        }
        assert_eq!(wait, MAX_RELAY_BACKOFF);
        r.reserved(relay);
        assert!(r.may_ask(&relay, now));
        assert_eq!(r.refused(relay, now), RELAY_BACKOFF);
    }
}
