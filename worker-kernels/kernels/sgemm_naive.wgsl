// Naive SGEMM: one invocation per element of C, reading A and B straight
// from storage. The baseline the tiled kernel is measured against.
//
// Bindings as sgemm.wgsl. Dispatch: (ceil(n / 16), ceil(m / 16), 1).

struct Dims {
    m: u32,
    n: u32,
    k: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.y;
    let col = id.x;
    if (row >= dims.m || col >= dims.n) { return; }
    var acc = 0.0;
    for (var i = 0u; i < dims.k; i = i + 1u) {
        acc = acc + a[row * dims.k + i] * b[i * dims.n + col];
    }
    c[row * dims.n + col] = acc;
}
