//! The inbound HTTP server: a tuned listener, HTTP/1.1 and h2c (prior knowledge) on one
//! port, and graceful shutdown.
//!
//! The caller binds (tests bind port 0) and passes the listener to [`serve`]; `serve` stops
//! accepting when the shutdown token fires and gives in-flight requests a grace period.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Which protocols a server speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocols {
    /// HTTP/1.1 and h2c with prior knowledge, told apart by the connection preface.
    #[default]
    Http1AndH2c,
    /// HTTP/1.1 only, like the legacy backend.
    Http1Only,
}

/// Binds `addr` with `SO_REUSEADDR` and the given listen backlog.
///
/// The kernel caps the backlog at `net.core.somaxconn`; a warning says so when that
/// makes it smaller than asked for.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // Accept IPv4 too on `::`, as most servers do; ignore platforms that refuse.
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket.listen(backlog)?;
    if let Some(max) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|max| *max < backlog)
    {
        warn!(
            requested = backlog,
            somaxconn = max,
            "listen backlog capped by net.core.somaxconn"
        );
    }
    TcpListener::from_std(socket.into())
}

/// Largest read buffer of an HTTP/1.1 connection.
pub const MAX_READ_BUFFER: usize = 64 << 10;

/// Serves `app` on `listener` until `shutdown` fires, then lets in-flight requests finish
/// for at most `grace`.
///
/// Every accepted socket gets `TCP_NODELAY`. HTTP/1.1 keeps connections alive and answers
/// pipelined requests in order.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    protocols: Protocols,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .pipeline_flush(true)
        // A connection's read buffer grows up to this while a large body streams in
        // (hyper's default is ~400 KiB, per connection); request heads fit easily.
        .max_buf_size(MAX_READ_BUFFER)
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        .keep_alive_interval(None);
    if protocols == Protocols::Http1Only {
        builder = builder.http1_only();
    }
    let local = listener.local_addr()?;
    info!(addr = %local, ?protocols, "listening");
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining connections"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => info!("all connections drained"),
        Err(_) => warn!(
            grace_ms = grace.as_millis() as u64,
            "grace period over; closing connections with requests still in flight"
        ),
    }
    Ok(())
}

/// A token that fires on SIGTERM or SIGINT (Ctrl-C).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        fire.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the service");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
