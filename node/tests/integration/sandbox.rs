//! The node binary's hidden `alliance sandbox` subcommand is a working
//! sandbox child.

use std::time::Duration;

use alliance_kernels::gpu::Selection;
use alliance_kernels::intake::Limits;
use alliance_kernels::library::{saxpy, to_f32};
use alliance_kernels::sandbox::{ChildConfig, Config, ResourceLimits, Sandbox};

#[test]
fn alliance_sandbox_runs_tasks() {
    let scratch = tempfile::tempdir().unwrap();
    let mut sb = Sandbox::start(Config {
        program: env!("CARGO_BIN_EXE_alliance").into(),
        args: vec!["sandbox".into()],
        env: vec![],
        child: ChildConfig {
            adapter: Selection::All,
            limits: Limits::default(),
            rlimits: ResourceLimits::default(),
            scratch: scratch.path().to_owned(),
        },
        start_timeout: Duration::from_secs(60),
        compile_timeout: Duration::from_secs(300),
    })
    .unwrap();
    let ready = sb.ready().unwrap();
    assert!(
        ready.hardening.network.is_enforced(),
        "{:?}",
        ready.hardening
    );
    let x: Vec<f32> = (0..500).map(|i| i as f32).collect();
    let y = vec![1.0f32; 500];
    let out = sb
        .run(
            &saxpy::task(3.0, &x, &y),
            Duration::from_secs(60),
            &mut |_| Ok(()),
        )
        .unwrap();
    let got = to_f32(&out.outputs[0].data);
    assert_eq!(got, saxpy::cpu(3.0, &x, &y));
}
