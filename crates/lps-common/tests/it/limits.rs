//! Hostile clients: silent and slow connections, stalled uploads, too many connections.
//! Each test serves on a real socket with short limits and measures when the server closes
//! or answers, so every limit is checked both ways: not before it runs out, and not long
//! after.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use http::StatusCode;
use lps_common::api::{Body, BodyBudget};
use lps_common::server::{Limits, Protocols};
use lps_common::{Registry, finish_router};
use lps_testkit::{TestServer, eventually, h2c_client, http1_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Short limits so that the tests take seconds.
fn limits() -> Limits {
    Limits {
        first_bytes_timeout: Duration::from_millis(1000),
        header_read_timeout: Duration::from_millis(2000),
        body_read_timeout: Duration::from_millis(2000),
        idle_timeout: Duration::from_millis(2000),
        body_budget_wait: Duration::from_millis(1000),
        ..Limits::default()
    }
}

/// Slack for a loaded two-core CI machine.
const SLACK: Duration = Duration::from_millis(1500);

fn app() -> Router {
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        "slow"
    }
    let budget = BodyBudget::new(1 << 20, 1 << 20);
    let routes = Router::new()
        .route("/echo", post(|Body(body): Body| async move { body }))
        .route("/slow", get(slow))
        .route(
            "/upload",
            post(|Body(body): Body| async move { body.len().to_string() }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            budget,
            BodyBudget::limit,
        ));
    finish_router(routes, Registry::default(), 1 << 20)
}

async fn start(limits: Limits) -> TestServer {
    TestServer::start_with_limits(
        "127.0.0.1:0".parse().unwrap(),
        app(),
        Protocols::Http1AndH2c,
        limits,
    )
    .await
}

/// How long after `since` the server closed `stream` (EOF or reset), reading whatever it
/// sends meanwhile; panics if it stays open for `at_most`.
async fn closed_after(mut stream: TcpStream, since: Instant, at_most: Duration) -> Duration {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(at_most, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("connection still open after {at_most:?}"))
}

/// A connection that sends `bytes` one per second (Slowloris) and reports when the
/// server closed it.
async fn dribble(addr: SocketAddr, first: &'static [u8], bytes: &'static [u8]) -> Duration {
    let stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        if write.write_all(first).await.is_err() {
            return;
        }
        let mut pace = tokio::time::interval(Duration::from_secs(1));
        for byte in bytes {
            pace.tick().await;
            if write.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    });
    let mut buf = [0u8; 4096];
    let elapsed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("a dribbling connection is closed");
    writer.abort();
    elapsed
}

/// Sends requests with `client` every 200 ms for `for_how_long`; each must succeed within
/// a second. Returns how many were served.
async fn keep_serving(client: reqwest::Client, url: String, for_how_long: Duration) -> usize {
    let until = Instant::now() + for_how_long;
    let mut pace = tokio::time::interval(Duration::from_millis(200));
    let mut served = 0;
    while Instant::now() < until {
        pace.tick().await;
        let started = Instant::now();
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            client.post(&url).body("hello").send(),
        )
        .await
        .expect("a normal client is served within a second")
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "hello");
        assert!(started.elapsed() < Duration::from_secs(1));
        served += 1;
    }
    served
}

const HEAD: &[u8] = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\nhello";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_http1_neither_holds_the_port_nor_stays() {
    // Idle longer than the header limit, so that it is the header limit that closes.
    let limits = Limits {
        idle_timeout: Duration::from_secs(6),
        ..limits()
    };
    let server = start(limits).await;
    let addr = server.addr;
    // 200 connections that send nothing.
    let mut silent = Vec::new();
    for _ in 0..200 {
        let stream = TcpStream::connect(addr).await.unwrap();
        silent.push(tokio::spawn(closed_after(
            stream,
            Instant::now(),
            Duration::from_secs(20),
        )));
    }
    // 200 that send a request head one byte per second.
    let slow: Vec<_> = (0..200)
        .map(|_| tokio::spawn(dribble(addr, b"P", &HEAD[1..])))
        .collect();
    // Meanwhile, a normal client on new connections each time is served at once.
    let served = keep_serving(
        reqwest::Client::builder()
            .no_proxy()
            .http1_only()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap(),
        server.url("/echo"),
        Duration::from_secs(3),
    )
    .await;
    assert!(served >= 10, "{served}");
    for task in silent {
        let after = task.await.unwrap();
        assert!(
            after >= limits.first_bytes_timeout.mul_f32(0.9)
                && after <= limits.first_bytes_timeout + SLACK,
            "a silent connection closed after {after:?}, limit {:?}",
            limits.first_bytes_timeout
        );
    }
    for task in slow {
        // The head started with the first byte; the header limit counts from there.
        let after = task.await.unwrap();
        assert!(
            after >= limits.header_read_timeout.mul_f32(0.9)
                && after <= limits.header_read_timeout + SLACK,
            "a dribbling connection closed after {after:?}, limit {:?}",
            limits.header_read_timeout
        );
    }
}

