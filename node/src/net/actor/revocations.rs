//! Revocation lists: checked, applied (members they revoke are turned
//! away), stored, gossiped, and kept for institutions not met yet.

use alliance_protocol::cert::{Revocations, Roles};
use alliance_protocol::wire::{Message, RevocationGossip};
use alliance_protocol::{Signed, Timestamp};
use libp2p::{PeerId, gossipsub};
use tracing::{info, warn};

use super::EventLoop;

/// Revocation lists of not-yet-met institutions kept for later.
pub(super) const MAX_DEFERRED_LISTS: usize = 64;

impl EventLoop {
    pub(super) fn on_revocations(&mut self, data: &[u8]) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance as A;
        let Ok(g) = RevocationGossip::decode(data) else {
            return A::Reject;
        };
        match self.apply_revocations(&g.list) {
            Ok(()) => A::Accept,
            Err(reason) if reason.contains("not newer") => A::Ignore,
            Err(reason) => {
                warn!(%reason, "revocation list refused");
                A::Reject
            }
        }
    }

    /// Verifies and applies a revocation list, persists it, and drops every
    /// member and advert it revokes.
    pub(super) fn apply_revocations(&mut self, list: &Signed<Revocations>) -> Result<(), String> {
        let inst = self.institutions.get(&list.signer()).cloned();
        self.setup
            .revocations
            .insert(list, inst.as_ref())
            .map_err(|e| e.to_string())?;
        self.verified_chains.clear();
        self.setup
            .store
            .save_revocations(&list.signer(), &list.to_bytes());
        self.signed_lists.insert(list.signer(), list.clone());
        let now = Timestamp::now();
        let revoked: Vec<(PeerId, String)> = self
            .members
            .iter()
            .filter_map(|(peer, (_, chain))| {
                chain
                    .verify(
                        &self.setup.charter,
                        &self.setup.revocations,
                        now,
                        Roles::NONE,
                    )
                    .err()
                    .map(|e| (*peer, e.to_string()))
            })
            .collect();
        for (peer, reason) in revoked {
            self.reject(peer, reason);
        }
        let charter = &self.setup.charter;
        let revocations = &self.setup.revocations;
        self.adverts.retain(|_, a| {
            a.chain
                .verify(charter, revocations, now, Roles::WORK)
                .is_ok()
        });
        info!(signer = %list.signer(), "revocation list applied");
        Ok(())
    }
}
