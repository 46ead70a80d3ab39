//! The node as a systemd service: the units in `dist/` verify and are
//! hardened, and the node speaks systemd's notify protocol on the socket
//! systemd would give it (ready, watchdog, status, reload on SIGHUP).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use alliance_protocol::cert::Roles;
use alliance_tests::alliance::TestAlliance;

/// `dist/NAME` with its `ExecStart` pointing at the binary under test.
fn unit(dir: &Path, name: &str) -> std::path::PathBuf {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let text = std::fs::read_to_string(dist.join(name)).unwrap();
    let bin = alliance_tests::alliance_bin();
    let path = dir.join(name);
    std::fs::write(
        &path,
        text.replace("/usr/local/bin/alliance", &bin.display().to_string()),
    )
    .unwrap();
    path
}

#[test]
fn the_units_verify_and_are_hardened() {
    let _scenario = alliance_tests::scenario(module_path!());
    let dir = tempfile::tempdir().unwrap();
    for name in ["alliance.service", "alliance-bootstrap.service"] {
        let path = unit(dir.path(), name);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian package systemd) runs");
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim().is_empty(),
            "{name}: {said}"
        );
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&path)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let score: f64 = said
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| {
                l.split(": ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no exposure level in {said}"));
        assert!(score <= 3.0, "{name}: exposure {score}\n{said}");
    }
}

/// Datagrams on `socket` until one satisfies `want`, all of them kept.
fn hear(socket: &UnixDatagram, heard: &mut Vec<String>, want: impl Fn(&str) -> bool, what: &str) {
    let deadline = Instant::now() + alliance_tests::jobs::LIMIT;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = want(&msg);
            heard.push(msg);
            if done {
                return;
            }
        }
    }
    panic!("no {what} from the node; it said {heard:?}");
}

#[test]
fn systemd_hears_ready_watchdog_status_and_a_reload() {
    let _scenario = alliance_tests::scenario(module_path!());
    let a = TestAlliance::new("Service Test", &[("University North", Roles::ALL)], 30);
    let node = a.node("svc", 0, Roles::ALL);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let run = node.start_with_env(
        true,
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut heard = Vec::new();
    hear(&socket, &mut heard, |m| m.contains("READY=1"), "READY=1");
    // The API serves by then.
    assert!(run.get("/v1/status").is_some());
    hear(
        &socket,
        &mut heard,
        |m| m.contains("WATCHDOG=1"),
        "watchdog ping",
    );
    assert!(
        heard
            .iter()
            .any(|m| m.contains("STATUS=") && m.contains("peers")),
        "{heard:?}"
    );

    // The owner stops sharing in the config and reloads: the GPU is
    // withdrawn without a restart.
    let gpu_state = || run.get("/v1/worker").unwrap()["states"][0].clone();
    assert_eq!(gpu_state()["state"], "Idle", "{}", gpu_state());
    node.edit_config("shared = true", "shared = false");
    let kill = Command::new("kill")
        .args(["-HUP", &run.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    hear(
        &socket,
        &mut heard,
        |m| m.contains("RELOADING=1"),
        "RELOADING=1",
    );
    hear(
        &socket,
        &mut heard,
        |m| m.contains("READY=1"),
        "READY=1 after the reload",
    );
    alliance_tests::alliance::wait_for(
        alliance_tests::jobs::LIMIT,
        "the GPU to be withdrawn",
        || gpu_state()["reason"] == "not shared by its owner",
    );
    assert!(run.log().contains("config reloaded"), "{}", run.log());

    // A config that does not parse leaves the node as it was, and says why.
    node.edit_config("shared = false", "shared = maybe");
    Command::new("kill")
        .args(["-HUP", &run.pid().to_string()])
        .status()
        .unwrap();
    alliance_tests::alliance::wait_for(
        alliance_tests::jobs::LIMIT,
        "the refusal in the log",
        || run.log().contains("config not reloaded"),
    );
    assert!(run.get("/v1/status").is_some(), "the node went on");

    // A second node on the same data directory (a unit started twice, a
    // stray `alliance node run`) stops at once and names the first, which
    // goes on untouched.
    node.edit_config("shared = maybe", "shared = true");
    let out = Command::new(alliance_tests::alliance_bin())
        .args(["node", "run", "--data-dir"])
        .arg(&node.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("in use by another alliance node")
            && err.contains(&node.path.display().to_string())
            && err.contains(&format!("pid {}", run.pid())),
        "{err}"
    );
    assert!(run.get("/v1/status").is_some(), "the first node went on");
}
