// Sum reduction of u32 (wrapping), same shape as reduce.wgsl: each
// workgroup sums 512 elements and writes one partial.
//
// Bindings: 0 uniform Params { n }; 1 input (read); 2 partials (read-write).

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> input: array<u32>;
@group(0) @binding(2) var<storage, read_write> partial: array<u32>;

var<workgroup> scratch: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let base = wg.x * 512u;
    var a = 0u;
    var b = 0u;
    if (base + lid < params.n) { a = input[base + lid]; }
    if (base + lid + 256u < params.n) { b = input[base + lid + 256u]; }
    scratch[lid] = a + b;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            scratch[lid] = scratch[lid] + scratch[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        partial[wg.x] = scratch[0];
    }
}
