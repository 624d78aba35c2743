//! Outages far longer than the backoff cap, a message that keeps failing among good ones,
//! and broker crashes during legacy-proxy-1's replay: nothing acknowledged is lost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use http::{HeaderMap, StatusCode};
use lps_common::config::{
    ENV_MQTT_RECEIVE_MAXIMUM, ENV_MQTT_RECONNECT_MAX_MS, ENV_REPLAY_WINDOW_MS,
    ENV_RETRY_BACKOFF_MAX_MS, ENV_RETRY_BACKOFF_MS,
};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{Broker, TestServer, eventually};
use rast_simulator::model::Model;

use crate::harness::{self, Simulator};

const PATH: &str = lps_common::wire::STORE_PATH;
/// A short backoff cap, so that an outage of ten times the cap is a few seconds.
const SHORT_BACKOFF: [(&str, &str); 2] = [
    (ENV_RETRY_BACKOFF_MS, "50"),
    (ENV_RETRY_BACKOFF_MAX_MS, "200"),
];
const OUTAGE: Duration = Duration::from_secs(3);

/// Sends to `url` until `running` turns false: `concurrency` requests at a time, then a
/// pause of `pause`. Ids start at `first`.
fn load(
    url: String,
    first: u64,
    concurrency: u64,
    pause: Duration,
    running: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(String, StatusCode)>> {
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        let mut next = first;
        while running.load(Ordering::Acquire) {
            let batch: Vec<String> = (next..next + concurrency).map(|i| i.to_string()).collect();
            next += concurrency;
            statuses.extend(harness::send(&url, batch, concurrency as usize).await);
            tokio::time::sleep(pause).await;
        }
        statuses
    })
}

