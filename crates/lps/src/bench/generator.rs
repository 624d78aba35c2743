//! The benchmark's load generator: raw hyper connections (HTTP/1.1 or h2c prior
//! knowledge), one request in flight per connection, no per-request allocation beyond the
//! request itself.
//!
//! - **Closed loop**: every connection sends its next request as soon as the answer to
//!   the previous one is read, like wrk; the throughput is what the system sustains.
//! - **Open loop**: requests start on a fixed schedule (`rate` per second) on whichever
//!   connection is idle; the latency of a request counts from its *scheduled* start, so
//!   a stall shows in the figures instead of slowing the schedule (no coordinated
//!   omission).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// Wire protocol of the generator's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge.
    H2c,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
        })
    }
}

/// Where requests go; connections are spread over the targets round-robin.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address.
    pub addr: SocketAddr,
    /// Request path, e.g. `/api/v1/simple`.
    pub path: String,
}

/// Closed or open loop; in reports `closed` or `open N/s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// As fast as answers come back.
    Closed,
    /// This many requests per second.
    Open(f64),
}

impl Mode {
    /// Whether requests follow a schedule.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Open(_))
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            Self::Open(rate) => write!(f, "open {rate:.0}/s"),
        }
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Targets.
    pub targets: Vec<Target>,
    /// Protocol.
    pub protocol: Protocol,
    /// Connections (closed loop: times `streams`, the requests in flight).
    pub connections: usize,
    /// h2c: requests in flight on each connection, each a stream of its own (HTTP/1.1
    /// carries one at a time whatever this says).
    pub streams: usize,
    /// Request body (JSON).
    pub body: Bytes,
    /// Closed or open loop.
    pub mode: Mode,
    /// Not measured, run first.
    pub warmup: Duration,
    /// Measured.
    pub duration: Duration,
    /// Keep the `Request-Id` of every acknowledged request (to check arrival).
    pub keep_ids: bool,
}

/// What a load run measured (after the warm-up).
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests answered 2xx in the measured window.
    pub ok: u64,
    /// Requests that failed (any status but 2xx, or a transport error), whole run.
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Latencies of the measured 2xx answers, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// `Request-Id`s acknowledged (whole run, warm-up included), when asked for.
    pub ids: Vec<u64>,
}

impl LoadResult {
    /// Acknowledged requests per second in the measured window.
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        let ok = self.ok as f64;
        ok / self.elapsed.as_secs_f64()
    }
}

enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

struct Connection {
    target: Target,
    sender: Sender,
    /// The `Host` header, built once per connection.
    host: http::HeaderValue,
    uri: http::Uri,
}

impl Connection {
    async fn open(target: &Target, protocol: Protocol) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        let authority = target.addr.to_string();
        let (sender, uri) = match protocol {
            Protocol::Http1 => {
                let (sender, connection) = http1::handshake(io).await?;
                tokio::spawn(connection);
                (Sender::Http1(sender), target.path.parse()?)
            }
            Protocol::H2c => {
                let (sender, connection) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                (
                    Sender::H2(sender),
                    format!("http://{authority}{}", target.path).parse()?,
                )
            }
        };
        Ok(Self {
            target: target.clone(),
            sender,
            host: http::HeaderValue::try_from(authority)?,
            uri,
        })
    }

    /// Another handle on the same h2c connection (a stream of its own per request);
    /// `None` for HTTP/1.1, which carries one request at a time.
    fn share(&self) -> Option<Self> {
        match &self.sender {
            Sender::Http1(_) => None,
            Sender::H2(sender) => Some(Self {
                target: self.target.clone(),
                sender: Sender::H2(sender.clone()),
                host: self.host.clone(),
                uri: self.uri.clone(),
            }),
        }
    }

    /// Sends one request and reads the whole answer; its status.
    async fn send(&mut self, body: &Bytes, id: u64) -> anyhow::Result<StatusCode> {
        let request = Request::post(self.uri.clone())
            .header(header::HOST, self.host.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header("request-id", http::HeaderValue::from(id))
            .body(Full::new(body.clone()))?;
        let response = match &mut self.sender {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
            Sender::H2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await?
            }
        };
        let status = response.status();
        response.into_body().collect().await?;
        Ok(status)
    }
}

/// Shared counters of one run.
struct Shared {
    spec: LoadSpec,
    next_id: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    measure_from: Instant,
    end: Instant,
}

