// Mandelbrot set: escape iteration counts on a w×h grid over the complex
// rectangle [x0, x0 + span_x] × [y0, y0 + span_y], up to max_iter.
//
// Bindings: 0 uniform Params { w, h, max_iter, x0, y0, span_x, span_y };
// 1 counts (read-write, u32 per pixel). Dispatch: (ceil(w / 16), ceil(h / 16), 1).

struct Params {
    w: u32,
    h: u32,
    max_iter: u32,
    x0: f32,
    y0: f32,
    span_x: f32,
    span_y: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> counts: array<u32>;

@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= params.w || id.y >= params.h) { return; }
    let cx = params.x0 + params.span_x * f32(id.x) / f32(params.w);
    let cy = params.y0 + params.span_y * f32(id.y) / f32(params.h);
    var zx = 0.0;
    var zy = 0.0;
    var n = 0u;
    while (n < params.max_iter && zx * zx + zy * zy <= 4.0) {
        let t = zx * zx - zy * zy + cx;
        zy = 2.0 * zx * zy + cy;
        zx = t;
        n = n + 1u;
    }
    counts[id.y * params.w + id.x] = n;
}
