//! Requests between members (task offers, reports, progress): inbound ones
//! from verified members handed to the worker or the submitter, outbound
//! ones matched to their answers.

use std::collections::HashMap;

use alliance_protocol::cert::Member;
use alliance_protocol::wire::{
    Ack, Acks, DeclineReason, OfferAnswers, OfferRequest, Progress, Reports,
};
use libp2p::request_response::{OutboundRequestId, ResponseChannel};
use libp2p::{PeerId, request_response};
use tokio::sync::{mpsc, oneshot};

use crate::net::codec::{Codec, Inbound as CodecInbound};

use crate::net::Behaviour;

use super::EventLoop;
use super::client::{Inbound, Reply};

/// An answer the node's parts produced, on its way back to the peer.
pub(super) enum Answer {
    Offer(Option<OfferAnswers>, ResponseChannel<OfferAnswers>),
    Report(Option<Acks>, ResponseChannel<Acks>),
    Progress(Option<Ack>, ResponseChannel<Ack>),
}

impl EventLoop {
    /// The member behind `peer` if it may use the job protocols; otherwise
    /// the peer is rejected (a refused frame or no verified membership).
    pub(super) fn gate<T>(
        &mut self,
        peer: PeerId,
        what: &str,
        request: CodecInbound<T>,
    ) -> Option<(Member, T)> {
        // Requests still in flight from a peer that was just turned away
        // add nothing to its record.
        if self.leaving(&peer) {
            return None;
        }
        match request {
            CodecInbound::Refused(why) => {
                self.reject(peer, format!("sent a bad {what}: {why}"));
                None
            }
            CodecInbound::Unfinished(why) => {
                self.unfinished(peer, what, &why);
                None
            }
            CodecInbound::Message(m) => match self.members.get(&peer) {
                Some((member, _)) => Some((member.clone(), m)),
                None => {
                    self.reject(peer, format!("sent a {what} before proving membership"));
                    None
                }
            },
        }
    }

    /// One of the job protocols: a request from a member goes to the part
    /// of the node that answers it (or is refused at once when there is
    /// none); an answer to our own request goes to whoever asked.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_service<Req, Resp>(
        &mut self,
        event: request_response::Event<CodecInbound<Req>, Resp>,
        what: &str,
        behaviour: fn(&mut Behaviour) -> &mut request_response::Behaviour<Codec<Req, Resp>>,
        waiting: fn(&mut Self) -> &mut HashMap<OutboundRequestId, oneshot::Sender<Reply<Resp>>>,
        inbound: fn(PeerId, Member, Req, oneshot::Sender<Resp>) -> Inbound,
        answer: fn(Option<Resp>, ResponseChannel<Resp>) -> Answer,
        refusal: fn(&Req) -> Resp,
    ) where
        Req: alliance_protocol::wire::Message + Send + Sync + 'static,
        Resp: alliance_protocol::wire::Message + Send + Sync + 'static,
    {
        use request_response::{Event, Message as M};
        match event {
            Event::Message {
                peer,
                message: M::Request {
                    request, channel, ..
                },
                ..
            } => {
                let Some((member, request)) = self.gate(peer, what, request) else {
                    return;
                };
                self.degree.used(peer, std::time::Instant::now());
                // A place in the queue first: the refusal is built only
                // when there is none.
                match self.setup.inbound.as_ref().map(mpsc::Sender::try_reserve) {
                    Some(Ok(permit)) => {
                        let (reply, rx) = oneshot::channel();
                        permit.send(inbound(peer, member, request, reply));
                        self.answers
                            .push(Box::pin(async move { answer(rx.await.ok(), channel) }));
                    }
                    _ => {
                        let refused = refusal(&request);
                        let _ =
                            behaviour(self.swarm.behaviour_mut()).send_response(channel, refused);
                    }
                }
            }
            Event::Message {
                message:
                    M::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(tx) = waiting(self).remove(&request_id) {
                    let _ = tx.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(tx) = waiting(self).remove(&request_id) {
                    let _ = tx.send(Err(error.to_string()));
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_answer(&mut self, answer: Answer) {
        let b = self.swarm.behaviour_mut();
        match answer {
            Answer::Offer(Some(a), ch) => {
                let _ = b.tasks.send_response(ch, a);
            }
            Answer::Report(Some(a), ch) => {
                let _ = b.results.send_response(ch, a);
            }
            Answer::Progress(Some(a), ch) => {
                let _ = b.progress.send_response(ch, a);
            }
            // The part that should answer gave up: the peer sees the
            // stream close.
            Answer::Offer(None, _) | Answer::Report(None, _) | Answer::Progress(None, _) => {}
        }
    }
}

impl EventLoop {
    /// Task offers: to the worker, or declined when this node runs none.
    pub(super) fn on_offers(
        &mut self,
        e: request_response::Event<CodecInbound<OfferRequest>, OfferAnswers>,
    ) {
        self.on_service(
            e,
            "task offer",
            |b| &mut b.tasks,
            |me| &mut me.offers_out,
            |peer, member, request, reply| Inbound::Offer {
                peer,
                member,
                request: Box::new(request),
                reply,
            },
            Answer::Offer,
            |_: &OfferRequest| {
                OfferRequest::decline_all(&DeclineReason::BadOffer(
                    "this node runs no worker".into(),
                ))
            },
        );
    }

    /// Task reports: to the submitter, or refused when this node has no jobs.
    pub(super) fn on_reports(&mut self, e: request_response::Event<CodecInbound<Reports>, Acks>) {
        self.on_service(
            e,
            "task report",
            |b| &mut b.results,
            |me| &mut me.reports_out,
            |peer, member, reports, reply| Inbound::Report {
                peer,
                member,
                reports: Box::new(reports),
                reply,
            },
            Answer::Report,
            |r: &Reports| r.refuse_all("this node has no jobs"),
        );
    }

    /// Progress of running tasks: to the submitter, likewise.
    pub(super) fn on_progress(&mut self, e: request_response::Event<CodecInbound<Progress>, Ack>) {
        self.on_service(
            e,
            "progress report",
            |b| &mut b.progress,
            |me| &mut me.progress_out,
            |peer, member, progress, reply| Inbound::Progress {
                peer,
                member,
                progress: Box::new(progress),
                reply,
            },
            Answer::Progress,
            |_: &Progress| Ack::Refused("this node has no jobs".into()),
        );
    }
}
