//! The HTTP forward proxy: absolute-form HTTP/1.1 requests (keep-alive, pipelining) and
//! `CONNECT host:port` tunnels.
//!
//! Every request first passes Basic proxy authentication when credentials are configured
//! (407 otherwise), then the destination port must be in `PROXY_ALLOWED_PORTS` (403), so
//! the proxy is no open relay. An absolute-form request is forwarded with a pooled
//! HTTP/1.1 client (hop-by-hop headers dropped, `Via` added, bodies streamed both ways);
//! `CONNECT` connects first and answers 200 only once the destination accepted, then
//! relays bytes ([`tunnel`]). Errors say who failed: 502 when the destination refused or
//! broke the exchange, 504 when it did not answer in time, 400 for requests a proxy
//! cannot serve, 508 for a request that already went through this edge.

pub mod tunnel;

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use crate::config::ProxyConfig;
use crate::dial::{DialError, Dialer, Resolver};
use crate::metrics::{ProxyMetrics, ProxyRequest};
use crate::net::{self, Slot};

/// The `Via` token this edge adds, and looks for to refuse loops.
const VIA: &str = "1.1 lps-edge";

/// Response bodies: streamed from a destination, or written here.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What every proxy connection shares: built once.
pub struct ProxyState {
    pub(crate) config: ProxyConfig,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) dialer: Dialer,
    client: Client<HttpConnector<Resolver>, Incoming>,
    h1: hyper::server::conn::http1::Builder,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) hard_stop: CancellationToken,
}

impl ProxyState {
    /// Builds the forwarding client (pooled, `TCP_NODELAY`, connect timeout).
    pub fn new(
        config: ProxyConfig,
        metrics: ProxyMetrics,
        dialer: Dialer,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Self {
        let mut connector = HttpConnector::new_with_resolver(dialer.resolver());
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            // hyper's default lets each destination connection's read buffer grow to about
            // 400 KiB on large bodies, and keeps it while the connection idles in the pool:
            // 100 connections of 1 MiB bodies held 150 MiB. Bounded as the server side is:
            // a body then passes in chunks of at most this much.
            .http1_max_buf_size(lps_common::server::MAX_READ_BUFFER)
            .build(connector);
        Self {
            h1: net::http1(config.idle_timeout),
            config,
            metrics,
            dialer,
            client,
            tracker,
            shutdown,
            hard_stop,
        }
    }
}

/// A client connection's hold on the limit and the gauge; a tunnel keeps it after the
/// HTTP exchange ends.
struct Held {
    _slot: Slot,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Serves one client connection.
pub async fn connection(state: Arc<ProxyState>, stream: TcpStream, peer: SocketAddr, slot: Slot) {
    state.metrics.connections.inc();
    let held = Arc::new(Held {
        _slot: slot,
        gauge: state.metrics.connections.clone(),
    });
    net::keepalive(&stream);
    let service = {
        let state = state.clone();
        hyper::service::service_fn(move |request| {
            let (state, held) = (state.clone(), held.clone());
            async move { Ok::<_, Infallible>(handle(&state, held, peer, request).await) }
        })
    };
    net::serve_http1(
        &state.h1,
        stream,
        peer,
        service,
        &state.shutdown,
        &state.hard_stop,
    )
    .instrument(info_span!("proxy", %peer))
    .await;
}

async fn handle(
    state: &Arc<ProxyState>,
    held: Arc<Held>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let connect = request.method() == Method::CONNECT;
    let response = route(state, held, peer, request).await;
    state
        .metrics
        .requests
        .get_or_create(&ProxyRequest {
            kind: if connect { "connect" } else { "forward" },
            status: response.status().as_u16(),
        })
        .inc();
    response
}

async fn route(
    state: &Arc<ProxyState>,
    held: Arc<Held>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(credentials) = &state.config.credentials
        && !authorized(request.headers(), credentials)
    {
        let mut response = text(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy authentication required (Proxy-Authorization: Basic)",
        );
        response.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"lps-edge\", charset=\"UTF-8\""),
        );
        return response;
    }
    if request
        .headers()
        .get_all(header::VIA)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("lps-edge")))
    {
        return text(
            StatusCode::LOOP_DETECTED,
            "request loops through this proxy",
        );
    }
    let uri = request.uri();
    if request.method() == Method::CONNECT {
        let Some((host, port)) = uri
            .authority()
            .and_then(|a| Some((a.host().to_owned(), a.port_u16()?)))
        else {
            return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        return connect(state, held, peer, request, host, port).await;
    }
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => {
            let port = authority.port_u16().unwrap_or(80);
            forward(state, request, port).await
        }
        (Some(_), Some(_)) => text(
            StatusCode::BAD_REQUEST,
            "only http:// is forwarded; use CONNECT for TLS",
        ),
        _ => text(
            StatusCode::BAD_REQUEST,
            "not a proxy request: expected an absolute URI (GET http://host/path) or CONNECT host:port",
        ),
    }
}

