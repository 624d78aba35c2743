//! The outbound HTTP client of a relay: one pooled client built at start-up, a list of
//! targets used round-robin, and a DNS cache.
//!
//! `TARGET_URL` may name several URLs separated by commas. Each request goes to the next
//! target in turn; a target that refuses a connection or times out is skipped for a
//! cool-down (`TARGET_COOLDOWN_MS`) and probed again afterwards. A request whose
//! connection could not be *established* is retried on the next target; once a request may
//! have reached a target it is never retried here, since the target may have acted on it.
//!
//! Each target has its own connection pool. A request that times out drops that pool (the
//! idle connections in it are closed; requests in flight on them finish) and the target's
//! cached address: a peer that went away without a reset, or a container that came back
//! at a new address, is not tried again through connections or an address that only
//! hang. Concurrent timeouts on the same pool drop it once.

use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};
use url::Url;

use crate::api::{self, ApiError};
use crate::config::{
    ConfigError, ENV_CONNECT_TIMEOUT_MS, ENV_REQUEST_TIMEOUT_SECS, ENV_SKIP_DNS_CACHE,
    ENV_TARGET_COOLDOWN_MS, ENV_TARGET_URL, ENV_USE_HTTP_2, Env, MAX_DURATION,
};
use crate::dns::{CacheResolver, DnsCache, HickoryLookup, NameLookup};
use crate::request_id::{REQUEST_ID, RequestId};
use crate::wire::LegacyMessage;
use axum::response::{IntoResponse, Response};

/// Settings of the outbound client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `TARGET_URL`: where requests are forwarded; several URLs separated by commas are used
    /// round-robin.
    pub targets: Vec<Url>,
    /// `USE_HTTP_2`: `1|true|yes` sends h2c with prior knowledge, otherwise HTTP/1.1.
    pub http2: bool,
    /// `SKIP_DNS_CACHE`: `1|true|yes` resolves the target on every new connection.
    pub skip_dns_cache: bool,
    /// `CONNECT_TIMEOUT_MS`: how long to wait for a TCP connection (default 2000).
    pub connect_timeout: Duration,
    /// `REQUEST_TIMEOUT_SECS`: how long a forwarded request may take in total (default 60,
    /// as upstream).
    pub request_timeout: Duration,
    /// `TARGET_COOLDOWN_MS`: how long a target that refused or timed out is skipped
    /// (default 2000).
    pub cooldown: Duration,
}

impl UpstreamConfig {
    /// Reads the client settings; `default_target` applies when `TARGET_URL` is unset.
    pub fn from_env(env: &Env<'_>, default_target: &str) -> Result<Self, ConfigError> {
        let raw = env.string(ENV_TARGET_URL, default_target);
        Ok(Self {
            targets: parse_targets(&raw)?,
            http2: env.flag(ENV_USE_HTTP_2, false)?,
            skip_dns_cache: env.flag(ENV_SKIP_DNS_CACHE, false)?,
            connect_timeout: env.millis_in(
                ENV_CONNECT_TIMEOUT_MS,
                Duration::from_secs(2),
                Duration::from_millis(1),
                MAX_DURATION,
            )?,
            request_timeout: positive_seconds(
                env,
                ENV_REQUEST_TIMEOUT_SECS,
                Duration::from_secs(60),
            )?,
            cooldown: env.millis(ENV_TARGET_COOLDOWN_MS, Duration::from_secs(2))?,
        })
    }

    /// A config for `targets` with the defaults, for tests and tools.
    pub fn for_targets(targets: Vec<Url>) -> Self {
        Self {
            targets,
            http2: false,
            skip_dns_cache: false,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(60),
            cooldown: Duration::from_secs(2),
        }
    }
}

/// A duration in seconds above zero (zero would fail every request at once).
fn positive_seconds(env: &Env<'_>, var: &str, default: Duration) -> Result<Duration, ConfigError> {
    let value = env.seconds(var, default)?;
    if value.is_zero() {
        return Err(ConfigError::new(
            var,
            "0",
            format!(
                "a number of seconds above 0, up to {}",
                MAX_DURATION.as_secs()
            ),
        ));
    }
    Ok(value)
}

