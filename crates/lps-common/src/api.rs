//! JSON errors and body parsing shared by the HTTP services.
//!
//! Every error a service returns is a JSON object
//! `{"status":"error","error":"<code>","message":"<what is wrong>"}` with a 4xx status for
//! bad input and 502/503/504 for a failure downstream.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::wire::READYZ_PATH;
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use hyper::body::Frame;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// The raw body, bounded by the router's `DefaultBodyLimit`, with JSON errors: 413 when it
/// is too large, 408 when it did not arrive within `BODY_READ_TIMEOUT_MS`, 503 with
/// `Retry-After` when a [`BodyBudget`] had no memory for it in time, 400 otherwise.
#[derive(Debug)]
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|rejection| {
                if let Some(error) = body_error(&rejection) {
                    return error;
                }
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

/// The answer to a body that failed because of a server limit (found anywhere in the
/// error's chain of causes), if it did.
fn body_error(error: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(timeout) = error.downcast_ref::<crate::server::BodyReadTimeout>() {
            return Some(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                timeout.to_string(),
            ));
        }
        if let Some(busy) = error.downcast_ref::<BudgetExhausted>() {
            return Some(busy.to_api_error());
        }
        cause = error.source();
    }
    None
}

/// How many times a relay holds a buffered body at once (see [`BodyBudget`]).
const COPIES: u64 = 3;

/// Bodies up to this many bytes are read without reserving from a [`BodyBudget`].
pub const SMALL_BODY_BYTES: u64 = 64 << 10;

/// How long a body waits for a [`BodyBudget`] when the server's [`Limits`] do not say.
///
/// [`Limits`]: crate::server::Limits
pub const DEFAULT_BUDGET_WAIT: Duration = Duration::from_secs(5);

/// The error of a body that found no room in a [`BodyBudget`] within its wait; answered
/// 503 with `Retry-After`.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "too many large request bodies at once: no memory for this one within {0:?} (BODY_BUDGET_WAIT_MS)"
)]
pub struct BudgetExhausted(pub Duration);

impl BudgetExhausted {
    fn to_api_error(self) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", self.to_string()).with_retry_after(1)
    }
}

/// Bounds the memory that large request bodies take at once, whatever the number of
/// connections. A relay that buffers and re-encodes a body holds it about three times (as
/// read, as parsed, as re-encoded), so a body reserves three times its size from a
/// process-wide budget; without this a relay's memory grows with body size × connections.
///
/// - A body with a `Content-Length` above [`SMALL_BODY_BYTES`] reserves its size before it
///   is read.
/// - A body of unknown length (chunked) reserves as its bytes arrive, so a slow upload
///   holds only what it has sent, never the whole budget.
///
/// A body that finds no room within `BODY_BUDGET_WAIT_MS` (the server's
/// [`Limits::body_budget_wait`], else [`DEFAULT_BUDGET_WAIT`]) is answered 503 with
/// `Retry-After`. What a request reserved is released once its answer is ready.
///
/// [`Limits::body_budget_wait`]: crate::server::Limits::body_budget_wait
#[derive(Debug, Clone)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: u32,
    max_body: u32,
}

impl BodyBudget {
    /// A budget of `total` bytes for bodies of at most `max_body` bytes.
    pub fn new(total: usize, max_body: usize) -> Self {
        let total = u32::try_from(total.max(1)).unwrap_or(u32::MAX >> 3);
        Self {
            bytes: Arc::new(Semaphore::new(total as usize)),
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
        let wait = request
            .extensions()
            .get::<crate::server::Limits>()
            .map_or(DEFAULT_BUDGET_WAIT, |l| l.body_budget_wait);
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match length {
            Some(n) if n <= SMALL_BODY_BYTES => next.run(request).await,
            // Too large: the body limit rejects it without reading it.
            Some(n) if n > u64::from(budget.max_body) => next.run(request).await,
            Some(n) => {
                let need = n.saturating_mul(COPIES).min(u64::from(budget.total));
                let need = u32::try_from(need).unwrap_or(budget.total);
                let _permit = match tokio::time::timeout(wait, budget.bytes.acquire_many(need))
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_closed)) => return shutting_down(),
                    Err(_elapsed) => return BudgetExhausted(wait).to_api_error().into_response(),
                };
                next.run(request).await
            }
            None => {
                let held = Arc::new(Mutex::new(Held::default()));
                let request = request.map(|body| {
                    axum::body::Body::new(Metered {
                        inner: body,
                        budget: budget.clone(),
                        held: held.clone(),
                        wait,
                        waiting: None,
                    })
                });
                let response = next.run(request).await;
                drop(held);
                response
            }
        }
    }
}

fn shutting_down() -> Response {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "closed").into_response()
}

/// What a body of unknown length has reserved so far.
#[derive(Default)]
struct Held {
    permit: Option<OwnedSemaphorePermit>,
    bytes: u64,
}

type Acquiring = Pin<
    Box<
        dyn Future<
                Output = Result<
                    Result<OwnedSemaphorePermit, tokio::sync::AcquireError>,
                    tokio::time::error::Elapsed,
                >,
            > + Send,
    >,
>;

/// A body of unknown length that reserves from a [`BodyBudget`] as its frames arrive.
struct Metered {
    inner: axum::body::Body,
    budget: BodyBudget,
    held: Arc<Mutex<Held>>,
    wait: Duration,
    /// A frame read but not yet paid for, and the reservation it waits on.
    waiting: Option<(Frame<Bytes>, Acquiring)>,
}

impl Metered {
    fn keep(&self, permit: OwnedSemaphorePermit) {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.bytes += permit.num_permits() as u64;
        match &mut held.permit {
            Some(all) => all.merge(permit),
            None => held.permit = Some(permit),
        }
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some((_, acquiring)) = &mut this.waiting {
            let result = std::task::ready!(acquiring.as_mut().poll(cx));
            let (frame, _) = this.waiting.take().expect("a frame waits");
            return Poll::Ready(Some(match result {
                Ok(Ok(permit)) => {
                    this.keep(permit);
                    Ok(frame)
                }
                Ok(Err(_closed)) => Err("the body budget is closed".into()),
                Err(_elapsed) => Err(BudgetExhausted(this.wait).into()),
            }));
        }
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
            None => return Poll::Ready(None),
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let reserved = this
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .bytes;
        let room = u64::from(this.budget.total).saturating_sub(reserved);
        let need = (data.len() as u64).saturating_mul(COPIES).min(room);
        let need = u32::try_from(need).unwrap_or(u32::MAX);
        if need == 0 {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Ok(permit) = this.budget.bytes.clone().try_acquire_many_owned(need) {
            this.keep(permit);
            return Poll::Ready(Some(Ok(frame)));
        }
        let acquiring: Acquiring = Box::pin(tokio::time::timeout(
            this.wait,
            this.budget.bytes.clone().acquire_many_owned(need),
        ));
        this.waiting = Some((frame, acquiring));
        // Poll the reservation once now so that it registers for a wake-up.
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
        READYZ_PATH,
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
