//! legacy-proxy-1 against a scripted broker: answers a real broker cannot be made to give
//! on demand (PUBREC 0x97, a handshake that never completes, a Maximum QoS of 0). In
//! every case the bridge must answer 503, never 200, and count why.

use std::time::{Duration, Instant};

use http::StatusCode;
use lps_common::config::{
    ENV_MQTT_MAX_INFLIGHT, ENV_MQTT_QOS, ENV_MQTT_RECONNECT_MAX_MS, ENV_PUBLISH_TIMEOUT_MS,
    ENV_SUBSCRIBER_PROBE,
};
use lps_testkit::scripted::{Qos2, Script, ScriptedBroker};

use super::{Lp1, PATH, admitting, lp1, post};

const SETTINGS: [(&str, &str); 2] = [
    (ENV_SUBSCRIBER_PROBE, "false"),
    (ENV_MQTT_RECONNECT_MAX_MS, "300"),
];

async fn start(script: Script, extra: &[(&str, &str)]) -> (ScriptedBroker, Lp1) {
    let broker = ScriptedBroker::start(script).await;
    let env: Vec<_> = SETTINGS.iter().chain(extra).copied().collect();
    let lp1 = lp1(lps_testkit::Broker::port(&broker), &env).await;
    admitting(&lp1).await;
    (broker, lp1)
}

/// Asserts a 503 with `Retry-After` and the JSON error.
async fn assert_unavailable(response: reqwest::Response) {
    let status = response.status();
    let retry_after = response.headers().get("retry-after").cloned();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "broker_unavailable", "{body}");
}

/// The PUBLISHes on the traffic topic (not the capability check or ownership record).
fn traffic(broker: &ScriptedBroker) -> Vec<lps_testkit::scripted::Received> {
    let mut published = broker.published();
    published.retain(|p| p.topic == "proxy1/message");
    published
}

/// `mqtt_publishes_total{outcome="<outcome>"}` from `/metrics`, by name and label (0 when
/// absent).
async fn publishes(lp1: &Lp1, outcome: &str) -> u64 {
    let text = lp1.metrics().await;
    lps_testkit::metric(&text, "mqtt_publishes_total", &[("outcome", outcome)])
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubrec_0x97_is_answered_503_never_200() {
    // A window of 2, at the broker (Receive Maximum) and in the bridge: a refused message
    // whose in-flight slot leaked, in the client or the bridge, would stall every request
    // after the second until its publish timeout.
    let script = Script {
        qos2: Qos2::Refuse(0x97),
        receive_maximum: Some(2),
        ..Script::default()
    };
    let settings = [
        (ENV_MQTT_MAX_INFLIGHT, "2"),
        (ENV_PUBLISH_TIMEOUT_MS, "2000"),
    ];
    let (broker, lp1) = start(script, &settings).await;
    let url = lp1.url(PATH);
    for i in 0..20 {
        assert_unavailable(post(&url, &i.to_string()).await).await;
    }
    assert_eq!(publishes(&lp1, "refused").await, 20);
    assert_eq!(publishes(&lp1, "delivered").await, 0);
    let published = traffic(&broker);
    assert_eq!(published.len(), 20, "each request published once");
    assert!(
        published
            .iter()
            .all(|p| p.qos == 2 && p.topic == "proxy1/message")
    );

    broker.set_qos2(Qos2::Complete);
    assert_eq!(post(&url, "4242").await.status(), StatusCode::OK);
    assert_eq!(publishes(&lp1, "delivered").await, 1);
    let last: serde_json::Value =
        serde_json::from_slice(&traffic(&broker).last().unwrap().payload).unwrap();
    assert_eq!(last["request_id"], "4242");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_completes_is_answered_503_within_the_publish_timeout() {
    let script = Script {
        qos2: Qos2::Silent,
        ..Script::default()
    };
    let (broker, lp1) = start(script, &[(ENV_PUBLISH_TIMEOUT_MS, "500")]).await;
    let started = Instant::now();
    let response = post(&lp1.url(PATH), "1").await;
    let elapsed = started.elapsed();
    assert_unavailable(response).await;
    assert!(
        elapsed < Duration::from_secs(5),
        "answered after {elapsed:?}"
    );
    assert_eq!(publishes(&lp1, "indeterminate").await, 1);
    assert_eq!(traffic(&broker).len(), 1, "the message did go out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_granting_less_than_the_qos_asked_for_is_refused_and_answered_503() {
    // (CONNACK Maximum QoS, MQTT_QOS): the client would send at the lower QoS, so no
    // handshake would prove the broker kept a message. The bridge checks before admitting
    // and never does.
    for (maximum_qos, qos) in [(0, "2"), (1, "2"), (0, "1")] {
        let script = Script {
            maximum_qos: Some(maximum_qos),
            ..Script::default()
        };
        let broker = ScriptedBroker::start(script).await;
        let env: Vec<_> = SETTINGS
            .iter()
            .copied()
            .chain([(ENV_MQTT_QOS, qos)])
            .collect();
        let lp1 = lp1(lps_testkit::Broker::port(&broker), &env).await;
        lps_testkit::eventually("a capability check", Duration::from_secs(10), || {
            let n = broker.published().len();
            async move { (n > 0).then_some(()) }
        })
        .await;
        let response = post(&lp1.url(PATH), "1").await;
        assert_unavailable(response).await;
        let ready = lps_testkit::http1_client()
            .get(lp1.url(lps_common::wire::READYZ_PATH))
            .send()
            .await
            .unwrap();
        assert_eq!(
            ready.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "Maximum QoS {maximum_qos}, MQTT_QOS={qos}: not ready"
        );
        assert_eq!(publishes(&lp1, "not_admitted").await, 1);
        let published = broker.published();
        assert!(traffic(&broker).is_empty(), "no traffic: {published:?}");
        assert!(
            published
                .iter()
                .filter(|p| p.topic == lps_common::mqtt::CAPABILITY_TOPIC)
                .all(|p| p.qos == maximum_qos),
            "capability checks go out at the granted QoS: {published:?}"
        );
    }
}
