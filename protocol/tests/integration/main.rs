//! Records, certificates and chains: one test binary, one module per area.

mod chain;
mod records;
