//! The inbound server: HTTP/1.1 and h2c on one port, pipelining, JSON fallbacks.

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::StatusCode;
use lps_common::wire::{HEALTHZ_PATH, METRICS_PATH};
use lps_common::{Registry, finish_router};
use lps_testkit::{TestServer, h2c_client, http1_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo(body: String) -> String {
    body
}

fn app() -> Router {
    finish_router(
        Router::new().route("/echo", post(echo)),
        Registry::default(),
        1024,
    )
}

#[tokio::test]
async fn one_port_serves_http1_and_h2c() {
    let server = TestServer::start(app()).await;
    for (client, want) in [
        (http1_client(), http::Version::HTTP_11),
        (h2c_client(), http::Version::HTTP_2),
    ] {
        let response = client
            .post(server.url("/echo"))
            .body("hi")
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), want);
        assert_eq!(response.text().await.unwrap(), "hi");
    }
    let metrics = http1_client()
        .get(server.url(METRICS_PATH))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"http_requests_total{route="/echo",status="200",version="HTTP/1.1"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"http_requests_total{route="/echo",status="200",version="HTTP/2.0"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = TestServer::start(app()).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut requests = String::new();
    for body in ["first", "second!", "third!!"] {
        requests.push_str(&format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    // All three in one write: the server must answer them one after another on this socket.
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed early: {}",
                String::from_utf8_lossy(&received)
            );
            received.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&received).into_owned();
            if text.matches("HTTP/1.1 200").count() == 3 && text.ends_with("third!!") {
                return text;
            }
        }
    })
    .await
    .expect("three pipelined answers");
    let first = text.find("\r\n\r\nfirst").unwrap();
    let second = text.find("\r\n\r\nsecond!").unwrap();
    let third = text.find("\r\n\r\nthird!!").unwrap();
    assert!(first < second && second < third, "{text}");
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_get_json_errors() {
    let server = TestServer::start(app()).await;
    let client = http1_client();
    let cases = [
        (
            client.get(server.url("/nope")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            client.get(server.url("/echo")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status);
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], code, "{body}");
    }
    let health = client.get(server.url(HEALTHZ_PATH)).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn stop_drains_in_flight_requests() {
    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_millis(300)).await;
        "done"
    }
    let app = finish_router(
        Router::new().route("/slow", post(slow)),
        Registry::default(),
        1024,
    );
    let server = TestServer::start(app).await;
    let url = server.url("/slow");
    let in_flight = tokio::spawn(async move { http1_client().post(url).send().await });
    // Wait until the request is inside the handler, then stop the server.
    let base = server.url("");
    lps_testkit::eventually("request in flight", Duration::from_secs(5), || async {
        let text = lps_testkit::try_scrape(&base).await?;
        text.contains("http_requests_in_flight 2").then_some(())
    })
    .await;
    let addr = server.addr;
    server.stop().await;
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "done");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after stop"
    );
}
