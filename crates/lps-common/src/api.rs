//! JSON errors and body parsing shared by the HTTP services.
//!
//! Every error a service returns is a JSON object
//! `{"status":"error","error":"<code>","message":"<what is wrong>"}` with a 4xx status for
//! bad input and 502/503/504 for a failure downstream.

use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// An error answered to the client as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code, e.g. `malformed_json`.
    pub code: &'static str,
    /// What is wrong, in words.
    pub message: String,
    /// Seconds after which a retry may succeed (sent as `Retry-After`).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    status: &'static str,
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 422 Unprocessable Content: well-formed JSON with missing or mistyped fields.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }

    /// Adds a `Retry-After` header.
    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorBody {
            status: "error",
            error: self.code,
            message: &self.message,
        })
        .unwrap_or_default();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Parses a JSON body, with errors that say what is wrong: empty body and malformed JSON
/// are 400, missing or mistyped fields 422.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "empty_body",
            "the request body is empty; expected a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        use serde_json::error::Category;
        match error.classify() {
            Category::Data => ApiError::invalid("invalid_field", error.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::bad_request("malformed_json", format!("malformed JSON: {error}"))
            }
        }
    })
}

/// The raw body, bounded by the router's `DefaultBodyLimit`, with JSON errors.
#[derive(Debug)]
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "body_too_large"
                } else {
                    "unreadable_body"
                };
                ApiError::new(status, code, rejection.body_text())
            })
    }
}

/// How many times a relay holds a buffered body at once (see [`BodyBudget`]).
const COPIES: u64 = 3;

/// Bodies up to this many bytes are read without reserving from a [`BodyBudget`].
pub const SMALL_BODY_BYTES: u64 = 64 << 10;

/// Bounds the memory that large request bodies take at once, whatever the number of
/// connections: a request whose body is larger than [`SMALL_BODY_BYTES`] (or of unknown
/// length) reserves its size from a process-wide budget before its body is read, and
/// waits while the budget is spent. A relay that buffers and re-encodes a body holds it
/// about three times (as read, as parsed, as re-encoded), so a body reserves three times
/// its size; without this a relay's memory grows with body size × connections.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: std::sync::Arc<tokio::sync::Semaphore>,
    total: u32,
    max_body: u32,
}

impl BodyBudget {
    /// A budget of `total` bytes for bodies of at most `max_body` bytes.
    pub fn new(total: usize, max_body: usize) -> Self {
        let total = u32::try_from(total.max(1)).unwrap_or(u32::MAX >> 3);
        Self {
            bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
            max_body: u32::try_from(max_body).unwrap_or(u32::MAX),
        }
    }

    /// The budget a relay with body limit `max_body` gets: twice that, at least 8 MiB.
    pub fn for_limit(max_body: usize) -> Self {
        Self::new(max_body.saturating_mul(2).max(8 << 20), max_body)
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Middleware (`axum::middleware::from_fn_with_state`): reserves, runs the handler,
    /// releases once the answer is ready (the handler has dropped the body by then).
    pub async fn limit(
        axum::extract::State(budget): axum::extract::State<Self>,
        request: Request,
        next: axum::middleware::Next,
    ) -> Response {
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let need = match length {
            Some(n) if n <= SMALL_BODY_BYTES => return next.run(request).await,
            // Too large: the body limit rejects it without reading it.
            Some(n) if n > u64::from(budget.max_body) => return next.run(request).await,
            Some(n) => n,
            None => u64::from(budget.max_body),
        };
        let need = need.saturating_mul(COPIES).min(u64::from(budget.total));
        let need = u32::try_from(need).unwrap_or(budget.total);
        let Ok(_permit) = budget.bytes.acquire_many(need).await else {
            return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "closed")
                .into_response();
        };
        next.run(request).await
    }
}

/// 200 with upstream's success body `{"status":"success",...}`.
pub fn success() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        crate::wire::SUCCESS_BODY,
    )
        .into_response()
}

