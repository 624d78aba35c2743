//! ars-comp-2 as a real process: configuration errors and graceful shutdown.

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use lps_common::config::{ENV_HTTP_PORT, ENV_SERVICE_NAME, ENV_TARGET_URL};
use lps_common::wire::STORE_PATH;
use lps_testkit::{ChildService, Recorder, TestServer, eventually, exits_64, http1_client};

const BINARY: &str = env!("CARGO_BIN_EXE_ars-comp-2");

#[tokio::test]
async fn invalid_configuration_exits_64_with_one_line() {
    let stderr = exits_64(BINARY, &[], &[(ENV_HTTP_PORT, "http")]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("HTTP_PORT=\"http\"") && stderr.contains("expected"),
        "{stderr}"
    );

    let stderr = exits_64(BINARY, &[], &[(ENV_TARGET_URL, "localhost:1337")]).await;
    assert!(stderr.contains(ENV_TARGET_URL));
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_and_exits_0() {
    let backend = Recorder::new();
    backend.respond(200, Duration::from_millis(800));
    let backend_server = TestServer::start(backend.router()).await;
    let dir = tempfile::tempdir().unwrap();
    let target = backend_server.url(STORE_PATH);
    let mut service = ChildService::start(
        Path::new(BINARY),
        &[
            (ENV_TARGET_URL, &target),
            (ENV_SERVICE_NAME, "ars-comp-2-test"),
        ],
        dir.path(),
    )
    .await
    .unwrap();
    let url = service.url(STORE_PATH);
    let in_flight = tokio::spawn(async move {
        http1_client()
            .post(url)
            .header("Request-Id", "9")
            .body(r#"{"id":"070010","body":"alarm"}"#)
            .send()
            .await
    });
    // Once the backend holds the request, stop the service.
    eventually("request at the backend", Duration::from_secs(10), || {
        let seen = backend.requests().len();
        async move { (seen == 1).then_some(()) }
    })
    .await;
    service.terminate().unwrap();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the in-flight request completes"
    );
    let status = service.wait(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(dir.path().join("ars-comp-2-test.log")).unwrap();
    assert!(log.contains("shutdown signal received"), "{log}");
}
