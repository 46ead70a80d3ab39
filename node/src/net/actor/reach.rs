//! Reachability: dialling the bootstrap nodes and remembered members,
//! AutoNAT's verdict, relayed addresses on bootstrap nodes while this node
//! cannot be reached directly.

use std::time::Instant;

use alliance_protocol::cert::Roles;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, autonat};
use tracing::{debug, info, warn};

use super::EventLoop;

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

impl EventLoop {
    /// Dials peers that Kademlia or mDNS found and that are not connected.
    pub(super) fn dial_found(&mut self, found: impl Iterator<Item = (PeerId, Vec<Multiaddr>)>) {
        for (peer, addrs) in found {
            if peer != *self.swarm.local_peer_id() && !self.connected.contains_key(&peer) {
                let _ = self
                    .swarm
                    .dial(DialOpts::peer_id(peer).addresses(addrs).build());
            }
        }
    }
}
