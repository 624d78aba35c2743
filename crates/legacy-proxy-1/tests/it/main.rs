//! legacy-proxy-1 over a real Mosquitto, in-process and as a process.

mod restart;
mod scripted;
mod takeover;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use lps_common::config::{
    ENV_MAX_PAYLOAD_BYTES, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_RECONNECT_MAX_MS,
    ENV_SERVICE_NAME, ENV_SHUTDOWN_GRACE_SECS, ENV_SUBSCRIBER_PROBE, ENV_TARGET_URL,
};
use lps_common::mqtt::mqtt5::MqttClient;
use lps_common::wire::READYZ_PATH;
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{ChildService, Recorder, TestServer, eventually, http1_client, ok_ids};

const PATH: &str = lps_common::wire::STORE_PATH;

/// legacy-proxy-1, in-process through its own `serve`.
type Lp1 = TestServer;

async fn lp1(broker_port: u16, extra: &[(&str, &str)]) -> Lp1 {
    let port = broker_port.to_string();
    let mut env: HashMap<&str, &str> = [
        (ENV_MQTT_HOST, "127.0.0.1"),
        (ENV_MQTT_PORT, port.as_str()),
        (ENV_SERVICE_NAME, "proxy1-1"),
        (ENV_MQTT_RECONNECT_MAX_MS, "300"),
    ]
    .into();
    env.extend(extra.iter().copied());
    let config = legacy_proxy_1::Config::from_lookup(&env).unwrap();
    TestServer::serve(|l, s| legacy_proxy_1::serve(config, l, s)).await
}

/// A plain (non-shared) subscriber to `topic` recording each message's request id.
async fn collector(broker: &Mosquitto, topic: &str) -> (MqttClient, Arc<Mutex<Vec<String>>>) {
    lps_testkit::collector(broker, topic, |m| {
        let value: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        value["request_id"].as_str().map(str::to_owned)
    })
    .await
}

