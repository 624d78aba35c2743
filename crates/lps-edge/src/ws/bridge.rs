//! One WebSocket bridged to one broker connection, and the seed's three lessons:
//!
//! - **Batching.** Client messages go to the broker in as few writes as possible without
//!   ever waiting for more data: whatever has already arrived is coalesced, up to
//!   `WS_FLUSH_THRESHOLD_BYTES`, and written as soon as nothing more is ready. A message
//!   shorter than `WS_SMALL_PACKET_BYTES` (an acknowledgement, a PINGREQ) ends the batch
//!   and is written at once. Broker bytes are read in chunks of up to [`READ_CHUNK`] and
//!   each chunk is one binary message (MQTT-6.0.0-2 lets packets span messages).
//! - **No pings of our own.** The bridge never sends WebSocket pings: MQTT's keep-alive
//!   covers liveness end to end, and a WebSocket ping queued behind a full pipe is what
//!   killed busy connections every 20 s in the seed. A client's pings are answered.
//! - **Tear both sides down at the first failure.** The two directions run in one task;
//!   the first to end (close, EOF, error) ends the other. The broker socket is closed
//!   first, at once, so the broker drops the session before a reconnecting client comes
//!   back with the same client id (no zombie to kick it); the client then gets a Close
//!   frame whose code says who ended it.
//!
//! Backpressure: each direction reads the next message only when the last write finished,
//! so a slow reader on either side slows the writer on the other; nothing is queued
//! beyond one batch (and tungstenite's bounded buffers).

use std::time::Duration;

use bytes::BytesMut;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::debug;

use super::WsState;
use crate::metrics;

/// The largest read from the broker, and so the largest message sent to a client.
pub const READ_CHUNK: usize = 64 << 10;

/// How long the Close frame to a client may take before the connection is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Why a bridge ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent Close, or its connection ended cleanly.
    ClientClosed,
    /// The client's connection failed, or it broke the WebSocket protocol (oversized
    /// message, unmasked frame...).
    ClientError,
    /// The client sent a text message, which MQTT over WebSocket forbids (MQTT-6.0.0-1).
    ClientProtocol,
    /// The broker closed the connection (it refused the client, or it is going away).
    BrokerClosed,
    /// The broker connection failed.
    BrokerError,
    /// The edge is stopping.
    Shutdown,
}

impl End {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientError => "client_error",
            Self::ClientProtocol => "client_protocol",
            Self::BrokerClosed => "broker_closed",
            Self::BrokerError => "broker_error",
            Self::Shutdown => "shutdown",
        }
    }

    /// The Close frame the client gets (`None`: the client closed, tungstenite answers).
    fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Self::ClientClosed | Self::ClientError => return None,
            Self::ClientProtocol => (CloseCode::Unsupported, "MQTT needs binary frames"),
            Self::BrokerClosed => (CloseCode::Normal, "broker closed the connection"),
            Self::BrokerError => (CloseCode::Error, "broker connection failed"),
            Self::Shutdown => (CloseCode::Away, "edge shutting down"),
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }
}

/// Relays between `ws` and `broker` until either side ends, then closes both.
pub async fn run(ws: Ws, broker: TcpStream, state: &WsState) -> End {
    let (mut sink, mut stream) = ws.split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let end = {
        let up = client_to_broker(&mut stream, &mut to_broker, state);
        let down = broker_to_client(&mut from_broker, &mut sink, state);
        tokio::pin!(up, down);
        let (end, up_left) = tokio::select! {
            end = &mut up => (end, Some(false)),
            end = &mut down => (end, Some(true)),
            () = state.hard_stop.cancelled() => (End::Shutdown, None),
        };
        if let (End::Shutdown, Some(up_left)) = (end, up_left) {
            // Both directions stop at their next read: let the other one finish the message
            // it is writing, if any (hard_stop, at the end of the grace period, cuts it).
            let other = async {
                if up_left {
                    up.as_mut().await;
                } else {
                    down.as_mut().await;
                }
            };
            tokio::select! {
                () = other => {}
                () = state.hard_stop.cancelled() => {}
            }
        }
        end
    };
    // The broker first: it must forget this client before the client can come back.
    drop(to_broker);
    drop(from_broker);
    let close = async {
        match end.close_frame() {
            Some(frame) => sink.send(Message::Close(Some(frame))).await,
            // tungstenite has queued the reply to the client's Close; send it.
            None => sink.close().await,
        }
    };
    if let Ok(Err(error)) = tokio::time::timeout(CLOSE_TIMEOUT, close).await {
        debug!(%error, "could not send the Close frame");
    }
    end
}

