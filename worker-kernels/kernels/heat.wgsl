// 2-D heat equation, explicit Euler on a w×h grid with fixed (Dirichlet)
// edges: u' = u + alpha · (left + right + up + down − 4u). Iterative: run
// with `steps = N`; the task's info uniform tells each step its index, and
// even steps read `a` and write `b`, odd steps the reverse (so after N
// steps the result is in `a` when N is even, `b` when odd). Both buffers
// are state, so checkpoints carry them and a resumed task continues exactly.
//
// Bindings: 0 info uniform; 1 uniform Params { w, h, alpha }; 2 a (state);
// 3 b (state). Dispatch: (ceil(w / 16), ceil(h / 16), 1).

struct Info {
    step: u32,
    steps: u32,
    task: u32,
    task_count: u32,
}

struct Params {
    w: u32,
    h: u32,
    alpha: f32,
}

@group(0) @binding(0) var<uniform> info: Info;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> a: array<f32>;
@group(0) @binding(3) var<storage, read_write> b: array<f32>;

fn at_a(x: u32, y: u32) -> f32 { return a[y * params.w + x]; }
fn at_b(x: u32, y: u32) -> f32 { return b[y * params.w + x]; }

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let x = id.x;
    let y = id.y;
    if (x >= params.w || y >= params.h) { return; }
    let i = y * params.w + x;
    let even = info.step % 2u == 0u;
    let edge = x == 0u || y == 0u || x + 1u == params.w || y + 1u == params.h;
    if (even) {
        var v = at_a(x, y);
        if (!edge) {
            v = v + params.alpha * (((at_a(x - 1u, y) + at_a(x + 1u, y)) + (at_a(x, y - 1u) + at_a(x, y + 1u))) - 4.0 * v);
        }
        b[i] = v;
    } else {
        var v = at_b(x, y);
        if (!edge) {
            v = v + params.alpha * (((at_b(x - 1u, y) + at_b(x + 1u, y)) + (at_b(x, y - 1u) + at_b(x, y + 1u))) - 4.0 * v);
        }
        a[i] = v;
    }
}
