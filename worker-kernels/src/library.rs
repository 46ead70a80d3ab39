//! The standard kernel library: WGSL kernels researchers can use as they
//! are or start from, each with a CPU reference implementation.
//!
//! The WGSL files live in `worker-kernels/kernels/`, with their bindings
//! and dispatch documented at the top of each. Every module here builds a
//! ready [`Task`] for its kernel and computes the same result on the CPU;
//! the tests compare the two on the software adapter.

use crate::executor::{Binding, ElemType, Task};

/// A kernel of the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryKernel {
    pub name: &'static str,
    pub source: &'static str,
    pub entry_point: &'static str,
    pub about: &'static str,
}

macro_rules! kernel {
    ($name:literal, $about:literal) => {
        LibraryKernel {
            name: $name,
            source: include_str!(concat!("../kernels/", $name, ".wgsl")),
            entry_point: "main",
            about: $about,
        }
    };
}

/// Every kernel of the library.
pub const KERNELS: [LibraryKernel; 11] = [
    kernel!("saxpy", "y = a·x + y"),
    kernel!("reduce_f32", "sum of f32, 512 elements per workgroup"),
    kernel!("reduce_u32", "sum of u32, 512 elements per workgroup"),
    kernel!("scan", "inclusive prefix sum of u32"),
    kernel!("histogram", "histogram of u32 with workgroup atomics"),
    kernel!("sgemm", "tiled single-precision matrix multiply"),
    kernel!("sgemm_naive", "naive matrix multiply, the baseline"),
    kernel!(
        "heat",
        "2-D heat equation stencil, iterative, checkpointable"
    ),
    kernel!(
        "monte_carlo_pi",
        "π by Monte Carlo, counter-based RNG, bit-exact"
    ),
    kernel!("nbody", "one step of direct-summation n-body"),
    kernel!("mandelbrot", "Mandelbrot escape counts"),
];

/// The library kernel called `name`.
pub fn get(name: &str) -> Option<&'static LibraryKernel> {
    KERNELS.iter().find(|k| k.name == name)
}

fn source(name: &str) -> &'static str {
    get(name).map_or("", |k| k.source)
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes of u32 values.
pub fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values from little-endian bytes.
pub fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// u32 values from little-endian bytes.
pub fn to_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn uniform(binding: u32, data: Vec<u8>) -> Binding {
    Binding::Uniform {
        binding,
        data: data.into(),
    }
}

fn input(binding: u32, data: Vec<u8>) -> Binding {
    Binding::Input {
        binding,
        data: data.into(),
    }
}

fn output(binding: u32, len: usize, elem: ElemType) -> Binding {
    Binding::Output {
        binding,
        len: len as u64,
        elem,
    }
}

/// y = a·x + y.
pub mod saxpy {
    use super::*;

    /// The task; its output (binding 2) is the new `y`.
    pub fn task(a: f32, x: &[f32], y: &[f32]) -> Task {
        let n = count(x.len().min(y.len()));
        let mut params = f32_bytes(&[a]);
        params.extend(u32_bytes(&[n]));
        Task::new(
            source("saxpy"),
            "main",
            vec![
                uniform(0, params),
                input(1, f32_bytes(x)),
                Binding::State {
                    binding: 2,
                    data: f32_bytes(y).into(),
                    elem: ElemType::F32,
                },
            ],
            [n.div_ceil(256).max(1), 1, 1],
        )
    }

    /// The CPU result.
    pub fn cpu(a: f32, x: &[f32], y: &[f32]) -> Vec<f32> {
        x.iter().zip(y).map(|(x, y)| a * x + y).collect()
    }
}

/// Sums: one pass gives one partial sum per 512 elements.
pub mod reduce {
    use super::*;

    /// Elements one workgroup sums.
    pub const BLOCK: usize = 512;

