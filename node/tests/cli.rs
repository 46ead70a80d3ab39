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

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = alliance(dir, args);
    assert!(
        out.status.success(),
        "alliance {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = alliance(dir, args);
    assert!(!out.status.success(), "alliance {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(dir, &all)).unwrap()
}

/// Operator, institution admin and node, as three directories.
struct Walk {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    peer: String,
}

fn walk() -> Walk {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    ok(
        &root,
        &[
            "charter",
            "new",
            "--name",
            "Alliance of Test Universities",
            "--out-dir",
            "op",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/4001",
        ],
    );
    let inst = json(&root, &["member", "new", "--out-dir", "uni"]);
    let inst_key = inst["public_key"].as_str().unwrap().to_owned();
    ok(
        &root,
        &[
            "charter",
            "admit",
            "--institution",
            "University of Example",
            "--key",
            &inst_key,
            "--roles",
            "work,submit",
            "--days",
            "365",
            "--root-key",
            "op/root.key",
            "--charter",
            "op/charter.alliance",
            "--out",
            "uni/institution.cert",
        ],
    );
    let node = json(&root, &["init", "--data-dir", "node"]);
    let peer = node["peer_id"].as_str().unwrap().to_owned();
    ok(
        &root,
        &[
            "member",
            "issue",
            "--node",
            &peer,
            "--roles",
            "work",
            "--days",
            "30",
            "--institution-key",
            "uni/institution.key",
            "--institution-cert",
            "uni/institution.cert",
            "--charter",
            "op/charter.alliance",
            "--out",
            "node/node.chain",
        ],
    );
    std::fs::copy(
        root.join("op/charter.alliance"),
        root.join("node/charter.alliance"),
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
    let text = ok(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(
        text.contains(&w.peer) && text.contains("University of Example"),
        "{text}"
    );
    let v = json(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "--charter",
            "op/charter.alliance",
            "--role",
            "work",
        ],
    );
    let node = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "node")
        .unwrap();
    assert_eq!(node["peer_id"], w.peer.as_str());
    assert_eq!(node["roles"], "work");
    let check = json(r, &["node", "check", "--data-dir", "node"]);
    assert_eq!(check["ready"], true);
    assert_eq!(check["peer_id"], w.peer.as_str());
    let shown = json(r, &["charter", "show", "--charter", "op/charter.alliance"]);
    assert_eq!(shown["name"], "Alliance of Test Universities");
    assert_eq!(shown["bootstrap"][0], "/ip4/127.0.0.1/tcp/4001");

    // Failures name the problem.
    let err = fails(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "--charter",
            "op/charter.alliance",
            "--role",
            "submit",
        ],
    );
    assert!(err.contains("lacks the role submit"), "{err}");
    let err = fails(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "--charter",
            "op/charter.alliance",
            "--at",
            "2099-01-01",
        ],
    );
    assert!(err.contains("expired"), "{err}");
    // Another alliance's charter.
    ok(
        r,
        &["charter", "new", "--name", "Other", "--out-dir", "other"],
    );
    let err = fails(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "--charter",
            "other/charter.alliance",
        ],
    );
    assert!(err.contains("not this alliance's root"), "{err}");
}

