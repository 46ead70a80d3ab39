// Tiled SGEMM: C = A · B for row-major f32 matrices, A m×k, B k×n, C m×n.
// Each workgroup computes a 64×64 block of C; each invocation a 4×4
// sub-block, from 64×16 tiles of A and B staged in workgroup memory.
//
// Bindings: 0 uniform Dims { m, n, k }; 1 a (read); 2 b (read); 3 c (read-write).
// Dispatch: (ceil(n / 64), ceil(m / 64), 1).

struct Dims {
    m: u32,
    n: u32,
    k: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TILE: u32 = 64u;
const TK: u32 = 16u;

var<workgroup> tile_a: array<f32, 1024>; // TILE rows × TK columns
var<workgroup> tile_b: array<f32, 1024>; // TK rows × TILE columns

@compute @workgroup_size(16, 16)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wg: vec3<u32>) {
    let row0 = wg.y * TILE + lid.y * 4u;
    let col0 = wg.x * TILE + lid.x * 4u;
    let flat = lid.y * 16u + lid.x;
    var acc: array<array<f32, 4>, 4>;
    for (var t = 0u; t < dims.k; t = t + TK) {
        // 256 invocations load 1024 values of each tile: 4 apiece.
        for (var l = 0u; l < 4u; l = l + 1u) {
            let idx = flat * 4u + l;
            let ar = wg.y * TILE + idx / TK;
            let ac = t + idx % TK;
            var av = 0.0;
            if (ar < dims.m && ac < dims.k) { av = a[ar * dims.k + ac]; }
            tile_a[idx] = av;
            let br = t + idx / TILE;
            let bc = wg.x * TILE + idx % TILE;
            var bv = 0.0;
            if (br < dims.k && bc < dims.n) { bv = b[br * dims.n + bc]; }
            tile_b[idx] = bv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk = kk + 1u) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i = i + 1u) {
                av[i] = tile_a[(lid.y * 4u + i) * TK + kk];
                bv[i] = tile_b[kk * TILE + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i = i + 1u) {
                for (var j = 0u; j < 4u; j = j + 1u) {
                    acc[i][j] = acc[i][j] + av[i] * bv[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i = i + 1u) {
        for (var j = 0u; j < 4u; j = j + 1u) {
            let r = row0 + i;
            let cc = col0 + j;
            if (r < dims.m && cc < dims.n) { c[r * dims.n + cc] = acc[i][j]; }
        }
    }
}
