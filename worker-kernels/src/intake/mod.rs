//! Intake checks: what a kernel and a task must satisfy before anything
//! reaches a device.
//!
//! A kernel is WGSL from another university. [`check_kernel`] parses and
//! validates it with naga (the copy wgpu ships), then applies the sandbox
//! rules: compute entry points only; storage and uniform buffers only (no
//! textures, samplers or immediates); every bound resource in group 0; no
//! pipeline overrides; and the owner's [`Limits`]. [`check_task`] then
//! checks a task against the kernel: every binding supplied with the right
//! kind and enough bytes, the dispatch, the steps and the bytes in total.
//!
//! Errors name the rule, the value and where the limit is set, so a
//! researcher can fix the kernel without asking anyone.

use std::fmt;

use serde::{Deserialize, Serialize};
use wgpu::naga;

use crate::gpu::ComputeLimits;

/// The owner's limits on what a kernel and a task may use. Each is
/// further capped by the device's own limit when a device is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest kernel source, in bytes.
    pub max_source_bytes: u64,
    /// Deepest nesting of brackets, parentheses and braces in the source.
    pub max_nesting_depth: u64,
    /// Most buffers bound at once.
    pub max_bindings: u64,
    /// Largest single buffer, in bytes.
    pub max_buffer_bytes: u64,
    /// Most bytes in all buffers of one task.
    pub max_total_bytes: u64,
    /// Most invocations in one workgroup (x·y·z of `@workgroup_size`).
    pub max_workgroup_invocations: u64,
    /// Most workgroups dispatched along one dimension.
    pub max_workgroups_per_dimension: u64,
    /// Most workgroups dispatched in total (x·y·z).
    pub max_workgroups_total: u64,
    /// Most repetitions of the dispatch in one task.
    pub max_steps: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_source_bytes: 256 * 1024,
            max_nesting_depth: 32,
            max_bindings: 8,
            max_buffer_bytes: 256 << 20,
            max_total_bytes: 1 << 30,
            max_workgroup_invocations: 256,
            max_workgroups_per_dimension: 65_535,
            max_workgroups_total: 1 << 22,
            max_steps: 1_000_000,
        }
    }
}

/// Where the limit that refused a kernel comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitSource {
    /// The worker owner's policy (the `Limits` in its config).
    OwnerPolicy,
    /// The GPU's own limit, lower than the owner's.
    Device,
}

impl fmt::Display for LimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitSource::OwnerPolicy => "set by the worker owner's policy",
            LimitSource::Device => "the GPU's own limit",
        })
    }
}

/// Why a kernel or task was refused. Every message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum IntakeError {
    #[error("WGSL syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: u32,
        column: u32,
        message: String,
    },
    #[error("WGSL syntax error: {message}")]
    SyntaxNoLocation { message: String },
    #[error("the kernel is not valid WGSL{location}: {message}")]
    Invalid { location: String, message: String },
    #[error("{what} is {value}, over the limit {limit} = {max} ({set_by})")]
    Limit {
        what: String,
        limit: String,
        value: u64,
        max: u64,
        set_by: LimitSource,
    },
    #[error("the kernel has no entry point {wanted:?}; it has {found}")]
    NoEntryPoint { wanted: String, found: String },
    #[error("entry point {name:?} is a {stage} shader; only @compute entry points run here")]
    NotCompute { name: String, stage: String },
    #[error(
        "{name} at @group({group}) @binding({binding}) is {kind}; kernels may bind only storage and uniform buffers"
    )]
    ForbiddenBinding {
        name: String,
        group: u32,
        binding: u32,
        kind: String,
    },
    #[error("{name} uses {what}, which kernels may not use: {why}")]
    Forbidden {
        name: String,
        what: String,
        why: String,
    },
    #[error("{name} is bound to @group({group}); put every binding in @group(0)")]
    WrongGroup { name: String, group: u32 },
    #[error("the kernel reads @binding({binding}) ({name}), but the task supplies no data for it")]
    MissingBinding { binding: u32, name: String },
    #[error("the task supplies @binding({binding}), which entry point {entry:?} does not use")]
    UnusedBinding { binding: u32, entry: String },
    #[error(
        "@binding({binding}) is a {declared} in the kernel, but the task supplies it as {supplied}"
    )]
    KindMismatch {
        binding: u32,
        declared: String,
        supplied: String,
    },
    #[error(
        "@binding({binding}) ({name}) needs at least {needed} bytes, but the task supplies {supplied}"
    )]
    TooSmall {
        binding: u32,
        name: String,
        needed: u64,
        supplied: u64,
    },
    #[error("the dispatch has {axis} = 0 workgroups; every dimension needs at least 1")]
    EmptyDispatch { axis: char },
    #[error("the task has 0 steps; give at least 1")]
    NoSteps,
    #[error("checkpoint_every = 0; give a number of steps, or no checkpoints")]
    ZeroCheckpointInterval,
}

