//! In-process bridges and chain pieces on ephemeral ports, plus MQTT helpers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lps_common::config::{
    ENV_LOG_DIR, ENV_MQTT_TOPIC, ENV_RETRY_BACKOFF_MS, ENV_SERVICE_NAME, ENV_TARGET_URL,
};
use lps_common::mqtt::mqtt5::MqttClient;
use lps_common::wire::READYZ_PATH;
use lps_testkit::{Broker, TestServer};
use rast_simulator::journal;
use rast_simulator::model::Model;

fn env_map(pairs: Vec<(String, String)>) -> HashMap<String, String> {
    pairs.into_iter().collect()
}

fn broker_env(broker: &dyn Broker) -> Vec<(String, String)> {
    broker
        .env()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// A bridge running in this process, through its own `serve`.
pub struct Running {
    pub server: TestServer,
}

impl Running {
    /// Stops the bridge the way SIGTERM would and waits for it.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// The bridge's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.server.metrics().await
    }

    /// One series of `/metrics` by name and labels (0 when absent).
    pub async fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        lps_testkit::metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }
}

/// legacy-proxy-1 `name` publishing to `topic`.
pub async fn lp1(broker: &dyn Broker, name: &str, topic: &str, extra: &[(&str, &str)]) -> Running {
    let mut pairs = broker_env(broker);
    pairs.push((ENV_SERVICE_NAME.into(), name.into()));
    pairs.push((ENV_MQTT_TOPIC.into(), topic.into()));
    pairs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = legacy_proxy_1::Config::from_lookup(&env_map(pairs)).unwrap();
    let server = TestServer::serve(|l, s| legacy_proxy_1::serve(config, l, s)).await;
    Running { server }
}

/// legacy-proxy-2 `name` forwarding to `target`.
pub async fn lp2(broker: &dyn Broker, name: &str, target: &str, extra: &[(&str, &str)]) -> Running {
    let mut pairs = broker_env(broker);
    pairs.push((ENV_SERVICE_NAME.into(), name.into()));
    pairs.push((ENV_TARGET_URL.into(), target.into()));
    pairs.push((ENV_RETRY_BACKOFF_MS.into(), "50".into()));
    pairs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = legacy_proxy_2::Config::from_lookup(&env_map(pairs)).unwrap();
    let server = TestServer::serve(|l, s| legacy_proxy_2::serve(config, l, s)).await;
    Running { server }
}

/// Waits until `/readyz` of each service answers 200.
pub async fn ready(services: &[&Running]) {
    ready_within(services, Duration::from_secs(20)).await;
}

/// [`ready`] with a longer wait.
pub async fn ready_within(services: &[&Running], within: Duration) {
    for service in services {
        lps_testkit::wait_ready(&service.server.url(READYZ_PATH), within).await;
    }
}

/// ars-comp-2 in front of `target`, through its own `serve`.
pub async fn ars_comp_2(target: &str) -> TestServer {
    ars_comp_2_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
}

/// ars-comp-1 in front of `target`, through its own `serve`.
pub async fn ars_comp_1(target: &str) -> TestServer {
    let config =
        ars_comp_1::Config::from_lookup(&env_map(vec![(ENV_TARGET_URL.into(), target.into())]))
            .unwrap();
    TestServer::serve(|l, s| ars_comp_1::serve(config, l, s)).await
}

/// The simulator with its journal in a temporary folder, through its own `serve`.
pub struct Simulator {
    pub server: TestServer,
    pub dir: tempfile::TempDir,
}

impl Simulator {
    pub async fn start(model: Model) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = env_map(vec![(ENV_LOG_DIR.into(), dir.path().display().to_string())]);
        let args = rast_simulator::Args {
            model: "zero".to_owned(),
            corr_max: 0,
            workers: 4,
            service_ms: 35.0,
        };
        let mut config = rast_simulator::Config::new(&env, &args).unwrap();
        config.model = model;
        let server = TestServer::serve(|l, s| rast_simulator::serve(config, l, s)).await;
        Self { server, dir }
    }

    /// How often each uid arrived (status 200).
    pub fn arrivals(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for record in
            journal::read_ledger(&self.dir.path().join(journal::LEDGER_FILE)).unwrap_or_default()
        {
            if record.status == 200 {
                *counts.entry(record.uid).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// A raw MQTT client collecting what arrives on `filter`.
pub async fn collect(
    broker: &dyn Broker,
    filter: &str,
) -> (
    MqttClient,
    Arc<std::sync::Mutex<Vec<lps_common::mqtt::mqtt5::Message>>>,
) {
    lps_testkit::collector(broker, filter, Some).await
}

/// A raw MQTT publisher.
pub async fn publisher(broker: &dyn Broker) -> MqttClient {
    let client = MqttClient::new(format!("publisher-{}", lps_common::net::free_port()));
    client
        .connect(&format!("mqtt://127.0.0.1:{}", broker.port()))
        .await
        .unwrap();
    client
}

/// An alarm for ars-comp-1.
pub fn alarm() -> String {
    r#"{"phone":"015142611148","branch":"2001","headnumber":"8023","triggertime":"2025-01-31T12:00:00Z"}"#.to_owned()
}

/// A legacy message for legacy-proxy-1 / ars-comp-2.
pub fn message() -> String {
    r#"{"id":"070010","body":"alarm"}"#.to_owned()
}

/// ars-comp-2 on `addr` in front of `target` (to bring a stopped one back on its port).
pub async fn ars_comp_2_on(addr: SocketAddr, target: &str) -> TestServer {
    let config =
        ars_comp_2::Config::from_lookup(&env_map(vec![(ENV_TARGET_URL.into(), target.into())]))
            .unwrap();
    TestServer::serve_on(addr, |l, s| ars_comp_2::serve(config, l, s)).await
}

/// Sends `ids` to legacy-proxy-1 at `url`, `concurrency` at a time; returns the status of each.
pub async fn send(
    url: &str,
    ids: impl IntoIterator<Item = String>,
    concurrency: usize,
) -> Vec<(String, http::StatusCode)> {
    let requests = ids.into_iter().map(|id| (url.to_owned(), id));
    lps_testkit::post_ids(requests, message(), concurrency)
        .await
        .into_iter()
        .map(|(id, status)| (id, status.unwrap_or(http::StatusCode::BAD_GATEWAY)))
        .collect()
}

/// The ids answered 200.
pub fn acknowledged(statuses: &[(String, http::StatusCode)]) -> std::collections::BTreeSet<String> {
    statuses
        .iter()
        .filter(|(_, s)| s.is_success())
        .map(|(id, _)| id.clone())
        .collect()
}

/// Waits until every id of `expected` arrived at `sim`; returns the arrivals.
pub async fn all_arrive(
    sim: &Simulator,
    expected: &std::collections::BTreeSet<String>,
    within: Duration,
) -> BTreeMap<String, usize> {
    lps_testkit::eventually("every acknowledged id at the simulator", within, || {
        let arrivals = sim.arrivals();
        let done = expected.iter().all(|id| arrivals.contains_key(id));
        async move { done.then_some(arrivals) }
    })
    .await
}
