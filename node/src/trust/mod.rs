//! Trust: who belongs to the alliance, and what each member has earned.
//!
//! - [`membership`]: charters, certificates and revocation lists as files,
//!   read, written and checked the way a node checks them.
//! - [`reputation`]: what a submitting node verified of each worker and
//!   institution; adaptive replication reads it.
//! - [`credits`]: signed credits for verified GPU time, kept by every node,
//!   and each institution's fading balance.
//! - [`sim`]: the model behind the trust benchmark, on the scheduler's own
//!   rules.
//!
//! This room holds records and their rules, not the network or the
//! scheduler: `submit` records outcomes here, `net` feeds credits in.

pub mod credits;
pub mod membership;
pub mod reputation;
pub mod sim;

pub use membership::{
    Bundle, Verified, armored, parse_time, read_charter, verify_bundle, write_new,
};
