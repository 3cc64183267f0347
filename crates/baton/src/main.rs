//! The `baton` binary: parse arguments, set up logging, run the command,
//! map its error to an exit code: 0 ok, 1 operation failed, 2 usage,
//! configuration or environment error.
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: error: {}", baton::error_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}