/// Parses a comma-separated list of `http://` URLs.
pub fn parse_targets(raw: &str) -> Result<Vec<Url>, ConfigError> {
    let expected = "one or more http://HOST:PORT/PATH URLs separated by commas";
    let targets = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            Url::parse(s)
                .ok()
                .filter(|u| u.scheme() == "http" && u.host_str().is_some())
                .ok_or_else(|| ConfigError::new(ENV_TARGET_URL, raw, expected))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if targets.is_empty() {
        return Err(ConfigError::new(ENV_TARGET_URL, raw, expected));
    }
    Ok(targets)
}

/// Any error, boxed.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a forwarded request failed; decides the status answered and whether a retry is safe.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No target accepted a connection: nothing was sent, a retry is safe.
    #[error("no target accepted a connection (last tried {target}): {}", Chain(.source))]
    Unavailable {
        /// The last target tried.
        target: Url,
        /// The connect error.
        source: hyper_util::client::legacy::Error,
    },
    /// The target did not answer in time; it may have acted on the request.
    #[error("{target} did not answer within {timeout:?}")]
    Timeout {
        /// The target.
        target: Url,
        /// The request timeout.
        timeout: Duration,
    },
    /// The target answered with a non-success status.
    #[error("{target} answered {status}")]
    Status {
        /// The target.
        target: Url,
        /// Its status.
        status: StatusCode,
    },
    /// The exchange broke after the request was sent (reset, bad response).
    #[error("request to {target} failed: {}", Chain(&**.source))]
    Failed {
        /// The target.
        target: Url,
        /// What broke: the client's or the response body's error.
        source: BoxError,
    },
}

/// Shows an error with its causes: hyper's errors say little by themselves ("client error
/// (Connect)"); what happened ("Connection refused") is further down the chain.
struct Chain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl UpstreamError {
    /// The error answered to our client: 503 (retry safe) when no target was reachable or
    /// the target itself was unavailable, 504 on timeout, 502 otherwise.
    pub fn to_api_error(&self) -> ApiError {
        let (status, code) = match self {
            Self::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            Self::Status { status, .. } if *status == StatusCode::SERVICE_UNAVAILABLE => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream_unavailable")
            }
            Self::Status { status, .. } if *status == StatusCode::GATEWAY_TIMEOUT => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            }
            Self::Status { .. } | Self::Failed { .. } => {
                (StatusCode::BAD_GATEWAY, "upstream_failed")
            }
        };
        let error = ApiError::new(status, code, self.to_string());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            error.with_retry_after(1)
        } else {
            error
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Status { .. } => "status",
            Self::Failed { .. } => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// Counters of the outbound side.
#[derive(Clone, Default)]
struct UpstreamMetrics {
    errors: Family<ErrorLabels, Counter>,
    connect_retries: Counter,
    pool_renewals: Counter,
}

struct Target {
    url: Url,
    /// `url` as hyper takes it, converted once at start-up.
    uri: Uri,
    /// Skip until this many ms after `Upstream::epoch` (0 = available).
    down_until_ms: AtomicU64,
    /// The target's connection pool, renewed after a timeout.
    pool: RwLock<Pool>,
}

/// One generation of a target's connection pool.
#[derive(Clone)]
struct Pool {
    generation: u64,
    client: HttpClient,
}

type HttpClient = Client<HttpConnector<CacheResolver>, Payload>;

/// A request body sent as one or two buffers, as they are: a relay forwards the bytes it
/// received and the tail it spliced on without copying them into one (see
/// [`crate::api::legacy_payload`]). Cloning it clones two `Bytes` handles.
#[derive(Debug, Clone, Default)]
pub struct Payload {
    pub(crate) head: Bytes,
    tail: Bytes,
}

impl Payload {
    /// `head` then `tail`.
    pub fn two(head: Bytes, tail: Bytes) -> Self {
        Self { head, tail }
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer (tests, logs).
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.tail[..]].concat()
    }
}

impl From<Bytes> for Payload {
    fn from(head: Bytes) -> Self {
        Self {
            head,
            tail: Bytes::new(),
        }
    }
}

