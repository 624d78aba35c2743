//! Prometheus metrics and the operational endpoints every service serves:
//! `GET /healthz` and `GET /metrics`.

use std::sync::Arc;
use std::time::Instant;

use crate::wire::{HEALTHZ_PATH, METRICS_PATH};
use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, Version, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route, or `unmatched`.
    pub route: String,
    /// Response status code.
    pub status: u16,
    /// `HTTP/1.1` or `HTTP/2.0` as received.
    pub version: &'static str,
}

/// Inbound request metrics, recorded by [`track`].
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Histogram,
    in_flight: Gauge,
}

impl HttpMetrics {
    /// Registers the inbound metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            requests: Family::default(),
            // 0.5 ms .. ~65 s
            latency: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 18,
            )),
            in_flight: Gauge::default(),
        };
        registry.register(
            "http_requests",
            "Requests answered, by route, status and HTTP version",
            metrics.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response head",
            metrics.latency.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests being handled",
            metrics.in_flight.clone(),
        );
        metrics
    }

    /// How many requests were answered with `status` over `version` on `route`.
    pub fn count(&self, route: &str, status: u16, version: Version) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status,
                version: version_label(version),
            })
            .get()
    }
}

/// The `version` label of a request: `HTTP/1.0`, `HTTP/1.1`, `HTTP/2.0` (and `HTTP/0.9`,
/// `HTTP/3.0`, `other`, which the servers here never see). The rast-simulator's ledger
/// writes the same text in its `proto` column.
pub fn version_label(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "other",
    }
}

struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Middleware recording every request; add with
/// `axum::middleware::from_fn_with_state(metrics, track)`. [`TrackLayer`] does the same
/// for a whole router at less cost per request.
pub async fn track(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let recorder = Recorder::start(&metrics, &req);
    let response = next.run(req).await;
    recorder.finish(response.status());
    response
}

/// What [`track`] and [`TrackLayer`] record of one request.
struct Recorder {
    metrics: HttpMetrics,
    start: Instant,
    version: &'static str,
    route: Option<MatchedPath>,
    // Decrements even when the client goes away and the handler is dropped.
    _in_flight: InFlight,
}

impl Recorder {
    fn start(metrics: &HttpMetrics, req: &Request) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics: metrics.clone(),
            start: Instant::now(),
            version: version_label(req.version()),
            route: req.extensions().get::<MatchedPath>().cloned(),
            _in_flight: InFlight(metrics.in_flight.clone()),
        }
    }

    fn finish(self, status: StatusCode) {
        self.metrics
            .latency
            .observe(self.start.elapsed().as_secs_f64());
        let route = self
            .route
            .as_ref()
            .map_or("unmatched", MatchedPath::as_str)
            .to_owned();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                route,
                status: status.as_u16(),
                version: self.version,
            })
            .inc();
    }
}

/// Records every request of a router, as [`track`] does, without boxing each request's
/// future: `router.layer(TrackLayer::new(metrics))`.
#[derive(Clone)]
pub struct TrackLayer(HttpMetrics);

impl TrackLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: HttpMetrics) -> Self {
        Self(metrics)
    }
}

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service of [`TrackLayer`].
#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    metrics: HttpMetrics,
}

impl<S> tower::Service<Request> for Track<S>
where
    S: tower::Service<Request, Response = Response>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let recorder = Recorder::start(&self.metrics, &req);
        TrackFuture {
            inner: self.inner.call(req),
            recorder: Some(recorder),
        }
    }
}

/// The future of [`Track`]: the inner service's, recorded when it completes.
pub struct TrackFuture<F> {
    inner: F,
    recorder: Option<Recorder>,
}

impl<F, E> std::future::Future for TrackFuture<F>
where
    F: std::future::Future<Output = Result<Response, E>> + Unpin,
{
    type Output = Result<Response, E>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let result = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll(cx));
        if let (Some(recorder), Ok(response)) = (self.recorder.take(), &result) {
            recorder.finish(response.status());
        }
        std::task::Poll::Ready(result)
    }
}

/// `GET /healthz` and `GET /metrics` over `registry`.
pub fn ops_routes(registry: Arc<Registry>) -> Router {
    Router::new()
        .route(HEALTHZ_PATH, get(healthz))
        .route(METRICS_PATH, get(metrics).with_state(registry))
}

async fn healthz() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"status":"ok"}"#,
    )
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    let mut text = String::with_capacity(4096);
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
