//! Dead letters outlive the broker and legacy-proxy-2, and replay delivers them.

use std::collections::BTreeSet;
use std::time::Duration;

use lps_common::dead_letters;
use lps_common::wire::DEAD_LETTER_TOPIC;
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{Recorder, TestServer, eventually};

use crate::harness;

const PATH: &str = lps_common::wire::STORE_PATH;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_restarts_of_the_broker_and_legacy_proxy_2_and_replay_delivers_them() {
    let mut broker = Mosquitto::start().await;
    // The target rejects everything at first: a 422 cannot succeed by retrying.
    let backend = Recorder::new();
    backend.respond(422, Duration::ZERO);
    let server = TestServer::start(backend.router()).await;
    let target = server.url(PATH);
    let lp2 = harness::lp2(&broker, "proxy2-1", &target, &[]).await;
    let lp1 = harness::lp1(&broker, "proxy1-1", "proxy1/message", &[]).await;
    harness::ready(&[&lp2, &lp1]).await;
    let ids: Vec<String> = (1..=5).map(|i| (6_000_000 + i).to_string()).collect();
    let statuses = harness::send(&lp1.server.url(PATH), ids.clone(), 5).await;
    assert_eq!(harness::acknowledged(&statuses).len(), 5);
    eventually("five dead letters", Duration::from_secs(20), || async {
        (lp2.counter("bridge_dead_lettered_total", &[("reason", "rejected")])
            .await
            >= 5.0)
            .then_some(())
    })
    .await;

    // Every process restarts: legacy-proxy-2, legacy-proxy-1 and the broker.
    lp2.stop().await;
    lp1.stop().await;
    broker.stop().await;
    broker.restart().await;
    let lp2 = harness::lp2(&broker, "proxy2-1", &target, &[]).await;
    harness::ready(&[&lp2]).await;

    let client = harness::publisher(&broker).await;
    let letters = dead_letters::list(&client, DEAD_LETTER_TOPIC, Duration::from_millis(500))
        .await
        .unwrap();
    let listed: BTreeSet<String> = letters
        .iter()
        .filter_map(|l| l.request_id.clone())
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect(), "{letters:?}");
    for letter in &letters {
        assert_eq!(letter.reason, "rejected");
        assert_eq!(letter.source_topic.as_deref(), Some("proxy1/message"));
        assert_eq!(letter.dead_lettered_by.as_deref(), Some("proxy2-1"));
    }

    // The target is fixed; replay sends each one through the chain again.
    backend.respond(200, Duration::ZERO);
    let before = backend.requests().len();
    let report = dead_letters::replay(&client, &letters, DEAD_LETTER_TOPIC)
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 5, "{report:?}");
    eventually(
        "the replayed letters at the target",
        Duration::from_secs(20),
        || {
            let delivered: BTreeSet<String> = backend.requests()[before..]
                .iter()
                .filter_map(|r| r.header("request-id").map(str::to_owned))
                .collect();
            let done = ids.iter().all(|id| delivered.contains(id));
            async move { done.then_some(()) }
        },
    )
    .await;
    let left = dead_letters::list(&client, DEAD_LETTER_TOPIC, Duration::from_millis(500))
        .await
        .unwrap();
    assert!(left.is_empty(), "replayed letters are cleared: {left:?}");
}
