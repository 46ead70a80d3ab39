//! The trust walk as a user runs it: the real `alliance` binary in
//! temporary directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alliance_node::trust::{self, Bundle};
use alliance_protocol::Timestamp;
use alliance_protocol::cert::Roles;

fn alliance(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alliance"))
        .args(args)
        .current_dir(dir)
        .env_remove("ALLIANCE_DATA_DIR")
        .output()
        .expect("run alliance")
}

/// `line` split on whitespace (for command lines without quoted words),
/// followed by `extra`.
fn args<'a>(line: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    line.split_whitespace()
        .chain(extra.iter().copied())
        .collect()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = alliance(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "alliance {args:?} failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = alliance(dir, args);
    assert!(!out.status.success(), "alliance {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let all: Vec<&str> = std::iter::once("--json")
        .chain(args.iter().copied())
        .collect();
    serde_json::from_str(&ok(dir, &all)).unwrap()
}

const ISSUE: &str = "member issue --institution-key uni/institution.key \
    --institution-cert uni/institution.cert --charter op/charter.alliance";
const VERIFY: &str = "cert verify node/node.chain --charter op/charter.alliance";
const REVOKE: &str = "member revoke --signing-key uni/institution.key \
    --charter op/charter.alliance --list uni/revocations.alliance";

/// Operator, institution admin and node, as three directories.
struct Walk {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    peer: String,
}

fn walk() -> Walk {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let r = &root;
    let new = "charter new --out-dir op --bootstrap /ip4/127.0.0.1/tcp/4001 --name";
    ok(r, &args(new, &["Alliance of Test Universities"]));
    let inst = json(r, &args("member new --out-dir uni", &[]));
    let inst_key = inst["public_key"].as_str().unwrap();
    let admit = "charter admit --roles work,submit --days 365 --root-key op/root.key \
        --charter op/charter.alliance --out uni/institution.cert --key";
    ok(
        r,
        &args(admit, &[inst_key, "--institution", "University of Example"]),
    );
    let node = json(r, &args("init --data-dir node", &[]));
    let peer = node["peer_id"].as_str().unwrap().to_owned();
    let issue = format!("{ISSUE} --roles work --days 30 --out node/node.chain --node {peer}");
    ok(r, &args(&issue, &[]));
    std::fs::copy(
        r.join("op/charter.alliance"),
        r.join("node/charter.alliance"),
    )
    .unwrap();
    Walk {
        _tmp: tmp,
        root,
        peer,
    }
}

#[test]
fn charter_admit_issue_verify() {
    let w = walk();
    let r = &w.root;
    let text = ok(r, &args(VERIFY, &[]));
    assert!(
        text.contains(&w.peer) && text.contains("University of Example"),
        "{text}"
    );
    let v = json(r, &args(VERIFY, &["--role", "work"]));
    let node = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "node")
        .unwrap();
    assert_eq!(node["peer_id"], w.peer.as_str());
    assert_eq!(node["roles"], "work");
    let check = json(r, &args("node check --data-dir node", &[]));
    assert_eq!(check["ready"], true);
    assert_eq!(check["peer_id"], w.peer.as_str());
    assert!(
        !check["gpus"].as_array().unwrap().is_empty(),
        "a work node lends its GPUs: {check}"
    );
    // A selection that matches nothing is refused with the adapters found.
    let cfg = r.join("node/alliance.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "gpus = \"all\"",
        "gpus = { name-contains = \"no such gpu\" }",
    );
    std::fs::write(&cfg, text).unwrap();
    let err = fails(r, &args("node check --data-dir node", &[]));
    assert!(
        err.contains("[worker] gpus") && err.contains("matches none"),
        "{err}"
    );
    let shown = json(r, &args("charter show --charter op/charter.alliance", &[]));
    assert_eq!(shown["name"], "Alliance of Test Universities");
    assert_eq!(shown["bootstrap"][0], "/ip4/127.0.0.1/tcp/4001");

    // Failures name the problem.
    let err = fails(r, &args(VERIFY, &["--role", "submit"]));
    assert!(err.contains("lacks the role submit"), "{err}");
    let err = fails(r, &args(VERIFY, &["--at", "2099-01-01"]));
    assert!(err.contains("expired"), "{err}");
    // Another alliance's charter.
    ok(r, &args("charter new --name Other --out-dir other", &[]));
    let err = fails(
        r,
        &args(
            "cert verify node/node.chain --charter other/charter.alliance",
            &[],
        ),
    );
    assert!(err.contains("not this alliance's root"), "{err}");
}

