//! Input forms, bad input and downstream failures, with a recording fake next hop.

use std::collections::HashMap;
use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use http::StatusCode;
use lps_common::config::{ENV_MAX_BODY_BYTES, ENV_TARGET_URL, ENV_USE_HTTP_2};
use lps_common::wire::STORE_PATH;
use lps_testkit::{Recorder, TestServer, http1_client};
use serde_json::{Value, json};

const BODY_LIMIT: usize = 64 * 1024;

/// ars-comp-1 through its own `serve`, forwarding to `target`.
async fn entry(target: &str, http2: bool) -> TestServer {
    let limit = BODY_LIMIT.to_string();
    let env = HashMap::from([
        (ENV_TARGET_URL, target),
        (ENV_USE_HTTP_2, if http2 { "true" } else { "false" }),
        (ENV_MAX_BODY_BYTES, limit.as_str()),
    ]);
    let config = ars_comp_1::Config::from_lookup(&env).unwrap();
    TestServer::serve(|l, s| ars_comp_1::serve(config, l, s)).await
}

fn alarm() -> Value {
    json!({"phone": "015142611148", "branch": "2001", "headnumber": "8023", "triggertime": "2025-01-31T12:00:00Z"})
}

/// Posts the alarm without a `Request-Id` to an ars-comp-1 (HTTP/1.1) in front of a server
/// of `recorder`: the answer's status, headers and body.
async fn alarm_without_id(recorder: &Recorder) -> (StatusCode, http::HeaderMap, Vec<u8>) {
    let next = TestServer::start(recorder.router()).await;
    let ac1 = entry(&next.url("/x"), false).await;
    let response = http1_client()
        .post(ac1.url(SIMPLE_PATH))
        .body(alarm().to_string())
        .send()
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn json_body_and_query_parameters_both_forward_the_same_message() {
    let recorder = Recorder::new();
    let next = TestServer::start(recorder.router()).await;
    let ac1 = entry(&next.url(STORE_PATH), true).await;
    let client = http1_client();
    let by_body = client
        .post(ac1.url(SIMPLE_PATH))
        .header("Request-Id", "1001")
        .body(alarm().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(by_body.status(), StatusCode::OK);
    assert_eq!(by_body.headers()["request-id"], "1001");
    let body: Value = serde_json::from_slice(&by_body.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"status": "success", "message": "Data published to Legacy System"})
    );
    let by_query = client
        .post(ac1.url(&format!(
            "{SIMPLE_PATH}?Phone=015142611148&Branch=2001&Headnumber=8023&TriggerTime=2025-01-31T12%3A00%3A00Z",
        )))
        .header("Request-Id", "1002")
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    let seen = recorder.requests();
    assert_eq!(seen.len(), 2);
    for (request, id) in seen.iter().zip(["1001", "1002"]) {
        assert_eq!(
            request.version,
            http::Version::HTTP_2,
            "USE_HTTP_2 sends h2c"
        );
        assert_eq!(request.path, STORE_PATH);
        assert_eq!(request.header("request-id"), Some(id));
        assert_eq!(
            request.json(),
            json!({"id": "015142611148", "body": "Phone: 015142611148, Branch: 2001, Headnumber: 8023, TriggerTime: 2025-01-31T12:00:00Z"})
        );
    }
}

#[tokio::test]
async fn a_missing_request_id_is_generated() {
    let recorder = Recorder::new();
    let (status, headers, _) = alarm_without_id(&recorder).await;
    assert_eq!(status, StatusCode::OK);
    let echoed = headers["request-id"].to_str().unwrap().to_owned();
    let forwarded = recorder.requests()[0]
        .header("request-id")
        .unwrap()
        .to_owned();
    assert_eq!(echoed, forwarded);
    assert!(
        !forwarded.is_empty() && forwarded.bytes().all(|b| b.is_ascii_digit()),
        "{forwarded}"
    );
    assert_eq!(recorder.requests()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_naming_the_problem_and_the_service_keeps_serving() {
    let recorder = Recorder::new();
    let next = TestServer::start(recorder.router()).await;
    let ac1 = entry(&next.url("/x"), false).await;
    let client = http1_client();
    let url = ac1.url(SIMPLE_PATH);
    let mut wrong_type = alarm();
    wrong_type["branch"] = json!(2001);
    let mut missing = alarm();
    missing.as_object_mut().unwrap().remove("headnumber");
    let mut bad_time = alarm();
    bad_time["triggertime"] = json!("yesterday");
    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str, &str)> = vec![
        (
            client.post(&url).body("{\"phone\": "),
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "malformed JSON",
        ),
        (
            client.post(&url).body(missing.to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "missing field `headnumber`",
        ),
        (
            client.post(&url).body(wrong_type.to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "invalid type",
        ),
        (
            client.post(&url).body(bad_time.to_string()),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "not an ISO-8601",
        ),
        (
            client.post(&url),
            StatusCode::BAD_REQUEST,
            "empty_body",
            "empty",
        ),
        (
            client.post(&url).body(vec![b' '; BODY_LIMIT + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "length limit",
        ),
        (
            client.post(format!("{url}?Phone=1&Branch=2")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "missing_field",
            "Headnumber, TriggerTime",
        ),
        (
            client
                .post(&url)
                .header("Request-Id", "not-a-number")
                .body(alarm().to_string()),
            StatusCode::BAD_REQUEST,
            "invalid_request_id",
            "decimal",
        ),
        (
            client.get(&url),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "GET",
        ),
        (
            client.post(ac1.url("/api/v2/other")),
            StatusCode::NOT_FOUND,
            "not_found",
            "/api/v2/other",
        ),
    ];
    for (request, status, code, says) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["status"], "error");
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{code}: {body}"
        );
    }
    assert!(
        recorder.requests().is_empty(),
        "bad input must not be forwarded"
    );
    let ok = client
        .post(&url)
        .body(alarm().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn downstream_failures_are_reported_as_json_5xx() {
    let closed = lps_testkit::ClosedPort::new();
    let ac1 = entry(&closed.url("/x"), false).await;
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        http1_client()
            .post(ac1.url(SIMPLE_PATH))
            .body(alarm().to_string())
            .send(),
    )
    .await
    .expect("a refused connection answers at once, not after the 60 s request timeout")
    .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");

    let recorder = Recorder::new();
    recorder.respond(500, Duration::ZERO);
    let (status, _, body) = alarm_without_id(&recorder).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["message"].as_str().unwrap().contains("500"), "{body}");
}
