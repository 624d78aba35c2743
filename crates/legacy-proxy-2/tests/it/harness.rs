//! In-process bridges and chain pieces on ephemeral ports, plus MQTT helpers.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lps_common::Registry;
use lps_common::mqtt::mqtt5::{MqttClient, QoS, SubscribeOptions};
use lps_common::server::Protocols;
use lps_common::upstream::{Upstream, UpstreamConfig, parse_targets};
use lps_testkit::Broker;
use lps_testkit::TestServer;
use rast_simulator::journal::{self, Journal};
use rast_simulator::model::Model;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// A bridge running in this process.
pub struct Running {
    pub server: TestServer,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Stops the bridge the way SIGTERM would and waits for it.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// The bridge's `/metrics` text.
    pub async fn metrics(&self) -> String {
        lps_testkit::http1_client()
            .get(self.server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One counter's value from `/metrics`.
    pub async fn counter(&self, line_prefix: &str) -> f64 {
        metric(&self.metrics().await, line_prefix)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The value of the first metric line starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// legacy-proxy-1 `name` publishing to `topic`.
pub async fn lp1(broker: &dyn Broker, name: &str, topic: &str, extra: &[(&str, &str)]) -> Running {
    let mut pairs = broker_env(broker);
    pairs.push(("SERVICE_NAME".into(), name.into()));
    pairs.push(("MQTT_TOPIC".into(), topic.into()));
    pairs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = legacy_proxy_1::Config::from_lookup(&env_map(pairs)).unwrap();
    let mut registry = Registry::default();
    let bridge = legacy_proxy_1::Bridge::new(config, &mut registry)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(bridge.clone().run(stop.clone()));
    let server = TestServer::start(legacy_proxy_1::app(bridge, registry, 1 << 20)).await;
    Running {
        server,
        stop,
        task: Some(task),
    }
}

/// legacy-proxy-2 `name` forwarding to `target`.
pub async fn lp2(broker: &dyn Broker, name: &str, target: &str, extra: &[(&str, &str)]) -> Running {
    let mut pairs = broker_env(broker);
    pairs.push(("SERVICE_NAME".into(), name.into()));
    pairs.push(("TARGET_URL".into(), target.into()));
    pairs.push(("RETRY_BACKOFF_MS".into(), "50".into()));
    pairs.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let config = legacy_proxy_2::Config::from_lookup(&env_map(pairs)).unwrap();
    let mut registry = Registry::default();
    let bridge = legacy_proxy_2::Bridge::new(config, &mut registry)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(bridge.clone().run(stop.clone(), Duration::from_secs(10)));
    let server = TestServer::start(legacy_proxy_2::app(&bridge, registry, 1 << 20)).await;
    Running {
        server,
        stop,
        task: Some(task),
    }
}

/// Waits until `/readyz` of each service answers 200.
pub async fn ready(services: &[&Running]) {
    for service in services {
        let url = service.server.url("/readyz");
        lps_testkit::eventually("bridge ready", Duration::from_secs(20), || {
            let url = url.clone();
            async move {
                let response = lps_testkit::http1_client().get(url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
    }
}

/// A relay (ars-comp-2 or ars-comp-1 app) in front of `target`.
pub async fn relay(
    app: fn(Arc<Upstream>, Registry, usize) -> axum::Router,
    target: &str,
    http2: bool,
) -> TestServer {
    let mut config = UpstreamConfig::for_targets(parse_targets(target).unwrap());
    config.http2 = http2;
    let mut registry = Registry::default();
    let upstream = Arc::new(Upstream::new(&config, &mut registry).unwrap());
    TestServer::start(app(upstream, registry, 1 << 20)).await
}

/// The simulator with a journal in a temporary folder.
pub struct Simulator {
    pub server: TestServer,
    pub dir: tempfile::TempDir,
}

impl Simulator {
    pub async fn start(model: Model) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _writer) = Journal::open(dir.path()).unwrap();
        let sim = rast_simulator::Simulator::new(model, journal);
        let server = TestServer::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            rast_simulator::app(sim, Registry::default(), 1 << 20),
            Protocols::Http1Only,
        )
        .await;
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
    let client = MqttClient::new(format!("collector-{}", lps_testkit::mosquitto::free_port()));
    client
        .connect(&format!("mqtt://127.0.0.1:{}", broker.port()))
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    client
        .subscribe_with_options(
            filter,
            SubscribeOptions {
                qos: QoS::ExactlyOnce,
                ..SubscribeOptions::default()
            },
            move |m| {
                sink.lock().unwrap().push(m);
            },
        )
        .await
        .unwrap();
    (client, seen)
}

/// A raw MQTT publisher.
pub async fn publisher(broker: &dyn Broker) -> MqttClient {
    let client = MqttClient::new(format!("publisher-{}", lps_testkit::mosquitto::free_port()));
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
    let config = UpstreamConfig::for_targets(parse_targets(target).unwrap());
    let mut registry = Registry::default();
    let upstream = Arc::new(Upstream::new(&config, &mut registry).unwrap());
    TestServer::start_on(
        addr,
        ars_comp_2::app(upstream, registry, 1 << 20),
        Protocols::default(),
    )
    .await
}

/// Sends `ids` to legacy-proxy-1 at `url`, `concurrency` at a time; returns the status of each.
pub async fn send(
    url: &str,
    ids: impl IntoIterator<Item = String>,
    concurrency: usize,
) -> Vec<(String, http::StatusCode)> {
    use futures_util::StreamExt;
    let client = lps_testkit::http1_client();
    futures_util::stream::iter(ids)
        .map(|id| {
            let client = client.clone();
            let url = url.to_owned();
            async move {
                let status = client
                    .post(url)
                    .header("Request-Id", &id)
                    .body(message())
                    .send()
                    .await
                    .map_or(http::StatusCode::BAD_GATEWAY, |r| r.status());
                (id, status)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
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
