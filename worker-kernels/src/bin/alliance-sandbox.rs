//! The sandbox child: runs tasks for a parent over stdin/stdout. Started by
//! `alliance_kernels::sandbox::Sandbox`; not meant to be run by hand.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(alliance_kernels::sandbox::child_main())
}
