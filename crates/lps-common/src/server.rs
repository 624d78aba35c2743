//! The inbound HTTP server: a tuned listener, HTTP/1.1 and h2c (prior knowledge) on one
//! port, bounded connections, and graceful shutdown.
//!
//! The caller binds (tests bind port 0) and passes the listener to [`serve`]; `serve` stops
//! accepting when the shutdown token fires and gives in-flight requests a grace period.
//!
//! A slow or silent client never holds what others need ([`Limits`], one value per
//! service, read from the environment with the server settings):
//!
//! - at most `MAX_CONNECTIONS` connections at once; beyond that, accepting waits and new
//!   connections queue in the listen backlog;
//! - the first bytes of a connection, enough to tell HTTP/1.1 from h2c, must arrive within
//!   `FIRST_BYTES_TIMEOUT_MS`: a client that connects and sends nothing is closed then;
//! - an HTTP/1.1 request head must be complete within `HEADER_READ_TIMEOUT_MS` of its first
//!   byte (one header byte per second does not keep a connection);
//! - a request body must be complete within `BODY_READ_TIMEOUT_MS` of its head (408);
//! - a connection with no request in flight is closed after `IDLE_TIMEOUT_MS`, whatever
//!   the protocol (an h2 connection dribbling an unfinished HEADERS frame included);
//! - h2 connections are pinged every `HTTP2_KEEPALIVE_INTERVAL_MS` and closed when a ping
//!   goes unanswered for `HTTP2_KEEPALIVE_TIMEOUT_MS` (dead peers);
//! - [`crate::api::BodyBudget`] waits at most `BODY_BUDGET_WAIT_MS` for memory (503).
//!
//! Errors the server produces itself are JSON (408, 413, 503 through [`crate::api`]),
//! except those hyper writes before any service sees the request (400 for a malformed
//! head, 431 for an oversized one, 505): hyper offers no hook for their bodies.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http::Request;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::config::{
    ConfigError, ENV_BODY_BUDGET_WAIT_MS, ENV_BODY_READ_TIMEOUT_MS, ENV_FIRST_BYTES_TIMEOUT_MS,
    ENV_HEADER_READ_TIMEOUT_MS, ENV_HTTP2_KEEPALIVE_INTERVAL_MS, ENV_HTTP2_KEEPALIVE_TIMEOUT_MS,
    ENV_IDLE_TIMEOUT_MS, ENV_MAX_CONNECTIONS, Env, MAX_DURATION,
};

/// Which protocols a server speaks on its port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocols {
    /// HTTP/1.1 and h2c with prior knowledge, told apart by the connection preface.
    #[default]
    Http1AndH2c,
    /// HTTP/1.1 only, like the legacy backend.
    Http1Only,
}