#[test]
fn revocation_takes_effect() {
    let w = walk();
    let r = &w.root;
    ok(
        r,
        &[
            "member",
            "revoke",
            "--key",
            &w.peer,
            "--reason",
            "laptop stolen",
            "--signing-key",
            "uni/institution.key",
            "--charter",
            "op/charter.alliance",
            "--list",
            "uni/revocations.alliance",
        ],
    );
    let err = fails(
        r,
        &[
            "cert",
            "verify",
            "node/node.chain",
            "uni/revocations.alliance",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(
        err.contains("revoked") && err.contains("laptop stolen"),
        "{err}"
    );
    // A second revocation extends the list with a higher sequence.
    let out = json(
        r,
        &[
            "member",
            "revoke",
            "--key",
            &w.peer,
            "--reason",
            "again",
            "--signing-key",
            "uni/institution.key",
            "--charter",
            "op/charter.alliance",
            "--list",
            "uni/revocations.alliance",
        ],
    );
    assert_eq!(out["sequence"], 2);
}

#[test]
fn bad_input_gets_a_clear_message() {
    let w = walk();
    let r = &w.root;
    let err = fails(
        r,
        &[
            "charter",
            "admit",
            "--institution",
            "X",
            "--key",
            "nothex",
            "--root-key",
            "op/root.key",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(err.contains("--key") && err.contains("64 hex"), "{err}");
    let err = fails(
        r,
        &[
            "member",
            "issue",
            "--node",
            "12D3KooNope",
            "--institution-key",
            "uni/institution.key",
            "--institution-cert",
            "uni/institution.cert",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(err.contains("--node") && err.contains("PeerId"), "{err}");
    let err = fails(
        r,
        &[
            "member",
            "issue",
            "--node",
            &w.peer,
            "--roles",
            "bootstrap",
            "--institution-key",
            "uni/institution.key",
            "--institution-cert",
            "uni/institution.cert",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(err.contains("admitted for work,submit only"), "{err}");
    let err = fails(
        r,
        &[
            "member",
            "issue",
            "--node",
            &w.peer,
            "--days",
            "400",
            "--institution-key",
            "uni/institution.key",
            "--institution-cert",
            "uni/institution.cert",
            "--charter",
            "op/charter.alliance",
        ],
    );
    assert!(err.contains("--days 400"), "{err}");
    // A key file others can read.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            r.join("op/root.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let err = fails(
            r,
            &[
                "charter",
                "admit",
                "--institution",
                "X",
                "--key",
                &"11".repeat(32),
                "--root-key",
                "op/root.key",
                "--charter",
                "op/charter.alliance",
            ],
        );
        assert!(err.contains("chmod 600"), "{err}");
    }
    // init refuses to overwrite a node.
    let err = fails(r, &["init", "--data-dir", "node"]);
    assert!(err.contains("already exists"), "{err}");
}

/// Tampering any byte of the charter or the chain file makes verification
/// fail. Every byte is checked in process; a sample through the binary.
#[test]
fn tampering_any_byte_is_detected() {
    let w = walk();
    let r = &w.root;
    let now = Timestamp::now();
    for (name, file) in [
        ("charter", "op/charter.alliance"),
        ("chain", "node/node.chain"),
    ] {
        let path = r.join(file);
        let original = std::fs::read(&path).unwrap();
        let tampered = r.join(format!("tampered.{name}"));
        for i in 0..original.len() {
            let mut bytes = original.clone();
            bytes[i] ^= 0x01;
            std::fs::write(&tampered, &bytes).unwrap();
            let (charter, chain) = if name == "charter" {
                (tampered.clone(), r.join("node/node.chain"))
            } else {
                (r.join("op/charter.alliance"), tampered.clone())
            };
            let result = trust::read_charter(&charter)
                .and_then(|c| trust::verify_bundle(&c, &Bundle::read(&[chain])?, now, Roles::NONE));
            assert!(result.is_err(), "{name}: flipping byte {i} went unnoticed");
            let msg = format!("{:#}", result.unwrap_err());
            assert!(msg.contains("tampered"), "the error names the file: {msg}");
            // Through the binary, at the start, inside the base64 and at the end.
            if i == 0 || i == original.len() / 2 || i + 1 == original.len() {
                let c = charter.to_str().unwrap();
                let k = r.join("node/node.chain");
                let chain_arg = if name == "charter" {
                    k.to_str().unwrap()
                } else {
                    tampered.to_str().unwrap()
                };
                let err = fails(r, &["cert", "verify", chain_arg, "--charter", c]);
                assert!(
                    err.starts_with("error: ") && err.contains("tampered"),
                    "{err}"
                );
            }
        }
    }
}