/// Client messages to the broker, coalesced (see the module docs).
async fn client_to_broker(
    stream: &mut futures_util::stream::SplitStream<Ws>,
    to_broker: &mut OwnedWriteHalf,
    state: &WsState,
) -> End {
    let config = &state.config;
    let bytes = metrics::direction(&state.metrics.bytes, "to_broker");
    let messages = metrics::direction(&state.metrics.messages, "to_broker");
    let writes = metrics::direction(&state.metrics.writes, "to_broker");
    let mut batch = BytesMut::new();
    loop {
        let next = if batch.is_empty() {
            tokio::select! {
                biased;
                () = state.shutdown.cancelled() => return End::Shutdown,
                next = stream.next() => next,
            }
        } else {
            match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Nothing more has arrived: write what we have now.
                    if flush(to_broker, &mut batch, &bytes, &writes).await.is_err() {
                        return End::BrokerError;
                    }
                    continue;
                }
            }
        };
        let data = match next {
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            other => {
                // The client is done: deliver what it sent before going.
                let _ = flush(to_broker, &mut batch, &bytes, &writes).await;
                return match other {
                    Some(Ok(Message::Text(_))) => End::ClientProtocol,
                    Some(Err(error)) => {
                        debug!(%error, "client connection failed");
                        End::ClientError
                    }
                    _ => End::ClientClosed,
                };
            }
        };
        messages.inc();
        let small = data.len() < config.small_packet;
        if batch.is_empty() && (small || data.len() >= config.flush_threshold) {
            // Nothing to coalesce with: write it as it is, without a copy.
            bytes.inc_by(data.len() as u64);
            writes.inc();
            if to_broker.write_all(&data).await.is_err() {
                return End::BrokerError;
            }
            continue;
        }
        batch.extend_from_slice(&data);
        if (small || batch.len() >= config.flush_threshold)
            && flush(to_broker, &mut batch, &bytes, &writes).await.is_err()
        {
            return End::BrokerError;
        }
    }
}

async fn flush(
    to_broker: &mut OwnedWriteHalf,
    batch: &mut BytesMut,
    bytes: &prometheus_client::metrics::counter::Counter,
    writes: &prometheus_client::metrics::counter::Counter,
) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    bytes.inc_by(batch.len() as u64);
    writes.inc();
    let result = to_broker.write_all(batch).await;
    batch.clear();
    result
}

/// Broker bytes to the client, one binary message per read.
async fn broker_to_client(
    from_broker: &mut OwnedReadHalf,
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    state: &WsState,
) -> End {
    let bytes = metrics::direction(&state.metrics.bytes, "to_client");
    let messages = metrics::direction(&state.metrics.messages, "to_client");
    let writes = metrics::direction(&state.metrics.writes, "to_client");
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    loop {
        let read = tokio::select! {
            biased;
            () = state.shutdown.cancelled() => return End::Shutdown,
            read = from_broker.read_buf(&mut buffer) => read,
        };
        match read {
            Ok(0) => return End::BrokerClosed,
            Ok(n) => {
                bytes.inc_by(n as u64);
                messages.inc();
                writes.inc();
            }
            Err(error) => {
                debug!(%error, "broker connection failed");
                return End::BrokerError;
            }
        }
        let data = buffer.split().freeze();
        if sink.send(Message::Binary(data)).await.is_err() {
            return End::ClientError;
        }
        buffer.reserve(READ_CHUNK);
    }
}
