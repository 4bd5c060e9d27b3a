//! The `normalizer` binary: parse arguments, set up logging, run, map the
//! result to an exit code. Everything else lives in the library.

use std::process::ExitCode;

use clap::Parser;
use normalizer::cli::{self, Cli, RunError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .parse_env("RUST_LOG")
        .format_timestamp_millis()
        .init();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Failed(e)) => {
            eprintln!("normalizer: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(RunError::GaveUp(e)) => {
            eprintln!("normalizer: gave up: {e:#}");
            ExitCode::from(cli::EXIT_GAVE_UP)
        }
    }
}
