//! Faults: the broker killed, a legacy-proxy-2 killed, the downstream down, graceful stops.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::StatusCode;
use lps_common::config::{
    ENV_MAX_ATTEMPTS, ENV_MQTT_HOST, ENV_MQTT_PORT, ENV_MQTT_RECEIVE_MAXIMUM,
    ENV_MQTT_RECONNECT_MAX_MS, ENV_RETRY_BACKOFF_MAX_MS, ENV_SERVICE_NAME, ENV_TARGET_URL,
};
use lps_common::wire::{ATTEMPT_PROPERTY, DEAD_LETTER_REASON_PROPERTY, STORE_PATH};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{ChildService, Recorder, TestServer, eventually};
use rast_simulator::model::Model;

use crate::harness::{self, Simulator};

const FAST_RECONNECT: (&str, &str) = (ENV_MQTT_RECONNECT_MAX_MS, "500");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_load_loses_no_acknowledged_request() {
    let mut broker = Mosquitto::start().await;
    let sim = Simulator::start(Model::Zero).await;
    let target = sim.server.url(STORE_PATH);
    let lp2a = harness::lp2(&broker, "proxy2-1", &target, &[FAST_RECONNECT]).await;
    let lp2b = harness::lp2(&broker, "proxy2-2", &target, &[FAST_RECONNECT]).await;
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[FAST_RECONNECT]).await;
    harness::ready(&[&lp2a, &lp2b, &lp1]).await;
    let url = lp1.server.url(STORE_PATH);

    // Load in the background while the broker is killed and restarted.
    let running = Arc::new(AtomicBool::new(true));
    let load = {
        let running = running.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            let mut next = 0u64;
            while running.load(Ordering::Acquire) {
                let batch: Vec<String> = (next..next + 16)
                    .map(|i| (500_000 + i).to_string())
                    .collect();
                next += 16;
                statuses.extend(harness::send(&url, batch, 16).await);
            }
            statuses
        })
    };
    eventually("traffic flowing", Duration::from_secs(20), || async {
        (sim.arrivals().len() > 200).then_some(())
    })
    .await;
    broker.kill().await;
    // While it is down, the bridge says so at once.
    let during = harness::send(&url, vec!["1".to_owned()], 1).await;
    assert_eq!(during[0].1, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restart().await;
    harness::ready(&[&lp2a, &lp2b, &lp1]).await;
    let before = sim.arrivals().len();
    eventually("traffic flowing again", Duration::from_secs(30), || async {
        (sim.arrivals().len() > before + 200).then_some(())
    })
    .await;
    running.store(false, Ordering::Release);
    let statuses = load.await.unwrap();

    let acknowledged = harness::acknowledged(&statuses);
    let refused = statuses
        .iter()
        .filter(|(_, s)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(30)).await;
    let duplicates = arrivals.values().filter(|n| **n > 1).count();
    println!(
        "broker kill: {} acknowledged, {refused} answered 503, {} arrived, {duplicates} duplicates, replayed {}",
        acknowledged.len(),
        arrivals.len(),
        lp1.counter("mqtt_replayed_total", &[]).await
    );
    assert!(
        lp1.counter("mqtt_connected", &[]).await >= 1.0,
        "legacy-proxy-1 reconnected by itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_legacy_proxy_2_gets_its_unacknowledged_messages_after_a_restart() {
    let broker = Mosquitto::start().await;
    let backend = Recorder::new();
    backend.respond(200, Duration::from_secs(3));
    let backend_server = TestServer::start(backend.router()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = broker.port.to_string();
    let target = backend_server.url(STORE_PATH);
    let env = [
        (ENV_MQTT_HOST, "127.0.0.1"),
        (ENV_MQTT_PORT, port.as_str()),
        (ENV_SERVICE_NAME, "proxy2-victim"),
        (ENV_TARGET_URL, target.as_str()),
        (ENV_MQTT_RECEIVE_MAXIMUM, "8"),
    ];
    let binary = Path::new(env!("CARGO_BIN_EXE_legacy-proxy-2"));
    let mut victim = ChildService::start(binary, &env, dir.path()).await.unwrap();
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp1]).await;

    let ids: Vec<String> = (1..=20).map(|i| (700 + i).to_string()).collect();
    let statuses = harness::send(&lp1.server.url(STORE_PATH), ids, 20).await;
    let acknowledged = harness::acknowledged(&statuses);
    assert_eq!(acknowledged.len(), 20);
    // The victim holds messages in flight (the backend is slow) when it is killed.
    eventually(
        "messages in flight at the victim",
        Duration::from_secs(10),
        || {
            let seen = backend.requests().len();
            async move { (seen >= 4).then_some(()) }
        },
    )
    .await;
    victim.kill().await;
    backend.respond(200, Duration::ZERO);
    let _restarted = ChildService::start(binary, &env, dir.path()).await.unwrap();
    eventually(
        "every acknowledged id at the backend",
        Duration::from_secs(30),
        || {
            let seen: BTreeSet<String> = backend
                .requests()
                .iter()
                .filter_map(|r| r.header("request-id").map(str::to_owned))
                .collect();
            let done = acknowledged.is_subset(&seen);
            async move { done.then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_downstream_down_messages_retry_and_arrive_once_it_is_back() {
    downstream_down(&Mosquitto::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_downstream_down_messages_retry_and_arrive_once_it_is_back_with_the_embedded_broker()
 {
    downstream_down(&lps_testkit::embedded::Embedded::start().await).await;
}

async fn downstream_down(broker: &dyn lps_testkit::Broker) {
    let sim = Simulator::start(Model::Zero).await;
    let sim_url = sim.server.url(STORE_PATH);
    let ac2 = harness::ars_comp_2(&sim_url).await;
    let ac2_addr: SocketAddr = ac2.addr;
    let target = ac2.url(STORE_PATH);
    // While the target is down the retry path paces its trials up to the backoff cap;
    // a short cap makes the recovery quick.
    let cap = [(ENV_RETRY_BACKOFF_MAX_MS, "500")];
    let lp2a = harness::lp2(broker, "proxy2-1", &target, &cap).await;
    let lp2b = harness::lp2(broker, "proxy2-2", &target, &cap).await;
    let lp1 = harness::lp1(broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2a, &lp2b, &lp1]).await;

    ac2.stop().await;
    let ids: Vec<String> = (1..=30).map(|i| (800 + i).to_string()).collect();
    let statuses = harness::send(&lp1.server.url(STORE_PATH), ids, 10).await;
    let acknowledged = harness::acknowledged(&statuses);
    assert_eq!(
        acknowledged.len(),
        30,
        "the broker takes them while the downstream is down"
    );
    eventually(
        "messages on the retry path",
        Duration::from_secs(20),
        || async {
            (lp2a.counter("bridge_retried_total", &[]).await
                + lp2b.counter("bridge_retried_total", &[]).await
                >= 30.0)
                .then_some(())
        },
    )
    .await;
    assert!(sim.arrivals().is_empty());
    let _ac2 = harness::ars_comp_2_on(ac2_addr, &sim_url).await;
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(30)).await;
    assert_eq!(arrivals.len(), 30);
    let dead = lp2a.metrics().await + &lp2b.metrics().await;
    assert!(
        !dead.contains("bridge_dead_lettered_total{"),
        "nothing dead-lettered: {dead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_attempts_a_message_is_dead_lettered() {
    dead_letters(&Mosquitto::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_max_attempts_a_message_is_dead_lettered_with_the_embedded_broker() {
    dead_letters(&lps_testkit::embedded::Embedded::start().await).await;
}

async fn dead_letters(broker: &dyn lps_testkit::Broker) {
    let closed = lps_testkit::ClosedPort::new();
    let target = closed.url(STORE_PATH);
    let (_collector, dead_letters) = harness::collect(broker, "legacy_proxy/dead_letter/+").await;
    let lp2 = harness::lp2(
        broker,
        "proxy2-1",
        &target,
        &[(ENV_MAX_ATTEMPTS, "3"), (ENV_RETRY_BACKOFF_MAX_MS, "200")],
    )
    .await;
    let lp1 = harness::lp1(broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2, &lp1]).await;
    let ids: Vec<String> = (1..=5).map(|i| (900 + i).to_string()).collect();
    let statuses = harness::send(&lp1.server.url(STORE_PATH), ids, 5).await;
    assert_eq!(harness::acknowledged(&statuses).len(), 5);
    let letters = eventually("five dead letters", Duration::from_secs(20), || {
        let letters = dead_letters.lock().unwrap().clone();
        async move { (letters.len() >= 5).then_some(letters) }
    })
    .await;
    for letter in &letters {
        let props = &letter.properties.user_properties;
        let reason = props
            .iter()
            .find(|(k, _)| k == DEAD_LETTER_REASON_PROPERTY)
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        assert!(
            reason.starts_with("max_attempts: gave up after 3 attempts"),
            "{reason}"
        );
        assert!(
            props.iter().any(|(k, v)| k == ATTEMPT_PROPERTY && v == "3"),
            "{props:?}"
        );
        let payload: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
        assert!(
            payload["request_id"].as_str().unwrap().starts_with("90"),
            "original payload kept"
        );
    }
    assert_eq!(
        lp2.counter("bridge_retried_total", &[]).await,
        10.0,
        "two retries for each of five"
    );
    assert_eq!(
        lp2.counter("bridge_dead_lettered_total", &[("reason", "max_attempts")])
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stops_of_both_bridges_under_load_lose_nothing() {
    let broker = Mosquitto::start().await;
    let sim = Simulator::start(Model::Fixed {
        workers: 4,
        service: Duration::from_millis(20),
    })
    .await;
    let target = sim.server.url(STORE_PATH);
    let lp2 = harness::lp2(
        &broker,
        "proxy2-1",
        &target,
        &[(ENV_MQTT_RECEIVE_MAXIMUM, "8")],
    )
    .await;
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2, &lp1]).await;
    let url = lp1.server.url(STORE_PATH);
    let ids: Vec<String> = (1..=200).map(|i| (1000 + i).to_string()).collect();
    let load = tokio::spawn(async move { harness::send(&url, ids, 16).await });
    eventually("some delivered", Duration::from_secs(10), || async {
        (sim.arrivals().len() >= 20).then_some(())
    })
    .await;
    // Stop the subscriber mid-stream: it finishes what it holds, acknowledges, leaves.
    lp2.stop().await;
    let statuses = load.await.unwrap();
    let acknowledged = harness::acknowledged(&statuses);
    assert_eq!(
        acknowledged.len(),
        200,
        "the broker keeps taking messages for the stopped member's session"
    );
    // Stop the publisher too, then bring a subscriber back under the same name.
    lp1.stop().await;
    let _lp2 = harness::lp2(&broker, "proxy2-1", &target, &[]).await;
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(30)).await;
    let duplicates = arrivals.values().filter(|n| **n > 1).count();
    assert_eq!(
        duplicates, 0,
        "a graceful stop acknowledges what it finished"
    );
}
