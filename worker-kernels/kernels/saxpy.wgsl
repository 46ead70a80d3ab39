// saxpy: y = a * x + y, one invocation per element.
//
// Bindings: 0 uniform Params { a, n }; 1 x (read); 2 y (read-write, the result).
// Dispatch: ceil(n / 256) workgroups.

struct Params {
    a: f32,
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i < params.n) {
        y[i] = params.a * x[i] + y[i];
    }
}