/// Whether `Proxy-Authorization: Basic` carries one of the configured pairs.
fn authorized(headers: &HeaderMap, credentials: &crate::config::Credentials) -> bool {
    let Some(value) = headers
        .get(header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("basic")
        && base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .is_some_and(|pair| credentials.accepts(&pair))
}

fn port_refused(port: u16) -> Response<ProxyBody> {
    text(
        StatusCode::FORBIDDEN,
        &format!("destination port {port} is not allowed (PROXY_ALLOWED_PORTS)"),
    )
}

async fn connect(
    state: &Arc<ProxyState>,
    held: Arc<Held>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
    host: String,
    port: u16,
) -> Response<ProxyBody> {
    if !state.config.allowed_ports.contains(port) {
        return port_refused(port);
    }
    let upstream = match state
        .dialer
        .connect(&host, port, state.config.connect_timeout)
        .await
    {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%error, "CONNECT failed");
            return dial_error(&error);
        }
    };
    net::keepalive(&upstream);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_state = state.clone();
    let span = info_span!("tunnel", %peer, to = %format!("{host}:{port}"));
    state.tracker.spawn(
        async move {
            let state = task_state;
            let client = match on_upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(error) => {
                    debug!(%error, "client left before the tunnel opened");
                    return;
                }
            };
            state.metrics.tunnels.inc();
            let end = tunnel::run(client, upstream, &state).await;
            state.metrics.tunnels.dec();
            crate::metrics::count(&state.metrics.tunnels_closed, end.as_str());
            debug!(reason = end.as_str(), "tunnel closed");
            drop(held);
        }
        .instrument(span),
    );
    Response::new(empty())
}

async fn forward(
    state: &Arc<ProxyState>,
    request: Request<Incoming>,
    port: u16,
) -> Response<ProxyBody> {
    if !state.config.allowed_ports.contains(port) {
        return port_refused(port);
    }
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::PROXY_AUTHORIZATION);
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    }
    parts
        .headers
        .append(header::VIA, HeaderValue::from_static(VIA));
    parts.version = Version::HTTP_11;
    let target = parts.uri.clone();
    let sent = state.client.request(Request::from_parts(parts, body));
    match tokio::time::timeout(state.config.response_timeout, sent).await {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Ok(Err(error)) => {
            debug!(%target, error = %chain(&error), "forwarding failed");
            let timed_out = sources(&error).any(|e| {
                e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            });
            if timed_out {
                text(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("upstream {target}: no connection in time"),
                )
            } else if error.is_connect() {
                text(
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream {target}: cannot connect: {}", chain(&error)),
                )
            } else {
                text(
                    StatusCode::BAD_GATEWAY,
                    &format!("upstream {target} failed: {}", chain(&error)),
                )
            }
        }
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "upstream {target}: no response within {:?}",
                state.config.response_timeout
            ),
        ),
    }
}

fn dial_error(error: &DialError) -> Response<ProxyBody> {
    let status = match error {
        DialError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        DialError::Failed(..) => StatusCode::BAD_GATEWAY,
    };
    text(status, &format!("upstream: {error}"))
}

/// Removes the headers that describe one hop (RFC 9110 7.6.1), including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn sources<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| (*e).source())
}

fn chain(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped_and_end_to_end_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key(header::ACCEPT));
    }
}
