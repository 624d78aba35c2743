//! Fuzz targets for everything the LPS services parse from the network, shared by two
//! drivers:
//!
//! - `fuzz/` (cargo fuzz, libFuzzer, coverage-guided; needs a nightly toolchain): one
//!   binary per target calling [`run`], for long runs.
//! - `tests/it` here (stable, part of `cargo test`): [`smoke`] runs each target over its
//!   seed corpus in `fuzz/seeds/<target>/` and then over random mutations of it for a
//!   bounded time (`LPS_FUZZ_SMOKE_SECS`, default 2 s per target).
//!
//! A target panics when an input breaks an invariant (a 5xx for bad input, a success
//! for an invalid id, a panic anywhere inside), so both drivers report it the same way.
//!
//! Targets ([`TARGETS`]) and input framing (lines separated by `\n`):
//!
//! | target | input | code under test |
//! |---|---|---|
//! | `alarm` | Request-Id, query string, JSON body | ars-comp-1's `POST /api/v1/simple` router |
//! | `legacy_message` | Request-Id, body | `api::legacy_message` (`{"id","body"}`; the reference of `api::legacy_payload`, which ars-comp-2 and legacy-proxy-1 use) |
//! | `request_id` | the header value | `RequestId::from_headers` / `parse` |
//! | `mqtt_payload` | the payload | `wire::validate_payload` (legacy-proxy-2's check) |
//! | `simulator_command` | `METHOD /path`, Request-Id, body | the simulator's router |

#![warn(missing_docs, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use lps_common::request_id::{REQUEST_ID, RequestId};
use rand::{Rng, SeedableRng};
use tower::ServiceExt;

/// Every target's name, as `fuzz/fuzz_targets/<name>.rs` and `fuzz/seeds/<name>/` name it.
pub const TARGETS: &[&str] = &[
    "alarm",
    "legacy_message",
    "request_id",
    "mqtt_payload",
    "simulator_command",
];

/// Runs target `name` on `data`; panics when an invariant breaks.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "alarm" => alarm(data),
        "legacy_message" => legacy_message(data),
        "request_id" => request_id(data),
        "mqtt_payload" => mqtt_payload(data),
        "simulator_command" => simulator_command(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Splits `data` at the first `n - 1` newlines; the last part keeps the rest.
fn lines(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    while parts.len() + 1 < n {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts.resize(n, &[][..]);
    parts
}

/// Headers with `Request-Id: value` when `value` is not empty and a valid header value.
fn request_id_header(value: &[u8]) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    if !value.is_empty() {
        headers.insert(REQUEST_ID, HeaderValue::from_bytes(value).ok()?);
    }
    Some(headers)
}

/// An error status must be a client error (bad input) and its body JSON.
fn assert_json_error(status: StatusCode, body: &[u8], what: &str) {
    assert!(
        status.is_client_error(),
        "{what}: bad input answered {status}: {}",
        String::from_utf8_lossy(body)
    );
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: {status} body is not JSON ({e})"));
    assert_eq!(json["status"], "error", "{what}: {json}");
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a Tokio runtime")
    })
}

/// Sends `request` through `app` in process and returns the status, headers and body.
fn call(app: &Router, request: Request<axum::body::Body>) -> (StatusCode, HeaderMap, Bytes) {
    runtime().block_on(async {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        (parts.status, parts.headers, body)
    })
}

/// ars-comp-1 forwarding to a closed port: a valid alarm reaches the relay (503), an
/// invalid one is a 4xx JSON error, nothing is a 5xx other than that 503.
fn alarm_app() -> &'static Router {
    static APP: std::sync::OnceLock<Router> = std::sync::OnceLock::new();
    APP.get_or_init(|| {
        let _guard = runtime().enter();
        let target = lps_common::upstream::parse_targets("http://127.0.0.1:1/x").expect("url");
        let mut config = lps_common::upstream::UpstreamConfig::for_targets(target);
        config.connect_timeout = Duration::from_millis(200);
        let mut registry = lps_common::Registry::default();
        let upstream = lps_common::upstream::Upstream::new(&config, &mut registry)
            .expect("an upstream client");
        ars_comp_1::app(Arc::new(upstream), registry, 1 << 20)
    })
}