async fn post(url: &str, id: &str) -> reqwest::Response {
    http1_client()
        .post(url)
        .header("Request-Id", id)
        .body(r#"{"id":"070010","body":"alarm"}"#)
        .send()
        .await
        .unwrap()
}

/// Posts each id to `url`, `concurrency` at a time; `None` when no answer came (the server
/// had stopped).
async fn send(
    url: String,
    ids: Vec<String>,
    concurrency: usize,
) -> Vec<(String, Option<StatusCode>)> {
    let requests = ids.into_iter().map(move |id| (url.clone(), id));
    let body = r#"{"id":"070010","body":"alarm"}"#.to_owned();
    lps_testkit::post_ids(requests, body, concurrency).await
}

/// legacy-proxy-1 `proxy1-1` as a process against `broker`, its log in `dir`, without the
/// subscriber probe; `extra` added to its environment.
async fn lp1_process(broker: &Mosquitto, dir: &Path, extra: &[(&str, &str)]) -> ChildService {
    let mut env = vec![
        (ENV_SERVICE_NAME, "proxy1-1"),
        (ENV_SUBSCRIBER_PROBE, "false"),
    ];
    env.extend_from_slice(extra);
    ChildService::start_with_broker(
        Path::new(env!("CARGO_BIN_EXE_legacy-proxy-1")),
        broker,
        &env,
        dir,
    )
    .await
    .unwrap()
}

async fn admitting(server: &TestServer) {
    lps_testkit::wait_ready(&server.url(READYZ_PATH), Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_the_message_and_answers_after_the_handshake() {
    let broker = Mosquitto::start().await;
    let (_c, seen) = collector(&broker, "proxy1/message").await;
    let lp1 = lp1(broker.port, &[(ENV_SUBSCRIBER_PROBE, "false")]).await;
    admitting(&lp1).await;
    let response = post(&lp1.url(PATH), "4242").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["request-id"], "4242");
    eventually(
        "the message at the subscriber",
        Duration::from_secs(5),
        || {
            let ids = seen.lock().unwrap().clone();
            async move { (ids == ["4242"]).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_it_answers_503_and_recovers_by_itself() {
    let mut broker = Mosquitto::start().await;
    broker.kill().await;
    let lp1 = lp1(broker.port, &[(ENV_SUBSCRIBER_PROBE, "false")]).await;
    let response = post(&lp1.url(PATH), "1").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "broker_unavailable");
    let ready = http1_client()
        .get(lp1.url(READYZ_PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    broker.restart().await;
    admitting(&lp1).await;
    assert_eq!(post(&lp1.url(PATH), "2").await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_subscriber_to_answer_the_probe() {
    let broker = Mosquitto::start().await;
    let lp1 = lp1(broker.port, &[]).await;
    // Connected, but no legacy-proxy-2 in the group: a message now would be dropped by the
    // broker with a successful PUBREC, so the bridge refuses it.
    let response = post(&lp1.url(PATH), "1").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let backend = Recorder::new();
    let backend_server = TestServer::start(backend.router()).await;
    let port = broker.port.to_string();
    let env: HashMap<&str, String> = [
        (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
        (ENV_MQTT_PORT, port),
        (ENV_SERVICE_NAME, "proxy2-1".to_owned()),
        (ENV_TARGET_URL, backend_server.url(PATH)),
        (ENV_SHUTDOWN_GRACE_SECS, "5".to_owned()),
    ]
    .into_iter()
    .collect();
    let env: HashMap<String, String> = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let config = legacy_proxy_2::Config::from_lookup(&env).unwrap();
    let lp2 = TestServer::serve(|l, s| legacy_proxy_2::serve(config, l, s)).await;
    admitting(&lp1).await;
    assert_eq!(post(&lp1.url(PATH), "2").await.status(), StatusCode::OK);
    eventually("forwarded", Duration::from_secs(10), || {
        let n = backend.requests().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    assert_eq!(
        backend.requests()[0].header("request-id"),
        Some("2"),
        "probes are never forwarded"
    );
    drop(lp2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_upstreams_broker_settings_no_acknowledged_request_is_lost() {
    // Upstream's Mosquitto: max_inflight_messages 1, i.e. Receive Maximum 1 for
    // publishers. A client that ignores it gets PUBREC 0x97 and its message is discarded;
    // upstream's bridge answered 200 anyway and lost ~45 % of acknowledged requests.
    let broker = Mosquitto::start_with(&["max_inflight_messages 1"]).await;
    let (_c, seen) = collector(&broker, "proxy1/message").await;
    let lp1 = lp1(broker.port, &[(ENV_SUBSCRIBER_PROBE, "false")]).await;
    admitting(&lp1).await;
    let ids = (60_001..=60_300).map(|i| i.to_string()).collect();
    let statuses = send(lp1.url(PATH), ids, 100).await;
    let unanswered: Vec<_> = statuses.iter().filter(|(_, s)| s.is_none()).collect();
    assert!(
        unanswered.is_empty(),
        "every request answered: {unanswered:?}"
    );
    let acknowledged = ok_ids(&statuses);
    let refused = statuses.len() - acknowledged.len();
    let delivered = eventually(
        "acknowledged messages at the subscriber",
        Duration::from_secs(20),
        || {
            let ids: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
            let done = acknowledged.is_subset(&ids);
            async move { done.then_some(ids) }
        },
    )
    .await;
    println!(
        "Receive Maximum 1: {} acknowledged, {refused} refused with 503, {} delivered",
        acknowledged.len(),
        delivered.len()
    );
    assert!(
        acknowledged.len() >= 250,
        "most requests get through a window of 1: {refused} refused"
    );
    let metrics = lp1.metrics().await;
    assert!(
        !metrics.contains("outcome=\"refused\""),
        "the broker never had to refuse a message: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_answers_what_it_took_and_loses_nothing() {
    let broker = Mosquitto::start().await;
    let (_c, seen) = collector(&broker, "proxy1/message").await;
    let dir = tempfile::tempdir().unwrap();
    let mut service = lp1_process(&broker, dir.path(), &[]).await;
    lps_testkit::wait_ready(&service.url(READYZ_PATH), Duration::from_secs(20)).await;
    let load = tokio::spawn(send(
        service.url(PATH),
        (70_001..=72_000).map(|i| i.to_string()).collect(),
        16,
    ));
    eventually("some published", Duration::from_secs(10), || {
        let n = seen.lock().unwrap().len();
        async move { (n >= 100).then_some(()) }
    })
    .await;
    service.terminate().unwrap();
    let status = service.wait(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let results = load.await.unwrap();
    let acknowledged = ok_ids(&results);
    assert!(acknowledged.len() >= 100);
    let seen_now: BTreeSet<String> = seen.lock().unwrap().iter().cloned().collect();
    let missing: Vec<_> = acknowledged.difference(&seen_now).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but never published: {missing:?}"
    );
    println!(
        "SIGTERM under load: {} acknowledged before the stop, all at the subscriber",
        acknowledged.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_legacy_proxy_2_forwards_is_answered_413() {
    let broker = Mosquitto::start().await;
    let (_c, seen) = collector(&broker, "proxy1/message").await;
    let lp1 = lp1(
        broker.port,
        &[
            (ENV_SUBSCRIBER_PROBE, "false"),
            (ENV_MAX_PAYLOAD_BYTES, "200"),
        ],
    )
    .await;
    admitting(&lp1).await;
    let big = format!(r#"{{"id":"070010","body":"{}"}}"#, "x".repeat(300));
    let response = http1_client()
        .post(lp1.url(PATH))
        .header("Request-Id", "1")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"], "payload_too_large");
    assert_eq!(post(&lp1.url(PATH), "2").await.status(), StatusCode::OK);
    eventually("the small one published", Duration::from_secs(5), || {
        let ids = seen.lock().unwrap().clone();
        async move { (ids == ["2"]).then_some(()) }
    })
    .await;
}
