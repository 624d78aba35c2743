//! ars-comp-2: the HTTP relay in front of the legacy backend.
//!
//! `POST /ID_REQ_KC_STORE7D3BPACKET` with `{"id","body"}` (extra fields ignored) is forwarded
//! as `POST TARGET_URL` with the JSON object `{"id","body","request_id"}` and the
//! `Request-Id` header, always over HTTP/1.1 since the legacy backend speaks nothing else.
//! 200 `{"status":"success",...}` when the backend answered 2xx; 502/503/504 with a JSON
//! error when it did not; 4xx with a JSON error for bad input. Each request is forwarded in a
//! `store` span (debug level) carrying its `request_id`.
//!
//! Environment: the server and logging variables of `lps-common`, plus `TARGET_URL`
//! (default `http://localhost:1337/ID_REQ_KC_STORE7D3BPACKET`), `SKIP_DNS_CACHE`,
//! `CONNECT_TIMEOUT_MS`, `REQUEST_TIMEOUT_SECS`, `TARGET_COOLDOWN_MS`. `USE_HTTP_2` is
//! ignored on the outbound side (a warning says so); inbound accepts HTTP/1.1 and h2c.

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use http::HeaderMap;
use lps_common::api::{self, ApiError, Body};
use lps_common::config::{ConfigError, Env, Lookup, ServerConfig};
use lps_common::telemetry::{self, TelemetryConfig};
use lps_common::upstream::{Upstream, UpstreamConfig};
use lps_common::wire::STORE_PATH;
use lps_common::{CancellationToken, Registry, finish_router, service};
use tokio::net::TcpListener;
use tracing::{debug_span, warn};

/// Default target: the simulator on its usual port.
pub const DEFAULT_TARGET: &str = "http://localhost:1337/ID_REQ_KC_STORE7D3BPACKET";

/// Everything ars-comp-2 reads from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Inbound server.
    pub server: ServerConfig,
    /// Logging.
    pub telemetry: TelemetryConfig,
    /// Outbound client; HTTP/1.1 whatever `USE_HTTP_2` says.
    pub upstream: UpstreamConfig,
    /// Whether `USE_HTTP_2` asked for h2c (ignored, reported at start-up).
    pub http2_requested: bool,
}

impl Config {
    /// Reads the configuration from `lookup`.
    pub fn from_lookup(lookup: &dyn Lookup) -> Result<Self, ConfigError> {
        let env = Env::new(lookup);
        let mut upstream = UpstreamConfig::from_env(&env, DEFAULT_TARGET)?;
        let http2_requested = upstream.http2;
        upstream.http2 = false;
        Ok(Self {
            server: ServerConfig::from_env(&env, 8080)?,
            telemetry: TelemetryConfig::from_env(&env, "ars-comp-2")?,
            upstream,
            http2_requested,
        })
    }
}

/// The router: the relay route plus `/healthz` and `/metrics`.
pub fn app(upstream: Arc<Upstream>, registry: Registry, max_body_bytes: usize) -> Router {
    // Bodies are buffered (and spliced, not copied: see `store`), so large ones are
    // admitted within a budget.
    let budget = api::BodyBudget::for_limit(max_body_bytes).with_copies(2);
    let routes = Router::new()
        .route(STORE_PATH, post(store))
        .route_layer(budget)
        .with_state(upstream);
    finish_router(routes, registry, max_body_bytes)
}

/// Builds the client and serves `listener` until `shutdown` fires, then drains: what the
/// binary runs (see [`run`]) and what the tests run.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.http2_requested {
        warn!("USE_HTTP_2 is ignored: the legacy backend speaks HTTP/1.1 only");
    }
    service::serve_relay(&config.server, &config.upstream, app, listener, shutdown).await
}

/// Binds per `config` and [`serve`]s until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    service::bind_and_serve(config, |c| &c.server, serve).await
}

async fn store(
    State(upstream): State<Arc<Upstream>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let (payload, request_id) = api::legacy_payload(&headers, &body)?;
    // Bodies can be large: let go of the received buffer as soon as it is sent on.
    drop(body);
    // Debug level: below it the span is never built (one relaxed load per request).
    let span = debug_span!("store", %request_id);
    let relay = upstream.relay_payload(payload, &request_id);
    Ok(telemetry::in_span(span, relay).await)
}

/// The binary's entry point: configuration from the process environment (exit 64 when
/// invalid), then [`run`].
pub fn main() -> std::process::ExitCode {
    service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}
