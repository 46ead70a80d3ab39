//! Admission: every new connection must present a certificate chain for
//! this charter within [`MEMBERSHIP_DEADLINE`]; a peer whose chain fails,
//! or that stays silent, is turned away (out of every table, disconnected,
//! blocked) and listed with the reason. A verified member enters Kademlia,
//! AutoNAT's servers and the peer store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use alliance_protocol::Timestamp;
use alliance_protocol::cert::{Chain, Member, Roles};
use alliance_protocol::wire::{CreditsRequest, Hello};
use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId, request_response};
use tracing::{debug, info, warn};

use crate::metrics::Blocked;
use crate::net::codec::Inbound as CodecInbound;

use super::{EventLoop, MEMBERSHIP_DEADLINE};
use super::{
    adverts::MAX_CACHED_CHAINS, client::Rejection, reach::is_unspecified,
    revocations::MAX_DEFERRED_LISTS,
};

/// Rejections remembered for the status page.
pub(super) const MAX_REJECTED: usize = 256;

/// How long a relayed connection stays once a direct one to the same peer
/// is up.
pub(super) const RELAYED_GRACE: Duration = Duration::from_secs(3);

/// Unfinished request frames that get a peer blocked.
pub(super) const MAX_STRIKES: u32 = 3;

/// How long a rejected peer stays connected, so our answer reaches it.
pub(super) const REJECT_GRACE: Duration = Duration::from_millis(300);

impl EventLoop {
    pub(super) fn hello(&self) -> Hello {
        let revocations = self.setup.revocations.held();
        Hello {
            alliance: self.setup.charter.id,
            chain: self.setup.chain.clone(),
            revocations,
            lists: Vec::new(),
        }
    }

