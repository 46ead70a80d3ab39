//! The system tests: one binary, one module per scenario, so libp2p and
//! wgpu are linked once rather than once per file. Helpers they share live
//! in the `alliance-tests` library (`tests/src`).

mod credits;
mod demo;
mod failures;
mod frames;
mod hostile;
mod jobs;
mod layering;
mod limits;
mod nat;
mod network;
mod owner;
mod reachability;
mod remote;
mod scale;
mod service;
mod trust;
