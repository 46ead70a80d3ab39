// Histogram of u32 values into `bins` bins of `width` values each (the last
// bin also takes everything above), counted per workgroup in workgroup
// memory with atomics, then merged into the global histogram with one
// atomic add per bin and workgroup.
//
// Bindings: 0 uniform Params { n, bins, width }; 1 values (read);
// 2 counts (read-write, `bins` u32, zeroed). At most 256 bins.

struct Params {
    n: u32,
    bins: u32,
    width: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> values: array<u32>;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<u32>>;

var<workgroup> local_counts: array<atomic<u32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = gid.x;
    if (i < params.n) {
        let bin = min(values[i] / params.width, params.bins - 1u);
        atomicAdd(&local_counts[bin], 1u);
    }
    workgroupBarrier();
    if (lid < params.bins) {
        let c = atomicLoad(&local_counts[lid]);
        if (c > 0u) { atomicAdd(&counts[lid], c); }
    }
}