/// `alarm`: Request-Id, query string, JSON body.
pub fn alarm(data: &[u8]) {
    let parts = lines(data, 3);
    let Some(headers) = request_id_header(parts[0]) else {
        return;
    };
    let Ok(query) = std::str::from_utf8(parts[1]) else {
        return;
    };
    let uri = if query.is_empty() {
        ars_comp_1::SIMPLE_PATH.to_owned()
    } else {
        format!("{}?{query}", ars_comp_1::SIMPLE_PATH)
    };
    let Ok(mut request) = Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(parts[2].to_vec()))
    else {
        return;
    };
    request.headers_mut().extend(headers);
    let (status, _, body) = call(alarm_app(), request);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // Valid input, relayed: the closed port refused it.
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON 503");
        assert_eq!(json["error"], "upstream_unavailable", "{json}");
        let id = parts[0];
        assert!(
            id.is_empty() || RequestId::parse(std::str::from_utf8(id).unwrap_or("x")).is_ok(),
            "relayed with an invalid Request-Id {:?}",
            String::from_utf8_lossy(id)
        );
    } else {
        assert_json_error(status, &body, "alarm");
    }
}

/// `legacy_message`: Request-Id, body.
pub fn legacy_message(data: &[u8]) {
    let parts = lines(data, 2);
    let Some(headers) = request_id_header(parts[0]) else {
        return;
    };
    // The id the message must carry: the header's, else the body's, else a new one.
    let body_id = serde_json::from_slice::<serde_json::Value>(parts[1])
        .ok()
        .and_then(|v| v.get("request_id").cloned());
    let spliced = lps_common::api::legacy_payload(&headers, &Bytes::copy_from_slice(parts[1]));
    match lps_common::api::legacy_message(&headers, parts[1]) {
        Ok((message, id)) => {
            // The splice sends what the parse and re-encoding would (an id it had to
            // generate aside), or refuses alike.
            let (payload, spliced_id) = spliced.expect("the splice accepts it too");
            let mut expected = message.clone();
            expected.request_id = Some(spliced_id.to_string());
            let expected = serde_json::to_vec(&expected).expect("serialisable");
            assert_eq!(payload.to_vec(), expected, "the splice's bytes");
            assert_eq!(message.request_id.as_deref(), Some(id.as_str()));
            assert!(RequestId::parse(id.as_str()).is_ok(), "{id}");
            if parts[0].is_empty() {
                match &body_id {
                    Some(serde_json::Value::String(given)) => assert_eq!(given, id.as_str()),
                    Some(serde_json::Value::Null) | None => {}
                    Some(other) => panic!("accepted request_id {other}"),
                }
            } else {
                assert_eq!(id.as_str().as_bytes(), parts[0], "the header's id is kept");
            }
            // What is sent on parses back to the same message.
            let sent = serde_json::to_vec(&message).expect("serialisable");
            let back: lps_common::wire::LegacyMessage =
                serde_json::from_slice(&sent).expect("round trip");
            assert_eq!(back, message);
        }
        Err(error) => {
            assert!(error.status.is_client_error(), "{error}");
            assert_eq!(spliced.err(), Some(error), "the splice refuses alike");
        }
    }
}

/// `request_id`: the header value.
pub fn request_id(data: &[u8]) {
    let Some(headers) = request_id_header(data) else {
        return;
    };
    match RequestId::from_headers(&headers) {
        Ok(id) => {
            let text = id.as_str();
            assert!(
                (1..=lps_common::request_id::MAX_DIGITS).contains(&text.len())
                    && text.bytes().all(|b| b.is_ascii_digit()),
                "accepted {text:?}"
            );
            if !data.is_empty() {
                assert_eq!(text.as_bytes(), data, "the id is kept verbatim");
            }
        }
        Err(error) => assert_eq!(error.status, StatusCode::BAD_REQUEST),
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let parsed = RequestId::parse(text);
        assert_eq!(
            parsed.is_ok(),
            !text.is_empty()
                && text.len() <= lps_common::request_id::MAX_DIGITS
                && text.bytes().all(|b| b.is_ascii_digit())
        );
    }
}

