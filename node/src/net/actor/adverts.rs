//! Adverts: this node's signed GPU advert, republished on a timer and on
//! every change; received adverts checked (chain, signature, publisher,
//! expiry, sequence) before they enter the live table.

use std::time::Instant;

use alliance_protocol::advert::{GpuAdvert, GpuInfo, GpuState, MAX_ADVERT_TTL_SECS};
use alliance_protocol::cert::{Chain, Member, Roles};
use alliance_protocol::wire::{
    AdvertGossip, AdvertsPage, AdvertsRequest, MAX_PAGE_ADVERTS, Message,
};
use alliance_protocol::{Signed, Timestamp};
use libp2p::{PeerId, gossipsub, request_response};
use tracing::{debug, warn};

use crate::net::codec::Inbound as CodecInbound;

use super::EventLoop;
use super::client::AdvertView;

/// Verified advert chains remembered.
pub(super) const MAX_CACHED_CHAINS: usize = 4096;

/// Adverts fetched from one member's table at most.
const MAX_SYNCED_ADVERTS: usize = 65_536;

/// Up to this many advertisers, adverts live as long as the charter says;
/// past it, longer in proportion ([`EventLoop::advert_lifetime`]).
pub(super) const FULL_RATE_ADVERTISERS: u64 = 50;

/// Where an advert came from, and so what proves its publisher.
#[derive(Debug, Clone, Copy)]
pub(super) enum Came {
    /// By gossip, with gossipsub's publisher, which must be the node its
    /// chain names.
    Gossiped(Option<PeerId>),
    /// In a page of a member's table: the advert's own signature by the
    /// chain's node key is the proof.
    Fetched,
}

pub(super) struct Advert {
    pub(super) advert: GpuAdvert,
    /// The advert as its publisher signed it, to hand to a member that
    /// fetches the table.
    pub(super) signed: Signed<GpuAdvert>,
    pub(super) member: Member,
    pub(super) chain: Chain,
    pub(super) received_at_us: u64,
}

/// Microseconds since the Unix epoch: when adverts were received, and when
/// the API's capacity samples were counted.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl EventLoop {
    /// How the API shows `peer`'s advert `a`.
    pub(super) fn advert_view(&self, peer: PeerId, a: &Advert) -> AdvertView {
        AdvertView {
            peer_id: peer.to_string(),
            institution: a.member.institution_name.clone(),
            local: peer == *self.swarm.local_peer_id(),
            sequence: a.advert.sequence,
            received_at_us: a.received_at_us,
            expires_at: a.advert.expires_at.to_string(),
            gpus: a.advert.gpus.clone(),
        }
    }

    /// A gossiped advert: it must come from the publisher its chain names.
    pub(super) fn on_advert(
        &mut self,
        source: Option<PeerId>,
        data: &[u8],
    ) -> gossipsub::MessageAcceptance {
        match AdvertGossip::decode(data) {
            Ok(g) => self.take_advert(g, Came::Gossiped(source)),
            Err(e) => {
                warn!(?source, reason = %e, "advert refused");
                gossipsub::MessageAcceptance::Reject
            }
        }
    }

    /// Checks an advert and keeps it when it is newer than the one held.
    pub(super) fn take_advert(
        &mut self,
        g: AdvertGossip,
        came: Came,
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let now = Timestamp::now();
        let checked = (|| {
            let member = self
                .chain_member(&g.chain, Roles::WORK, now)
                .map_err(|e| (A::Reject, e))?;
            if let Came::Gossiped(source) = came
                && source != Some(member.peer_id)
            {
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
            Ok((member, advert))
        })();
        match checked {
            Ok((member, advert)) => {
                debug!(peer = %member.peer_id, sequence = advert.sequence, "advert accepted");
                self.adverts.insert(
                    member.peer_id,
                    Advert {
                        advert,
                        signed: g.advert,
                        member,
                        chain: g.chain,
                        received_at_us: now_us(),
                    },
                );
                A::Accept
            }
            Err((acceptance, reason)) => {
                if acceptance == A::Reject {
                    warn!(?came, %reason, "advert refused");
                }
                acceptance
            }
        }
    }

    /// How long this node's advert lives: the charter's lifetime, longer
    /// in proportion once more than [`FULL_RATE_ADVERTISERS`] members
    /// advertise, up to [`MAX_ADVERT_TTL_SECS`]. Every member takes in
    /// every refresh, and an unchanged advert is refreshed every quarter of
    /// its lifetime, so this keeps what one member pays for the alliance's
    /// refreshes the same at any size; a changed advert still goes out at
    /// once. A member that vanished stays in the tables for as long, and
    /// an offer to it fails and goes elsewhere.
    pub(super) fn advert_lifetime(&self) -> u64 {
        let ttl = u64::from(self.setup.charter.charter.defaults.advert_ttl_secs).max(4);
        let advertisers = self.adverts.len() as u64;
        (ttl * advertisers.div_ceil(FULL_RATE_ADVERTISERS).max(1)).min(MAX_ADVERT_TTL_SECS.max(ttl))
    }

    pub(super) fn publish_advert(&mut self) {
        self.publish_due = false;
        self.last_publish = Instant::now();
        if self.setup.gpus.is_empty() {
            return;
        }
        self.sequence += 1;
        let now = Timestamp::now();
        let ttl = self.advert_lifetime();
        self.advert_ttl = ttl;
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
            advert: signed.clone(),
        };
        match gossip.encode() {
            Ok(bytes) => {
                let sent = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.adverts_topic.clone(), bytes);
                self.advert_out = sent.is_ok();
                if let Err(e) = sent {
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
                signed,
                member: self.setup.member.clone(),
                chain: self.setup.chain.clone(),
                received_at_us: now_us(),
            },
        );
    }
}

