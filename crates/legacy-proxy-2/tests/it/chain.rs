//! The NG chain end to end: ars-comp-1 ×3 → legacy-proxy-1 ×3 → broker →
//! legacy-proxy-2 ×3 → ars-comp-2 → rast-simulator, with Mosquitto and with the embedded
//! broker.

use std::collections::BTreeSet;
use std::time::Duration;

use ars_comp_1::SIMPLE_PATH;
use http::StatusCode;
use lps_common::config::ENV_USE_HTTP_2;
use lps_common::wire::STORE_PATH;
use lps_testkit::embedded::Embedded;
use lps_testkit::mosquitto::Mosquitto;
use lps_testkit::{Broker, eventually, ok_ids, post_ids};
use rast_simulator::model::Model;

use crate::harness::{self, Simulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mosquitto_every_acknowledged_request_arrives_exactly_once_and_the_load_is_shared() {
    chain(&Mosquitto::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_embedded_broker_every_acknowledged_request_arrives_exactly_once_and_the_load_is_shared()
 {
    chain(&Embedded::start().await).await;
}

async fn chain(broker: &dyn Broker) {
    let sim = Simulator::start(Model::Zero).await;
    let ac2 = harness::ars_comp_2(&sim.server.url(STORE_PATH)).await;
    let target = ac2.url(STORE_PATH);
    let mut lp2s = Vec::new();
    for i in 1..=3 {
        lp2s.push(
            harness::lp2(
                broker,
                &format!("proxy2-{i}"),
                &target,
                &[(ENV_USE_HTTP_2, "true")],
            )
            .await,
        );
    }
    let mut lp1s = Vec::new();
    let mut entries = Vec::new();
    for i in 1..=3 {
        let lp1 = harness::lp1(
            broker,
            &format!("proxy1-{i}"),
            &format!("proxy{i}/message"),
            &[],
        )
        .await;
        entries.push(harness::ars_comp_1(&lp1.server.url(STORE_PATH)).await);
        lp1s.push(lp1);
    }
    harness::ready(&lp2s.iter().chain(&lp1s).collect::<Vec<_>>()).await;

    let requests = (0..1000).map(|i| (entries[i % 3].url(SIMPLE_PATH), (10_001 + i).to_string()));
    let statuses = post_ids(requests, harness::alarm(), 32).await;
    let acknowledged = ok_ids(&statuses);
    assert_eq!(
        acknowledged.len(),
        1000,
        "every request acknowledged: {:?}",
        statuses.iter().find(|(_, s)| *s != Some(StatusCode::OK))
    );

    let arrivals = eventually("all 1000 at the simulator", Duration::from_secs(30), || {
        let arrivals = sim.arrivals();
        async move { (arrivals.len() >= 1000).then_some(arrivals) }
    })
    .await;
    let arrived: BTreeSet<String> = arrivals.keys().cloned().collect();
    assert_eq!(
        arrived, acknowledged,
        "the simulator saw exactly the acknowledged ids"
    );
    let duplicates: Vec<_> = arrivals.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "duplicates without any fault: {duplicates:?}"
    );

    let mut shares = Vec::new();
    for lp2 in &lp2s {
        shares.push(lp2.counter("bridge_forwarded_total", &[]).await);
    }
    println!("forwarded per legacy-proxy-2: {shares:?}");
    assert_eq!(shares.iter().sum::<f64>(), 1000.0);
    for share in &shares {
        assert!(
            *share >= 200.0,
            "every legacy-proxy-2 forwards a fair share: {shares:?}"
        );
    }
    for lp2 in lp2s {
        lp2.stop().await;
    }
}
