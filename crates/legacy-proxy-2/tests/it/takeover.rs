//! Session takeover and brokers that lack a capability.
//!
//! A second legacy-proxy-2 with the same `SERVICE_NAME` connects while the first is up and
//! holds unacknowledged messages (a rescheduled pod whose old one is not dead yet): the
//! broker moves the sessions to the new one, the old one stops with exit code 3 without
//! reconnecting, nothing acknowledged is lost, and the messages the old one had forwarded
//! but not acknowledged arrive twice, counted at the simulator. A broker whose CONNACK
//! denies shared subscriptions or QoS 2 is refused: not ready, one log line per check,
//! checks spaced by the longest reconnect delay.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use lps_common::config::{
    ENV_MQTT_RECEIVE_MAXIMUM, ENV_MQTT_RECONNECT_MAX_MS, ENV_RETRY_BACKOFF_MS, ENV_SERVICE_NAME,
    ENV_TARGET_URL,
};
use lps_common::wire::{READYZ_PATH, STORE_PATH};
use lps_testkit::embedded::Limited;
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{
    Broker, ChildService, TestServer, assert_never_ready, eventually, http1_client, log_lines,
};
use rast_simulator::model::Model;
use tokio::sync::watch;

use crate::harness::{self, Simulator};

/// Messages in flight per path of the displaced instance.
const WINDOW: usize = 16;

/// In front of the simulator: while `hold` is on, it records each request's id and holds
/// the answer; an even id is forwarded first (the simulator has it, the bridge has no
/// answer yet: after a takeover it arrives again), an odd one only once released (it
/// reaches the simulator only if the broker redelivers it to the new owner).
#[derive(Clone)]
struct Gate {
    sim: String,
    hold: watch::Sender<bool>,
    held: Arc<Mutex<Vec<u64>>>,
    client: reqwest::Client,
}

