//! The binary: a bad value exits 64 with one line; a good configuration serves and stops
//! cleanly on SIGTERM.

use std::path::Path;
use std::time::Duration;

use lps_common::config::{ENV_MQTT_PORT, ENV_PROXY_ALLOWED_PORTS, ENV_PROXY_HOST, ENV_PROXY_PORT};
use lps_common::net::free_port;
use lps_common::wire::HEALTHZ_PATH;
use lps_testkit::{ChildService, exits_64};

const BINARY: &str = env!("CARGO_BIN_EXE_lps-edge");

#[tokio::test]
async fn a_bad_value_exits_64_naming_the_variable() {
    let stderr = exits_64(BINARY, &[], &[(ENV_PROXY_ALLOWED_PORTS, "80,ssh")]).await;
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("PROXY_ALLOWED_PORTS=\"80,ssh\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_binary_serves_health_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_port = free_port().to_string();
    let mut edge = ChildService::start(
        Path::new(BINARY),
        &[
            (ENV_PROXY_HOST, "127.0.0.1"),
            (ENV_PROXY_PORT, &proxy_port),
            (ENV_MQTT_PORT, "1"),
        ],
        dir.path(),
    )
    .await
    .unwrap();
    let health = reqwest::get(edge.url(HEALTHZ_PATH)).await.unwrap();
    assert_eq!(health.status(), 200);
    // The proxy port answers as a proxy (an origin-form request is no proxy request).
    let (_, response) = crate::harness::proxy_request(
        format!("127.0.0.1:{proxy_port}").parse().unwrap(),
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(response.0, 400);
    edge.terminate().unwrap();
    let status = edge.wait(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "{status}");
}
