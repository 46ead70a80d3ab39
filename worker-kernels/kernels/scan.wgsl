// Inclusive prefix sum of u32 (wrapping), one workgroup walking the array
// in chunks of 256 and carrying the running total between chunks.
//
// Bindings: 0 uniform Params { n }; 1 input (read); 2 output (read-write).
// Dispatch: exactly one workgroup.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> input: array<u32>;
@group(0) @binding(2) var<storage, read_write> output: array<u32>;

var<workgroup> tile: array<u32, 256>;
var<workgroup> carry: u32;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    if (lid == 0u) { carry = 0u; }
    workgroupBarrier();
    let chunks = (params.n + 255u) / 256u;
    for (var c = 0u; c < chunks; c = c + 1u) {
        let i = c * 256u + lid;
        var v = 0u;
        if (i < params.n) { v = input[i]; }
        tile[lid] = v;
        workgroupBarrier();
        // Hillis-Steele scan within the chunk.
        for (var offset = 1u; offset < 256u; offset = offset * 2u) {
            var add = 0u;
            if (lid >= offset) { add = tile[lid - offset]; }
            workgroupBarrier();
            tile[lid] = tile[lid] + add;
            workgroupBarrier();
        }
        let base = carry;
        if (i < params.n) { output[i] = tile[lid] + base; }
        workgroupBarrier();
        if (lid == 255u) { carry = base + tile[255]; }
        workgroupBarrier();
    }
}
