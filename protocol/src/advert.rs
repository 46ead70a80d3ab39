//! Signed GPU adverts: what a worker offers the alliance right now.
//!
//! A worker publishes a [`GpuAdvert`] on the alliance's gossip topic, signed
//! with its node key, and republishes before it expires or when its state
//! changes. Receivers keep the newest advert per peer (by `sequence`) and
//! drop it at `expires_at`.

use serde::{Deserialize, Serialize};

use crate::keys::PublicKey;
use crate::signed::Record;
use crate::time::Timestamp;

/// Longest advert lifetime a receiver accepts, in seconds.
pub const MAX_ADVERT_TTL_SECS: u64 = 3600;

/// The graphics API an adapter is driven through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Backend {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    Other,
}

/// What kind of device an adapter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceType {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    /// A software rasteriser (llvmpipe, lavapipe, WARP): works, slowly.
    Cpu,
    Other,
}

/// Whether a GPU takes work now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuState {
    /// Free for alliance work.
    Idle,
    /// All of its alliance slots are taken, or its owner is using it.
    Busy,
    /// Its owner paused sharing, or the sharing window is closed.
    Paused,
}

/// The device limits that decide whether a kernel fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuLimits {
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_uniform_buffer_binding_size: u64,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroup_size: [u32; 3],
    pub max_compute_workgroups_per_dimension: u32,
    pub max_compute_workgroup_storage_size: u32,
}

/// Self-benchmark figures, for matching and finish-time estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuBench {
    /// Streaming copy bandwidth, MB/s.
    pub copy_mb_per_s: u64,
    /// Fused multiply-add throughput, MFLOP/s.
    pub fma_mflops: u64,
}

/// One GPU a worker offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index of this GPU on the node (stable across restarts).
    pub index: u16,
    /// Adapter name, e.g. "NVIDIA H200" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// PCI vendor id (0 when unknown).
    pub vendor: u32,
    /// PCI device id (0 when unknown).
    pub device: u32,
    pub backend: Backend,
    pub device_type: DeviceType,
    /// Driver name and version.
    pub driver: String,
    pub limits: GpuLimits,
    /// Absent until the self-benchmark has run.
    pub bench: Option<GpuBench>,
    pub state: GpuState,
    /// Why the GPU takes no work now, in words for people (empty when
    /// idle): paused by its owner, outside its sharing window, its owner's
    /// own work running on it.
    pub reason: String,
    /// How many more tasks this GPU accepts now.
    pub free_slots: u16,
    /// The owner's terms for work on this GPU.
    pub terms: Terms,
}

/// What an owner lets alliance work do on one GPU; schedulers read it so
/// they never offer a task the GPU would decline.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Terms {
    /// Largest GPU memory one task may use, in bytes (0: the device's limits).
    pub max_task_bytes: u64,
    /// Longest a task may run, in seconds (0: no cap).
    pub max_task_secs: u64,
    /// Only these institutions' tasks run here (empty: every member's).
    pub allow: Vec<String>,
    /// These institutions' tasks never run here.
    pub deny: Vec<String>,
}

impl Terms {
    /// Whether tasks of `institution` may run under these terms.
    pub fn admits(&self, institution: &str) -> bool {
        !self.deny.iter().any(|d| d == institution)
            && (self.allow.is_empty() || self.allow.iter().any(|a| a == institution))
    }

    /// Whether a task of `institution` that may run `timeout_ms` and uses
    /// `bytes` of GPU memory may run under these terms, or why not. The
    /// worker and the schedulers that read its advert ask the same.
    pub fn check(
        &self,
        institution: &str,
        timeout_ms: u64,
        bytes: u64,
    ) -> Result<(), TermsRefusal> {
        if !self.admits(institution) {
            return Err(TermsRefusal::Institution);
        }
        if self.max_task_secs > 0 && timeout_ms > self.max_task_secs.saturating_mul(1000) {
            return Err(TermsRefusal::TooLong {
                max_secs: self.max_task_secs,
                secs: timeout_ms.div_ceil(1000),
            });
        }
        if self.max_task_bytes > 0 && bytes > self.max_task_bytes {
            return Err(TermsRefusal::TooLarge {
                max_mib: self.max_task_bytes >> 20,
                mib: bytes.div_ceil(1 << 20),
            });
        }
        Ok(())
    }
}

/// Why an owner's terms refuse a task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TermsRefusal {
    #[error("the owner's allow or deny list refuses the submitter's institution")]
    Institution,
    #[error(
        "tasks here may run at most {max_secs} s; this one may run {secs} s (its job's timeout_secs)"
    )]
    TooLong { max_secs: u64, secs: u64 },
    #[error("tasks here may use at most {max_mib} MiB of GPU memory; this one needs {mib} MiB")]
    TooLarge { max_mib: u64, mib: u64 },
}

/// A worker's signed statement of the GPUs it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuAdvert {
    /// The worker's node key (must be the signer).
    pub peer: PublicKey,
    /// The worker's institution key.
    pub institution: PublicKey,
    pub gpus: Vec<GpuInfo>,
    /// Increases with every advert this peer issues; an older one loses.
    pub sequence: u64,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

impl Record for GpuAdvert {
    const NAME: &'static str = "GPU advert";
    const CONTEXT: &'static str = "gpu-advert/v2";
    const VERSION: u16 = 2;
    const MAX_SIZE: usize = 16 * 1024;
}

/// Why an advert whose signature holds is still refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertError {
    #[error("advert names peer {named} but is signed by {signer}")]
    SignerMismatch { named: PublicKey, signer: PublicKey },
    #[error("advert expired at {expires_at} (now {now})")]
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
    #[error("advert is issued in the future ({issued_at}, now {now})")]
    FromTheFuture {
        issued_at: Timestamp,
        now: Timestamp,
    },
    #[error("advert lives {ttl}s, more than the {MAX_ADVERT_TTL_SECS}s allowed")]
    TooLong { ttl: u64 },
    #[error(
        "advert sequence {sequence} is not newer than {held}, already held (replayed or reordered)"
    )]
    Stale { sequence: u64, held: u64 },
}

/// Seconds of clock difference tolerated between peers.
pub const CLOCK_SKEW_SECS: u64 = 60;

impl GpuAdvert {
    /// Checks an advert (already signature-verified and signed by `signer`)
    /// against the clock and the newest sequence held for its peer.
    pub fn check(
        &self,
        signer: PublicKey,
        now: Timestamp,
        held: Option<u64>,
    ) -> Result<(), AdvertError> {
        if self.peer != signer {
            return Err(AdvertError::SignerMismatch {
                named: self.peer,
                signer,
            });
        }
        if self.issued_at > now.saturating_add_secs(CLOCK_SKEW_SECS) {
            return Err(AdvertError::FromTheFuture {
                issued_at: self.issued_at,
                now,
            });
        }
        if now >= self.expires_at {
            return Err(AdvertError::Expired {
                expires_at: self.expires_at,
                now,
            });
        }
        let ttl = self
            .expires_at
            .as_secs()
            .saturating_sub(self.issued_at.as_secs());
        if ttl > MAX_ADVERT_TTL_SECS {
            return Err(AdvertError::TooLong { ttl });
        }
        if let Some(held) = held
            && self.sequence <= held
        {
            return Err(AdvertError::Stale {
                sequence: self.sequence,
                held,
            });
        }
        Ok(())
    }
}
