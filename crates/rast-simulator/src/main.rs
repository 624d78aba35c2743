use std::process::ExitCode;

use clap::Parser;
use lps_common::config::ProcessEnv;

fn main() -> ExitCode {
    let args = rast_simulator::Args::parse();
    let config = rast_simulator::Config::new(&ProcessEnv, &args)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    lps_common::service::main(&config.telemetry.clone(), rast_simulator::run(config))
}