/// Adds the `Request-Id` header to `response`.
pub fn with_request_id(
    mut response: Response,
    request_id: &crate::request_id::RequestId,
) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        response
            .headers_mut()
            .insert(crate::request_id::REQUEST_ID, value);
    }
    response
}

/// Reads a legacy message `{"id","body"}` and its request id: the `Request-Id` header,
/// else a `request_id` in the body, else a new one. The returned message carries the id.
pub fn legacy_message(
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<(crate::wire::LegacyMessage, crate::request_id::RequestId), ApiError> {
    use crate::request_id::{REQUEST_ID, RequestId};
    let mut message: crate::wire::LegacyMessage = parse_json(body)?;
    let request_id = match (headers.contains_key(&REQUEST_ID), &message.request_id) {
        (false, Some(id)) => RequestId::parse(id)?,
        _ => RequestId::from_headers(headers)?,
    };
    message.request_id = Some(request_id.to_string());
    Ok((message, request_id))
}

/// `GET /readyz`: 200 while `ready` holds, else 503; both JSON.
pub fn readyz(ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> axum::Router {
    axum::Router::new().route(
        "/readyz",
        axum::routing::get(move || {
            let ready = ready.load(std::sync::atomic::Ordering::Acquire);
            async move {
                let (status, body) = if ready {
                    (StatusCode::OK, r#"{"status":"ready"}"#)
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#)
                };
                (
                    status,
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    body,
                )
            }
        }),
    )
}

/// Fallback for unknown paths: 404 with a JSON error.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

/// Fallback for a known path with the wrong method: 405 with a JSON error.
pub async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_bodies_wait_for_the_budget_small_ones_do_not() {
        use std::sync::Arc;
        use std::time::Duration;
        use tower::ServiceExt;
        // Large bodies stay in the handler until the gate lets them go.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let budget = BodyBudget::new(3 << 20, 1 << 20);
        let app = {
            let gate = gate.clone();
            axum::Router::new()
                .route(
                    "/",
                    axum::routing::post(move |Body(body): Body| {
                        let gate = gate.clone();
                        async move {
                            if body.len() as u64 > SMALL_BODY_BYTES {
                                gate.acquire().await.unwrap().forget();
                            }
                            body.len().to_string()
                        }
                    }),
                )
                .route_layer(axum::middleware::from_fn_with_state(
                    budget.clone(),
                    BodyBudget::limit,
                ))
        };
        let post = |len: usize| {
            let app = app.clone();
            tokio::spawn(async move {
                let request = http::Request::post("/")
                    .header(header::CONTENT_LENGTH, len)
                    .body(axum::body::Body::from(vec![b'x'; len]))
                    .unwrap();
                app.oneshot(request).await.unwrap().status()
            })
        };
        let first = post(700 << 10);
        while budget.available() == 3 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(budget.available(), (3 << 20) - 3 * (700 << 10));
        // A second large body does not fit while the first is in the handler: it waits.
        let second = post(700 << 10);
        // A small one is not held up.
        assert_eq!(post(1 << 10).await.unwrap(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !second.is_finished(),
            "the second large body waits for the budget"
        );
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), StatusCode::OK);
        gate.add_permits(1);
        assert_eq!(second.await.unwrap(), StatusCode::OK);
        assert_eq!(budget.available(), 3 << 20, "everything released");
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Msg {
        id: String,
    }

    #[test]
    fn json_errors_are_classified() {
        assert_eq!(parse_json::<Msg>(b"  ").unwrap_err().code, "empty_body");
        assert_eq!(
            parse_json::<Msg>(b"{\"id\":").unwrap_err().code,
            "malformed_json"
        );
        let err = parse_json::<Msg>(b"{}").unwrap_err();
        assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            err.message.contains("missing field `id`"),
            "{}",
            err.message
        );
        let err = parse_json::<Msg>(b"{\"id\": 5}").unwrap_err();
        assert!(err.message.contains("invalid type"), "{}", err.message);
    }
}