impl EventLoop {
    /// Pages of the advert table: served to members; fetched from the
    /// first member met after start (and after losing every connection).
    pub(super) fn on_advert_sync(
        &mut self,
        event: request_response::Event<CodecInbound<AdvertsRequest>, AdvertsPage>,
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
                let Some((_, request)) = self.gate(peer, "adverts request", request) else {
                    return;
                };
                let page = self.advert_page(request.skip as usize);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .advert_sync
                    .send_response(channel, page);
            }
            Event::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => {
                let got = response.adverts.len();
                for g in response.adverts {
                    self.take_advert(g, Came::Fetched);
                }
                self.advert_skip += got;
                // A member that always says there is more is not followed
                // past the largest table an alliance could hold.
                if response.more && got > 0 && self.advert_skip < MAX_SYNCED_ADVERTS {
                    let skip = u32::try_from(self.advert_skip).unwrap_or(u32::MAX);
                    self.swarm
                        .behaviour_mut()
                        .advert_sync
                        .send_request(&peer, AdvertsRequest { skip }.into());
                } else {
                    self.adverts_synced = true;
                    self.advert_sync = None;
                    debug!(%peer, adverts = self.adverts.len(), "advert table fetched");
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "advert table fetch failed; trying the next member met");
                self.advert_sync = None;
            }
            _ => {}
        }
    }

    /// Starts fetching the advert table from `peer` when this node has not
    /// since it started or last lost every connection.
    pub(super) fn sync_adverts_from(&mut self, peer: PeerId) {
        if self.adverts_synced || self.advert_sync.is_some() {
            return;
        }
        self.advert_skip = 0;
        self.swarm
            .behaviour_mut()
            .advert_sync
            .send_request(&peer, AdvertsRequest { skip: 0 }.into());
        self.advert_sync = Some(peer);
    }

    /// The live adverts after the first `skip`, in peer id order.
    fn advert_page(&self, skip: usize) -> AdvertsPage {
        let now = Timestamp::now();
        let mut live: Vec<(&PeerId, &Advert)> = self
            .adverts
            .iter()
            .filter(|(_, a)| a.advert.expires_at > now)
            .collect();
        live.sort_unstable_by_key(|(p, _)| **p);
        let adverts: Vec<AdvertGossip> = live
            .iter()
            .skip(skip)
            .take(MAX_PAGE_ADVERTS)
            .map(|(_, a)| AdvertGossip {
                chain: a.chain.clone(),
                advert: a.signed.clone(),
            })
            .collect();
        AdvertsPage {
            more: skip + adverts.len() < live.len(),
            adverts,
        }
    }
}
