//! What one API user may hold, as a researcher with their own token meets
//! it from the command line: past the limits the node's admin set, an
//! upload is 413 and a job 409, each with the fix.

use std::process::{Command, Output};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;
use alliance_tests::jobs::{alliance, text, write};

const DOUBLE: &str = "@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&y)) { y[id.x] = 2.0 * x[id.x]; }
}
";

fn job(n: usize) -> String {
    format!(
        "kernel = \"double.wgsl\"\ndispatch = [{}, 1, 1]\n[[inputs]]\nbinding = 0\nfile = \"x{n}.npy\"\n[[outputs]]\nbinding = 1\ntype = \"f32\"\nlen = {n}\n",
        n.div_ceil(64)
    )
}

#[test]
fn a_user_past_their_limits_is_refused_with_the_fix() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Limits Test", &[("University North", Roles::ALL)], 30);
    // A submitting node that lends no GPU: its jobs stay running.
    let node = a.node("sub", 0, Roles::BOOTSTRAP | Roles::SUBMIT);
    node.edit_config("running_jobs = 32", "running_jobs = 1");
    node.edit_config("stored_bytes = 68719476736", "stored_bytes = 4096");
    // Machine-readable logs, as a log shipper would take them.
    node.edit_config("format = \"text\"", "format = \"json\"");
    let _run = node.start(true);
    let url = std::fs::read_to_string(node.path.join("api.url")).unwrap();

    let out = alliance(&["user", "add", "bob", "--json"], &node.path);
    assert!(out.status.success(), "{}", text(&out));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = made["token"].as_str().unwrap().to_owned();

    // Bob's own directory, away from the node's.
    let home = tempfile::tempdir().unwrap();
    let jobs = home.path();
    write(jobs, "double.wgsl", DOUBLE);
    for n in [64usize, 2048] {
        let x: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let npy = alliance_node::submit::npy::write(
            alliance_protocol::task::ElemType::F32,
            &[n as u64],
            &x,
        );
        write(jobs, &format!("x{n}.npy"), npy);
        write(jobs, &format!("job{n}.toml"), job(n));
    }
    let bob = |args: &[&str]| -> Output {
        Command::new(alliance_tests::alliance_bin())
            .args(args)
            .current_dir(jobs)
            .env("ALLIANCE_URL", url.trim())
            .env("ALLIANCE_TOKEN", &token)
            .env_remove("ALLIANCE_DATA_DIR")
            .output()
            .unwrap()
    };

    // 8 KiB of input past a 4 KiB allowance: refused before it is kept.
    let out = bob(&["submit", "job2048.toml"]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("limit_stored_bytes"), "{said}");
    assert!(said.contains("api.per_user.stored_bytes"), "{said}");

    // A small job is taken, and it is Bob's one running job.
    let out = bob(&["submit", "job64.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    let first = text(&out)
        .split_whitespace()
        .skip_while(|w| *w != "job")
        .nth(1)
        .unwrap()
        .to_owned();
    let out = bob(&["submit", "job64.toml"]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("limit_running_jobs"), "{said}");
    assert!(said.contains("cancel one"), "{said}");

    // Cancelling it makes room.
    let out = bob(&["job", "cancel", &first]);
    assert!(out.status.success(), "{}", text(&out));
    let out = bob(&["submit", "job64.toml"]);
    assert!(out.status.success(), "{}", text(&out));
    // What Bob holds is what he was let keep.
    let api = alliance_node::api::Api::new(&alliance_node::api::Target {
        url: Some(url.trim().to_owned()),
        token: Some(token.clone()),
        ..Default::default()
    })
    .unwrap();
    let me = api.get("/v1/me").unwrap();
    assert_eq!(me["name"], "bob", "{me}");
    let held = me["stored_bytes"].as_u64().unwrap();
    assert!(held > 0 && held <= 4096, "{me}");

    // Letting go of an upload frees Bob's allowance.
    let file = jobs.join("x64.npy");
    let x = alliance_node::api::hash_file(&file).unwrap();
    let gone = api.send("DELETE", &format!("/v1/blobs/{x}"), "").unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    assert_eq!(gone["freed"].as_u64(), Some(len), "{gone}");
    assert_eq!(
        api.get("/v1/me").unwrap()["stored_bytes"].as_u64(),
        Some(held - len)
    );
    let detail = api.get(&format!("/v1/jobs/{first}")).unwrap();
    assert_eq!(detail["summary"]["state"], "cancelled", "{detail}");
    let err = api
        .send("DELETE", &format!("/v1/blobs/{x}"), "")
        .unwrap_err();
    assert!(format!("{err:#}").contains("not_held"), "{err:#}");

    // Every line the node logged is one JSON object with its message.
    let log = std::fs::read_to_string(node.path.join("node.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "API listening"),
        "{log}"
    );
}
