//! Jobs: the job file a researcher writes ([`spec`]), and `.npy` arrays
//! ([`npy`]) for inputs and results.

pub mod npy;
pub mod spec;

pub use spec::{Job, JobError};
