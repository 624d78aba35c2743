//! Shared building blocks of the LPS services.
//!
//! Data flow of a relay built from these parts: [`server::bind`] opens a tuned listener,
//! [`server::serve`] runs an axum router on it (HTTP/1.1 and h2c on one port) until the
//! [`server::shutdown_on_signals`] token fires; the handler validates input
//! ([`api`], [`request_id`]), and forwards with an [`upstream::Upstream`] built once at
//! start-up (pooled h2c or HTTP/1.1 client, round-robin targets, [`dns`] cache).
//! [`metrics`] adds `/healthz`, `/metrics` and request accounting; [`telemetry`] logs to
//! stdout and `logs/<SERVICE_NAME>.log`.
//!
//! Environment variables read here (each service adds its own):
//! `HTTP_HOST`, `HTTP_PORT`, `LISTEN_BACKLOG`, `SHUTDOWN_GRACE_SECS`, `MAX_BODY_BYTES`,
//! the limits of [`server::Limits`] (`MAX_CONNECTIONS`, `FIRST_BYTES_TIMEOUT_MS`,
//! `HEADER_READ_TIMEOUT_MS`, `BODY_READ_TIMEOUT_MS`, `IDLE_TIMEOUT_MS`,
//! `HTTP2_KEEPALIVE_INTERVAL_MS`, `HTTP2_KEEPALIVE_TIMEOUT_MS`, `BODY_BUDGET_WAIT_MS`),
//! `SERVICE_NAME`, `LOG`, `LOG_FORMAT`, `LOG_DIR`, `TARGET_URL`, `USE_HTTP_2`,
//! `SKIP_DNS_CACHE`, `CONNECT_TIMEOUT_MS`, `REQUEST_TIMEOUT_SECS`, `TARGET_COOLDOWN_MS`, and
//! the broker settings of [`mqtt`] (`MQTT_*`, including the secure-link ones).

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod config;
pub mod dead_letters;
pub mod dns;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod poll;
pub mod request_id;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod upstream;
pub mod wire;

pub use prometheus_client::registry::Registry;
/// The shutdown signal every service's `serve` takes (re-exported so that services and tests
/// name one type).
pub use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;

/// Finishes a service router: adds `/healthz` and `/metrics`, JSON 404/405 fallbacks, the
/// body limit, and request metrics.
pub fn finish_router(app: Router, mut registry: Registry, max_body_bytes: usize) -> Router {
    let http = metrics::HttpMetrics::register(&mut registry);
    app.merge(metrics::ops_routes(Arc::new(registry)))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(metrics::TrackLayer::new(http))
}

/// Prints a configuration error on one line and exits with code 64.
pub fn exit_on_config_error(error: &config::ConfigError) -> ! {
    eprintln!("{error}");
    std::process::exit(config::EXIT_CONFIG)
}
