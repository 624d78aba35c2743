//! Tracing to stdout and to `<LOG_DIR>/<SERVICE_NAME>.log`.
//!
//! `LOG` sets the filter (EnvFilter syntax, default `info`), `LOG_FORMAT` is `plain` or
//! `json`, `LOG_DIR` the folder of the log file (default `logs`). Writing to the file goes
//! through a background thread so a slow disk never stalls a request.

use std::future::Future;
use std::path::PathBuf;

use tracing::{Instrument, Span};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{ConfigError, ENV_LOG, ENV_LOG_DIR, ENV_LOG_FORMAT, ENV_SERVICE_NAME, Env};

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Plain,
    /// One JSON object per line.
    Json,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `SERVICE_NAME`: names the log file.
    pub service_name: String,
    /// `LOG`: the filter, e.g. `info` or `info,lps_common=debug`.
    pub filter: String,
    /// `LOG_FORMAT`: `plain` (default) or `json`.
    pub format: LogFormat,
    /// `LOG_DIR`: folder of `<SERVICE_NAME>.log` (default `logs`).
    pub dir: PathBuf,
}

impl TelemetryConfig {
    /// Reads the logging settings; `default_name` applies when `SERVICE_NAME` is unset.
    pub fn from_env(env: &Env<'_>, default_name: &str) -> Result<Self, ConfigError> {
        let filter = env.string(ENV_LOG, "info");
        if EnvFilter::try_new(&filter).is_err() {
            return Err(ConfigError::new(
                ENV_LOG,
                &filter,
                "a tracing filter such as info, debug or info,lps_common=debug",
            ));
        }
        let format = match env
            .string(ENV_LOG_FORMAT, "plain")
            .to_ascii_lowercase()
            .as_str()
        {
            "plain" | "text" => LogFormat::Plain,
            "json" => LogFormat::Json,
            other => return Err(ConfigError::new(ENV_LOG_FORMAT, other, "plain or json")),
        };
        Ok(Self {
            service_name: env.string(ENV_SERVICE_NAME, default_name),
            filter,
            format,
            dir: PathBuf::from(env.string(ENV_LOG_DIR, "logs")),
        })
    }
}

/// Installs the global subscriber. Keep the guard alive until exit: dropping it flushes
/// the file.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<WorkerGuard> {
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| anyhow::anyhow!("cannot create log folder {}: {e}", config.dir.display()))?;
    let file =
        tracing_appender::rolling::never(&config.dir, format!("{}.log", config.service_name));
    let (file, guard) = tracing_appender::non_blocking(file);
    let filter = EnvFilter::try_new(&config.filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    match config.format {
        LogFormat::Plain => registry
            .with(fmt::layer().with_target(false))
            .with(
                fmt::layer()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(file),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(fmt::layer().json().with_target(false))
            .with(fmt::layer().json().with_target(false).with_writer(file))
            .try_init()?,
    }
    Ok(guard)
}

/// Awaits `future` inside `span`, or bare when `span` is disabled (below the log level):
/// a per-request span on a hot path then costs no `Instrumented` wrapper when it is off.
/// Build the span with `debug_span!` at the call site, so that a disabled one is never built.
pub async fn in_span<F: Future>(span: Span, future: F) -> F::Output {
    if span.is_disabled() {
        future.await
    } else {
        future.instrument(span).await
    }
}
