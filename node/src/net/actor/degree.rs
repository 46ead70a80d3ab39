//! Degree: how many members a node holds connections to. Gossip needs a
//! mesh of a few peers, not the whole alliance; every connection costs a
//! share of every heartbeat, ping and poll, so a node that kept each one
//! that Kademlia's walks and other members' dials opened would pay in
//! proportion to the alliance. Past [`MAX_PEERS`] the node closes the
//! connections nothing needs (not in a gossip mesh, not its relay, no job
//! traffic lately) down to [`TRIM_TO`]; it keeps the addresses it learned,
//! so a job can dial the peer again. Bootstrap nodes do not trim.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use tracing::debug;

use super::EventLoop;

/// Connections to more peers than this are trimmed.
pub(super) const MAX_PEERS: usize = 16;

/// What trimming brings the count down to: the gap keeps a node from
/// trimming again each time another member dials it.
const TRIM_TO: usize = 12;

/// A new connection is left alone this long: a Kademlia query, the
/// membership exchange or a first offer runs on it.
const NEW_GRACE: Duration = Duration::from_secs(20);

/// A peer this node exchanged job traffic with (offers, reports, progress)
/// is kept this long after: its blobs and next reports go the same way.
const USE_GRACE: Duration = Duration::from_secs(10 * 60);

/// Peers whose addresses a Kademlia walk or mDNS turned up, at most.
const MAX_FOUND: usize = 8192;

/// Addresses per found peer, at most.
const MAX_FOUND_ADDRS: usize = 8;

/// The instants before which each connected peer is not trimmed, and the
/// addresses of peers found but not dialled.
#[derive(Debug, Default)]
pub(super) struct Degree {
    keep_until: HashMap<PeerId, Instant>,
    found: HashMap<PeerId, Vec<Multiaddr>>,
}

impl Degree {
    /// A first connection to `peer`.
    pub(super) fn connected(&mut self, peer: PeerId, now: Instant) {
        let until = self.keep_until.entry(peer).or_insert(now);
        *until = (*until).max(now + NEW_GRACE);
    }

    /// The last connection to `peer` closed.
    pub(super) fn disconnected(&mut self, peer: &PeerId) {
        self.keep_until.remove(peer);
    }

    /// Job traffic with `peer`.
    pub(super) fn used(&mut self, peer: PeerId, now: Instant) {
        let until = self.keep_until.entry(peer).or_insert(now);
        *until = (*until).max(now + USE_GRACE);
    }

    /// Addresses a walk or mDNS found for `peer`.
    pub(super) fn found(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
        if addrs.is_empty() {
            return;
        }
        if self.found.len() >= MAX_FOUND && !self.found.contains_key(&peer) {
            // Any one makes room: a forgotten peer is found again by the
            // next walk.
            if let Some(old) = self.found.keys().next().copied() {
                self.found.remove(&old);
            }
        }
        let kept: Vec<Multiaddr> = addrs.iter().take(MAX_FOUND_ADDRS).cloned().collect();
        self.found.insert(peer, kept);
    }

    /// Of the `connected` peers, those to close now: none while there are
    /// no more than [`MAX_PEERS`]; otherwise enough to come down to
    /// [`TRIM_TO`], never a `kept` one (a relay) nor one within its grace,
    /// and of the rest first those in the fewest gossip meshes (`meshes`),
    /// then the longest unused. Gossipsub grafts the peers that remain in
    /// place of the mesh peers that go.
    pub(super) fn surplus(
        &self,
        connected: impl Iterator<Item = PeerId>,
        kept: impl Fn(&PeerId) -> bool,
        meshes: impl Fn(&PeerId) -> usize,
        now: Instant,
    ) -> Vec<PeerId> {
        let connected: Vec<PeerId> = connected.collect();
        if connected.len() <= MAX_PEERS {
            return Vec::new();
        }
        let mut idle: Vec<(usize, Instant, PeerId)> = connected
            .iter()
            .filter(|p| !kept(p))
            .filter_map(|p| {
                let until = self.keep_until.get(p).copied().unwrap_or(now);
                (until <= now).then(|| (meshes(p), until, *p))
            })
            .collect();
        idle.sort_unstable();
        idle.into_iter()
            .take(connected.len() - TRIM_TO)
            .map(|(_, _, p)| p)
            .collect()
    }
}

