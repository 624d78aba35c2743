//! lps-edge: the way into an LPS testbed from outside, on two listeners that can each be
//! switched off.
//!
//! - **MQTT over WebSocket** on `HTTP_PORT` (default 8000): `GET /mqtt` upgrades with the
//!   subprotocol `mqtt` and the connection is bridged to the broker's TCP port
//!   (`MQTT_HOST:MQTT_PORT`), binary frames both ways, so alarm devices that only get out
//!   on port 80/443 can publish straight into the broker. [`ws`] and [`ws::bridge`] say
//!   how the seed's three failures (per-packet drain, WebSocket pings stacked on MQTT's
//!   keep-alive, zombie sessions after slow closes) are avoided. The same port serves
//!   `/healthz` and `/metrics`.
//! - **HTTP forward proxy** on `PROXY_PORT` (default 3128): absolute-form HTTP/1.1
//!   requests (keep-alive, pipelining) and `CONNECT` tunnels, with optional Basic proxy
//!   authentication and an allow-list of destination ports ([`proxy`]).
//!
//! Both listeners use `SO_REUSEPORT` (unless `REUSE_PORT=false`), so several edge
//! processes can share the ports. On SIGTERM the edge stops accepting, closes each bridge
//! after the message it is relaying (Close 1001: devices reconnect elsewhere), lets
//! proxied requests and tunnels finish for `SHUTDOWN_GRACE_SECS`, then closes the rest.
//!
//! Environment, besides the server (`HTTP_HOST`, `HTTP_PORT`, `LISTEN_BACKLOG`,
//! `MAX_CONNECTIONS`, `HEADER_READ_TIMEOUT_MS`, `SHUTDOWN_GRACE_SECS`) and logging
//! (`SERVICE_NAME`, `LOG`, `LOG_FORMAT`, `LOG_DIR`) variables of `lps-common`:
//! `REUSE_PORT`; `WS_ENABLED`, `WS_PATH`, `MQTT_HOST`, `MQTT_PORT`, `WS_MAX_CONNECTIONS`,
//! `WS_MAX_MESSAGE_BYTES`, `WS_FLUSH_THRESHOLD_BYTES`, `WS_SMALL_PACKET_BYTES`,
//! `WS_BROKER_CONNECT_TIMEOUT_MS`; `PROXY_ENABLED`, `PROXY_HOST`, `PROXY_PORT`,
//! `PROXY_ALLOWED_PORTS`, `PROXY_AUTH`, `PROXY_AUTH_FILE`, `PROXY_MAX_CONNECTIONS`,
//! `PROXY_CONNECT_TIMEOUT_MS`, `PROXY_RESPONSE_TIMEOUT_MS`, `PROXY_IDLE_TIMEOUT_MS`
//! ([`config`] documents each).

// Stricter than the workspace: a library documents what it exports, and `pub` means
// exported (`pub(crate)` otherwise).
#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod dial;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod ws;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use lps_common::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{info, warn};

pub use config::Config;

/// The edge's bound sockets; the caller binds (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// `HTTP_PORT`: the WebSocket bridge and `/healthz`, `/metrics`.
    pub http: TcpListener,
    /// `PROXY_PORT`, when the proxy is on.
    pub proxy: Option<TcpListener>,
}

impl Listeners {
    /// Binds what `config` asks for.
    pub fn bind(config: &Config) -> anyhow::Result<Self> {
        let backlog = config.server.backlog;
        let http = net::bind(config.server.addr(), backlog, config.reuse_port)
            .with_context(|| format!("binding {} (HTTP_PORT)", config.server.addr()))?;
        let proxy = config
            .proxy
            .as_ref()
            .map(|p| {
                net::bind(p.addr, backlog, config.reuse_port)
                    .with_context(|| format!("binding {} (PROXY_PORT)", p.addr))
            })
            .transpose()?;
        Ok(Self { http, proxy })
    }
}

