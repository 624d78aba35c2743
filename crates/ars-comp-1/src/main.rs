use std::process::ExitCode;

use lps_common::config::ProcessEnv;

fn main() -> ExitCode {
    let config = ars_comp_1::Config::from_lookup(&ProcessEnv)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    lps_common::service::main(&config.telemetry.clone(), ars_comp_1::run(config))
}