/// How a kernel declares a bound buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufferKind {
    Uniform,
    /// A storage buffer; `read_only` when declared `read`.
    Storage {
        read_only: bool,
    },
}

impl fmt::Display for BufferKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BufferKind::Uniform => "uniform buffer",
            BufferKind::Storage { read_only: true } => "read-only storage buffer",
            BufferKind::Storage { read_only: false } => "read-write storage buffer",
        })
    }
}

/// A buffer the entry point uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingInfo {
    pub binding: u32,
    /// The variable's name in the source, for messages.
    pub name: String,
    pub kind: BufferKind,
    /// Bytes the buffer must hold at least (one element of a runtime array).
    pub min_bytes: u64,
    /// The WGSL scalar type its elements are made of (`"f32"` for
    /// `array<vec4<f32>>`), when there is one; `None` for structs.
    pub scalar: Option<&'static str>,
}

/// The scalar type a buffer of type `ty` is made of, looking through
/// arrays, vectors, matrices and atomics.
fn scalar_of(module: &naga::Module, ty: naga::Handle<naga::Type>) -> Option<&'static str> {
    use naga::{ScalarKind, TypeInner};
    let scalar = match &module.types[ty].inner {
        TypeInner::Scalar(s) | TypeInner::Atomic(s) => *s,
        TypeInner::Vector { scalar, .. } | TypeInner::Matrix { scalar, .. } => *scalar,
        TypeInner::Array { base, .. } => return scalar_of(module, *base),
        _ => return None,
    };
    Some(match (scalar.kind, scalar.width) {
        (ScalarKind::Float, 4) => "f32",
        (ScalarKind::Float, 2) => "f16",
        (ScalarKind::Uint, 4) => "u32",
        (ScalarKind::Sint, 4) => "i32",
        (ScalarKind::Bool, _) => "bool",
        _ => "other",
    })
}

/// A kernel that passed intake: its entry point's shape and bindings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub entry_point: String,
    pub workgroup_size: [u32; 3],
    /// The buffers the entry point uses, by binding number.
    pub bindings: Vec<BindingInfo>,
}

/// Refuses `value` above the owner's `max`, or above `device_max` when lower.
fn check(
    what: impl Into<String>,
    limit: &str,
    value: u64,
    max: u64,
    device_max: Option<u64>,
) -> Result<(), IntakeError> {
    let (max, source) = match device_max {
        Some(d) if d < max => (d, LimitSource::Device),
        _ => (max, LimitSource::OwnerPolicy),
    };
    if value > max {
        return Err(IntakeError::Limit {
            what: what.into(),
            limit: limit.into(),
            value,
            max,
            set_by: source,
        });
    }
    Ok(())
}

