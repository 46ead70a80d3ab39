// Monte Carlo estimate of π with a counter-based random number generator:
// every sample's random numbers are a pure function of (seed, task, sample
// index), and the test x² + y² < 2^30 is integer arithmetic, so counts are
// bit-exact on every device. π ≈ 4 · inside / samples.
//
// Bindings: 0 info uniform (task index); 1 uniform Params { seed,
// samples_per_invocation }; 2 counts (read-write, one u32 per workgroup).
// Dispatch: (workgroups, 1, 1).

struct Info {
    step: u32,
    steps: u32,
    task: u32,
    task_count: u32,
}

struct Params {
    seed: u32,
    samples_per_invocation: u32,
}

@group(0) @binding(0) var<uniform> info: Info;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> counts: array<atomic<u32>>;

// A 32-bit integer hash (lowbias32): a stateless RNG when fed a counter.
fn hash(v: u32) -> u32 {
    var x = v;
    x = x ^ (x >> 16u);
    x = x * 0x7feb352du;
    x = x ^ (x >> 15u);
    x = x * 0x846ca68bu;
    x = x ^ (x >> 16u);
    return x;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let stream = hash(params.seed ^ hash(info.task ^ hash(id.x)));
    var inside = 0u;
    for (var s = 0u; s < params.samples_per_invocation; s = s + 1u) {
        let r = hash(stream + s);
        let x = r & 0x7fffu;         // 15 bits
        let y = (r >> 15u) & 0x7fffu; // 15 bits
        if (x * x + y * y < 0x40000000u) { inside = inside + 1u; }
    }
    atomicAdd(&counts[wg.x], inside);
}
