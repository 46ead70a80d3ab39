//! `alliance demo` runs its whole alliance and checks its own results.

#[test]
fn the_demo_runs_to_completion() {
    let _scenario = alliance_tests::scenario(module_path!());
    let out = std::process::Command::new(alliance_tests::alliance_bin())
        .args(["demo", "--tasks", "6"])
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    for expected in [
        "every count equals the CPU reference",
        "C matches the CPU reference",
        "who computed what",
        "submitter stopped",
        "demo complete",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // The demo's workers warm the library's kernels when they start, so
    // no replica of its library jobs pays compile time.
    let compiling: Vec<&str> = text.matches(" ms compiling").collect();
    assert!(!compiling.is_empty(), "{text}");
    assert_eq!(
        text.matches(", 0.0 ms compiling").count(),
        compiling.len(),
        "a replica compiled its kernel:\n{text}"
    );
}