/// The payload limit of the `mqtt_payload` target (small, so that it is reached).
pub const FUZZ_MAX_PAYLOAD: usize = 4096;

/// `mqtt_payload`: the payload.
pub fn mqtt_payload(data: &[u8]) {
    match lps_common::wire::validate_payload(data, FUZZ_MAX_PAYLOAD) {
        Ok(id) => {
            assert!(data.len() <= FUZZ_MAX_PAYLOAD);
            let value: serde_json::Value = serde_json::from_slice(data).expect("accepted JSON");
            let field = match &value["request_id"] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => panic!("accepted request_id {other}"),
            };
            assert_eq!(field, id.as_str());
        }
        Err((reason, message)) => {
            assert!(
                ["too_large", "not_json", "no_request_id"].contains(&reason),
                "{reason}"
            );
            assert!(!message.is_empty());
        }
    }
}

struct Simulator {
    app: Router,
    _dir: tempfile::TempDir,
}

fn simulator() -> &'static Simulator {
    static SIM: std::sync::OnceLock<Simulator> = std::sync::OnceLock::new();
    SIM.get_or_init(|| {
        let _guard = runtime().enter();
        let dir = tempfile::tempdir().expect("temp dir");
        let (journal, writer) =
            rast_simulator::journal::Journal::open(dir.path()).expect("journal");
        // The writer thread runs for the life of the process.
        std::mem::forget(writer);
        let sim = rast_simulator::Simulator::new(rast_simulator::model::Model::Zero, journal);
        Simulator {
            app: rast_simulator::app(sim, lps_common::Registry::default(), 1 << 20),
            _dir: dir,
        }
    })
}

/// `simulator_command`: `METHOD /path`, Request-Id, body.
pub fn simulator_command(data: &[u8]) {
    let parts = lines(data, 3);
    let Ok(line) = std::str::from_utf8(parts[0]) else {
        return;
    };
    let (method, path) = line.split_once(' ').unwrap_or(("POST", line));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(mut request) = Request::builder()
        .method(method.clone())
        .uri(path)
        .body(axum::body::Body::from(parts[2].to_vec()))
    else {
        return;
    };
    // The simulator takes the Request-Id verbatim (any header value), as upstream.
    if !parts[1].is_empty() {
        match HeaderValue::from_bytes(parts[1]) {
            Ok(value) => {
                request.headers_mut().insert(REQUEST_ID, value);
            }
            Err(_) => return,
        }
    }
    let decoded = request.uri().path().to_owned();
    let (status, headers, body) = call(&simulator().app, request);
    let command = decoded
        .strip_prefix('/')
        .filter(|c| !c.is_empty() && !c.contains('/'));
    let known = command.is_some_and(|c| {
        // The router percent-decodes the segment.
        let decoded = percent_decode(c);
        rast_simulator::commands::ordinal(&decoded).is_some()
    });
    if method == Method::POST && known {
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(&body[..], b"Success");
        assert!(headers.contains_key("x-process-time"));
    } else if method == Method::POST && command.is_some() && status == StatusCode::NOT_FOUND {
        assert!(
            &body[..] == b"Command not found" || body.starts_with(b"{"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    } else if status == StatusCode::OK {
        // Only the operations endpoints answer anything else with 200.
        assert!(
            matches!(method, Method::GET | Method::HEAD)
                && ["/healthz", "/metrics"].contains(&decoded.as_str()),
            "{method} {decoded} answered {status}"
        );
    } else {
        assert!(
            !status.is_server_error(),
            "{method} {decoded} answered {status}"
        );
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The committed seed corpus of `target`: `fuzz/seeds/<target>/` at the repository root.
pub fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target)
}

/// Tokens worth inserting: what the parsers look for.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"18446744073709551616",
    b"123456789012345678901234567890123456789",
    b"request_id",
    b"id",
    b"body",
    b"phone",
    b"Phone",
    b"TriggerTime",
    b"triggertime",
    b"2025-01-31T12:00:00Z",
    b"%",
    b"%00",
    b"%ff",
    b"&",
    b"=",
    b"?",
    b"/",
    b"\n",
    b"\r\n",
    b"\xff",
    b"\xc3\xa9",
    b"POST /",
    b"GET /",
    b"ID_REQ_KC_STORE7D3BPACKET",
];

/// One random change to `input`.
fn mutate(rng: &mut impl Rng, input: &mut Vec<u8>, other: &[u8]) {
    let len = input.len();
    match rng.random_range(0..8) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] = rng.random();
        }
        2 if len > 0 => {
            let start = rng.random_range(0..len);
            let end = rng.random_range(start..=len.min(start + 16));
            input.drain(start..end);
        }
        3 => {
            let at = rng.random_range(0..=len);
            let token = DICTIONARY[rng.random_range(0..DICTIONARY.len())];
            input.splice(at..at, token.iter().copied());
        }
        4 if len > 0 => {
            let start = rng.random_range(0..len);
            let end = rng.random_range(start..=len.min(start + 64));
            let copy = input[start..end].to_vec();
            let at = rng.random_range(0..=input.len());
            input.splice(at..at, copy);
        }
        5 if !other.is_empty() => {
            // Splice: our head, the other's tail.
            let cut = rng.random_range(0..=len);
            let from = rng.random_range(0..other.len());
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        6 => {
            let at = rng.random_range(0..=len);
            let byte: u8 = rng.random();
            let most = if rng.random_bool(0.1) { 5000 } else { 8 };
            let count = rng.random_range(1..=most);
            input.splice(at..at, std::iter::repeat_n(byte, count));
        }
        _ => {
            let at = rng.random_range(0..=len);
            input.insert(at, rng.random());
        }
    }
}