impl hyper::body::Body for Payload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let next = if self.head.is_empty() {
            std::mem::take(&mut self.tail)
        } else {
            std::mem::take(&mut self.head)
        };
        std::task::Poll::Ready((!next.is_empty()).then(|| Ok(hyper::body::Frame::data(next))))
    }

    fn is_end_stream(&self) -> bool {
        self.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len() as u64)
    }
}

/// How often a request refused by an HTTP/2 target before it was processed (GOAWAY,
/// REFUSED_STREAM) is sent again, as reqwest did.
const PROTOCOL_NACK_RETRIES: u32 = 2;

/// How one try at a target ended.
enum Exchange {
    /// The target answered with this status (and the body was read, unless it failed).
    Answered(StatusCode),
    /// No answer within the request timeout.
    TimedOut,
    /// The client failed: no connection, or the request or response broke on the way.
    SendFailed(hyper_util::client::legacy::Error),
    /// A 2xx answer whose body broke off.
    BodyFailed(hyper::Error),
}

/// Whether an HTTP/2 target refused the request before processing it: a GOAWAY without
/// error (graceful shutdown) or REFUSED_STREAM (RFC 9113, 8.7).
fn is_protocol_nack(error: &hyper_util::client::legacy::Error) -> bool {
    let mut cause = error.source();
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)));
        }
        cause = error.source();
    }
    false
}

/// The pooled outbound client and its target list. Build once per service.
pub struct Upstream {
    builder: hyper_util::client::legacy::Builder,
    connector: HttpConnector<CacheResolver>,
    targets: Vec<Target>,
    next: AtomicUsize,
    dns: Arc<DnsCache>,
    cooldown: Duration,
    request_timeout: Duration,
    epoch: Instant,
    metrics: UpstreamMetrics,
}

impl Upstream {
    /// A client resolving names with hickory-resolver and the system configuration.
    pub fn new(config: &UpstreamConfig, registry: &mut Registry) -> anyhow::Result<Self> {
        let lookup = HickoryLookup::from_system()
            .map_err(|e| anyhow::anyhow!("cannot set up the DNS resolver: {e}"))?;
        Self::with_lookup(config, Arc::new(lookup), registry)
    }

