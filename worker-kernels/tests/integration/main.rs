//! The GPU side on the software adapter: one test binary, one module per
//! area.

mod executor;
mod library;
mod sandbox;
