//! The `alliance` binary.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = alliance_node::cli::Cli::parse();
    match alliance_node::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
