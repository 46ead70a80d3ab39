//! Credits on the network: gossiped credits checked against their issuer's
//! chain and kept; pages of credits served to members, and fetched from the
//! first member met after a restart.

use std::collections::HashMap;

use alliance_protocol::Timestamp;
use alliance_protocol::cert::Roles;
use alliance_protocol::wire::{
    CreditGossip, CreditsPage, CreditsRequest, MAX_GOSSIP_CREDITS, Message,
};
use libp2p::{PeerId, gossipsub, request_response};
use tracing::{debug, info};

use crate::net::codec::Inbound as CodecInbound;

use super::EventLoop;

impl EventLoop {
    /// Pages of credits: served to members; fetched from one after start.
    pub(super) fn on_credit_sync(
        &mut self,
        event: request_response::Event<CodecInbound<CreditsRequest>, CreditsPage>,
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
                let Some((_, request)) = self.gate(peer, "credits request", request) else {
                    return;
                };
                let page = self.credits.page(request.after);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .credit_sync
                    .send_response(channel, page);
            }
            Event::Message {
                peer,
                message: M::Response { response, .. },
                ..
            } => {
                let added = self.take_credits(&response);
                match response.next {
                    Some(after) if !response.credits.is_empty() => {
                        self.swarm
                            .behaviour_mut()
                            .credit_sync
                            .send_request(&peer, CreditsRequest { after: Some(after) }.into());
                    }
                    _ => {
                        self.credits_synced = true;
                        self.credit_sync = None;
                    }
                }
                if added > 0 {
                    info!(%peer, added, "credits this node missed, fetched");
                }
            }
            Event::OutboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "credit sync failed; trying the next member met");
                self.credit_sync = None;
            }
            _ => {}
        }
    }

    /// Keeps the credits of a page that check out as gossiped ones must;
    /// how many were new.
    pub(super) fn take_credits(&mut self, page: &CreditsPage) -> u32 {
        let now = Timestamp::now();
        let mut issuers = HashMap::new();
        for chain in &page.issuers {
            if let Ok(m) = self.chain_member(chain, Roles::SUBMIT, now) {
                issuers.insert(m.node_key, (m, chain.clone()));
            }
        }
        let mut added = 0u32;
        for signed in &page.credits {
            let Some((member, chain)) = issuers.get(&signed.signer()) else {
                continue;
            };
            if let Ok(true) = self.credits.add(signed, Some((member, chain))) {
                added += 1;
            }
        }
        added
    }

    /// A credit from the gossip: signed by a submitting member for its own
    /// institution, kept once.
    pub(super) fn on_credit(
        &mut self,
        source: Option<PeerId>,
        data: &[u8],
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let now = Timestamp::now();
        let checked = (|| {
            let g = CreditGossip::decode(data).map_err(|e| e.to_string())?;
            if g.credits.is_empty() || g.credits.len() > MAX_GOSSIP_CREDITS {
                return Err(format!("{} credits in one message", g.credits.len()));
            }
            let member = self.chain_member(&g.chain, Roles::SUBMIT, now)?;
            if source != Some(member.peer_id) {
                return Err(format!(
                    "published by {source:?} with the chain of {}",
                    member.peer_id
                ));
            }
            let mut new = false;
            for signed in &g.credits {
                new |= self
                    .credits
                    .add(signed, Some((&member, &g.chain)))
                    .map_err(|e| e.to_string())?;
            }
            Ok(new)
        })();
        match checked {
            Ok(true) => A::Accept,
            Ok(false) => A::Ignore,
            Err(why) => {
                debug!(?source, %why, "credit refused");
                A::Reject
            }
        }
    }

    /// Institution names this node knows, by key.
    pub(super) fn institution_names(&self) -> HashMap<alliance_protocol::PublicKey, String> {
        let mut names: HashMap<_, _> = self
            .verified_chains
            .values()
            .chain(self.members.values().map(|(m, _)| m))
            .map(|m| (m.institution_key, m.institution_name.clone()))
            .collect();
        names.insert(
            self.setup.member.institution_key,
            self.setup.member.institution_name.clone(),
        );
        names
    }
}