impl EventLoop {
    /// Closes the connections past [`MAX_PEERS`] that nothing needs.
    pub(super) fn trim_connections(&mut self, now: Instant) {
        // A bootstrap node carries the circuits of the members it relays
        // for and takes every join: its connection limits bound it.
        if self.swarm.behaviour().relay.is_enabled() {
            return;
        }
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let mut meshes: HashMap<PeerId, usize> = HashMap::new();
        for topic in [
            &self.adverts_topic,
            &self.credits_topic,
            &self.revocations_topic,
        ] {
            for p in gossipsub.mesh_peers(&topic.hash()) {
                *meshes.entry(*p).or_default() += 1;
            }
        }
        let surplus = self.degree.surplus(
            self.connected.keys().copied(),
            |p| self.relayed.contains_key(p),
            |p| meshes.get(p).copied().unwrap_or(0),
            now,
        );
        if !surplus.is_empty() {
            debug!(
                closing = surplus.len(),
                connected = self.connected.len(),
                "closing connections nothing needs"
            );
        }
        for peer in surplus {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Where to dial `peer` when it is not connected: what its identify
    /// said, what a walk found, and circuits through the relays at hand.
    /// Empty while it is connected.
    pub(super) fn addresses_for(&self, peer: &PeerId) -> Vec<Multiaddr> {
        if self.connected.contains_key(peer) {
            return Vec::new();
        }
        let mut addrs: Vec<Multiaddr> = self
            .identified
            .get(peer)
            .into_iter()
            .chain(self.degree.found.get(peer))
            .flatten()
            .filter(|a| !super::reach::is_unspecified(a))
            .cloned()
            .collect();
        addrs.extend(self.circuits_to(*peer));
        addrs.sort();
        addrs.dedup();
        addrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_trimmed_up_to_the_limit_and_then_only_what_nothing_needs() {
        let now = Instant::now();
        let mut d = Degree::default();
        let peers: Vec<PeerId> = (0..MAX_PEERS + 6).map(|_| PeerId::random()).collect();
        for p in &peers {
            d.connected(*p, now);
        }
        let later = now + NEW_GRACE;
        assert!(
            d.surplus(peers[..MAX_PEERS].iter().copied(), |_| false, |_| 0, later)
                .is_empty(),
            "at the limit nothing is closed"
        );
        assert!(
            d.surplus(peers.iter().copied(), |_| false, |_| 0, now)
                .is_empty(),
            "new connections are left alone"
        );
        // A relay and one with job traffic are kept; a mesh peer goes
        // after those in no mesh.
        let (relay, busy, mesh) = (peers[0], peers[1], peers[2]);
        d.used(busy, later);
        let meshes = |p: &PeerId| usize::from(*p == mesh);
        let surplus = d.surplus(peers.iter().copied(), |p| *p == relay, meshes, later);
        assert_eq!(surplus.len(), peers.len() - TRIM_TO);
        assert!(!surplus.contains(&relay) && !surplus.contains(&busy));
        assert!(
            !surplus.contains(&mesh),
            "enough peers in no mesh to go first"
        );
        // With every other peer kept, the one with job traffic is the only
        // candidate: after its grace it goes.
        let others_kept = |p: &PeerId| *p != busy;
        assert!(
            d.surplus(peers.iter().copied(), others_kept, |_| 0, later)
                .is_empty()
        );
        assert_eq!(
            d.surplus(peers.iter().copied(), others_kept, |_| 0, later + USE_GRACE),
            vec![busy],
            "job traffic protects for a while, not for ever"
        );
    }

    #[test]
    fn found_addresses_are_bounded() {
        let mut d = Degree::default();
        let addr: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().unwrap();
        for _ in 0..MAX_FOUND + 10 {
            d.found(PeerId::random(), std::slice::from_ref(&addr));
        }
        assert_eq!(d.found.len(), MAX_FOUND);
        let many = vec![addr; MAX_FOUND_ADDRS * 2];
        let p = PeerId::random();
        d.found(p, &many);
        assert_eq!(d.found[&p].len(), MAX_FOUND_ADDRS);
    }
}
