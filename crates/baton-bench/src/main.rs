//! `baton-bench`: see the crate documentation and docs/benchmarks.md.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    baton_bench::run(baton_bench::cli::Cli::parse())
}
