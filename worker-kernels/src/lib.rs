//! Alliance's GPU side: everything that touches a GPU, behind an interface
//! the node can call without knowing wgpu.
//!
//! # Layout
//!
//! - [`gpu`]: find the adapters on every backend, choose the ones the
//!   owner shares, and describe them (name, vendor, backend, device type,
//!   driver, the limits that decide whether a kernel fits).
//!
//! This crate knows nothing of the network or of Alliance's records; the
//! node turns its reports into signed adverts.
//!
//! # Example
//!
//! ```no_run
//! use alliance_kernels::gpu::{self, Selection};
//!
//! for found in gpu::discover(&Selection::default()).unwrap() {
//!     println!("{}: {} ({:?}, {:?})", found.report.index, found.report.name,
//!              found.report.backend, found.report.device_type);
//! }
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod compare;
pub mod executor;
pub mod gpu;
pub mod intake;
pub mod library;
pub mod sandbox;
pub mod selfbench;
