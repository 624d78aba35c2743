//! The common `main` of a service: telemetry, runtime, bind, signals, serve.

use std::future::Future;
use std::process::ExitCode;

use anyhow::Context;
use axum::Router;
use tracing::{error, info};

use crate::config::ServerConfig;
use crate::server::{self, Protocols};
use crate::telemetry::{self, TelemetryConfig};

/// Sets up telemetry and a Tokio runtime, runs `run`, and turns its outcome into an exit
/// code (0 on a clean stop, 1 on an error, which is logged).
pub fn main<F>(telemetry: &TelemetryConfig, run: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let _guard = match telemetry::init(telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("cannot set up logging: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run) {
        Ok(()) => {
            info!(service = %telemetry.service_name, "stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(service = %telemetry.service_name, error = format!("{e:#}"), "failed");
            ExitCode::FAILURE
        }
    }
}

/// Binds per `config` and serves `app` until SIGTERM or SIGINT, then drains.
pub async fn serve_until_signal(
    config: &ServerConfig,
    app: Router,
    protocols: Protocols,
) -> anyhow::Result<()> {
    serve(config, app, protocols, server::shutdown_on_signals()).await
}

/// Binds per `config` and serves `app` until `shutdown` fires, then drains.
pub async fn serve(
    config: &ServerConfig,
    app: Router,
    protocols: Protocols,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let listener = server::bind(config.addr(), config.backlog)
        .with_context(|| format!("binding {}", config.addr()))?;
    server::serve(listener, app, protocols, shutdown, config.shutdown_grace)
        .await
        .context("serving HTTP")
}
