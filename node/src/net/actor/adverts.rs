//! Adverts: this node's signed GPU advert, republished on a timer and on
//! every change; received adverts checked (chain, signature, publisher,
//! expiry, sequence) before they enter the live table.

use std::time::Instant;

use alliance_protocol::advert::{GpuAdvert, GpuInfo, GpuState};
use alliance_protocol::cert::{Chain, Member, Roles};
use alliance_protocol::wire::{AdvertGossip, Message};
use alliance_protocol::{Signed, Timestamp};
use libp2p::{PeerId, gossipsub};
use tracing::{debug, warn};

use super::EventLoop;

/// Verified advert chains remembered.
pub(super) const MAX_CACHED_CHAINS: usize = 4096;

pub(super) struct Advert {
    pub(super) advert: GpuAdvert,
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
    pub(super) fn on_advert(
        &mut self,
        source: Option<PeerId>,
        data: &[u8],
    ) -> gossipsub::MessageAcceptance {
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

    pub(super) fn publish_advert(&mut self) {
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
}
