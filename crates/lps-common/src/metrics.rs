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

fn version_label(version: Version) -> &'static str {
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
/// `axum::middleware::from_fn_with_state(metrics, track)`.
pub async fn track(State(metrics): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let version = version_label(req.version());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    metrics.in_flight.inc();
    // Decrements even when the client goes away and the handler is dropped.
    let _guard = InFlight(metrics.in_flight.clone());
    let response = next.run(req).await;
    metrics.latency.observe(start.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: response.status().as_u16(),
            version,
        })
        .inc();
    response
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
