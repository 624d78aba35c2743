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
pub fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
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

/// How many times a relay holds a buffered body at once, unless it says otherwise (see
/// [`BodyBudget`]).
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
/// process-wide budget ([`Self::with_copies`] for a relay that holds it less); without
/// this a relay's memory grows with body size × connections.
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
    copies: u64,
}

impl BodyBudget {
    /// A budget of `total` bytes for bodies of at most `max_body` bytes.
    pub fn new(total: usize, max_body: usize) -> Self {
        let total = u32::try_from(total.max(1)).unwrap_or(u32::MAX >> 3);
        Self {
            bytes: Arc::new(Semaphore::new(total as usize)),
            total,
            max_body: u32::try_from(max_body).unwrap_or(u32::MAX),
            copies: COPIES,
        }
    }

    /// A body reserves `copies` times its size (default 3): a relay that forwards the
    /// received bytes as they are ([`legacy_payload`]) holds a body twice at most, while
    /// it is read (the received frames and the buffer they are joined into).
    pub fn with_copies(mut self, copies: u32) -> Self {
        self.copies = u64::from(copies.max(1));
        self
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
        budget.admit(request, |request| next.run(request)).await
    }

    /// The length of a body that can pass without a reservation: small, or too large to be
    /// read at all (the body limit rejects it unread). `None` when it must reserve.
    fn exempt(&self, request: &Request) -> bool {
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        matches!(length, Some(n) if n <= SMALL_BODY_BYTES || n > u64::from(self.max_body))
    }

    /// Reserves for `request`, runs `run` on it, releases once the answer is ready.
    async fn admit<F, Fut>(self, request: Request, run: F) -> Response
    where
        F: FnOnce(Request) -> Fut,
        Fut: Future<Output = Response>,
    {
        let budget = self;
        let wait = request
            .extensions()
            .get::<crate::server::Limits>()
            .map_or(DEFAULT_BUDGET_WAIT, |l| l.body_budget_wait);
        let length = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        match length {
            Some(n) if n <= SMALL_BODY_BYTES => run(request).await,
            // Too large: the body limit rejects it without reading it.
            Some(n) if n > u64::from(budget.max_body) => run(request).await,
            Some(n) => {
                let need = n.saturating_mul(budget.copies).min(u64::from(budget.total));
                let need = u32::try_from(need).unwrap_or(budget.total);
                let _permit = match tokio::time::timeout(wait, budget.bytes.acquire_many(need))
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_closed)) => return shutting_down(),
                    Err(_elapsed) => return BudgetExhausted(wait).to_api_error().into_response(),
                };
                run(request).await
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
                let response = run(request).await;
                drop(held);
                response
            }
        }
    }
}

/// [`BodyBudget::limit`] as a layer (`router.route_layer(budget)`): a small body passes
/// straight to the handler, with no future boxed for it.
impl<S> tower::Layer<S> for BodyBudget {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            budget: self.clone(),
        }
    }
}

/// The service of [`BodyBudget`] as a layer.
#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budget: BodyBudget,
}

type BoxedResponse =
    Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

impl<S> tower::Service<Request> for Budgeted<S>
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<S::Future, BoxedResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if self.budget.exempt(&request) {
            return futures_util::future::Either::Left(self.inner.call(request));
        }
        // The service that was made ready serves this request; a fresh clone takes its
        // place (tower's rule for services called from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let budget = self.budget.clone();
        futures_util::future::Either::Right(Box::pin(async move {
            let response = budget
                .admit(request, |request| async move {
                    match inner.call(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                })
                .await;
            Ok(response)
        }))
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
        let need = (data.len() as u64)
            .saturating_mul(this.budget.copies)
            .min(room);
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

/// A legacy message as [`legacy_message`] reads it, checked without building it: what the
/// fields must be (`id` and `body` strings, `request_id` a string or null), so that the
/// errors are those of [`legacy_message`], word for word (hence the type's name, which
/// serde's messages quote).
mod checked {
    #[derive(serde::Deserialize)]
    pub(super) struct LegacyMessage<'a> {
        #[allow(dead_code)]
        id: super::JsonString,
        #[allow(dead_code)]
        body: super::JsonString,
        #[serde(default, borrow)]
        pub(super) request_id: Option<std::borrow::Cow<'a, str>>,
    }
}