/// How long slow or silent clients may hold a connection, and how many may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `MAX_CONNECTIONS`: connections served at once (default 4096); beyond that accepting
    /// waits and new connections queue in the listen backlog.
    pub max_connections: u32,
    /// `FIRST_BYTES_TIMEOUT_MS`: a new connection must send the bytes that tell HTTP/1.1
    /// from h2c within this (default 5000), or it is closed.
    pub first_bytes_timeout: Duration,
    /// `HEADER_READ_TIMEOUT_MS`: an HTTP/1.1 request head must be complete within this of
    /// its first byte (default 10000), or the connection is closed.
    pub header_read_timeout: Duration,
    /// `BODY_READ_TIMEOUT_MS`: a request body must be complete within this of its head
    /// (default 30000), or the request is answered 408.
    pub body_read_timeout: Duration,
    /// `IDLE_TIMEOUT_MS`: a connection with no request in flight is closed after this
    /// (default 60000), HTTP/1.1 keep-alive and h2 alike.
    pub idle_timeout: Duration,
    /// `HTTP2_KEEPALIVE_INTERVAL_MS`: how often an h2 connection is pinged (default 20000;
    /// 0 turns pings off).
    pub h2_keepalive_interval: Option<Duration>,
    /// `HTTP2_KEEPALIVE_TIMEOUT_MS`: an h2 connection whose ping is not answered within
    /// this is closed (default 20000).
    pub h2_keepalive_timeout: Duration,
    /// `BODY_BUDGET_WAIT_MS`: how long a large body waits for memory from a
    /// [`crate::api::BodyBudget`] before it is answered 503 with `Retry-After` (default
    /// 5000).
    pub body_budget_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            first_bytes_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            h2_keepalive_interval: Some(Duration::from_secs(20)),
            h2_keepalive_timeout: Duration::from_secs(20),
            body_budget_wait: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// Reads the limits; every value is range-checked.
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = Duration::from_millis;
        let positive =
            |var: &str, default: Duration| env.millis_in(var, default, ms(1), MAX_DURATION);
        let interval = env.millis_in(
            ENV_HTTP2_KEEPALIVE_INTERVAL_MS,
            d.h2_keepalive_interval.unwrap_or_default(),
            Duration::ZERO,
            MAX_DURATION,
        )?;
        Ok(Self {
            max_connections: env.number(ENV_MAX_CONNECTIONS, d.max_connections, 1, 1 << 20)?,
            first_bytes_timeout: positive(ENV_FIRST_BYTES_TIMEOUT_MS, d.first_bytes_timeout)?,
            header_read_timeout: positive(ENV_HEADER_READ_TIMEOUT_MS, d.header_read_timeout)?,
            body_read_timeout: positive(ENV_BODY_READ_TIMEOUT_MS, d.body_read_timeout)?,
            idle_timeout: positive(ENV_IDLE_TIMEOUT_MS, d.idle_timeout)?,
            h2_keepalive_interval: (!interval.is_zero()).then_some(interval),
            h2_keepalive_timeout: positive(ENV_HTTP2_KEEPALIVE_TIMEOUT_MS, d.h2_keepalive_timeout)?,
            body_budget_wait: env.millis_in(
                ENV_BODY_BUDGET_WAIT_MS,
                d.body_budget_wait,
                Duration::ZERO,
                MAX_DURATION,
            )?,
        })
    }
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

/// The h2 connection preface (RFC 9113, 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection closed for idleness may take to close gracefully (h2 GOAWAY)
/// before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` with the default [`Limits`] until `shutdown` fires, then
/// lets in-flight requests finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    protocols: Protocols,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    serve_with_limits(listener, app, protocols, shutdown, grace, Limits::default()).await
}

/// Serves `app` on `listener` within `limits` until `shutdown` fires, then lets in-flight
/// requests finish for at most `grace` and closes what is left.
///
/// Every accepted socket gets `TCP_NODELAY`. HTTP/1.1 keeps connections alive and answers
/// pipelined requests in order.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: Router,
    protocols: Protocols,
    shutdown: CancellationToken,
    grace: Duration,
    limits: Limits,
) -> io::Result<()> {
    let shared = Arc::new(Shared::new(app, protocols, limits));
    let local = listener.local_addr()?;
    info!(addr = %local, ?protocols, max_connections = limits.max_connections, "listening");
    let tracker = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let mut slots = Slots::new(limits.max_connections);
    loop {
        let Some(slot) = slots.acquire(&shutdown).await else {
            break;
        };
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
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let hard_stop = hard_stop.clone();
        tracker.spawn(async move {
            connection(stream, peer, shared, shutdown, hard_stop).await;
            drop(slot);
        });
    }
    drop(listener);
    drain(&tracker, grace, &hard_stop).await;
    Ok(())
}

/// The `MAX_CONNECTIONS` connection slots of a server: one is held for the life of each
/// connection.
struct Slots {
    slots: Arc<Semaphore>,
    max_connections: u32,
    /// When the last "limit reached" warning was logged.
    warned_full: Option<Instant>,
}

impl Slots {
    fn new(max_connections: u32) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_connections as usize)),
            max_connections,
            warned_full: None,
        }
    }

    /// A free slot, waiting (and warning) while all are taken; `None` once `shutdown`
    /// fires during that wait.
    async fn acquire(&mut self, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        // Rate-limited: under a flood this would otherwise log per connection.
        if self
            .warned_full
            .is_none_or(|at| at.elapsed() > Duration::from_secs(10))
        {
            warn!(
                max_connections = self.max_connections,
                "connection limit reached; new connections wait in the backlog"
            );
            self.warned_full = Some(Instant::now());
        }
        tokio::select! {
            () = shutdown.cancelled() => None,
            slot = self.slots.clone().acquire_owned() => slot.ok(),
        }
    }
}

