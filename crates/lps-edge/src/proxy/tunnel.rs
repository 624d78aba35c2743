//! A CONNECT tunnel: bytes both ways between the client and the destination.
//!
//! One task, two bounded buffers ([`BUFFER`] each way): a direction reads again only when
//! its last write finished, so the slower side paces the faster one. The end:
//!
//! - the destination closes (it finished, or it died): its last bytes are delivered, the
//!   client gets a FIN, and the tunnel is gone; a killed destination thus closes the
//!   client's connection at once instead of leaving it open on nothing;
//! - the client half-closes (sent its request, waits for the answer): the destination gets
//!   a FIN and its answer still flows back until it closes;
//! - an error on either side: both are closed at once;
//! - the end of the shutdown grace period: both are closed. Until then tunnels run on,
//!   so that requests in flight through them can finish.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ProxyState;
use crate::metrics;

/// Bytes buffered per direction.
pub const BUFFER: usize = 32 << 10;

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The destination closed its side.
    UpstreamClosed,
    /// The client closed (after the destination, or before it answered anything more).
    ClientClosed,
    /// Reading from or writing to the destination failed.
    UpstreamError,
    /// Reading from or writing to the client failed.
    ClientError,
    /// The shutdown grace period ended.
    Shutdown,
}

impl End {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamClosed => "upstream_closed",
            Self::ClientClosed => "client_closed",
            Self::UpstreamError => "upstream_error",
            Self::ClientError => "client_error",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pump {
    /// The source closed; the FIN was passed on.
    Eof,
    /// Reading from the source failed.
    ReadFailed,
    /// Writing to the sink failed.
    WriteFailed,
}

/// Relays until the tunnel ends (see the module docs), then closes both sides.
pub async fn run<C>(client: C, upstream: TcpStream, state: &ProxyState) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let to_upstream = metrics::direction(&state.metrics.tunnel_bytes, "to_upstream");
    let to_client = metrics::direction(&state.metrics.tunnel_bytes, "to_client");
    let up = pump(&mut client_read, &mut upstream_write, &to_upstream);
    let down = pump(&mut upstream_read, &mut client_write, &to_client);
    tokio::pin!(up, down);
    tokio::select! {
        () = state.hard_stop.cancelled() => End::Shutdown,
        ended = &mut down => match ended {
            Pump::Eof => End::UpstreamClosed,
            Pump::ReadFailed => End::UpstreamError,
            Pump::WriteFailed => End::ClientError,
        },
        ended = &mut up => match ended {
            Pump::ReadFailed => End::ClientError,
            Pump::WriteFailed => End::UpstreamError,
            // Half-close: the destination's answer may still be on its way.
            Pump::Eof => tokio::select! {
                () = state.hard_stop.cancelled() => End::Shutdown,
                ended = &mut down => match ended {
                    Pump::Eof => End::ClientClosed,
                    Pump::ReadFailed => End::UpstreamError,
                    Pump::WriteFailed => End::ClientError,
                },
            },
        },
    }
    // Returning drops both sockets: closed at once, whatever the other direction was doing.
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    bytes: &prometheus_client::metrics::counter::Counter,
) -> Pump
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Pump::Eof;
            }
            Ok(n) => n,
            Err(_) => return Pump::ReadFailed,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            return Pump::WriteFailed;
        }
        bytes.inc_by(n as u64);
    }
}