/// An h2 HEADERS frame header (length 16, END_HEADERS, stream 1) and a few bytes of it.
const H2_HEADERS: &[u8] = &[0, 0, 16, 1, 4, 0, 0, 0, 1, 0x83, 0x86, 0x84, 0x41];
/// The h2c connection preface and an empty SETTINGS frame.
const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_h2c_neither_holds_the_port_nor_stays() {
    let limits = limits();
    let server = start(limits).await;
    let addr = server.addr;
    // 200 h2c connections that open and then send nothing.
    let mut quiet = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(H2_START).await.unwrap();
        quiet.push(tokio::spawn(closed_after(
            stream,
            Instant::now(),
            Duration::from_secs(20),
        )));
    }
    // 200 that dribble a HEADERS frame one byte per second.
    let slow: Vec<_> = (0..200)
        .map(|_| tokio::spawn(dribble(addr, H2_START, H2_HEADERS)))
        .collect();
    let served = keep_serving(h2c_client(), server.url("/echo"), Duration::from_secs(3)).await;
    assert!(served >= 10, "{served}");
    // An idle h2 connection gets a GOAWAY at the idle limit and is closed at most a second
    // later.
    let most = limits.idle_timeout + Duration::from_secs(1) + SLACK;
    for task in quiet.into_iter().chain(slow) {
        let after = task.await.unwrap();
        assert!(
            after >= limits.idle_timeout.mul_f32(0.9) && after <= most,
            "an h2c connection without a request closed after {after:?}, idle limit {:?}",
            limits.idle_timeout
        );
    }
}

#[tokio::test]
async fn idle_connections_close_but_requests_in_flight_do_not() {
    let limits = limits();
    let server = start(limits).await;
    // HTTP/1.1: the handler takes longer than the idle limit; the request is answered, and
    // the connection closes an idle limit after the answer.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!((status, body.as_str()), (200, "slow"));
    let after = closed_after(stream, Instant::now(), Duration::from_secs(10)).await;
    assert!(
        after >= limits.idle_timeout.mul_f32(0.9) && after <= limits.idle_timeout + SLACK,
        "idle keep-alive connection closed after {after:?}"
    );
    // h2c: a stream in flight keeps its connection.
    let response = h2c_client().get(server.url("/slow")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "slow");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_slot() {
    let limits = Limits {
        max_connections: 2,
        ..limits()
    };
    let server = start(limits).await;
    let started = Instant::now();
    // Two silent connections take both slots until the first-bytes limit closes them.
    let _silent = [
        TcpStream::connect(server.addr).await.unwrap(),
        TcpStream::connect(server.addr).await.unwrap(),
    ];
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http1_client()
            .post(server.url("/echo"))
            .body("hello")
            .send(),
    )
    .await
    .expect("served once a slot is free")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let waited = started.elapsed();
    assert!(
        waited >= limits.first_bytes_timeout.mul_f32(0.9)
            && waited <= limits.first_bytes_timeout + SLACK,
        "the third connection was served after {waited:?}"
    );
}

/// Reads one HTTP/1.1 response with a Content-Length: status, head, body.
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if data.len() >= end + 4 + length {
                    let status = head[9..12].parse().unwrap();
                    let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]);
                    return (status, head, body.into_owned());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&data));
            data.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response")
}

/// Starts a chunked upload on its own connection and sends one chunk of `len` bytes.
async fn chunked_upload(addr: SocketAddr, len: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    request.extend_from_slice(format!("{len:x}\r\n").as_bytes());
    request.extend_from_slice(&vec![b'x'; len]);
    request.extend_from_slice(b"\r\n");
    stream.write_all(&request).await.unwrap();
    stream
}

#[tokio::test]
async fn a_stalled_upload_neither_blocks_others_nor_keeps_its_memory() {
    let limits = limits();
    let budget = BodyBudget::new(1 << 20, 1 << 20);
    let routes = Router::new()
        .route(
            "/upload",
            post(|Body(body): Body| async move { body.len().to_string() }),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            budget.clone(),
            BodyBudget::limit,
        ));
    let server = TestServer::start_with_limits(
        "127.0.0.1:0".parse().unwrap(),
        finish_router(routes, Registry::default(), 1 << 20),
        Protocols::Http1AndH2c,
        limits,
    )
    .await;
    // A chunked upload sends 300 KiB and stalls: it holds 3 × 300 KiB of the 1 MiB budget,
    // what it sent, not the whole budget.
    let stalled_at = Instant::now();
    let mut stalled = chunked_upload(server.addr, 300 << 10).await;
    let check = budget.clone();
    eventually(
        "the stalled upload reserved",
        Duration::from_secs(5),
        || {
            let held = (1 << 20) - check.available();
            async move { (held == 900 << 10).then_some(()) }
        },
    )
    .await;
    // Another chunked upload needs more than is left: 503 with Retry-After, in time.
    let started = Instant::now();
    let mut second = chunked_upload(server.addr, 100 << 10).await;
    let (status, head, body) = read_response(&mut second).await;
    let waited = started.elapsed();
    assert_eq!(status, 503, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "busy", "{json}");
    assert!(
        waited >= limits.body_budget_wait.mul_f32(0.9) && waited <= limits.body_budget_wait + SLACK,
        "503 after {waited:?}"
    );
    // Small requests keep flowing meanwhile.
    for _ in 0..20 {
        let response = tokio::time::timeout(
            Duration::from_secs(1),
            http1_client()
                .post(server.url("/upload"))
                .body(vec![b'y'; 1024])
                .send(),
        )
        .await
        .expect("small requests are not held up")
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.text().await.unwrap(), "1024");
    }
    // The stalled upload ends with 408 at the body limit, and its memory comes back.
    let (status, _, body) = read_response(&mut stalled).await;
    let after = stalled_at.elapsed();
    assert_eq!(status, 408, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"], "body_timeout", "{json}");
    assert!(
        after >= limits.body_read_timeout.mul_f32(0.9) && after <= limits.body_read_timeout + SLACK,
        "408 after {after:?}"
    );
    eventually("the budget is free again", Duration::from_secs(5), || {
        let free = budget.available();
        async move { (free == 1 << 20).then_some(()) }
    })
    .await;
    // And a large upload with a Content-Length fits again.
    let response = http1_client()
        .post(server.url("/upload"))
        .body(vec![b'z'; 200 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), (200 << 10).to_string());
}