/// The deepest nesting of `(`, `[` and `{` outside comments, found without
/// parsing, so pathological input is refused before it reaches naga.
pub fn nesting_depth(source: &str) -> u64 {
    let bytes = source.as_bytes();
    let (mut depth, mut max, mut i) = (0u64, 0u64, 0usize);
    let mut comment_depth = 0u64;
    while i < bytes.len() {
        let next = bytes.get(i + 1).copied();
        match (bytes[i], next) {
            (b'/', Some(b'*')) => {
                comment_depth += 1;
                i += 2;
                continue;
            }
            (b'*', Some(b'/')) if comment_depth > 0 => {
                comment_depth -= 1;
                i += 2;
                continue;
            }
            (b'/', Some(b'/')) if comment_depth == 0 => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        if comment_depth == 0 {
            match bytes[i] {
                b'(' | b'[' | b'{' => {
                    depth += 1;
                    max = max.max(depth);
                }
                b')' | b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        i += 1;
    }
    max
}

fn stage_name(stage: naga::ShaderStage) -> String {
    format!("{stage:?}").to_lowercase()
}

/// Parses, validates and checks a kernel against the sandbox rules and
/// `limits` (further capped by `device` when given).
pub fn check_kernel(
    source: &str,
    entry_point: &str,
    limits: &Limits,
    device: Option<&ComputeLimits>,
) -> Result<Kernel, IntakeError> {
    check(
        "the kernel source",
        "max_source_bytes",
        source.len() as u64,
        limits.max_source_bytes,
        None,
    )?;
    check(
        "the nesting depth of the source",
        "max_nesting_depth",
        nesting_depth(source),
        limits.max_nesting_depth,
        None,
    )?;

    let module = naga::front::wgsl::parse_str(source).map_err(|e| match e.location(source) {
        Some(loc) => IntakeError::Syntax {
            line: loc.line_number,
            column: loc.line_position,
            message: e.message().to_owned(),
        },
        None => IntakeError::SyntaxNoLocation {
            message: e.message().to_owned(),
        },
    })?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .map_err(|e| IntakeError::Invalid {
        location: e
            .location(source)
            .map(|l| format!(" at line {}, column {}", l.line_number, l.line_position))
            .unwrap_or_default(),
        message: full_message(e.as_inner()),
    })?;

    for ep in &module.entry_points {
        if ep.stage != naga::ShaderStage::Compute {
            return Err(IntakeError::NotCompute {
                name: ep.name.clone(),
                stage: stage_name(ep.stage),
            });
        }
    }
    if !module.overrides.is_empty() {
        return Err(IntakeError::Forbidden {
            name: "the kernel".into(),
            what: "`override` declarations".into(),
            why: "tasks carry no pipeline constants; use a `const` or a uniform".into(),
        });
    }
    let (index, ep) = module
        .entry_points
        .iter()
        .enumerate()
        .find(|(_, ep)| ep.name == entry_point)
        .ok_or_else(|| IntakeError::NoEntryPoint {
            wanted: entry_point.into(),
            found: if module.entry_points.is_empty() {
                "none".into()
            } else {
                module
                    .entry_points
                    .iter()
                    .map(|e| format!("{:?}", e.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })?;

    let [x, y, z] = ep.workgroup_size;
    let invocations = u64::from(x) * u64::from(y) * u64::from(z);
    check(
        format!("@workgroup_size({x}, {y}, {z}) = {invocations} invocations"),
        "max_workgroup_invocations",
        invocations,
        limits.max_workgroup_invocations,
        device.map(|d| u64::from(d.max_compute_invocations_per_workgroup)),
    )?;
    if let Some(d) = device {
        for (axis, (size, max)) in ['x', 'y', 'z'].into_iter().zip(
            ep.workgroup_size
                .into_iter()
                .zip(d.max_compute_workgroup_size),
        ) {
            check(
                format!("@workgroup_size along {axis}"),
                "max_compute_workgroup_size",
                u64::from(size),
                u64::from(max),
                None,
            )
            .map_err(|e| match e {
                IntakeError::Limit {
                    what,
                    limit,
                    value,
                    max,
                    ..
                } => IntakeError::Limit {
                    what,
                    limit,
                    value,
                    max,
                    set_by: LimitSource::Device,
                },
                other => other,
            })?;
        }
    }

    let ep_info = info.get_entry_point(index);
    let mut bindings = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        let name = var
            .name
            .clone()
            .unwrap_or_else(|| "an unnamed global".into());
        let kind = match var.space {
            naga::AddressSpace::Uniform => BufferKind::Uniform,
            naga::AddressSpace::Storage { access } => BufferKind::Storage {
                read_only: !access.contains(naga::StorageAccess::STORE),
            },
            naga::AddressSpace::Private
            | naga::AddressSpace::WorkGroup
            | naga::AddressSpace::Function => continue,
            naga::AddressSpace::Handle => {
                let (group, binding) = var
                    .binding
                    .as_ref()
                    .map_or((0, 0), |b| (b.group, b.binding));
                let kind = match module.types[var.ty].inner {
                    naga::TypeInner::Sampler { .. } => "a sampler",
                    naga::TypeInner::Image { .. } => "a texture",
                    _ => "an opaque handle",
                };
                return Err(IntakeError::ForbiddenBinding {
                    name,
                    group,
                    binding,
                    kind: kind.into(),
                });
            }
            other => {
                return Err(IntakeError::Forbidden {
                    name,
                    what: format!("the {other:?} address space"),
                    why: "only storage and uniform buffers are bound".into(),
                });
            }
        };
        let Some(rb) = var.binding.as_ref() else {
            continue;
        };
        if rb.group != 0 {
            return Err(IntakeError::WrongGroup {
                name,
                group: rb.group,
            });
        }
        if ep_info[handle].is_empty() {
            continue; // declared but not used by this entry point
        }
        let min_bytes = module.types[var.ty]
            .inner
            .try_size(module.to_ctx())
            .map_or(0, u64::from);
        bindings.push(BindingInfo {
            binding: rb.binding,
            name,
            kind,
            min_bytes,
            scalar: scalar_of(&module, var.ty),
        });
    }
    bindings.sort_by_key(|b| b.binding);
    check(
        format!("the number of bindings ({})", bindings.len()),
        "max_bindings",
        bindings.len() as u64,
        limits.max_bindings,
        device.map(|d| u64::from(d.max_storage_buffers_per_shader_stage)),
    )?;
    Ok(Kernel {
        entry_point: entry_point.into(),
        workgroup_size: ep.workgroup_size,
        bindings,
    })
}

/// The error and its sources, one clause each.
fn full_message(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// What a task supplies for one binding, for [`check_task`].
mod task;
pub use task::{Supplied, check_task};

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const SAXPY: &str = "
        struct Params { a: f32, n: u32 }
        @group(0) @binding(0) var<uniform> p: Params;
        @group(0) @binding(1) var<storage, read> x: array<f32>;
        @group(0) @binding(2) var<storage, read_write> y: array<f32>;
        @compute @workgroup_size(64)
        fn main(@builtin(global_invocation_id) id: vec3<u32>) {
            if (id.x < p.n) { y[id.x] = p.a * x[id.x] + y[id.x]; }
        }";

    pub(super) fn check(src: &str) -> Result<Kernel, IntakeError> {
        check_kernel(src, "main", &Limits::default(), None)
    }

    #[test]
    fn accepts_a_compute_kernel_and_reports_its_bindings() {
        let k = check(SAXPY).unwrap();
        assert_eq!(k.workgroup_size, [64, 1, 1]);
        let kinds: Vec<_> = k
            .bindings
            .iter()
            .map(|b| (b.binding, b.kind, b.min_bytes))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, BufferKind::Uniform, 8),
                (1, BufferKind::Storage { read_only: true }, 4),
                (2, BufferKind::Storage { read_only: false }, 4),
            ]
        );
        let scalars: Vec<_> = k.bindings.iter().map(|b| b.scalar).collect();
        assert_eq!(scalars, vec![None, Some("f32"), Some("f32")]);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let err = check("@compute @workgroup_size(1)\nfn main() {\n  let x = ;\n}").unwrap_err();
        match &err {
            IntakeError::Syntax { line, column, .. } => {
                assert_eq!((*line, *column), (3, 11), "{err}")
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("line 3, column 11"), "{err}");
    }

    #[test]
    fn textures_samplers_and_other_stages_are_refused() {
        let err = check("@group(0) @binding(3) var t: texture_2d<f32>;\n@compute @workgroup_size(1) fn main() { _ = textureDimensions(t); }").unwrap_err();
        assert!(
            matches!(&err, IntakeError::ForbiddenBinding { binding: 3, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("texture") && err.to_string().contains("@binding(3)"),
            "{err}"
        );
        let err = check(
            "@group(0) @binding(1) var s: sampler;\n@compute @workgroup_size(1) fn main() {}",
        )
        .unwrap_err();
        assert!(err.to_string().contains("sampler"), "{err}");
        let err =
            check("@vertex fn main() -> @builtin(position) vec4<f32> { return vec4<f32>(); }")
                .unwrap_err();
        assert!(matches!(err, IntakeError::NotCompute { .. }), "{err}");
        let err = check("@group(1) @binding(0) var<storage, read_write> a: array<u32>;\n@compute @workgroup_size(1) fn main() { a[0] = 1u; }").unwrap_err();
        assert!(
            matches!(err, IntakeError::WrongGroup { group: 1, .. }),
            "{err}"
        );
        let err = check("override n: u32 = 4u;\n@compute @workgroup_size(1) fn main() { _ = n; }")
            .unwrap_err();
        assert!(err.to_string().contains("override"), "{err}");
    }

    #[test]
    fn limits_name_value_and_source() {
        let err = check(&format!("{SAXPY}{}", " ".repeat(300 * 1024))).unwrap_err();
        assert!(
            err.to_string().contains("max_source_bytes")
                && err.to_string().contains("owner's policy"),
            "{err}"
        );
        // 1 MiB of nested parentheses, under a policy that allows the size.
        let deep = format!(
            "const x = {}1{};\n@compute @workgroup_size(1) fn main() {{}}",
            "(".repeat(1 << 19),
            ")".repeat(1 << 19)
        );
        let roomy = Limits {
            max_source_bytes: 4 << 20,
            ..Limits::default()
        };
        let err = check_kernel(&deep, "main", &roomy, None).unwrap_err();
        assert!(err.to_string().contains("max_nesting_depth"), "{err}");
        let err = check("@compute @workgroup_size(32, 32) fn main() {}").unwrap_err();
        assert!(
            err.to_string().contains("1024 invocations")
                && err.to_string().contains("max_workgroup_invocations"),
            "{err}"
        );
        let device = ComputeLimits {
            max_buffer_size: 1 << 30,
            max_storage_buffer_binding_size: 1 << 27,
            max_storage_buffers_per_shader_stage: 8,
            max_uniform_buffer_binding_size: 1 << 16,
            max_compute_invocations_per_workgroup: 128,
            max_compute_workgroup_size: [128, 128, 64],
            max_compute_workgroups_per_dimension: 65535,
            max_compute_workgroup_storage_size: 16384,
        };
        let err = check_kernel(
            "@compute @workgroup_size(256) fn main() {}",
            "main",
            &Limits::default(),
            Some(&device),
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                IntakeError::Limit {
                    set_by: LimitSource::Device,
                    max: 128,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn nesting_depth_ignores_comments() {
        assert_eq!(nesting_depth("fn f() { let a = (1 + (2)); }"), 3);
        assert_eq!(
            nesting_depth("// ((((((\n/* (((( /* nested */ (( */ fn f() {}"),
            1
        );
    }
}