    fn task(name: &str, n: usize, data: Vec<u8>, elem: ElemType) -> Task {
        let groups = n.div_ceil(BLOCK).max(1);
        Task::new(
            source(name),
            "main",
            vec![
                uniform(0, u32_bytes(&[count(n)])),
                input(1, data),
                output(2, groups, elem),
            ],
            [count(groups), 1, 1],
        )
    }

    /// One pass over f32 values.
    pub fn f32_task(x: &[f32]) -> Task {
        task("reduce_f32", x.len(), f32_bytes(x), ElemType::F32)
    }

    /// One pass over u32 values.
    pub fn u32_task(x: &[u32]) -> Task {
        task("reduce_u32", x.len(), u32_bytes(x), ElemType::U32)
    }

    /// The partial sums the GPU computes, added in the GPU's order.
    pub fn f32_cpu(x: &[f32]) -> Vec<f32> {
        partials(x, 0.0, |a, b| a + b)
    }

    /// The u32 partial sums (wrapping).
    pub fn u32_cpu(x: &[u32]) -> Vec<u32> {
        partials(x, 0, u32::wrapping_add)
    }

    fn partials<T: Copy>(x: &[T], zero: T, add: impl Fn(T, T) -> T) -> Vec<T> {
        let groups = x.len().div_ceil(BLOCK).max(1);
        (0..groups)
            .map(|g| {
                let at = |i: usize| x.get(g * BLOCK + i).copied().unwrap_or(zero);
                let mut s: Vec<T> = (0..256).map(|l| add(at(l), at(l + 256))).collect();
                let mut stride = 128;
                while stride > 0 {
                    for l in 0..stride {
                        s[l] = add(s[l], s[l + stride]);
                    }
                    stride /= 2;
                }
                s[0]
            })
            .collect()
    }
}

/// Inclusive prefix sums of u32.
pub mod scan {
    use super::*;

    pub fn task(x: &[u32]) -> Task {
        Task::new(
            source("scan"),
            "main",
            vec![
                uniform(0, u32_bytes(&[count(x.len())])),
                input(1, u32_bytes(x)),
                output(2, x.len(), ElemType::U32),
            ],
            [1, 1, 1],
        )
    }

    pub fn cpu(x: &[u32]) -> Vec<u32> {
        x.iter()
            .scan(0u32, |acc, v| {
                *acc = acc.wrapping_add(*v);
                Some(*acc)
            })
            .collect()
    }
}

/// Histograms of u32 values.
pub mod histogram {
    use super::*;

    /// `bins` (at most 256) bins of `width` values each; the last bin also
    /// counts everything above.
    pub fn task(values: &[u32], bins: u32, width: u32) -> Task {
        let n = count(values.len());
        Task::new(
            source("histogram"),
            "main",
            vec![
                uniform(0, u32_bytes(&[n, bins, width.max(1)])),
                input(1, u32_bytes(values)),
                output(2, bins as usize, ElemType::U32),
            ],
            [n.div_ceil(256).max(1), 1, 1],
        )
    }

    pub fn cpu(values: &[u32], bins: u32, width: u32) -> Vec<u32> {
        let mut counts = vec![0u32; bins as usize];
        for v in values {
            let bin = (v / width.max(1)).min(bins - 1) as usize;
            counts[bin] += 1;
        }
        counts
    }
}

/// Matrix multiply C = A·B, row-major f32.
pub mod sgemm {
    use super::*;

    fn task(name: &str, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], block: u32) -> Task {
        Task::new(
            source(name),
            "main",
            vec![
                uniform(0, u32_bytes(&[count(m), count(n), count(k)])),
                input(1, f32_bytes(a)),
                input(2, f32_bytes(b)),
                output(3, m * n, ElemType::F32),
            ],
            [count(n).div_ceil(block), count(m).div_ceil(block), 1],
        )
    }

    /// The tiled kernel (64×64 blocks).
    pub fn tiled(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Task {
        task("sgemm", m, n, k, a, b, 64)
    }

    /// The naive kernel (one invocation per element).
    pub fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Task {
        task("sgemm_naive", m, n, k, a, b, 16)
    }

    /// A plain CPU loop, accumulating along k in order (as the kernels do).
    pub fn cpu(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for p in 0..k {
                let av = a[i * k + p];
                let row = &b[p * n..p * n + n];
                for (cv, bv) in c[i * n..i * n + n].iter_mut().zip(row) {
                    *cv += av * bv;
                }
            }
        }
        c
    }
}

