//! legacy-proxy-1 killed and restarted while thousands of messages wait behind a stuck
//! backend: ready again within seconds, and its probes never reach a foreign subscriber.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::StatusCode;
use lps_common::config::{
    ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_RECEIVE_MAXIMUM, ENV_SERVICE_NAME,
    ENV_SHUTDOWN_GRACE_SECS, ENV_TARGET_URL,
};
use lps_common::mqtt::mqtt5::{Message, MqttClient, QoS, SubscribeOptions};
use lps_common::net::free_port;
use lps_common::wire::{PROBE_PROPERTY, READYZ_PATH};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{ChildService, Recorder, TestServer, http1_client, wait_ready};

const PATH: &str = lps_common::wire::STORE_PATH;

/// A subscriber that does not speak the probe, like upstream's legacy_proxy_2: a plain
/// subscription to every traffic and retry topic. It records what it receives.
async fn foreign_subscriber(port: u16) -> (MqttClient, Arc<Mutex<Vec<Message>>>) {
    let client = MqttClient::new(format!("foreign-{}", free_port()));
    client
        .connect(&format!("mqtt://127.0.0.1:{port}"))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    for filter in [
        "+/message",
        "+/retry/message",
        "$share/legacy_proxy/+/message",
    ] {
        let sink = seen.clone();
        client
            .subscribe_with_options(
                filter,
                SubscribeOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscribeOptions::default()
                },
                move |m| sink.lock().unwrap().push(m),
            )
            .await
            .unwrap();
    }
    (client, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_during_a_backlog_of_thousands_it_is_ready_within_seconds() {
    let broker = Mosquitto::start().await;
    let (_foreign, foreign_seen) = foreign_subscriber(broker.port).await;
    // The backend takes every request and answers none for a minute: legacy-proxy-2 holds
    // its window, and everything else queues in its session at the broker.
    let backend = Recorder::new();
    backend.respond(200, Duration::from_secs(60));
    let backend_server = TestServer::start(backend.router()).await;
    let port = broker.port.to_string();
    let env: HashMap<String, String> = [
        (ENV_MQTT_HOST, "127.0.0.1".to_owned()),
        (ENV_MQTT_PORT, port.clone()),
        (ENV_SERVICE_NAME, "proxy2-1".to_owned()),
        (ENV_TARGET_URL, backend_server.url(PATH)),
        (ENV_MQTT_RECEIVE_MAXIMUM, "8".to_owned()),
        (ENV_SHUTDOWN_GRACE_SECS, "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = legacy_proxy_2::Config::from_lookup(&env).unwrap();
    let lp2 = TestServer::serve(|l, s| legacy_proxy_2::serve(config, l, s)).await;

    let dir = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_legacy-proxy-1"));
    let lp1_env = [
        (ENV_MQTT_HOST, "127.0.0.1"),
        (ENV_MQTT_PORT, port.as_str()),
        (ENV_SERVICE_NAME, "proxy1-1"),
    ];
    let mut lp1 = ChildService::start(binary, &lp1_env, dir.path())
        .await
        .unwrap();
    wait_ready(&lp1.url(READYZ_PATH), Duration::from_secs(20)).await;
    let url = lp1.url(PATH);
    let client = http1_client();
    let acknowledged = futures_util::stream::iter(0..3000)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .post(url)
                    .header("Request-Id", (5_000_000 + i).to_string())
                    .body(r#"{"id":"070010","body":"alarm"}"#)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK)
            }
        })
        .buffer_unordered(64)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    assert!(acknowledged >= 2900, "{acknowledged} of 3000 acknowledged");
    assert!(
        backend.requests().len() <= 16,
        "the backend holds legacy-proxy-2's window; the rest is a backlog"
    );

    lp1.kill().await;
    let restarted_at = Instant::now();
    let lp1 = ChildService::start(binary, &lp1_env, dir.path())
        .await
        .unwrap();
    wait_ready(&lp1.url(READYZ_PATH), Duration::from_secs(5)).await;
    let took = restarted_at.elapsed();
    let status = http1_client()
        .post(lp1.url(PATH))
        .header("Request-Id", "42")
        .body(r#"{"id":"070010","body":"alarm"}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK, "it admits requests again");
    println!(
        "legacy-proxy-1 SIGKILLed with a backlog of ~{} messages: ready again {took:?} after the restart began",
        acknowledged - backend.requests().len()
    );
    let foreign = foreign_seen.lock().unwrap();
    let probes: Vec<_> = foreign
        .iter()
        .filter(|m| {
            m.topic.starts_with("lps/")
                || m.properties
                    .user_properties
                    .iter()
                    .any(|(k, _)| k == PROBE_PROPERTY)
        })
        .collect();
    assert!(
        probes.is_empty(),
        "a subscriber that does not speak the probe never receives one: {probes:?}"
    );
    assert!(
        foreign.len() >= acknowledged,
        "the foreign subscriber saw the traffic itself ({} messages)",
        foreign.len()
    );
    drop(lp2);
}
