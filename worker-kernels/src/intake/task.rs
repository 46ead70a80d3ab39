//! The task's side of intake: what a task supplies for each binding,
//! checked against a kernel that passed [`super::check_kernel`], with the
//! dispatch, the steps and the bytes in total.

use super::{BufferKind, IntakeError, Kernel, Limits, check};
use crate::gpu::ComputeLimits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supplied {
    pub binding: u32,
    pub kind: BufferKind,
    pub bytes: u64,
}

/// Checks a task's bindings, dispatch and steps against a checked kernel.
pub fn check_task(
    kernel: &Kernel,
    supplied: &[Supplied],
    dispatch: [u32; 3],
    steps: u32,
    checkpoint_every: Option<u32>,
    limits: &Limits,
    device: Option<&ComputeLimits>,
) -> Result<(), IntakeError> {
    for (axis, n) in ['x', 'y', 'z'].into_iter().zip(dispatch) {
        if n == 0 {
            return Err(IntakeError::EmptyDispatch { axis });
        }
        check(
            format!("the dispatch along {axis}"),
            "max_workgroups_per_dimension",
            u64::from(n),
            limits.max_workgroups_per_dimension,
            device.map(|d| u64::from(d.max_compute_workgroups_per_dimension)),
        )?;
    }
    let total: u64 = dispatch.iter().map(|&n| u64::from(n)).product();
    check(
        format!("the dispatch ({total} workgroups)"),
        "max_workgroups_total",
        total,
        limits.max_workgroups_total,
        None,
    )?;
    if steps == 0 {
        return Err(IntakeError::NoSteps);
    }
    check(
        "the number of steps",
        "max_steps",
        u64::from(steps),
        limits.max_steps,
        None,
    )?;
    if checkpoint_every == Some(0) {
        return Err(IntakeError::ZeroCheckpointInterval);
    }

    let mut total_bytes = 0u64;
    for s in supplied {
        let Some(info) = kernel.bindings.iter().find(|b| b.binding == s.binding) else {
            return Err(IntakeError::UnusedBinding {
                binding: s.binding,
                entry: kernel.entry_point.clone(),
            });
        };
        let compatible = match (info.kind, s.kind) {
            (BufferKind::Uniform, BufferKind::Uniform) => true,
            // A task may hand a read-write buffer to a kernel that only reads it.
            (BufferKind::Storage { read_only: true }, BufferKind::Storage { .. }) => true,
            (
                BufferKind::Storage { read_only: false },
                BufferKind::Storage { read_only: false },
            ) => true,
            _ => false,
        };
        if !compatible {
            return Err(IntakeError::KindMismatch {
                binding: s.binding,
                declared: info.kind.to_string(),
                supplied: s.kind.to_string(),
            });
        }
        let device_max = device.map(|d| match s.kind {
            BufferKind::Uniform => d.max_uniform_buffer_binding_size,
            BufferKind::Storage { .. } => d.max_storage_buffer_binding_size.min(d.max_buffer_size),
        });
        check(
            format!("@binding({}) ({} bytes)", s.binding, s.bytes),
            "max_buffer_bytes",
            s.bytes,
            limits.max_buffer_bytes,
            device_max,
        )?;
        if s.bytes < info.min_bytes.max(1) {
            return Err(IntakeError::TooSmall {
                binding: s.binding,
                name: info.name.clone(),
                needed: info.min_bytes.max(1),
                supplied: s.bytes,
            });
        }
        total_bytes = total_bytes.saturating_add(s.bytes);
    }
    for info in &kernel.bindings {
        if !supplied.iter().any(|s| s.binding == info.binding) {
            return Err(IntakeError::MissingBinding {
                binding: info.binding,
                name: info.name.clone(),
            });
        }
    }
    check(
        format!("the task's buffers ({total_bytes} bytes in all)"),
        "max_total_bytes",
        total_bytes,
        limits.max_total_bytes,
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intake::tests::{SAXPY, check};

    #[test]
    fn task_checks() {
        let k = check(SAXPY).unwrap();
        let l = Limits::default();
        let ok = [
            Supplied {
                binding: 0,
                kind: BufferKind::Uniform,
                bytes: 8,
            },
            Supplied {
                binding: 1,
                kind: BufferKind::Storage { read_only: true },
                bytes: 400,
            },
            Supplied {
                binding: 2,
                kind: BufferKind::Storage { read_only: false },
                bytes: 400,
            },
        ];
        check_task(&k, &ok, [2, 1, 1], 1, None, &l, None).unwrap();
        let err = check_task(&k, &ok[..2], [2, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(
            matches!(err, IntakeError::MissingBinding { binding: 2, .. }),
            "{err}"
        );
        let mut wrong = ok;
        wrong[2].kind = BufferKind::Storage { read_only: true };
        let err = check_task(&k, &wrong, [2, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(
            matches!(err, IntakeError::KindMismatch { binding: 2, .. }),
            "{err}"
        );
        let mut small = ok;
        small[0].bytes = 4;
        let err = check_task(&k, &small, [2, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(
            matches!(err, IntakeError::TooSmall { needed: 8, .. }),
            "{err}"
        );
        let err = check_task(&k, &ok, [70_000, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(
            err.to_string().contains("max_workgroups_per_dimension"),
            "{err}"
        );
        let err = check_task(&k, &ok, [60_000, 60_000, 1], 1, None, &l, None).unwrap_err();
        assert!(err.to_string().contains("max_workgroups_total"), "{err}");
        let err = check_task(&k, &ok, [1, 0, 1], 1, None, &l, None).unwrap_err();
        assert_eq!(err, IntakeError::EmptyDispatch { axis: 'y' });
        let mut huge = ok;
        huge[2].bytes = 300 << 20;
        let err = check_task(&k, &huge, [1, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(err.to_string().contains("max_buffer_bytes"), "{err}");
        let mut extra = ok.to_vec();
        extra.push(Supplied {
            binding: 9,
            kind: BufferKind::Uniform,
            bytes: 4,
        });
        let err = check_task(&k, &extra, [1, 1, 1], 1, None, &l, None).unwrap_err();
        assert!(
            matches!(err, IntakeError::UnusedBinding { binding: 9, .. }),
            "{err}"
        );
    }
}
