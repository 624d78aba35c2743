//! Listening sockets and the accept loop both listeners share.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Binds `addr` with `SO_REUSEADDR`, and `SO_REUSEPORT` when `reuse_port`: then several
/// processes can listen on one port and the kernel spreads connections over them.
pub fn bind(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(reuse_port)?;
    if addr.is_ipv6() {
        // Accept IPv4 too on `::`; ignore platforms that refuse.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// TCP keep-alive on long-lived sockets (bridges, tunnels): a peer that vanished without a
/// FIN is found within about a minute instead of never.
pub fn keepalive(stream: &TcpStream) {
    let params = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    let params = params.with_retries(3);
    if let Err(error) = SockRef::from(stream).set_tcp_keepalive(&params) {
        debug!(%error, "cannot set TCP keep-alive");
    }
}

/// Accepts on `listener` until `shutdown` fires, with at most `max_connections` handled
/// at once (beyond that, accepting waits and new connections queue in the backlog). Each
/// connection runs `handle` on the `tracker` with its slot, which it may hand on to a task
/// that outlives the HTTP exchange (a bridge, a tunnel).
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    max_connections: u32,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Slot) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let mut warned_full: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Rate-limited: under a flood this would otherwise log per connection.
                if warned_full.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    warn!(
                        listener = name,
                        max_connections, "connection limit reached; new connections wait"
                    );
                    warned_full = Some(Instant::now());
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        tracker.spawn(handle(stream, peer, Slot(Arc::new(slot))));
    }
}

/// A connection's place under its listener's limit; freed when the last clone is dropped.
#[derive(Clone)]
pub struct Slot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// The HTTP/1.1 server settings of both listeners.
pub fn http1(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(hyper_util::rt::TokioTimer::new())
        .keep_alive(true)
        // Pipelined requests are answered in order; their responses leave together.
        .pipeline_flush(true)
        .max_buf_size(lps_common::server::MAX_READ_BUFFER)
        // Also applies while a keep-alive connection waits for its next request.
        .header_read_timeout(header_read_timeout);
    h1
}

/// Serves one HTTP/1.1 connection (with upgrades) until it ends; on `shutdown` it finishes
/// the request in flight and closes, and on `hard_stop` it is dropped.
pub async fn serve_http1<S>(
    builder: &hyper::server::conn::http1::Builder,
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => result,
                () = hard_stop.cancelled() => return,
            }
        }
    };
    if let Err(error) = result {
        debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuse_port_lets_two_listeners_share_a_port() {
        let first = bind("127.0.0.1:0".parse().unwrap(), 16, true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, 16, true).expect("second listener on the same port");
        assert_eq!(second.local_addr().unwrap(), addr);
        // Without it the port is taken, as usual.
        let taken = bind("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        assert!(bind(taken.local_addr().unwrap(), 16, false).is_err());
    }
}