impl Gate {
    async fn forward(&self, id: &str, body: Bytes) -> StatusCode {
        match self
            .client
            .post(&self.sim)
            .header("Request-Id", id)
            .body(body)
            .send()
            .await
        {
            Ok(r) => StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            Err(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

async fn gate(State(gate): State<Gate>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let number: u64 = id.parse().unwrap_or(0);
    if !*gate.hold.borrow() {
        return gate.forward(&id, body).await;
    }
    gate.held.lock().unwrap().push(number);
    let mut status = None;
    if number % 2 == 0 {
        status = Some(gate.forward(&id, body.clone()).await);
    }
    let mut hold = gate.hold.subscribe();
    let _ = hold.wait_for(|h| !*h).await;
    match status {
        Some(status) => status,
        None => gate.forward(&id, body).await,
    }
}

/// `" as <client id> ("` lines in Mosquitto's log: connections accepted for that id.
fn connections(broker: &Mosquitto, client_id: &str) -> usize {
    broker.log().matches(&format!(" as {client_id} (")).count()
}

fn ids(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_with_the_same_id_takes_over_the_first_stops_with_code_3_and_nothing_is_lost()
 {
    let broker = Mosquitto::start().await;
    let sim = Simulator::start(Model::Zero).await;
    let gate_state = Gate {
        sim: sim.server.url(STORE_PATH),
        hold: watch::Sender::new(false),
        held: Arc::default(),
        client: http1_client(),
    };
    let gate_server = TestServer::start(
        Router::new()
            .route(STORE_PATH, post(gate))
            .with_state(gate_state.clone()),
    )
    .await;
    let target = gate_server.url(STORE_PATH);

    // The first instance, as a process: its exit code and log are what is checked.
    let dir = tempfile::tempdir().unwrap();
    let window = WINDOW.to_string();
    let mut first = lp2_process(
        &broker,
        dir.path(),
        &[
            (ENV_TARGET_URL, &target),
            (ENV_MQTT_RECEIVE_MAXIMUM, &window),
            (ENV_RETRY_BACKOFF_MS, "50"),
        ],
    )
    .await;
    lps_testkit::wait_ready(&first.url(READYZ_PATH), Duration::from_secs(20)).await;
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp1]).await;
    let url = lp1.server.url(STORE_PATH);

    // Traffic through the first instance.
    let mut statuses = harness::send(&url, ids(1_000..1_100), 16).await;
    harness::all_arrive(
        &sim,
        &harness::acknowledged(&statuses),
        Duration::from_secs(20),
    )
    .await;

    // The first instance holds a full window unacknowledged.
    gate_state.hold.send_replace(true);
    statuses.extend(harness::send(&url, ids(2_000..2_040), 40).await);
    eventually(
        "a full window held by the first instance",
        Duration::from_secs(20),
        || {
            let n = gate_state.held.lock().unwrap().len();
            async move { (n >= WINDOW).then_some(()) }
        },
    )
    .await;
    let held: BTreeSet<u64> = gate_state.held.lock().unwrap().iter().copied().collect();
    assert_eq!(held.len(), WINDOW, "held by the first instance: {held:?}");

    // The second instance, same SERVICE_NAME: the broker moves the sessions to it.
    let second = harness::lp2(
        &broker,
        "proxy2-1",
        &target,
        &[(ENV_MQTT_RECEIVE_MAXIMUM, &window)],
    )
    .await;
    first
        .assert_displaced(|| {
            std::fs::read_to_string(dir.path().join("proxy2-1.log")).unwrap_or_default()
        })
        .await;
    gate_state.hold.send_replace(false);
    harness::ready(&[&second]).await;

    // Traffic through the second instance.
    statuses.extend(harness::send(&url, ids(3_000..3_100), 16).await);
    let acknowledged = harness::acknowledged(&statuses);
    assert_eq!(acknowledged.len(), 240, "legacy-proxy-1 acknowledged all");
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(30)).await;
    let duplicates: BTreeSet<u64> = arrivals
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.parse().unwrap())
        .collect();
    let forwarded_before: BTreeSet<u64> = held.iter().copied().filter(|i| i % 2 == 0).collect();
    println!(
        "takeover: {} acknowledged, 0 lost, {} held unacknowledged by the displaced instance, {} duplicates (forwarded by it, redelivered to the new owner): {duplicates:?}",
        acknowledged.len(),
        held.len(),
        duplicates.len()
    );
    assert_eq!(
        duplicates, forwarded_before,
        "exactly the messages the displaced instance forwarded but could not acknowledge arrive twice"
    );
    assert_eq!(
        arrivals.len(),
        acknowledged.len(),
        "nothing arrives that was not acknowledged"
    );

    // No fight: once the displaced instance stopped, nobody came for the ids again. (When
    // the 0x8E is lost, the displaced instance reconnects once before its ownership check
    // stops it, and the new one comes back: at most four connections per id.)
    let ids = ["proxy2-1", "proxy2-1-retry", "proxy2-1-control"];
    let before = ids.map(|id| connections(&broker, id));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = ids.map(|id| connections(&broker, id));
    println!("connections per client id: {settled:?}");
    assert!(
        settled == before && settled.iter().all(|n| (2..=4).contains(n)),
        "{before:?} then {settled:?} connections\n{}",
        broker.log()
    );
    harness::ready(&[&second]).await;
    assert_eq!(
        log_lines(dir.path(), "proxy2-1", "took over the broker session"),
        1,
        "one error line"
    );
    second.stop().await;
}

/// legacy-proxy-2 `proxy2-1` as a process against `broker`, its log in `dir`; `env` added
/// to its environment.
async fn lp2_process(broker: &dyn Broker, dir: &Path, env: &[(&str, &str)]) -> ChildService {
    let mut all = vec![(ENV_SERVICE_NAME, "proxy2-1")];
    all.extend_from_slice(env);
    ChildService::start_with_broker(
        Path::new(env!("CARGO_BIN_EXE_legacy-proxy-2")),
        broker,
        &all,
        dir,
    )
    .await
    .unwrap()
}

/// Starts legacy-proxy-2 as a process against `broker` and asserts it stays not ready,
/// saying why (`capability`) once per check, checks spaced by the longest reconnect delay.
async fn refused(broker: &dyn Broker, capability: &str) {
    let dir = tempfile::tempdir().unwrap();
    let service = lp2_process(
        broker,
        dir.path(),
        &[
            (ENV_TARGET_URL, "http://127.0.0.1:9/x"),
            (ENV_MQTT_RECONNECT_MAX_MS, "500"),
        ],
    )
    .await;
    assert_never_ready(
        &service.url(READYZ_PATH),
        Duration::from_secs(3),
        || async {},
    )
    .await;
    let needle = format!("\"capability\":\"{capability}\"");
    let lines = log_lines(dir.path(), "proxy2-1", &needle);
    println!("{capability}: {lines} refusal lines in 3 s");
    // Each client that needs it (two or three) checks about every 0.5 s: ~20 lines; a
    // check in a loop would write thousands.
    assert!(
        (1..=30).contains(&lines),
        "{lines} lines naming {capability}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_shared_subscriptions_is_refused() {
    refused(&Limited::start(2, false).await, "shared_subscriptions").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_without_qos_2_is_refused() {
    refused(&Mosquitto::start_with(&["max_qos 1"]).await, "qos2").await;
}
