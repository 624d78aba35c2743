//! The relay hop in-process: payload, protocol, ids.

use std::collections::HashMap;

use http::StatusCode;
use lps_common::config::{ENV_MAX_BODY_BYTES, ENV_TARGET_URL, ENV_USE_HTTP_2};
use lps_common::wire::STORE_PATH;
use lps_testkit::{Recorder, TestServer, h2c_client};
use serde_json::{Value, json};

/// ars-comp-2 configured by `env`, through its own `serve`.
async fn relay(env: &[(&str, &str)]) -> TestServer {
    let env: HashMap<&str, &str> = env.iter().copied().collect();
    let config = ars_comp_2::Config::from_lookup(&env).unwrap();
    TestServer::serve(|l, s| ars_comp_2::serve(config, l, s)).await
}

#[tokio::test]
async fn forwards_over_http1_even_when_http2_is_asked_for() {
    let backend = Recorder::new();
    let server = TestServer::start(backend.router()).await;
    let target = server.url(STORE_PATH);
    let ac2 = relay(&[(ENV_TARGET_URL, &target), (ENV_USE_HTTP_2, "true")]).await;
    let response = h2c_client()
        .post(ac2.url(STORE_PATH))
        .header("Request-Id", "123456789012345678901234567890123456789")
        .body(json!({"id": "070010", "body": "alarm", "extra": [1, 2]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.version(),
        http::Version::HTTP_2,
        "inbound h2c accepted"
    );
    let seen = backend.requests();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(
        seen[0].header("request-id"),
        Some("123456789012345678901234567890123456789")
    );
    assert_eq!(
        seen[0].json(),
        json!({"id": "070010", "body": "alarm", "request_id": "123456789012345678901234567890123456789"})
    );
}

#[tokio::test]
async fn an_id_in_the_body_is_used_when_the_header_is_missing() {
    let backend = Recorder::new();
    let server = TestServer::start(backend.router()).await;
    let ac2 = relay(&[(ENV_TARGET_URL, &server.url("/x"))]).await;
    let response = h2c_client()
        .post(ac2.url(STORE_PATH))
        .body(json!({"id": "070010", "body": "alarm", "request_id": "55"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.requests()[0].header("request-id"), Some("55"));
}

#[tokio::test]
async fn wrong_shapes_are_rejected_with_json_errors() {
    let backend = Recorder::new();
    let server = TestServer::start(backend.router()).await;
    let ac2 = relay(&[
        (ENV_TARGET_URL, &server.url("/x")),
        (ENV_MAX_BODY_BYTES, "1024"),
    ])
    .await;
    let client = h2c_client();
    for (body, status, code) in [
        (
            json!({"id": 7, "body": "x"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            json!({"body": "x"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
        ),
        (
            r#"{"id": "1", "bo"#.to_owned(),
            StatusCode::BAD_REQUEST,
            "malformed_json",
        ),
        (
            json!({"id": "1", "body": "x".repeat(2048)}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ] {
        let response = client
            .post(ac2.url(STORE_PATH))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"], code, "{body}");
    }
    assert!(backend.requests().is_empty());
}