/// After accepting stopped: lets the connections of `tracker` finish within `grace`, then
/// fires `hard_stop` to close the rest and waits for them.
async fn drain(tracker: &TaskTracker, grace: Duration, hard_stop: &CancellationToken) {
    info!(
        grace_ms = grace.as_millis() as u64,
        "stopped accepting; draining connections"
    );
    tracker.close();
    match tokio::time::timeout(grace, tracker.wait()).await {
        Ok(()) => info!("all connections drained"),
        Err(_) => {
            warn!(
                grace_ms = grace.as_millis() as u64,
                left = tracker.len(),
                "grace period over; closing connections with requests still in flight"
            );
            hard_stop.cancel();
            tracker.wait().await;
        }
    }
}

/// What every connection task of one server shares.
struct Shared {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    app: Router,
    protocols: Protocols,
    limits: Limits,
    epoch: Instant,
}

impl Shared {
    /// The HTTP/1.1 and h2 settings of `limits`, and what the connections share.
    fn new(app: Router, protocols: Protocols, limits: Limits) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .keep_alive(true)
            .pipeline_flush(true)
            // A connection's read buffer grows up to this while a large body streams in
            // (hyper's default is ~400 KiB, per connection); request heads fit easily.
            .max_buf_size(MAX_READ_BUFFER)
            // The per-connection watchdog enforces the header and idle limits precisely;
            // hyper's own timer (which also runs while a keep-alive connection waits for its
            // next request) is only a backstop behind both.
            .header_read_timeout(
                limits
                    .header_read_timeout
                    .saturating_add(limits.idle_timeout),
            );
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(1024)
            .keep_alive_interval(limits.h2_keepalive_interval)
            .keep_alive_timeout(limits.h2_keepalive_timeout);
        Self {
            h1,
            h2,
            app,
            protocols,
            limits,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Reads the first bytes of a connection until they tell HTTP/1.1 from h2c: the 24-byte h2
/// preface, or any byte that departs from it. `None` when the peer closed first.
/// Also returns when the first byte arrived (ms since the server's epoch).
async fn read_preface(
    stream: &mut TcpStream,
    shared: &Shared,
) -> io::Result<Option<(BytesMut, bool, u64)>> {
    let mut prefix = BytesMut::with_capacity(H2_PREFACE.len());
    let mut first_byte_ms = 0;
    loop {
        let seen = prefix.len().min(H2_PREFACE.len());
        if prefix[..seen] != H2_PREFACE[..seen] {
            return Ok(Some((prefix, false, first_byte_ms)));
        }
        if seen == H2_PREFACE.len() {
            return Ok(Some((prefix, true, first_byte_ms)));
        }
        if stream.read_buf(&mut prefix).await? == 0 {
            return Ok(None);
        }
        if first_byte_ms == 0 {
            first_byte_ms = shared.now_ms();
        }
    }
}

/// Serves one accepted connection: tells HTTP/1.1 from h2c, then drives it under its
/// watchdog until it ends, `shutdown` (graceful) or `hard_stop`.
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
) {
    let Some((prefix, h2, first_byte_ms)) =
        detect_protocol(&mut stream, peer, &shared, &shutdown).await
    else {
        return;
    };
    let h2 = h2 && shared.protocols == Protocols::Http1AndH2c;
    let now = shared.now_ms();
    let state = Arc::new(ConnState {
        in_flight: AtomicU32::new(0),
        last_event_ms: AtomicU64::new(now),
        // The bytes already read start the first request head.
        head_started_ms: AtomicU64::new(if h2 { 0 } else { first_byte_ms + 1 }),
    });
    let io = TokioIo::new(ConnIo {
        prefix: prefix.freeze(),
        inner: stream,
        track_heads: !h2,
        state: state.clone(),
        shared: shared.clone(),
    });
    let service = {
        let state = state.clone();
        let shared = shared.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            respond(request, state.clone(), shared.clone())
        })
    };
    let watch = Watch {
        state: &state,
        shared: &shared,
        h2,
        peer,
    };
    if h2 {
        let conn = shared.h2.serve_connection(io, service);
        watch
            .drive(conn, |c| c.graceful_shutdown(), &shutdown, &hard_stop)
            .await;
    } else {
        let conn = shared.h1.serve_connection(io, service);
        watch
            .drive(conn, |c| c.graceful_shutdown(), &shutdown, &hard_stop)
            .await;
    }
}