    /// A client resolving names through `lookup` (tests move names between addresses).
    pub fn with_lookup(
        config: &UpstreamConfig,
        lookup: Arc<dyn NameLookup>,
        registry: &mut Registry,
    ) -> anyhow::Result<Self> {
        let dns = DnsCache::new(lookup, !config.skip_dns_cache);
        let mut connector = HttpConnector::new_with_resolver(CacheResolver::new(
            dns.clone(),
            config.connect_timeout,
        ));
        connector.enforce_http(true);
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        // TCP keep-alive as reqwest had it: finds half-open pooled connections.
        connector.set_keepalive(Some(Duration::from_secs(15)));
        connector.set_keepalive_interval(Some(Duration::from_secs(15)));
        connector.set_keepalive_retries(Some(3));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            // h2c with prior knowledge when asked, HTTP/1.1 otherwise.
            .http2_only(config.http2);
        let targets = config
            .targets
            .iter()
            .map(|url| {
                let uri = url
                    .as_str()
                    .parse::<Uri>()
                    .map_err(|e| anyhow::anyhow!("cannot use {url} as a target: {e}"))?;
                Ok(Target {
                    url: url.clone(),
                    uri,
                    down_until_ms: AtomicU64::new(0),
                    pool: RwLock::new(Pool {
                        generation: 0,
                        client: builder.build(connector.clone()),
                    }),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!targets.is_empty(), "no target to forward to");
        let metrics = UpstreamMetrics::default();
        registry.register(
            "upstream_errors",
            "Forwarded requests that failed, by kind (connect, timeout, status, failed)",
            metrics.errors.clone(),
        );
        registry.register(
            "upstream_connect_retries",
            "Requests retried on another target after a failed connect",
            metrics.connect_retries.clone(),
        );
        registry.register(
            "upstream_pool_renewals",
            "Connection pools of a target dropped after a request to it timed out",
            metrics.pool_renewals.clone(),
        );
        Ok(Self {
            builder,
            connector,
            targets,
            next: AtomicUsize::new(0),
            dns,
            cooldown: config.cooldown,
            request_timeout: config.request_timeout,
            epoch: Instant::now(),
            metrics,
        })
    }

    /// The DNS cache in use.
    pub fn dns(&self) -> &DnsCache {
        &self.dns
    }

    /// Relays `message` as JSON: 200 with upstream's success body when a target answered
    /// 2xx, the mapped [`ApiError`] otherwise. Both carry the `Request-Id` header.
    pub async fn relay(&self, message: &LegacyMessage, request_id: &RequestId) -> Response {
        match serde_json::to_vec(message) {
            Ok(payload) => {
                self.relay_payload(Bytes::from(payload).into(), request_id)
                    .await
            }
            Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                .into_response(),
        }
    }

    /// Relays a JSON `payload` already encoded (see [`crate::api::legacy_payload`]), as
    /// [`Self::relay`] does.
    pub async fn relay_payload(&self, payload: Payload, request_id: &RequestId) -> Response {
        let result = self.post_payload(payload, request_id).await;
        let response = match result {
            Ok(_) => {
                debug!(%request_id, "forwarded");
                api::success()
            }
            Err(error) => {
                warn!(%request_id, %error, "forwarding failed");
                error.to_api_error().into_response()
            }
        };
        api::with_request_id(response, request_id)
    }

    /// POSTs a JSON `body` with `Request-Id` to the next target; succeeds on a 2xx.
    pub async fn post_json(
        &self,
        body: Bytes,
        request_id: &RequestId,
    ) -> Result<StatusCode, UpstreamError> {
        self.post_payload(body.into(), request_id).await
    }

    /// POSTs a JSON `body` in one or two buffers with `Request-Id` to the next target;
    /// succeeds on a 2xx.
    pub async fn post_payload(
        &self,
        body: Payload,
        request_id: &RequestId,
    ) -> Result<StatusCode, UpstreamError> {
        let result = self.post_inner(body, request_id).await;
        if let Err(error) = &result {
            self.metrics
                .errors
                .get_or_create(&ErrorLabels { kind: error.kind() })
                .inc();
        }
        result
    }

    async fn post_inner(
        &self,
        body: Payload,
        request_id: &RequestId,
    ) -> Result<StatusCode, UpstreamError> {
        let order = self.order();
        // A single target gets one more try once its stale cached address is dropped.
        let attempts = if order.len() == 1 { 2 } else { order.len() };
        let id =
            HeaderValue::from_str(request_id.as_str()).unwrap_or(HeaderValue::from_static("0"));
        let mut attempt = 0;
        let mut nacks = 0;
        loop {
            let target = &self.targets[order[attempt % order.len()]];
            let pool = target
                .pool
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match self.exchange(&pool.client, target, body.clone(), &id).await {
                Exchange::Answered(status) if status.is_success() => return Ok(status),
                Exchange::Answered(status) => {
                    return Err(UpstreamError::Status {
                        target: target.url.clone(),
                        status,
                    });
                }
                Exchange::TimedOut => {
                    self.mark_down(target);
                    self.renew_pool(target, pool.generation);
                    return Err(UpstreamError::Timeout {
                        target: target.url.clone(),
                        timeout: self.request_timeout,
                    });
                }
                Exchange::SendFailed(source) if source.is_connect() => {
                    self.mark_down(target);
                    let host = target.url.host_str().unwrap_or_default();
                    let had_entry = self.dns.invalidate(host);
                    debug!(target = %target.url, error = %Chain(&source), "connect failed");
                    attempt += 1;
                    if attempt >= attempts || (order.len() == 1 && !had_entry) {
                        let error = UpstreamError::Unavailable {
                            target: target.url.clone(),
                            source,
                        };
                        warn!(%request_id, %error, "no target reachable");
                        return Err(error);
                    }
                    self.metrics.connect_retries.inc();
                }
                Exchange::SendFailed(source)
                    if nacks < PROTOCOL_NACK_RETRIES && is_protocol_nack(&source) =>
                {
                    // The target refused the stream unprocessed: sending it again is safe.
                    nacks += 1;
                    let error = Chain(&source);
                    debug!(target = %target.url, %error, "stream refused, sending again");
                }
                Exchange::SendFailed(source) => {
                    return Err(UpstreamError::Failed {
                        target: target.url.clone(),
                        source: source.into(),
                    });
                }
                Exchange::BodyFailed(source) => {
                    return Err(UpstreamError::Failed {
                        target: target.url.clone(),
                        source: source.into(),
                    });
                }
            }
        }
    }

    /// One POST to `target` within the request timeout, reading the response body to the
    /// end so the connection goes back to the pool.
    async fn exchange(
        &self,
        client: &HttpClient,
        target: &Target,
        body: Payload,
        id: &HeaderValue,
    ) -> Exchange {
        let mut request = Request::new(body);
        *request.method_mut() = Method::POST;
        *request.uri_mut() = target.uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        headers.insert(REQUEST_ID, id.clone());
        // The status is kept for when the body then times out: a non-2xx answer is reported
        // as such, as before.
        let mut answered = None;
        let exchange = async {
            let response = client.request(request).await?;
            let status = response.status();
            answered = Some(status);
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                if let Err(error) = frame {
                    return Ok((status, Err(error)));
                }
            }
            Ok((status, Ok(())))
        };
        match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(Ok((status, _))) if !status.is_success() => Exchange::Answered(status),
            Ok(Ok((_, Err(error)))) => Exchange::BodyFailed(error),
            Ok(Ok((status, Ok(())))) => Exchange::Answered(status),
            Ok(Err(source)) => Exchange::SendFailed(source),
            Err(_elapsed) => match answered {
                Some(status) if !status.is_success() => Exchange::Answered(status),
                _ => Exchange::TimedOut,
            },
        }
    }

    /// After a timeout on a connection of `generation`: a fresh pool for `target` (once per
    /// generation) and its cached address dropped.
    fn renew_pool(&self, target: &Target, generation: u64) {
        let host = target.url.host_str().unwrap_or_default();
        self.dns.invalidate(host);
        let mut pool = target.pool.write().unwrap_or_else(PoisonError::into_inner);
        if pool.generation == generation {
            *pool = Pool {
                generation: generation + 1,
                client: self.builder.build(self.connector.clone()),
            };
            self.metrics.pool_renewals.inc();
            debug!(target = %target.url, "request timed out: pooled connections dropped");
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_down(&self, target: &Target) {
        if self.targets.len() > 1 {
            let until = self.now_ms() + u64::try_from(self.cooldown.as_millis()).unwrap_or(0);
            target.down_until_ms.store(until.max(1), Ordering::Relaxed);
        }
    }

    /// Target indices for one request: round-robin, targets in cool-down last.
    fn order(&self) -> Vec<usize> {
        let n = self.targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if n == 1 {
            return vec![0];
        }
        let now = self.now_ms();
        let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).collect();
        // Stable: keeps round-robin order within the available and the cooling groups.
        order.sort_by_key(|&i| self.targets[i].down_until_ms.load(Ordering::Relaxed) > now);
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ENV_TARGET_URL;

    #[test]
    fn targets_parse_and_reject() {
        let t = parse_targets("http://a:1/x, http://b:2/y").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].host_str(), Some("b"));
        for bad in ["", "a:1", "https://a/x", "ftp://a/x", ","] {
            let err = parse_targets(bad).unwrap_err();
            assert_eq!(err.var, ENV_TARGET_URL, "{bad}");
        }
    }

    #[test]
    fn upstream_errors_pick_status() {
        let url = Url::parse("http://a/x").unwrap();
        let e = UpstreamError::Status {
            target: url.clone(),
            status: StatusCode::NOT_FOUND,
        };
        assert_eq!(e.to_api_error().status, StatusCode::BAD_GATEWAY);
        let e = UpstreamError::Timeout {
            target: url,
            timeout: Duration::from_secs(1),
        };
        assert_eq!(e.to_api_error().status, StatusCode::GATEWAY_TIMEOUT);
    }
}