/// A JSON string, checked (valid UTF-8, valid escapes) and thrown away: no copy of it is
/// made, however large.
struct JsonString;

impl<'de> serde::Deserialize<'de> for JsonString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = JsonString;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // As `String` says it, so that messages stay as they were.
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<JsonString, E> {
                Ok(JsonString)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// Bodies up to this size are sent on as one buffer; larger ones as the received bytes and
/// the spliced tail, uncopied.
const SPLICE_COPY_BYTES: usize = 4 << 10;

/// The legacy message of a request, ready to forward, and its request id: what
/// [`legacy_message`] reads, with the same errors and the same id, sent on as exactly the
/// bytes `serde_json::to_vec` gives for its message.
///
/// No JSON tree and no copy of the strings is built. A body in the compact form
/// `serde_json` writes ([`crate::wire::compact_message`], what every hop of the chain
/// sends) is checked by one scan and `request_id` is spliced into the received bytes. Any
/// other form (whitespace, other escapes, other fields or order, invalid JSON) goes through
/// `serde_json` as before: checked, then parsed and re-encoded.
pub fn legacy_payload(
    headers: &http::HeaderMap,
    body: &Bytes,
) -> Result<(crate::upstream::Payload, crate::request_id::RequestId), ApiError> {
    use crate::request_id::{REQUEST_ID, RequestId};
    // The compact form needs no parser: valid UTF-8 in that form is valid JSON.
    let compact = crate::wire::compact_message(body).filter(|_| std::str::from_utf8(body).is_ok());
    let (end, body_id) = match compact {
        // Valid UTF-8 (checked above). Raw: an escape in an id makes it no decimal id
        // either way, and RequestId's error does not quote the id.
        Some(found) => (
            Some(found.end),
            found.request_id.map(String::from_utf8_lossy),
        ),
        None => {
            let checked: checked::LegacyMessage<'_> = parse_json(body)?;
            (None, checked.request_id)
        }
    };
    let request_id = match (headers.contains_key(&REQUEST_ID), &body_id) {
        (false, Some(id)) => RequestId::parse(id)?,
        _ => RequestId::from_headers(headers)?,
    };
    let payload = match end {
        Some(end) => {
            let id = request_id.as_str().as_bytes();
            let field = crate::wire::REQUEST_ID_FIELD;
            let mut tail = Vec::with_capacity(field.len() + id.len() + 2);
            tail.extend_from_slice(field);
            tail.extend_from_slice(id);
            tail.extend_from_slice(b"\"}");
            if end <= SPLICE_COPY_BYTES {
                let mut whole = Vec::with_capacity(end + tail.len());
                whole.extend_from_slice(&body[..end]);
                whole.extend_from_slice(&tail);
                crate::upstream::Payload::from(Bytes::from(whole))
            } else {
                crate::upstream::Payload::two(body.slice(..end), Bytes::from(tail))
            }
        }
        None => {
            let mut message: crate::wire::LegacyMessage = parse_json(body)?;
            message.request_id = Some(request_id.to_string());
            let encoded = serde_json::to_vec(&message).map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
            crate::upstream::Payload::from(Bytes::from(encoded))
        }
    };
    Ok((payload, request_id))
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

    /// What ars-comp-2 sent before the splice: the message parsed and re-encoded.
    fn old_payload(headers: &http::HeaderMap, body: &[u8]) -> Result<(Vec<u8>, String), ApiError> {
        let (message, id) = legacy_message(headers, body)?;
        Ok((serde_json::to_vec(&message).unwrap(), id.to_string()))
    }

    /// Asserts that [`legacy_payload`] answers `body` exactly as the old path does: the same
    /// bytes (a generated id aside) or the same error. Whether it spliced, if it succeeded.
    fn same_as_before(headers: &http::HeaderMap, body: &[u8]) -> Option<bool> {
        let shown = String::from_utf8_lossy(body);
        let new = legacy_payload(headers, &Bytes::copy_from_slice(body));
        match (old_payload(headers, body), new) {
            (Ok((old, old_id)), Ok((payload, new_id))) => {
                let new = payload.to_vec();
                let generated = !headers.contains_key(crate::request_id::REQUEST_ID)
                    && old_id != new_id.as_str();
                let (old, new) = if generated {
                    // Each path generated an id of its own; compare the rest.
                    let old = String::from_utf8(old).unwrap().replace(&old_id, "ID");
                    let new = String::from_utf8(new)
                        .unwrap()
                        .replace(new_id.as_str(), "ID");
                    (old.into_bytes(), new.into_bytes())
                } else {
                    (old, new)
                };
                assert_eq!(
                    String::from_utf8_lossy(&new),
                    String::from_utf8_lossy(&old),
                    "input {shown}"
                );
                // Whatever the path, one valid JSON object whose request_id is the id.
                let value: serde_json::Value = serde_json::from_slice(&payload.to_vec()).unwrap();
                assert_eq!(value["request_id"], new_id.as_str(), "input {shown}");
                Some(crate::wire::compact_message(body).is_some())
            }
            (Err(old), Err(new)) => {
                assert_eq!(new, old, "input {shown}");
                None
            }
            (old, new) => panic!("input {shown}: before {old:?}, now {new:?}"),
        }
    }

    fn with_id(id: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(crate::request_id::REQUEST_ID, id.parse().unwrap());
        headers
    }

    #[test]
    fn splice_matches_the_old_encoding() {
        let header = with_id("42");
        let none = http::HeaderMap::new();
        // (body, spliced?) for `Request-Id: 42`.
        let cases: &[(&str, Option<bool>)] = &[
            (r#"{"id":"1","body":"x"}"#, Some(true)),
            (r#"{"id":"","body":""}"#, Some(true)),
            (
                r#"{"id":"a\"b\\c","body":"\n\t\r\b\f\u0001\u001f"}"#,
                Some(true),
            ),
            (r#"{"id":"1","body":"\u007f"}"#, Some(false)),
            ("{\"id\":\"é😀\u{7f}/\",\"body\":\"ü\"}", Some(true)),
            (r#"{"id":"1","body":"x","request_id":"7"}"#, Some(true)),
            (r#"{"id":"1","body":"x","request_id":"007"}"#, Some(true)),
            // Not as serde_json writes it: re-encoded.
            (r#"{"id":"1","body":"x","request_id":null}"#, Some(false)),
            (r#"{ "id": "1", "body": "x" }"#, Some(false)),
            ("{\"id\":\"1\",\"body\":\"x\"}\n", Some(false)),
            (r#"{"body":"x","id":"1"}"#, Some(false)),
            (
                r#"{"id":"1","body":"x","extra":{"a":[1,{"b":"}"}]}}"#,
                Some(false),
            ),
            (r#"{"id":"1","extra":"}","body":"x"}"#, Some(false)),
            (r#"{"id":"\/","body":"x"}"#, Some(false)),
            (r#"{"id":"\u00e9","body":"\ud83d\ude00"}"#, Some(false)),
            (r#"{"id":"\u001F","body":"x"}"#, Some(false)),
            (r#"{"id":"\u0008","body":"\u000a"}"#, Some(false)),
            (r#"{"\u0069d":"1","body":"x"}"#, Some(false)),
            (r#"["1","x"]"#, Some(false)),
            // Refused as before.
            (r#"{"id":"1","body":"x","request_id":"abc"}"#, Some(true)),
            (r#"{"id":1,"body":"x"}"#, None),
            (r#"{"id":"1"}"#, None),
            (r#"{"id":"1","body":"x","id":"2"}"#, None),
            (r#"{"id":"1","body":"x","request_id":5}"#, None),
            (r#"{"id":"1","body":"x"#, None),
            (r#"{"id":"1","body":"\ud800"}"#, None),
            ("{\"id\":\"1\",\"body\":\"\u{1}\"}", None),
            ("", None),
            ("   ", None),
            ("[]", None),
            ("null", None),
            (r#"{"id":"1","body":"x"} {}"#, None),
        ];
        for (body, spliced) in cases {
            assert_eq!(same_as_before(&header, body.as_bytes()), *spliced, "{body}");
            // Without the header the body's id is used (or refused), else a new one.
            same_as_before(&none, body.as_bytes());
        }
        // Invalid UTF-8 in the compact form, an escaped id: refused as before.
        for body in [
            &b"{\"id\":\"\xff\",\"body\":\"x\"}"[..],
            &b"{\"id\":\"1\",\"body\":\"\xc3\"}"[..],
            br#"{"id":"1","body":"x","request_id":"1\"2"}"#,
            br#"{"id":"1","body":"x","request_id":""}"#,
        ] {
            same_as_before(&none, body);
            same_as_before(&header, body);
        }
        assert_eq!(
            same_as_before(&none, br#"{"id":"1","body":"x","request_id":"1\"2"}"#),
            None
        );
        // The body's id when no header names one.
        let (payload, id) = legacy_payload(
            &none,
            &Bytes::from_static(br#"{"id":"1","body":"x","request_id":"9"}"#),
        )
        .unwrap();
        assert_eq!(id.as_str(), "9");
        assert_eq!(
            payload.to_vec(),
            br#"{"id":"1","body":"x","request_id":"9"}"#
        );
        let err = legacy_payload(
            &none,
            &Bytes::from_static(br#"{"id":"1","body":"x","request_id":"abc"}"#),
        )
        .unwrap_err();
        assert_eq!(err.code, "invalid_request_id");
    }

    #[test]
    fn splice_matches_the_old_encoding_on_random_messages() {
        use rand::{Rng, SeedableRng};
        const PALETTE: &[&str] = &[
            "a", "Z", "0", " ", "\"", "\\", "/", "\n", "\t", "\r", "\u{8}", "\u{c}", "\u{1}",
            "\u{1f}", "\u{7f}", "é", "😀", "{", "}", ":", ",", "\\u0041",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let text = |rng: &mut rand::rngs::StdRng| -> String {
            let len = rng.random_range(0..12);
            (0..len)
                .map(|_| PALETTE[rng.random_range(0..PALETTE.len())])
                .collect()
        };
        let header = with_id("123456789");
        let none = http::HeaderMap::new();
        let (mut spliced, mut encoded, mut refused) = (0, 0, 0);
        for round in 0..4000 {
            let mut fields = vec![
                ("id", serde_json::to_string(&text(&mut rng)).unwrap()),
                ("body", serde_json::to_string(&text(&mut rng)).unwrap()),
            ];
            match rng.random_range(0..6) {
                0 => fields.push(("request_id", "\"31\"".to_owned())),
                1 => fields.push(("request_id", "null".to_owned())),
                2 => fields.push(("extra", r#"{"n":[1,2,{"s":"}\""}],"u":"é"}"#.to_owned())),
                3 => fields.push(("request_id", "31".to_owned())),
                _ => {}
            }
            // Sometimes another order, other escapes or whitespace: not the compact form.
            let mut compact = true;
            if rng.random_range(0..4) == 0 {
                fields.swap(0, 1);
                compact = false;
            }
            let mut body = format!(
                "{{{}}}",
                fields
                    .iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            match rng.random_range(0..8) {
                0 if body.contains('/') => {
                    body = body.replace('/', "\\/");
                    compact = false;
                }
                1 if body.contains('é') => {
                    body = body.replace('é', "\\u00e9");
                    compact = false;
                }
                2 => {
                    body = body.replace(',', " , ");
                    compact = !body.contains(" , ");
                }
                3 => {
                    body.push('\n');
                    compact = false;
                }
                // Broken JSON: cut short.
                4 => {
                    let mut cut = rng.random_range(0..body.len());
                    while !body.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    body.truncate(cut);
                    compact = false;
                }
                _ => {}
            }
            let headers = if round % 3 == 0 { &none } else { &header };
            match same_as_before(headers, body.as_bytes()) {
                Some(true) => spliced += 1,
                Some(false) => {
                    // Every compact message with string fields only is spliced.
                    let plain = fields
                        .iter()
                        .all(|(k, v)| *k != "extra" && v.starts_with('"'));
                    assert!(!(compact && plain), "not spliced: {body}");
                    encoded += 1;
                }
                None => refused += 1,
            }
        }
        assert!(
            spliced > 500 && encoded > 500 && refused > 100,
            "{spliced} {encoded} {refused}"
        );
    }

    #[test]
    fn large_bodies_are_sent_uncopied() {
        let text = "x\\\"é".repeat(20_000);
        let body = Bytes::from(format!(r#"{{"id":"1","body":"{text}"}}"#));
        let (payload, _) = legacy_payload(&with_id("5"), &body).unwrap();
        let old = old_payload(&with_id("5"), &body).unwrap().0;
        assert_eq!(payload.to_vec(), old);
        // The head is a view of the received buffer, not a copy.
        assert_eq!(payload.head.as_ptr(), body.as_ptr());
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
