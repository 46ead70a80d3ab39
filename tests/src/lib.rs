//! System tests that span the Alliance crates.
//!
//! The tests live in `tests/`; this library holds what they share.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Condvar, Mutex, PoisonError};

/// The workspace root (the folder of the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The names of every crate in `package`'s normal (non-dev, non-build)
/// dependency tree, as cargo resolves it for that package alone.
pub fn dependency_names(package: &str) -> Result<Vec<String>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "-p",
            package,
        ])
        .output()
        .map_err(|e| format!("cannot run cargo tree: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

pub mod alliance;
pub mod jobs;
pub mod netns;

/// The scenario whose tests run now, and how many of them.
static RUNNING: Mutex<(Option<&'static str>, usize)> = Mutex::new((None, 0));
/// Signalled when a scenario's last running test ends.
static FREE: Condvar = Condvar::new();

/// A test's turn: held for the whole test, see [`scenario`].
#[derive(Debug)]
pub struct Turn;

/// Waits until no test of another scenario runs, then lets this test of
/// `name` (a module of the test binary: pass `module_path!()`) run. The
/// tests of one scenario still run side by side, as they did when each
/// scenario was a test binary of its own; tests of two scenarios never do,
/// so a heavy scenario (fifty nodes in one process, a whole alliance of
/// processes, an owner's timing) has the machine to itself as it was
/// written to.
pub fn scenario(name: &'static str) -> Turn {
    let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    while running.0.is_some_and(|now| now != name) {
        running = FREE.wait(running).unwrap_or_else(PoisonError::into_inner);
    }
    *running = (Some(name), running.1 + 1);
    Turn
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
        running.1 = running.1.saturating_sub(1);
        if running.1 == 0 {
            running.0 = None;
            FREE.notify_all();
        }
    }
}

/// Builds the release `alliance` binary that benchmarks start as node
/// processes, so they measure this build; keeps the old one if cargo
/// cannot run.
pub fn build_release_alliance() {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // Cargo runs a benchmark with the variables it gives a crate it builds
    // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, OUT_DIR, ...). Some build
    // scripts (ring's) ask to rerun when those change, and cargo compares
    // them with its own environment: passed on, they would rebuild ring and
    // everything above it here, and again at the next `cargo bench`.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_crate_variable(&name) {
            cargo.env_remove(name.as_ref());
        }
    }
    let built = cargo
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            "alliance-node",
            // With the benchmarks' package in the build, its dependencies'
            // features unify as in `cargo bench`: the shared libraries are
            // not rebuilt on every run.
            "-p",
            "alliance-tests",
            "--bin",
            "alliance",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if !built {
        let bin = alliance_bin();
        assert!(bin.exists(), "cannot build the alliance binary");
        println!("(cannot rebuild; using {})", bin.display());
    }
}

/// A variable cargo sets for a crate it compiles or runs, as opposed to
/// one that configures cargo itself (CARGO_HOME, CARGO_TARGET_DIR, ...).
fn is_crate_variable(name: &str) -> bool {
    const PREFIXES: [&str; 4] = ["CARGO_PKG_", "CARGO_BIN_", "CARGO_MANIFEST_", "CARGO_CFG_"];
    const NAMES: [&str; 5] = [
        "OUT_DIR",
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

/// The `alliance` binary of this build, built first when missing. A
/// benchmark (the release profile, which `cargo bench` does not build the
/// binary for) has cargo bring it up to date once per run, so it never
/// measures a stale binary.
pub fn alliance_bin() -> PathBuf {
    static FRESH: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/alliance
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let bin = dir.join(format!("alliance{}", std::env::consts::EXE_SUFFIX));
    let release = dir.ends_with("release");
    let mut stale = !bin.exists();
    if release {
        FRESH.call_once(|| stale = true);
    }
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "-p", "alliance-node", "--bin", "alliance"])
            .args(release.then_some("--release"))
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cannot build the alliance binary"
        );
    }
    bin
}