/// The 2-D heat equation on a grid with fixed edges.
pub mod heat {
    use super::*;

    /// Binding of the info uniform.
    pub const INFO: u32 = 0;

    /// `steps` explicit steps from `grid` (w×h). Both grids are state
    /// buffers (bindings 2 and 3); the result is binding 2 after an even
    /// number of steps, binding 3 after an odd one.
    pub fn task(w: usize, h: usize, alpha: f32, grid: &[f32], steps: u32) -> Task {
        let mut params = u32_bytes(&[count(w), count(h)]);
        params.extend(f32_bytes(&[alpha]));
        let mut t = Task::new(
            source("heat"),
            "main",
            vec![
                uniform(1, params),
                Binding::State {
                    binding: 2,
                    data: f32_bytes(grid).into(),
                    elem: ElemType::F32,
                },
                Binding::State {
                    binding: 3,
                    data: f32_bytes(grid).into(),
                    elem: ElemType::F32,
                },
            ],
            [count(w).div_ceil(16), count(h).div_ceil(16), 1],
        );
        t.steps = steps;
        t.info_binding = Some(INFO);
        t
    }

    /// The state binding that holds the result after `steps` steps.
    pub fn result_binding(steps: u32) -> u32 {
        if steps.is_multiple_of(2) { 2 } else { 3 }
    }

    /// `steps` steps on the CPU, in the kernel's order of operations.
    pub fn cpu(w: usize, h: usize, alpha: f32, grid: &[f32], steps: u32) -> Vec<f32> {
        let mut a = grid.to_vec();
        let mut b = grid.to_vec();
        for _ in 0..steps {
            for y in 0..h {
                for x in 0..w {
                    let i = y * w + x;
                    let v = a[i];
                    b[i] = if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                        v
                    } else {
                        v + alpha * (((a[i - 1] + a[i + 1]) + (a[i - w] + a[i + w])) - 4.0 * v)
                    };
                }
            }
            std::mem::swap(&mut a, &mut b);
        }
        a
    }
}

/// π by Monte Carlo with a counter-based RNG.
pub mod monte_carlo_pi {
    use super::*;

    /// Invocations per workgroup.
    pub const WORKGROUP: u32 = 64;

    /// `workgroups × 64 × samples` samples for task `task_index`; the
    /// output (binding 2) holds one count of hits per workgroup.
    pub fn task(seed: u32, workgroups: u32, samples: u32, task_index: u32) -> Task {
        let mut t = Task::new(
            source("monte_carlo_pi"),
            "main",
            vec![
                uniform(1, u32_bytes(&[seed, samples])),
                output(2, workgroups as usize, ElemType::U32),
            ],
            [workgroups, 1, 1],
        );
        t.info_binding = Some(0);
        t.task_index = task_index;
        t
    }

    fn hash(v: u32) -> u32 {
        let mut x = v;
        x ^= x >> 16;
        x = x.wrapping_mul(0x7feb_352d);
        x ^= x >> 15;
        x = x.wrapping_mul(0x846c_a68b);
        x ^= x >> 16;
        x
    }

    /// The per-workgroup counts on the CPU (bit-exact).
    pub fn cpu(seed: u32, workgroups: u32, samples: u32, task_index: u32) -> Vec<u32> {
        (0..workgroups)
            .map(|g| {
                (0..WORKGROUP)
                    .map(|l| {
                        let id = g * WORKGROUP + l;
                        let stream = hash(seed ^ hash(task_index ^ hash(id)));
                        (0..samples)
                            .map(|s| {
                                let r = hash(stream.wrapping_add(s));
                                let (x, y) = (r & 0x7fff, (r >> 15) & 0x7fff);
                                u32::from(x * x + y * y < 0x4000_0000)
                            })
                            .sum::<u32>()
                    })
                    .sum()
            })
            .collect()
    }

