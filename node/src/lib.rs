//! The Alliance node: the daemon and the `alliance` command line.
//!
//! # Layout
//!
//! - [`config`]: the node's documented configuration file.
//! - [`trust`]: membership files (charters, certificates, revocation lists)
//!   and checking them as a node does.
//! - [`gpus`]: this node's GPUs as advert entries.
//! - [`policy`]: the owner's terms per GPU, sharing windows, idle detection
//!   ([`nvml`] for NVIDIA GPUs).
//! - [`net`]: the libp2p swarm and the network actor.
//! - [`store`]: the node's sled database.
//! - [`api`]: the local HTTP API and its client.
//! - [`run`]: `alliance node run`.
//! - [`cli`]: the `alliance` commands.
//!
//! The node joins the two lower crates: records and signatures come from
//! `alliance-protocol`, everything that touches a GPU from
//! `alliance-kernels`.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod api;
pub mod blobs;
pub mod cli;
pub mod config;
pub mod credits;
pub mod demo;
pub mod gpus;
pub mod job;
pub mod jobcli;
pub mod jobs;
pub mod net;
pub mod nvml;
pub mod policy;
pub mod reputation;
pub mod run;
pub mod store;
pub mod trust;
pub mod trustsim;
pub mod worker;