/// ars-comp-2 stops for [`OUTAGE`] (15 times the backoff cap) while load runs; every
/// acknowledged id arrives once it is back, and nothing is dead-lettered.
async fn outage(broker: &dyn Broker, what: &str, concurrency: u64, pause: Duration) {
    let sim = Simulator::start(Model::Zero).await;
    let sim_url = sim.server.url(PATH);
    let ac2 = harness::ars_comp_2(&sim_url).await;
    let ac2_addr = ac2.addr;
    let target = ac2.url(PATH);
    let lp2a = harness::lp2(broker, "proxy2-1", &target, &SHORT_BACKOFF).await;
    let lp2b = harness::lp2(broker, "proxy2-2", &target, &SHORT_BACKOFF).await;
    let lp1 = harness::lp1(broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2a, &lp2b, &lp1]).await;

    let running = Arc::new(AtomicBool::new(true));
    let sender = load(
        lp1.server.url(PATH),
        2_000_000,
        concurrency,
        pause,
        running.clone(),
    );
    eventually("traffic flowing", Duration::from_secs(20), || async {
        (sim.arrivals().len() >= 10).then_some(())
    })
    .await;
    ac2.stop().await;
    tokio::time::sleep(OUTAGE).await;
    let retried = lp2a.counter("bridge_retried_total", &[]).await
        + lp2b.counter("bridge_retried_total", &[]).await;
    let _ac2 = harness::ars_comp_2_on(ac2_addr, &sim_url).await;
    let before = sim.arrivals().len();
    eventually("traffic flowing again", Duration::from_secs(20), || async {
        (sim.arrivals().len() >= before + 10).then_some(())
    })
    .await;
    running.store(false, Ordering::Release);
    let statuses = sender.await.unwrap();
    let acknowledged = harness::acknowledged(&statuses);
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(30)).await;
    let duplicates = arrivals.values().filter(|n| **n > 1).count();
    println!(
        "outage of {OUTAGE:?} (15x the backoff cap) under {what}: {} acknowledged, {} retries, all arrived, {duplicates} duplicates",
        acknowledged.len(),
        retried
    );
    assert!(
        retried > 0.0,
        "the outage was seen: messages went to the retry path"
    );
    let metrics = lp2a.metrics().await + &lp2b.metrics().await;
    assert!(
        !metrics.contains("bridge_dead_lettered_total{"),
        "a transient failure is never dead-lettered: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fifteen_times_the_backoff_cap_loses_nothing_under_steady_load() {
    outage(&Mosquitto::start().await, "steady load", 8, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fifteen_times_the_backoff_cap_loses_nothing_under_a_trickle() {
    outage(
        &Mosquitto::start().await,
        "a trickle",
        1,
        Duration::from_millis(100),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fifteen_times_the_backoff_cap_loses_nothing_with_the_embedded_broker() {
    outage(
        &lps_testkit::embedded::Embedded::start().await,
        "steady load, embedded broker",
        8,
        Duration::ZERO,
    )
    .await;
}

/// A target that answers 500 to one request id and 200 to every other, recording ids.
#[derive(Clone, Default)]
struct Picky {
    seen: Arc<Mutex<Vec<String>>>,
}

const POISON_ID: &str = "999999";

async fn picky(State(picky): State<Picky>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let failing = id == POISON_ID;
    picky.seen.lock().unwrap().push(id);
    if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_always_failing_message_does_not_hold_back_a_thousand_good_ones() {
    let broker = Mosquitto::start().await;
    let target = Picky::default();
    let server = TestServer::start(
        axum::Router::new()
            .fallback(axum::routing::post(picky))
            .with_state(target.clone()),
    )
    .await;
    // The failing message waits a minute between attempts, far longer than the test may
    // take: if its wait held back the others (their acknowledgements leave in order, and
    // the window is 32), the thousand could not arrive.
    let lp2 = harness::lp2(
        &broker,
        "proxy2-1",
        &server.url(PATH),
        &[
            (ENV_RETRY_BACKOFF_MS, "60000"),
            (ENV_RETRY_BACKOFF_MAX_MS, "60000"),
            (ENV_MQTT_RECEIVE_MAXIMUM, "32"),
        ],
    )
    .await;
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2, &lp1]).await;
    let url = lp1.server.url(PATH);
    let poison = harness::send(&url, vec![POISON_ID.to_owned()], 1).await;
    assert_eq!(poison[0].1, StatusCode::OK);
    eventually(
        "the failing message tried",
        Duration::from_secs(10),
        || async {
            target
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|id| id == POISON_ID)
                .then_some(())
        },
    )
    .await;
    let good: Vec<String> = (1..=1000).map(|i| (3_000_000 + i).to_string()).collect();
    let statuses = harness::send(&url, good.clone(), 32).await;
    assert_eq!(harness::acknowledged(&statuses).len(), 1000);
    let expected: BTreeSet<String> = good.into_iter().collect();
    eventually(
        "the thousand good ones at the target while the failing one waits out its backoff",
        Duration::from_secs(30),
        || {
            let seen: BTreeSet<String> = target.seen.lock().unwrap().iter().cloned().collect();
            let done = expected.is_subset(&seen);
            async move { done.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        lp2.counter("bridge_retry_waiting", &[]).await,
        1.0,
        "the failing message is on the retry path, waiting"
    );
    assert_eq!(lp2.counter("bridge_forwarded_total", &[]).await, 1000.0);
    let metrics = lp2.metrics().await;
    assert!(
        !metrics.contains("bridge_dead_lettered_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_twice_during_the_replay_loses_no_acknowledged_request() {
    let mut broker = Mosquitto::start().await;
    let sim = Simulator::start(Model::Zero).await;
    let target = sim.server.url(PATH);
    let fast = (ENV_MQTT_RECONNECT_MAX_MS, "300");
    let lp2a = harness::lp2(&broker, "proxy2-1", &target, &[fast]).await;
    let lp2b = harness::lp2(&broker, "proxy2-2", &target, &[fast]).await;
    // A long window makes the replay long enough to kill the broker in the middle of it.
    let lp1 = harness::lp1(
        &broker,
        "proxy1-1",
        "proxy1/message",
        &[fast, (ENV_REPLAY_WINDOW_MS, "10000")],
    )
    .await;
    harness::ready(&[&lp2a, &lp2b, &lp1]).await;
    let running = Arc::new(AtomicBool::new(true));
    let sender = load(
        lp1.server.url(PATH),
        4_000_000,
        16,
        Duration::ZERO,
        running.clone(),
    );
    eventually("traffic flowing", Duration::from_secs(20), || async {
        (sim.arrivals().len() >= 1000).then_some(())
    })
    .await;
    broker.kill().await;
    broker.restart().await;
    let pending = eventually(
        "legacy-proxy-1 replaying",
        Duration::from_secs(20),
        || async {
            let pending = lp1.counter("mqtt_replay_pending", &[]).await;
            (pending > 0.0).then_some(pending)
        },
    )
    .await;
    broker.kill().await;
    broker.restart().await;
    // Recovery after the second kill can take tens of seconds on a loaded machine (seen:
    // the readiness wait or the traffic wait below ran out at 20 s and 30 s in 2 of 3
    // runs of CI, also before this round's changes); what this test guards is that
    // nothing acknowledged is lost, so it waits longer rather than timing the recovery.
    harness::ready_within(&[&lp2a, &lp2b, &lp1], Duration::from_secs(90)).await;
    let before = sim.arrivals().len();
    eventually("traffic flowing again", Duration::from_secs(90), || async {
        (sim.arrivals().len() >= before + 200).then_some(())
    })
    .await;
    running.store(false, Ordering::Release);
    let statuses = sender.await.unwrap();
    let acknowledged = harness::acknowledged(&statuses);
    let arrivals = harness::all_arrive(&sim, &acknowledged, Duration::from_secs(60)).await;
    let duplicates = arrivals.values().filter(|n| **n > 1).count();
    println!(
        "broker SIGKILL twice, the second with {pending} messages still to replay: {} acknowledged, 0 lost, {duplicates} duplicates, {} replayed",
        acknowledged.len(),
        lp1.counter("mqtt_replayed_total", &[]).await
    );
}
