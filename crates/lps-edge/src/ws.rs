//! MQTT over WebSocket: `GET WS_PATH` upgrades (subprotocol `mqtt`) and the connection is
//! bridged to the broker's TCP port, binary frames both ways.
//!
//! The upgrade is answered only once the broker has accepted the TCP connection, so a
//! device learns at once (502/504) that the broker is away. Above `WS_MAX_CONNECTIONS`
//! bridges it is answered 503. The relay itself is in [`bridge`].

pub mod bridge;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::config::WsConfig;
use crate::dial::{DialError, Dialer};
use crate::metrics::{self, WsMetrics};

/// The subprotocols a client may ask for, in our order of preference: `mqtt` (MQTT 3.1.1
/// and 5, MQTT-6.0.0-3) and `mqttv3.1` (the old 3.1 clients).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// What every upgrade shares.
pub struct WsState {
    pub(crate) config: WsConfig,
    pub(crate) metrics: WsMetrics,
    pub(crate) dialer: Dialer,
    pub(crate) bridges: Arc<Semaphore>,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) hard_stop: CancellationToken,
}

impl WsState {
    /// The framing limits: a client message is buffered whole, so it is bounded; the write
    /// buffer is bounded too (each send flushes, so it never holds more than a message).
    fn framing(&self) -> WebSocketConfig {
        let max = self.config.max_message_bytes;
        WebSocketConfig::default()
            .read_buffer_size(16 << 10)
            .write_buffer_size(0)
            .max_write_buffer_size(2 * bridge::READ_CHUNK + (64 << 10))
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
    }
}

/// `GET WS_PATH`: checks the handshake, takes a bridge slot, connects to the broker, and
/// answers 101; the bridge runs once hyper hands over the connection.
pub async fn upgrade(State(state): State<Arc<WsState>>, mut request: Request) -> Response {
    let (accept, protocol) = match handshake(request.headers()) {
        Ok(found) => found,
        Err(why) => {
            metrics::count(&state.metrics.rejected, "bad_handshake");
            debug!(why, "refused a WebSocket handshake");
            return (StatusCode::BAD_REQUEST, why).into_response();
        }
    };
    let Ok(slot) = state.bridges.clone().try_acquire_owned() else {
        metrics::count(&state.metrics.rejected, "limit");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many WebSocket connections; retry later",
        )
            .into_response();
    };
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        // The listener serves connections with upgrades; reaching this is a bug of ours.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "connection cannot be upgraded",
        )
            .into_response();
    };
    let broker = match dial_broker(&state).await {
        Ok(stream) => stream,
        Err(refusal) => return refusal,
    };
    state.metrics.accepted.inc();
    let peer = request.extensions().get::<crate::Peer>().map(|p| p.0);
    spawn_bridge(state, on_upgrade, broker, slot, peer);
    switching_protocols(accept, protocol)
}

/// Connects to the broker for one WebSocket; a failure is the response that refuses it.
async fn dial_broker(state: &WsState) -> Result<tokio::net::TcpStream, Response> {
    let config = &state.config;
    let dialed = state
        .dialer
        .connect(
            &config.broker_host,
            config.broker_port,
            config.broker_connect_timeout,
        )
        .await;
    match dialed {
        Ok(stream) => {
            crate::net::keepalive(&stream);
            Ok(stream)
        }
        Err(error) => {
            metrics::count(&state.metrics.rejected, "broker_unreachable");
            warn!(%error, "broker unreachable; WebSocket refused");
            let status = match error {
                DialError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
                DialError::Failed(..) => StatusCode::BAD_GATEWAY,
            };
            Err((
                status,
                [(header::RETRY_AFTER, "1")],
                format!("broker: {error}"),
            )
                .into_response())
        }
    }
}

/// Runs the bridge once hyper hands over the upgraded connection; the slot is held until
/// the bridge closes.
fn spawn_bridge(
    state: Arc<WsState>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    broker: tokio::net::TcpStream,
    slot: tokio::sync::OwnedSemaphorePermit,
    peer: Option<std::net::SocketAddr>,
) {
    let span = info_span!("ws", peer = ?peer);
    let tracker = state.tracker.clone();
    tracker.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    debug!(%error, "client left during the upgrade");
                    metrics::count(&state.metrics.closed, "client_error");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(state.framing()),
            )
            .await;
            state.metrics.open.inc();
            let end = bridge::run(ws, broker, &state).await;
            state.metrics.open.dec();
            metrics::count(&state.metrics.closed, end.as_str());
            debug!(reason = end.as_str(), "bridge closed");
            drop(slot);
        }
        .instrument(span),
    );
}

/// The `101 Switching Protocols` answer to a handshake that was accepted.
fn switching_protocols(accept: HeaderValue, protocol: Option<&'static str>) -> Response {
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(protocol) = protocol {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    response
}

/// Checks an upgrade request (RFC 6455 4.2.1): the `Sec-WebSocket-Accept` value to answer
/// and the subprotocol chosen. A client that offers subprotocols must offer `mqtt` (or
/// `mqttv3.1`); one that offers none is served without (some embedded clients do that).
fn handshake(headers: &HeaderMap) -> Result<(HeaderValue, Option<&'static str>), &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err("expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err("expected Sec-WebSocket-Version: 13");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or("expected a Sec-WebSocket-Key")?;
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let protocol = if offered.is_empty() {
        None
    } else {
        Some(
            SUBPROTOCOLS
                .into_iter()
                .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
                .ok_or("expected the WebSocket subprotocol mqtt")?,
        )
    };
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| "unusable Sec-WebSocket-Key")?;
    Ok((accept, protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    header::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const BASE: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn handshake_answers_the_rfc_example_and_picks_mqtt() {
        let mut pairs = BASE.to_vec();
        pairs.push(("sec-websocket-protocol", "mqttv5.0, mqtt"));
        let (accept, protocol) = handshake(&headers(&pairs)).unwrap();
        // RFC 6455, section 1.3.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(protocol, Some("mqtt"));
        assert_eq!(handshake(&headers(&BASE)).unwrap().1, None);
    }

    #[test]
    fn handshake_refuses_what_is_not_an_mqtt_websocket() {
        let mut other = BASE.to_vec();
        other.push(("sec-websocket-protocol", "chat"));
        assert!(handshake(&headers(&other)).is_err());
        assert!(handshake(&headers(&BASE[1..])).is_err());
        let mut old = BASE.to_vec();
        old[2] = ("sec-websocket-version", "8");
        assert!(handshake(&headers(&old)).is_err());
    }
}
