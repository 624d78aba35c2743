//! Poison payloads and the in-flight window.

use std::time::{Duration, Instant};

use lps_common::config::{ENV_MAX_PAYLOAD_BYTES, ENV_MQTT_RECEIVE_MAXIMUM};
use lps_common::mqtt::mqtt5::{PublishOptions, QoS};
use lps_common::wire::{DEAD_LETTER_REASON_PROPERTY, SOURCE_TOPIC_PROPERTY, STORE_PATH};
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{Recorder, TestServer, eventually};
use rast_simulator::model::Model;

use crate::harness::{self, Simulator};

fn qos2() -> PublishOptions {
    PublishOptions {
        qos: QoS::ExactlyOnce,
        ..PublishOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_payloads_are_dead_lettered_with_a_reason_and_the_bridge_keeps_working() {
    poison(&Mosquitto::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_payloads_are_dead_lettered_with_a_reason_and_the_bridge_keeps_working_with_the_embedded_broker()
 {
    poison(&lps_testkit::embedded::Embedded::start().await).await;
}

async fn poison(broker: &dyn lps_testkit::Broker) {
    let sim = Simulator::start(Model::Zero).await;
    let (_collector, dead_letters) = harness::collect(broker, "legacy_proxy/dead_letter/+").await;
    let lp2 = harness::lp2(
        broker,
        "proxy2-1",
        &sim.server.url(STORE_PATH),
        &[(ENV_MAX_PAYLOAD_BYTES, "1024")],
    )
    .await;
    harness::ready(&[&lp2]).await;
    let publisher = harness::publisher(broker).await;
    let huge = format!(
        r#"{{"id":"1","body":"{}","request_id":"5"}}"#,
        "x".repeat(2000)
    );
    let poison: [(&[u8], &str); 5] = [
        (b"not json at all", "not_json"),
        (b"[1, 2, 3]", "not_json"),
        (br#"{"id":"1","body":"x"}"#, "no_request_id"),
        (
            br#"{"id":"1","body":"x","request_id":"abc"}"#,
            "no_request_id",
        ),
        (huge.as_bytes(), "too_large"),
    ];
    for (payload, _) in &poison {
        publisher
            .publish_with_options("proxy9/message", payload.to_vec(), qos2())
            .await
            .unwrap();
    }
    publisher
        .publish_with_options(
            "proxy9/message",
            br#"{"id":"1","body":"x","request_id":"77"}"#.to_vec(),
            qos2(),
        )
        .await
        .unwrap();
    eventually(
        "the valid message forwarded",
        Duration::from_secs(10),
        || async { sim.arrivals().contains_key("77").then_some(()) },
    )
    .await;
    let letters = eventually("five dead letters", Duration::from_secs(10), || {
        let letters = dead_letters.lock().unwrap().clone();
        async move { (letters.len() >= 5).then_some(letters) }
    })
    .await;
    assert_eq!(letters.len(), poison.len());
    // Handled concurrently, so dead letters may come in any order: match them by payload,
    // which also shows the original payload is kept.
    for (payload, reason) in &poison {
        let letter = letters
            .iter()
            .find(|l| &l.payload[..] == *payload)
            .unwrap_or_else(|| panic!("no dead letter with the original payload for {reason}"));
        let props = &letter.properties.user_properties;
        let why = props
            .iter()
            .find(|(k, _)| k == DEAD_LETTER_REASON_PROPERTY)
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        assert!(why.starts_with(reason), "{why} should start with {reason}");
        assert!(
            props
                .iter()
                .any(|(k, v)| k == SOURCE_TOPIC_PROPERTY && v == "proxy9/message"),
            "{props:?}"
        );
    }
    assert_eq!(
        lp2.counter("bridge_dead_lettered_total", &[("reason", "not_json")])
            .await,
        2.0
    );
    assert_eq!(lp2.counter("bridge_forwarded_total", &[]).await, 1.0);
}

/// Delivers `count` messages through one legacy-proxy-2 with `receive_maximum` to a
/// backend taking `delay` per request; returns the time it took.
async fn deliver(receive_maximum: &str, count: usize, delay: Duration) -> Duration {
    let broker = Mosquitto::start().await;
    let backend = Recorder::new();
    backend.respond(200, delay);
    let server = TestServer::start(backend.router()).await;
    let lp2 = harness::lp2(
        &broker,
        "proxy2-1",
        &server.url("/x"),
        &[(ENV_MQTT_RECEIVE_MAXIMUM, receive_maximum)],
    )
    .await;
    harness::ready(&[&lp2]).await;
    let publisher = harness::publisher(&broker).await;
    let started = Instant::now();
    for i in 0..count {
        let payload = format!(r#"{{"id":"1","body":"x","request_id":"{}"}}"#, 100 + i);
        publisher
            .publish_with_options("proxy1/message", payload.into_bytes(), qos2())
            .await
            .unwrap();
    }
    eventually(
        "every message forwarded",
        Duration::from_secs(60),
        || async {
            (lp2.counter("bridge_forwarded_total", &[]).await >= count as f64).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    let mut ids: Vec<String> = backend
        .requests()
        .iter()
        .filter_map(|r| r.header("request-id").map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "every message delivered once");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_1_and_32_both_deliver_everything() {
    let delay = Duration::from_millis(20);
    let one = deliver("1", 40, delay).await;
    let many = deliver("32", 40, delay).await;
    println!(
        "40 messages, backend 20 ms each: Receive Maximum 1 took {one:?}, 32 took {many:?} ({:.1}x)",
        one.as_secs_f64() / many.as_secs_f64()
    );
}
