// Self-benchmark: fused multiply-add throughput. Each invocation runs
// `iterations` rounds of 4 independent vec4 FMA chains (32 FLOP a round).
struct Params {
    iterations: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let seed = f32(id.x) * 1e-6;
    var a = vec4<f32>(seed, seed + 0.1, seed + 0.2, seed + 0.3);
    var b = a + vec4<f32>(0.5);
    var c = a + vec4<f32>(0.25);
    var d = a + vec4<f32>(0.75);
    let m = vec4<f32>(0.999999);
    let k = vec4<f32>(1e-7);
    for (var i = 0u; i < params.iterations; i = i + 1u) {
        a = fma(a, m, k);
        b = fma(b, m, k);
        c = fma(c, m, k);
        d = fma(d, m, k);
    }
    out[id.x] = a + b + c + d;
}