impl Shared {
    fn fail(&self, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(error);
    }
}

/// Per-connection (or per-worker) results, merged at the end.
#[derive(Default)]
struct Partial {
    ok: u64,
    latencies_us: Vec<u32>,
    ids: Vec<u64>,
}

impl Partial {
    fn record(&mut self, shared: &Shared, started: Instant, id: u64) {
        let now = Instant::now();
        if shared.spec.keep_ids {
            self.ids.push(id);
        }
        if started >= shared.measure_from && now <= shared.end {
            self.ok += 1;
            let us = now.duration_since(started).as_micros();
            self.latencies_us
                .push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }
}

/// First id of a run: unique across runs (milliseconds since the epoch × 10⁶).
fn first_id() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
    ms.saturating_mul(1_000_000)
}

/// Runs `spec` and returns what it measured.
pub async fn run(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!spec.targets.is_empty(), "no targets");
    anyhow::ensure!(spec.connections > 0, "no connections");
    let mut connections = Vec::with_capacity(spec.connections);
    for i in 0..spec.connections {
        let target = &spec.targets[i % spec.targets.len()];
        let connection = Connection::open(target, spec.protocol).await?;
        for _ in 1..spec.streams {
            connections.extend(connection.share());
        }
        connections.push(connection);
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        next_id: AtomicU64::new(first_id()),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
        measure_from: start + spec.warmup,
        end: start + spec.warmup + spec.duration,
        spec,
    });
    let partials = match shared.spec.mode {
        Mode::Closed => closed(&shared, connections).await,
        Mode::Open(rate) => open(&shared, connections, rate).await,
    };
    let mut result = LoadResult {
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone(),
        elapsed: shared.spec.duration,
        ..LoadResult::default()
    };
    for partial in partials {
        result.ok += partial.ok;
        result.latencies_us.extend(partial.latencies_us);
        result.ids.extend(partial.ids);
    }
    result.latencies_us.sort_unstable();
    Ok(result)
}

async fn closed(shared: &Arc<Shared>, connections: Vec<Connection>) -> Vec<Partial> {
    let mut tasks = tokio::task::JoinSet::new();
    for mut connection in connections {
        let shared = shared.clone();
        tasks.spawn(async move {
            let mut partial = Partial::default();
            let body = shared.spec.body.clone();
            while Instant::now() < shared.end {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                match connection.send(&body, id).await {
                    Ok(status) if status.is_success() => partial.record(&shared, started, id),
                    Ok(status) => shared.fail(format!("answered {status}")),
                    Err(e) => {
                        shared.fail(format!("{e:#}"));
                        // A broken connection is replaced; keep the pace of failures sane.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let target = connection.target.clone();
                        if let Ok(fresh) = Connection::open(&target, shared.spec.protocol).await {
                            connection = fresh;
                        }
                    }
                }
            }
            partial
        });
    }
    tasks.join_all().await
}

async fn open(shared: &Arc<Shared>, connections: Vec<Connection>, rate: f64) -> Vec<Partial> {
    let (idle_tx, mut idle_rx) = tokio::sync::mpsc::channel(connections.len());
    for connection in connections {
        let _ = idle_tx.try_send(connection);
    }
    let results = Arc::new(std::sync::Mutex::new(Partial::default()));
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut tasks = tokio::task::JoinSet::new();
    let mut scheduled = Instant::now();
    while scheduled < shared.end {
        tokio::time::sleep_until(scheduled.into()).await;
        let Some(mut connection) = idle_rx.recv().await else {
            break;
        };
        let shared = shared.clone();
        let idle_tx = idle_tx.clone();
        let results = results.clone();
        let started = scheduled;
        tasks.spawn(async move {
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            match connection.send(&shared.spec.body, id).await {
                Ok(status) if status.is_success() => results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .record(&shared, started, id),
                Ok(status) => shared.fail(format!("answered {status}")),
                Err(e) => {
                    shared.fail(format!("{e:#}"));
                    let target = connection.target.clone();
                    match Connection::open(&target, shared.spec.protocol).await {
                        Ok(fresh) => connection = fresh,
                        Err(_) => return,
                    }
                }
            }
            let _ = idle_tx.send(connection).await;
        });
        scheduled += interval;
        while tasks.try_join_next().is_some() {}
    }
    tasks.join_all().await;
    let mut results = results
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    vec![std::mem::take(&mut *results)]
}
