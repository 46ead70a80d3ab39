//! The `alliance` binary as a user runs it: one test binary, one module
//! per area.

mod cli;
mod sandbox;