#[test]
fn revocation_takes_effect() {
    let w = walk();
    let r = &w.root;
    ok(
        r,
        &args(REVOKE, &["--key", &w.peer, "--reason", "laptop stolen"]),
    );
    let err = fails(r, &args(VERIFY, &["uni/revocations.alliance"]));
    assert!(
        err.contains("revoked") && err.contains("laptop stolen"),
        "{err}"
    );
    assert!(
        err.contains(&w.peer) && err.contains("University of Example"),
        "{err}"
    );
    // A second revocation extends the list with a higher sequence.
    let out = json(r, &args(REVOKE, &["--key", &w.peer, "--reason", "again"]));
    assert_eq!(out["sequence"], 2);
}

#[test]
fn bad_input_gets_a_clear_message() {
    let w = walk();
    let r = &w.root;
    let admit =
        "charter admit --institution X --root-key op/root.key --charter op/charter.alliance --key";
    let err = fails(r, &args(admit, &["nothex"]));
    assert!(err.contains("--key") && err.contains("64 hex"), "{err}");
    let err = fails(r, &args(ISSUE, &["--node", "12D3KooNope"]));
    assert!(err.contains("--node") && err.contains("PeerId"), "{err}");
    let err = fails(
        r,
        &args(ISSUE, &["--node", &w.peer, "--roles", "bootstrap"]),
    );
    assert!(err.contains("admitted for work,submit only"), "{err}");
    let err = fails(r, &args(ISSUE, &["--node", &w.peer, "--days", "400"]));
    assert!(err.contains("--days 400"), "{err}");
    // A key file others can read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o644);
        std::fs::set_permissions(r.join("op/root.key"), mode).unwrap();
        let err = fails(r, &args(admit, &[&"11".repeat(32)]));
        assert!(err.contains("chmod 600"), "{err}");
    }
    // init refuses to overwrite a node.
    let err = fails(r, &args("init --data-dir node", &[]));
    assert!(err.contains("already exists"), "{err}");
}

/// Tampering any byte of the charter or the chain file makes verification
/// fail. Every byte is checked in process; a sample through the binary.
#[test]
fn tampering_any_byte_is_detected() {
    let w = walk();
    let r = &w.root;
    let now = Timestamp::now();
    let charter = r.join("op/charter.alliance");
    let chain = r.join("node/node.chain");
    for (name, target) in [("charter", &charter), ("chain", &chain)] {
        let original = std::fs::read(target).unwrap();
        let tampered = r.join(format!("tampered.{name}"));
        let (c, k) = if name == "charter" {
            (&tampered, &chain)
        } else {
            (&charter, &tampered)
        };
        for i in 0..original.len() {
            let mut bytes = original.clone();
            bytes[i] ^= 0x01;
            std::fs::write(&tampered, &bytes).unwrap();
            let result = trust::read_charter(c).and_then(|c| {
                trust::verify_bundle(
                    &c,
                    &Bundle::read(std::slice::from_ref(k))?,
                    now,
                    Roles::NONE,
                )
            });
            let Err(err) = result else {
                panic!("{name}: flipping byte {i} went unnoticed");
            };
            let msg = format!("{err:#}");
            assert!(msg.contains("tampered"), "the error names the file: {msg}");
            // Through the binary, at the start, inside the base64 and at the end.
            if i == 0 || i == original.len() / 2 || i + 1 == original.len() {
                let (c, k) = (c.to_str().unwrap(), k.to_str().unwrap());
                let err = fails(r, &["cert", "verify", k, "--charter", c]);
                assert!(
                    err.starts_with("error: ") && err.contains("tampered"),
                    "{err}"
                );
            }
        }
    }
}