/// What a smoke run did.
#[derive(Debug, Clone, Copy)]
pub struct SmokeReport {
    /// Seed inputs run.
    pub seeds: usize,
    /// Mutated inputs run.
    pub mutations: u64,
}

/// Runs `target` over its seed corpus, then over random mutations of it until `budget`
/// is spent, starting from `seed` (printed, so that a failure can be replayed). An input
/// that breaks an invariant is written to the folder `failures` before the panic goes on.
pub fn smoke(target: &str, budget: Duration, seed: u64, failures: &Path) -> SmokeReport {
    let dir = seed_dir(target);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|entry| std::fs::read(entry.ok()?.path()).ok())
        .collect();
    corpus.sort();
    assert!(!corpus.is_empty(), "no seeds in {}", dir.display());
    let check = |input: &[u8]| {
        if let Err(panic) = std::panic::catch_unwind(|| run(target, input)) {
            std::fs::create_dir_all(failures).ok();
            let path = failures.join(format!("{target}-{seed}-{:016x}", fingerprint(input)));
            std::fs::write(&path, input).ok();
            eprintln!(
                "fuzz target {target} failed on {} (LPS_FUZZ_SEED={seed}); replay with \
                 LPS_FUZZ_TARGET={target} LPS_FUZZ_REPLAY={} cargo test -p lps-fuzz --test it replay",
                path.display(),
                path.display()
            );
            std::panic::resume_unwind(panic);
        }
    };
    for input in &corpus {
        check(input);
    }
    let seeds = corpus.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut mutations = 0;
    while started.elapsed() < budget {
        let mut input = corpus[rng.random_range(0..corpus.len())].clone();
        let other = corpus[rng.random_range(0..corpus.len())].clone();
        for _ in 0..rng.random_range(1..=4) {
            mutate(&mut rng, &mut input, &other);
        }
        input.truncate(64 << 10);
        check(&input);
        mutations += 1;
        // Keep some mutants as parents, so that changes stack up over the run.
        if mutations % 16 == 0 && corpus.len() < 4096 {
            corpus.push(input);
        }
    }
    SmokeReport { seeds, mutations }
}

fn fingerprint(data: &[u8]) -> u64 {
    // FNV-1a: stable across runs and platforms, enough to name a file.
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
