// One step of a gravitational n-body simulation by direct summation with
// softening: a_i = Σ_j m_j (p_j − p_i) / (|p_j − p_i|² + ε²)^{3/2}, then
// v += a·dt, p += v·dt (semi-implicit Euler).
//
// Bindings: 0 uniform Params { n, dt, softening }; 1 pos_in (read, vec4:
// xyz and mass in w); 2 vel_in (read, vec4); 3 pos_out (read-write);
// 4 vel_out (read-write). Dispatch: ceil(n / 64) workgroups.

struct Params {
    n: u32,
    dt: f32,
    softening: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> pos_in: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> vel_in: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> pos_out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> vel_out: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    if (i >= params.n) { return; }
    let p = pos_in[i];
    var acc = vec3<f32>(0.0);
    for (var j = 0u; j < params.n; j = j + 1u) {
        let q = pos_in[j];
        let d = q.xyz - p.xyz;
        let r2 = dot(d, d) + params.softening * params.softening;
        let inv = 1.0 / sqrt(r2 * r2 * r2);
        acc = acc + d * (q.w * inv);
    }
    let v = vel_in[i].xyz + acc * params.dt;
    vel_out[i] = vec4<f32>(v, 0.0);
    pos_out[i] = vec4<f32>(p.xyz + v * params.dt, p.w);
}
