use super::*;
use crate::submit::npy;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const PI: &str = r#"
kernel = "library:monte_carlo_pi"
dispatch = [4, 1, 1]
tasks = 3
info_binding = 0
[[inputs]]
binding = 1
kind = "uniform"
type = "u32"
values = [7, 64]
[[outputs]]
binding = 2
type = "u32"
len = 4
"#;

#[test]
fn a_library_array_job_loads() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::load(&write(dir.path(), "pi.toml", PI), &Limits::default()).unwrap();
    assert_eq!(job.name, "pi");
    assert_eq!(job.tasks, 3);
    assert_eq!(
        job.inputs[0].bytes(2).unwrap(),
        [7u32.to_le_bytes(), 64u32.to_le_bytes()].concat()
    );
    let t = job.task(2).unwrap();
    assert_eq!(
        (t.task_index, t.task_count, t.info_binding),
        (2, 3, Some(0))
    );
}

#[test]
fn redundancy_is_a_number_or_auto() {
    let dir = tempfile::tempdir().unwrap();
    let load = |text: &str| Job::load(&write(dir.path(), "pi.toml", text), &Limits::default());
    let job = load(PI).unwrap();
    assert_eq!((job.redundancy, job.adaptive), (1, false));
    let job = load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = 3")).unwrap();
    assert_eq!((job.redundancy, job.adaptive), (3, false));
    let job = load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = \"auto\"")).unwrap();
    assert_eq!((job.redundancy, job.adaptive), (2, true));
    assert!(load(&PI.replace("tasks = 3", "tasks = 3\nredundancy = \"often\"")).is_err());
}

fn refused(text: &str, files: &[(&str, Vec<u8>)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let err = Job::load(&write(dir.path(), "job.toml", text), &Limits::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("job.toml"), "{msg}");
    msg
}

#[test]
fn bad_jobs_are_refused_with_the_reason() {
    let msg = refused(
        "kernel = \"k.wgsl\"\ndispatch = [1,1,1]\n[[outputs]]\nbinding = 0\ntype = \"u32\"\nlen = 4\n",
        &[("k.wgsl", b"@compute fn main( {".to_vec())],
    );
    assert!(msg.contains("line") || msg.contains("parse"), "{msg}");

    let texture = b"@group(0) @binding(0) var t: texture_2d<f32>;\n@group(0) @binding(1) var<storage, read_write> o: array<u32>;\n@compute @workgroup_size(1) fn main() { o[0] = u32(textureDimensions(t).x); }".to_vec();
    let msg = refused(
        "kernel = \"k.wgsl\"\ndispatch = [1,1,1]\n[[outputs]]\nbinding = 1\ntype = \"u32\"\nlen = 4\n",
        &[("k.wgsl", texture)],
    );
    assert!(msg.contains("texture"), "{msg}");

    let msg = refused(&PI.replace("len = 4", "len = 4000000000"), &[]);
    assert!(msg.contains("max_buffer_bytes"), "{msg}");

    let msg = refused(
        &PI.replace("values = [7, 64]", "file = \"missing.npy\""),
        &[],
    );
    assert!(msg.contains("missing.npy"), "{msg}");

    let f64_npy = npy::write(ElemType::U32, &[2], &[0; 8]);
    let text = PI
        .replace("values = [7, 64]", "file = \"p.npy\"")
        .replace("type = \"u32\"\nfile", "type = \"f32\"\nfile");
    let msg = refused(&text, &[("p.npy", f64_npy)]);
    assert!(msg.contains("float32"), "{msg}");

    let text = PI.replace("values = [7, 64]", "file = \"p.npy\"\nsplit = true");
    let msg = refused(
        &text,
        &[("p.npy", npy::write(ElemType::U32, &[4], &[0; 16]))],
    );
    assert!(msg.contains("split evenly"), "{msg}");

    let msg = refused(&PI.replace("dispatch", "dispatchh"), &[]);
    assert!(msg.contains("dispatchh"), "{msg}");
}

const DOUBLE: &str = "@group(0) @binding(0) var<storage, read> x: array<f32>;\n@group(0) @binding(1) var<storage, read_write> y: array<f32>;\n@compute @workgroup_size(4) fn main(@builtin(global_invocation_id) id: vec3<u32>) { y[id.x] = 2.0 * x[id.x]; }";

const DOUBLE_JOB: &str = "kernel = \"k.wgsl\"\ndispatch = [1,1,1]\ntasks = 2\n[[inputs]]\nbinding = 0\nfile = \"x.npy\"\nsplit = true\n[[outputs]]\nbinding = 1\ntype = \"f32\"\nshape = [2, 2]\n";

fn double_files() -> Vec<(&'static str, Vec<u8>)> {
    let x: Vec<u8> = (0..8).flat_map(|v: u32| (v as f32).to_le_bytes()).collect();
    vec![
        ("k.wgsl", DOUBLE.as_bytes().to_vec()),
        ("x.npy", npy::write(ElemType::F32, &[4, 2], &x)),
    ]
}

#[test]
fn element_types_are_checked_against_the_kernel() {
    let msg = refused(
        &DOUBLE_JOB.replace("type = \"f32\"\nshape", "type = \"u32\"\nshape"),
        &double_files(),
    );
    assert!(
        msg.contains("output binding 1") && msg.contains("type = \"f32\""),
        "{msg}"
    );
    let mut files = double_files();
    files[1].1 = npy::write(ElemType::I32, &[4, 2], &[0; 32]);
    let msg = refused(DOUBLE_JOB, &files);
    assert!(msg.contains("astype(np.float32)"), "{msg}");
}

#[test]
fn shapes_split_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in double_files() {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let job = Job::load(
        &write(dir.path(), "job.toml", DOUBLE_JOB),
        &Limits::default(),
    )
    .unwrap();
    let x = &job.inputs[0];
    assert_eq!((x.parts, x.part_len(), x.part_shape()), (2, 16, vec![2, 2]));
    let second: Vec<u8> = (4..8).flat_map(|v: u32| (v as f32).to_le_bytes()).collect();
    assert_eq!(x.bytes(1).unwrap(), second);
    assert_eq!((job.outputs[0].len, job.outputs[0].dims()), (4, vec![2, 2]));
    let msg = refused(
        &DOUBLE_JOB.replace("shape = [2, 2]", "shape = [2, 2]\nlen = 5"),
        &double_files(),
    );
    assert!(msg.contains("agree"), "{msg}");
}
