//! The `baton` binary: parse arguments, set up logging, hand over to the
//! library. Exit codes: 0 ok, 1 operation failed, 2 usage, configuration
//! or environment error.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = baton::cli::Cli::parse();
    baton::cli::init_tracing();
    baton::cli::run(cli)
}
