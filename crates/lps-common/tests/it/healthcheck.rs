//! `<service> healthcheck`: the blocking probe against real listeners on loopback.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http::StatusCode;
use lps_common::config::{ENV_HTTP_HOST, ENV_HTTP_PORT};
use lps_common::service::{HEALTHCHECK_PATH, HEALTHCHECK_TIMEOUT, healthcheck};
use lps_common::wire::{HEALTHZ_PATH, READYZ_PATH};
use lps_common::{Registry, finish_router};
use lps_testkit::{ClosedPort, TestServer};

/// Runs the blocking probe off the runtime that serves the test server.
async fn check(env: &[(&str, String)], path: &str, timeout: Duration) -> Result<String, String> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || healthcheck(&env, 8080, &path, timeout))
        .await
        .expect("probe task")
}

fn app() -> Router {
    finish_router(
        Router::new().route(
            READYZ_PATH,
            get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
        ),
        Registry::default(),
        1024,
    )
}

#[tokio::test]
async fn healthy_service_passes_and_a_failing_path_does_not() {
    let server = TestServer::start(app()).await;
    let env = [
        (ENV_HTTP_HOST, "0.0.0.0".to_owned()),
        (ENV_HTTP_PORT, server.addr.port().to_string()),
    ];
    let line = check(&env, HEALTHCHECK_PATH, HEALTHCHECK_TIMEOUT)
        .await
        .expect("healthy");
    assert_eq!(
        line,
        format!("healthy: GET http://{}/healthz answered 200", server.addr)
    );
    let line = check(&env, READYZ_PATH, HEALTHCHECK_TIMEOUT)
        .await
        .expect_err("503 is unhealthy");
    assert!(line.ends_with("/readyz answered 503"), "{line}");
    let line = check(&env, "/nowhere", HEALTHCHECK_TIMEOUT)
        .await
        .expect_err("404 is unhealthy");
    assert!(line.ends_with("answered 404"), "{line}");
}

#[tokio::test]
async fn closed_port_fails() {
    let closed = ClosedPort::new();
    let env = [(ENV_HTTP_PORT, closed.port.to_string())];
    let line = check(&env, HEALTHCHECK_PATH, HEALTHCHECK_TIMEOUT)
        .await
        .expect_err("nothing listens");
    assert!(
        line.starts_with(&format!(
            "unhealthy: GET http://127.0.0.1:{}/healthz: ",
            closed.port
        )),
        "{line}"
    );
}

#[tokio::test]
async fn silent_listener_fails_within_the_timeout() {
    // The kernel completes the handshake into the backlog; nobody ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let env = [(
        ENV_HTTP_PORT,
        silent.local_addr().expect("addr").port().to_string(),
    )];
    let started = Instant::now();
    let line = check(&env, HEALTHCHECK_PATH, Duration::from_millis(300))
        .await
        .expect_err("no answer");
    assert!(line.ends_with("no answer within 300ms"), "{line}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn invalid_port_names_the_variable() {
    let line = check(
        &[(ENV_HTTP_PORT, "eighty".to_owned())],
        HEALTHZ_PATH,
        HEALTHCHECK_TIMEOUT,
    )
    .await
    .expect_err("bad config");
    assert!(line.contains("HTTP_PORT=\"eighty\""), "{line}");
}