/// The router of `HTTP_PORT`: the upgrade route (when the bridge is on), `/healthz`,
/// `/metrics`.
fn app(ws: Option<Arc<ws::WsState>>, registry: Registry) -> Router {
    let mut routes = Router::new();
    if let Some(ws) = ws {
        let path = ws.config.path.clone();
        routes = routes.route(&path, get(ws::upgrade).with_state(ws));
    }
    lps_common::finish_router(routes, registry, 64 << 10)
}

/// Serves both listeners until `shutdown` fires, then drains (see the crate docs).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let dialer = dial::Dialer::from_system().context("setting up the DNS resolver")?;
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let ws = config.ws.clone().map(|ws| {
        Arc::new(ws::WsState {
            bridges: Arc::new(Semaphore::new(ws.max_connections as usize)),
            config: ws,
            metrics: metrics.ws.clone(),
            dialer: dialer.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            hard_stop: hard_stop.clone(),
        })
    });
    let app = app(ws.clone(), registry);
    let h1 = Arc::new(net::http1(config.server.limits.header_read_timeout));
    let http_addr = listeners.http.local_addr()?;
    info!(
        addr = %http_addr,
        ws_path = ws.as_ref().map(|w| w.config.path.as_str()),
        broker = ws.as_ref().map(|w| format!("{}:{}", w.config.broker_host, w.config.broker_port)),
        "listening"
    );
    let http = {
        let (shutdown, hard_stop) = (shutdown.clone(), hard_stop.clone());
        net::accept_loop(
            "http",
            listeners.http,
            config.server.limits.max_connections,
            shutdown.clone(),
            tracker.clone(),
            move |stream, peer, slot| {
                http_connection(
                    app.clone(),
                    h1.clone(),
                    stream,
                    peer,
                    slot,
                    shutdown.clone(),
                    hard_stop.clone(),
                )
            },
        )
    };
    let proxy = async {
        if let (Some(listener), Some(proxy_config)) = (listeners.proxy, config.proxy.clone()) {
            let state = proxy::ProxyState::new(
                proxy_config,
                metrics.proxy.clone(),
                dialer.clone(),
                tracker.clone(),
                shutdown.clone(),
                hard_stop.clone(),
            );
            serve_proxy(listener, state, &tracker, &shutdown).await;
        }
    };
    tokio::join!(http, proxy);
    drain(&tracker, config.server.shutdown_grace, &hard_stop).await;
    Ok(())
}

/// Accepts proxy clients on `listener` until `shutdown`.
async fn serve_proxy(
    listener: TcpListener,
    state: proxy::ProxyState,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    info!(
        proxy_addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
        auth = state.config.credentials.is_some(),
        "proxy listening"
    );
    let max = state.config.max_connections;
    let state = Arc::new(state);
    net::accept_loop(
        "proxy",
        listener,
        max,
        shutdown.clone(),
        tracker.clone(),
        move |stream, peer, slot| proxy::connection(state.clone(), stream, peer, slot),
    )
    .await;
}

/// Waits up to `grace` for the tracked connections to finish, then closes what is left.
async fn drain(tracker: &TaskTracker, grace: Duration, hard_stop: &CancellationToken) {
    info!(
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining"
    );
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            left = tracker.len(),
            "grace period over; closing what is left"
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
}

async fn http_connection(
    app: Router,
    h1: Arc<hyper::server::conn::http1::Builder>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: net::Slot,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let service =
        hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(axum::body::Body::new)).await;
                Ok::<_, Infallible>(match response {
                    Ok(response) => response,
                    Err(never) => match never {},
                })
            }
        });
    net::serve_http1(&h1, stream, peer, service, &shutdown, &hard_stop).await;
    // The HTTP exchange is over; a bridge it started holds its own bridge slot.
    drop(slot);
}

/// The client's address, in the request extensions of `HTTP_PORT`.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Binds per `config` and serves until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config)?;
    serve(config, listeners, lps_common::server::shutdown_on_signals()).await
}

/// The binary's entry point: `healthcheck` probes `HTTP_PORT` (default 8000); otherwise
/// configuration from the process environment (exit 64 when invalid), then [`run`].
pub fn main() -> ExitCode {
    if let Some(code) = lps_common::service::healthcheck_if_requested(config::DEFAULT_HTTP_PORT) {
        return code;
    }
    lps_common::service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}