    /// The estimate of π from the counts.
    pub fn estimate(counts: &[u32], samples_total: u64) -> f64 {
        4.0 * counts.iter().map(|&c| f64::from(c)).sum::<f64>() / samples_total as f64
    }
}

/// One step of direct-summation n-body.
pub mod nbody {
    use super::*;

    /// Bodies as `[x, y, z, mass]` and velocities as `[vx, vy, vz, 0]`;
    /// outputs: positions (binding 3) and velocities (binding 4).
    pub fn task(pos: &[[f32; 4]], vel: &[[f32; 4]], dt: f32, softening: f32) -> Task {
        let n = pos.len();
        let flat = |v: &[[f32; 4]]| f32_bytes(&v.concat());
        let mut params = u32_bytes(&[count(n)]);
        params.extend(f32_bytes(&[dt, softening]));
        Task::new(
            source("nbody"),
            "main",
            vec![
                uniform(0, params),
                input(1, flat(pos)),
                input(2, flat(vel)),
                output(3, n * 4, ElemType::F32),
                output(4, n * 4, ElemType::F32),
            ],
            [count(n).div_ceil(64), 1, 1],
        )
    }

    /// The step on the CPU: (positions, velocities), flattened.
    pub fn cpu(
        pos: &[[f32; 4]],
        vel: &[[f32; 4]],
        dt: f32,
        softening: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut p_out = Vec::with_capacity(pos.len() * 4);
        let mut v_out = Vec::with_capacity(pos.len() * 4);
        for (p, v) in pos.iter().zip(vel) {
            let mut acc = [0f32; 3];
            for q in pos {
                let d = [q[0] - p[0], q[1] - p[1], q[2] - p[2]];
                let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] + softening * softening;
                let inv = 1.0 / (r2 * r2 * r2).sqrt();
                for (a, di) in acc.iter_mut().zip(d) {
                    *a += di * (q[3] * inv);
                }
            }
            let nv = [v[0] + acc[0] * dt, v[1] + acc[1] * dt, v[2] + acc[2] * dt];
            v_out.extend([nv[0], nv[1], nv[2], 0.0]);
            p_out.extend([
                p[0] + nv[0] * dt,
                p[1] + nv[1] * dt,
                p[2] + nv[2] * dt,
                p[3],
            ]);
        }
        (p_out, v_out)
    }
}

/// Mandelbrot escape counts.
pub mod mandelbrot {
    use super::*;

    /// The view: `[x0, y0, span_x, span_y]`.
    pub fn task(w: u32, h: u32, max_iter: u32, view: [f32; 4]) -> Task {
        let mut params = u32_bytes(&[w, h, max_iter]);
        params.extend(f32_bytes(&view));
        Task::new(
            source("mandelbrot"),
            "main",
            vec![
                uniform(0, params),
                output(1, (w * h) as usize, ElemType::U32),
            ],
            [w.div_ceil(16), h.div_ceil(16), 1],
        )
    }

    pub fn cpu(w: u32, h: u32, max_iter: u32, view: [f32; 4]) -> Vec<u32> {
        let [x0, y0, sx, sy] = view;
        let mut out = Vec::with_capacity((w * h) as usize);
        for py in 0..h {
            for px in 0..w {
                let cx = x0 + sx * px as f32 / w as f32;
                let cy = y0 + sy * py as f32 / h as f32;
                let (mut zx, mut zy, mut n) = (0f32, 0f32, 0u32);
                while n < max_iter && zx * zx + zy * zy <= 4.0 {
                    let t = zx * zx - zy * zy + cx;
                    zy = 2.0 * zx * zy + cy;
                    zx = t;
                    n += 1;
                }
                out.push(n);
            }
        }
        out
    }
}
