//! The `lps` executable: parses the command line and runs the subcommand (see [`lps::cli`]).

use std::process::ExitCode;

use clap::Parser;
use lps::cli::{self, Cli, Command};

/// mimalloc instead of glibc malloc: less CPU per request (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Service(args) => cli::service(args),
        Command::Up(args) => cli::up(args),
        Command::Load(args) => cli::load(args),
        Command::Experiment(args) => cli::experiment(args),
        Command::Demo(args) => cli::demo(args),
        Command::Fault(args) => cli::fault(args),
        Command::Bench(args) => cli::bench(args),
        Command::DeadLetters(args) => cli::dead_letters(args),
        Command::Analyze(args) => cli::analyze(args),
        Command::Reproduce(args) => cli::reproduce(args),
    }
}