/// [`read_preface`] within `FIRST_BYTES_TIMEOUT_MS`: the bytes read, whether they are the
/// h2 preface, and when the first arrived. `None` when the peer closed, failed or stayed
/// silent first (logged at `debug`), or `shutdown` fired.
async fn detect_protocol(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<(BytesMut, bool, u64)> {
    let limits = shared.limits;
    let detected = tokio::select! {
        () = shutdown.cancelled() => return None,
        read = tokio::time::timeout(
            limits.first_bytes_timeout,
            read_preface(stream, shared),
        ) => read,
    };
    match detected {
        Ok(Ok(Some(found))) => Some(found),
        Ok(Ok(None)) => None,
        Ok(Err(error)) => {
            debug!(%peer, %error, "connection failed before its first request");
            None
        }
        Err(_) => {
            debug!(
                %peer,
                limit_ms = limits.first_bytes_timeout.as_millis() as u64,
                "closing a connection that sent no request in time"
            );
            None
        }
    }
}

/// Hands one request to the app: counted in flight from now until its answer is sent,
/// with the [`Limits`] in its extensions and its body under `BODY_READ_TIMEOUT_MS`.
fn respond(
    request: Request<Incoming>,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
) -> impl Future<Output = Result<http::Response<Guarded<axum::body::Body>>, Infallible>> {
    let guard = InFlight::start(state, shared.clone());
    let limits = shared.limits;
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(limits);
    let request = Request::from_parts(parts, TimedBody::new(body, limits.body_read_timeout));
    let response = shared.app.clone().oneshot(request);
    async move {
        let response = match response.await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        Ok::<_, Infallible>(response.map(|body| Guarded {
            inner: body,
            _guard: guard,
        }))
    }
}

/// What the watchdog of one connection knows about it.
struct ConnState {
    /// Requests whose answer has not been sent completely.
    in_flight: AtomicU32,
    /// When the last request finished, or the protocol was detected (ms since the
    /// server's epoch).
    last_event_ms: AtomicU64,
    /// HTTP/1.1: when the first byte after the last request event arrived, plus one (0:
    /// none yet).
    head_started_ms: AtomicU64,
}

/// Counts a request from its head to the last byte of its answer.
struct InFlight {
    state: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl InFlight {
    fn start(state: Arc<ConnState>, shared: Arc<Shared>) -> Self {
        // No clock read here: while a request is in flight no limit of the connection
        // runs, and its end sets the time.
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.head_started_ms.store(0, Ordering::Relaxed);
        Self { state, shared }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.head_started_ms.store(0, Ordering::Relaxed);
        self.state
            .last_event_ms
            .store(self.shared.now_ms(), Ordering::Relaxed);
        self.state.in_flight.fetch_sub(1, Ordering::Release);
    }
}

struct Watch<'a> {
    state: &'a ConnState,
    shared: &'a Shared,
    h2: bool,
    peer: SocketAddr,
}

impl Watch<'_> {
    /// When the connection is due to close if nothing happens, and why; `None` while a
    /// request is in flight.
    fn deadline(&self) -> Option<(u64, &'static str)> {
        if self.state.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limits = &self.shared.limits;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let idle = self
            .state
            .last_event_ms
            .load(Ordering::Relaxed)
            .saturating_add(ms(limits.idle_timeout));
        match self.state.head_started_ms.load(Ordering::Relaxed) {
            0 => Some((idle, "idle")),
            started => {
                let head = (started - 1).saturating_add(ms(limits.header_read_timeout));
                Some(if head < idle {
                    (head, "request head incomplete")
                } else {
                    (idle, "idle")
                })
            }
        }
    }

    /// Runs `conn` until it ends; closes it gracefully on shutdown or when the limits say
    /// so, and drops it on `hard_stop` or when a graceful close takes too long.
    async fn drive<C>(
        &self,
        conn: C,
        graceful: fn(Pin<&mut C>),
        shutdown: &CancellationToken,
        hard_stop: &CancellationToken,
    ) where
        C: Future<Output = hyper::Result<()>>,
    {
        let limits = &self.shared.limits;
        // While a request is in flight, look again this often: its end starts the idle
        // and header clocks, and the next check must not come later than they run out.
        let recheck = limits.idle_timeout.min(limits.header_read_timeout);
        let mut conn = std::pin::pin!(conn);
        let mut closing_since: Option<tokio::time::Instant> = None;
        let mut draining = false;
        loop {
            let wake = match (closing_since, self.deadline()) {
                (Some(since), _) => since + CLOSE_GRACE,
                (None, Some((due, _))) => {
                    let now = self.shared.now_ms();
                    tokio::time::Instant::now() + Duration::from_millis(due.saturating_sub(now))
                }
                (None, None) => tokio::time::Instant::now() + recheck,
            };
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(error) = result {
                        debug!(peer = %self.peer, %error, "connection ended with an error");
                    }
                    return;
                }
                () = shutdown.cancelled(), if !draining => {
                    draining = true;
                    graceful(conn.as_mut());
                }
                () = hard_stop.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {
                    if closing_since.is_some() {
                        if self.state.in_flight.load(Ordering::Acquire) > 0 {
                            // A request slipped in as the close began: let it finish.
                            closing_since = Some(tokio::time::Instant::now());
                            continue;
                        }
                        debug!(peer = %self.peer, "connection did not close in time; dropped");
                        return;
                    }
                    if let Some((due, why)) = self.deadline()
                        && due <= self.shared.now_ms()
                    {
                        debug!(peer = %self.peer, h2 = self.h2, why, "closing connection");
                        graceful(conn.as_mut());
                        closing_since = Some(tokio::time::Instant::now());
                    }
                }
            }
        }
    }
}