    /// The answer to `asked`: our hello, with the revocation lists it lacks.
    pub(super) fn answer(&self, asked: &Hello) -> Hello {
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

    /// Turns a peer away: out of every table and the gossip mesh at once;
    /// blocked and disconnected a moment later, so that the answer to its
    /// membership request (which tells it why) still reaches it.
    pub(super) fn reject(&mut self, peer: PeerId, reason: String) {
        self.turn_away(peer, reason, true);
    }

    /// Like [`Self::reject`]; `block` false only disconnects, for peers
    /// that may simply have been slow (a busy bootstrap node must not lock
    /// out members that join all at once).
    pub(super) fn turn_away(&mut self, peer: PeerId, reason: String, block: bool) {
        warn!(%peer, %reason, blocked = block, "peer rejected");
        let label = if block { "true" } else { "false" };
        self.turned_away
            .get_or_create(&Blocked { blocked: label })
            .inc();
        if block {
            self.strikes.remove(&peer);
        }
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

    /// Closes the relayed connections of peers whose direct connection came
    /// up long enough ago and is still there.
    pub(super) fn retire_relayed(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) =
            self.retiring.drain(..).partition(|(_, at)| *at <= now);
        self.retiring = later;
        for (peer, _) in due {
            let Some(conns) = self.connected.get(&peer) else {
                continue;
            };
            if !conns.values().any(|relayed| !relayed) {
                continue;
            }
            let relayed: Vec<ConnectionId> = conns
                .iter()
                .filter(|(_, relayed)| **relayed)
                .map(|(c, _)| *c)
                .collect();
            for c in relayed {
                debug!(%peer, "relayed connection closed: a direct one is up");
                self.swarm.close_connection(c);
            }
        }
    }

    /// Whether `peer` was turned away and is about to be disconnected.
    pub(super) fn leaving(&self, peer: &PeerId) -> bool {
        self.doomed.iter().any(|(p, ..)| p == peer)
    }

    /// A request frame from `peer` that stopped short or stalled: it is
    /// disconnected, and blocked at the [`MAX_STRIKES`]th, since a broken
    /// connection looks the same once but not every time.
    pub(super) fn unfinished(&mut self, peer: PeerId, what: &str, why: &str) {
        // Its other streams end the same way as it goes: one strike.
        if self.leaving(&peer) {
            return;
        }
        if self.strikes.len() >= MAX_REJECTED && !self.strikes.contains_key(&peer) {
            self.strikes.clear();
        }
        let strikes = self.strikes.entry(peer).or_insert(0);
        *strikes += 1;
        let block = *strikes >= MAX_STRIKES;
        self.turn_away(peer, format!("left a {what} unfinished: {why}"), block);
    }

    /// Checks a peer's hello: same alliance, valid chain, and the chain is
    /// the peer's own.
    pub(super) fn check_hello(&mut self, peer: PeerId, hello: &Hello) -> Result<Member, String> {
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

    pub(super) fn accept(&mut self, peer: PeerId, member: Member, chain: Chain) {
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
        // The new member fetches the table, this advert with it; only an
        // advert that reached no one yet goes out again.
        if !self.advert_out {
            self.publish_due = true;
        }
        self.sync_adverts_from(peer);
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

    /// Adds a verified peer's addresses to Kademlia and the peer store.
    pub(super) fn remember(&mut self, peer: PeerId, addrs: &[Multiaddr]) {
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

    pub(super) fn on_membership(
        &mut self,
        event: request_response::Event<CodecInbound<Hello>, Hello>,
    ) {
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
                    CodecInbound::Unfinished(why) => {
                        return self.unfinished(peer, "membership request", &why);
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

    /// The member behind `chain`, checked once and then cached.
    pub(super) fn chain_member(
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
}

impl EventLoop {
    /// A new connection: the first one to a peer that is not a member yet
    /// starts the membership exchange, with a deadline.
    pub(super) fn on_connected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
        established: u32,
    ) {
        let relayed = endpoint.is_relayed();
        if established == 1 {
            self.degree.connected(peer_id, Instant::now());
        }
        self.connected
            .entry(peer_id)
            .or_default()
            .insert(connection_id, relayed);
        if let ConnectedPoint::Dialer { address, .. } = endpoint
            && !relayed
        {
            self.reached_at.insert(peer_id, address.clone());
        }
        // A direct connection makes a relayed one to the same peer a
        // detour: streams pick a connection at random, and a blob through
        // the relay crawls and counts against its limits. Closed a moment
        // later, so that hole punching finishes on it first.
        let has_relayed = self
            .connected
            .get(&peer_id)
            .is_some_and(|c| c.values().any(|r| *r));
        if !relayed && has_relayed {
            self.retiring
                .push((peer_id, Instant::now() + RELAYED_GRACE));
        }
        // Back from having no connection at all: what was published
        // meanwhile comes from this member, and this node's own advert,
        // which the others may have let expire, goes out again.
        if established == 1 && !self.adverts_synced && self.members.contains_key(&peer_id) {
            self.sync_adverts_from(peer_id);
            self.publish_due = true;
        }
        if established == 1 && !self.members.contains_key(&peer_id) {
            self.pending
                .insert(peer_id, Instant::now() + MEMBERSHIP_DEADLINE);
            let hello = self.hello();
            self.swarm
                .behaviour_mut()
                .membership
                .send_request(&peer_id, hello.into());
        }
    }

    /// A connection closed; once a peer has none left, it is no AutoNAT
    /// server and no relay of this node's any more.
    pub(super) fn on_disconnected(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        remaining: u32,
    ) {
        if let Some(conns) = self.connected.get_mut(&peer_id) {
            conns.remove(&connection_id);
        }
        if remaining == 0 {
            self.connected.remove(&peer_id);
            self.degree.disconnected(&peer_id);
            // Cut off from everyone: the adverts published meanwhile are
            // fetched again from the first member met.
            if self.connected.is_empty() {
                self.adverts_synced = false;
            }
            self.pending.remove(&peer_id);
            self.swarm.behaviour_mut().autonat.remove_server(&peer_id);
            if let Some(listener) = self.relayed.remove(&peer_id) {
                self.swarm.remove_listener(listener);
            }
        }
    }
}
