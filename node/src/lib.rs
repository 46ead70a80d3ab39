//! The Alliance node: the daemon and the `alliance` command line.
//!
//! # Layout
//!
//! The crate is a house of rooms by role. Each room owns its types and
//! its sled tables and shows a small surface to the others.
//!
//! | room | owns | calls |
//! |---|---|---|
//! | [`submit`] | the submitter: job files, job/task/replica records and their tables, the scheduler, offers, report intake, verification, settlement (reputation events, credits issued), `.npy` export | `net` (its `Client`), `store`, `trust`; `work` for the intake rules a worker applies |
//! | [`work`] | the worker: offer intake, a GPU's queue, sandbox runs, checkpoints, reports; the owner's policy and idle detection; this node's GPUs as advert entries | `net`, `store` |
//! | [`net`] | the libp2p swarm and the one actor that owns it: admission, adverts, revocations, credit gossip, requests between members, reachability; blob transfer | `store`, `trust` |
//! | [`trust`] | membership files, reputation, credits, the trust simulation | nothing of the node's |
//! | [`store`] | the sled database (peers, revocation lists) and the blob files | nothing of the node's |
//! | [`metrics`] | the node's counters, one Prometheus registry with libp2p's | nothing of the node's |
//! | [`api`], [`cli`] | the interfaces: the HTTP API (routes by resource, and the client the CLI uses), one CLI file per user, the demo | every room, through its handle |
//! | [`daemon`] | `alliance node run`: opens the store, starts the network actor, the worker, the submitter and the API | every room |
//! | [`config`] | the documented configuration file, a section per room | `work` (owner policy types) |
//!
//! Records that cross rooms are few and come from `alliance-protocol`
//! (an offer, a receipt, a credit, an advert) or are the submitter's job
//! records ([`submit::JobRecord`], [`submit::JobSummary`]) that the API
//! shows. Everything that touches a GPU comes from `alliance-kernels`.
//!
//! # The path of a job
//!
//! 1. **Submit** — `cli::researcher` (or any API client) posts a job to
//!    `api::jobs`; `submit::spec` checks it as a worker would and
//!    `submit::intake` writes it to sled before the id is handed out.
//! 2. **Match** — `submit::schedule` runs a pass over the live adverts
//!    that `net::actor::adverts` keeps; `submit::matching` picks a worker
//!    per replica or says why the task waits.
//! 3. **Offer** — `submit::offers` signs a batch; the actor sends it
//!    (`net::actor::requests`) and the worker's `work::offers` accepts or
//!    declines each offer.
//! 4. **Fetch** — `work::run` pulls blob inputs over `net::blobs` into
//!    `store::blobs`.
//! 5. **Run** — `work::run` hands the task to the GPU's sandbox child;
//!    `work::checkpoints` sends state every K steps.
//! 6. **Receipt** — `work::reports` signs receipts and failures a batch at
//!    a time and retries until acknowledged.
//! 7. **Verify** — `submit::reports` checks each receipt and output hash;
//!    `submit::verify` compares replicas and decides by quorum.
//! 8. **Account** — `submit::settle` counts the outcome in `trust::reputation`
//!    and seals credits, which `net` gossips and `trust::credits` keeps on
//!    every node.
//! 9. **Assemble** — `submit::export` writes verified outputs as `.npy`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod net;
pub mod store;
pub mod submit;
pub mod trust;
pub mod work;