/// The accepted socket with the bytes already read to detect the protocol put back in
/// front, noting when a request head starts arriving.
struct ConnIo {
    prefix: Bytes,
    inner: TcpStream,
    track_heads: bool,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.track_heads
            && buf.filled().len() > before
            && this.state.in_flight.load(Ordering::Relaxed) == 0
            && this.state.head_started_ms.load(Ordering::Relaxed) == 0
        {
            this.state
                .head_started_ms
                .store(this.shared.now_ms() + 1, Ordering::Relaxed);
        }
        result
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until it is sent.
struct Guarded<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: HttpBody + Unpin> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a request body yields when it did not arrive within `BODY_READ_TIMEOUT_MS`;
/// [`crate::api::Body`] answers it with 408.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body did not arrive within {0:?} (BODY_READ_TIMEOUT_MS)")]
pub struct BodyReadTimeout(pub Duration);

/// A request body that fails with [`BodyReadTimeout`] once its deadline passes. The timer
/// is armed only if the body is not there at once (most small bodies come with the head).
struct TimedBody {
    inner: Incoming,
    limit: Duration,
    started: tokio::time::Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            started: tokio::time::Instant::now(),
            timer: None,
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => return Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {}
        }
        let deadline = this.started + this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(BodyReadTimeout(this.limit).into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        ENV_HTTP2_KEEPALIVE_INTERVAL_MS, ENV_IDLE_TIMEOUT_MS, ENV_MAX_CONNECTIONS,
    };
    use std::collections::HashMap;

    #[test]
    fn limits_default_and_parse() {
        let env: HashMap<&str, &str> = HashMap::new();
        assert_eq!(
            Limits::from_env(&Env::new(&env)).unwrap(),
            Limits::default()
        );
        let env: HashMap<&str, &str> = [
            (ENV_HTTP2_KEEPALIVE_INTERVAL_MS, "0"),
            (ENV_IDLE_TIMEOUT_MS, "1500"),
            (ENV_MAX_CONNECTIONS, "10"),
        ]
        .into();
        let limits = Limits::from_env(&Env::new(&env)).unwrap();
        assert_eq!(limits.h2_keepalive_interval, None);
        assert_eq!(limits.idle_timeout, Duration::from_millis(1500));
        assert_eq!(limits.max_connections, 10);
    }
}
