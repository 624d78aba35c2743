//! The `broker` scenario: raw QoS 2 publish → shared-subscription delivery through a
//! broker, with as many publishers and subscribers as the NG chain has bridges. This is
//! the ceiling of the NG chain: every alarm crosses the broker exactly like this.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use lps_common::mqtt::mqtt5::{
    ConnectOptions, MqttClient, PublishOptions, PublishResult, QoS, SubscribeOptions,
};

/// One broker run.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    /// `mqtt://127.0.0.1:PORT`.
    pub address: String,
    /// Publishing clients (the legacy-proxy-1s).
    pub publishers: usize,
    /// Subscribing clients in one shared group (the legacy-proxy-2s).
    pub subscribers: usize,
    /// Publishes in flight per publisher (the broker's Receive Maximum bounds it too).
    pub window: usize,
    /// Receive Maximum each subscriber advertises (legacy-proxy-2's default: 32).
    pub receive_maximum: u16,
    /// Payload size, bytes.
    pub payload: usize,
    /// Not measured, run first.
    pub warmup: Duration,
    /// Measured.
    pub duration: Duration,
}

/// What a broker run measured.
#[derive(Debug, Clone, Default)]
pub struct BrokerResult {
    /// Publishes completed (PUBCOMP) in the window.
    pub published: u64,
    /// Messages delivered to the subscribers in the window.
    pub delivered: u64,
    /// Publishes refused or failed (whole run).
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Publish → PUBCOMP latencies in the window, microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Length of the window.
    pub elapsed: Duration,
}

async fn client(address: &str, id: String, receive_maximum: u16) -> anyhow::Result<MqttClient> {
    let options = ConnectOptions::new(id)
        .with_clean_start(true)
        .with_receive_maximum(receive_maximum);
    let client = MqttClient::with_options(options);
    client
        .connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    Ok(client)
}

/// Runs `spec` against the broker at `spec.address`.
pub async fn run(spec: &BrokerSpec) -> anyhow::Result<BrokerResult> {
    let run = format!("{:x}", crate::records::now_us());
    let topic_root = format!("lps-bench/{run}");
    let measuring = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let subscribers = subscribe(spec, &run, &topic_root, &measuring, &delivered).await?;
    let mut publishers = Vec::new();
    for i in 0..spec.publishers {
        publishers.push(client(&spec.address, format!("lps-bench-pub-{run}-{i}"), 65_535).await?);
    }

    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let failures = Arc::new(Failures::default());
    let payload = vec![b'x'; spec.payload];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, publisher) in publishers.iter().enumerate() {
        for _ in 0..spec.window {
            let publishing = Publishing {
                publisher: publisher.clone(),
                topic: format!("{topic_root}/p{i}"),
                payload: payload.clone(),
                measure_from,
                end,
                failures: failures.clone(),
            };
            tasks.spawn(publishing.run());
        }
    }
    tokio::time::sleep_until(measure_from.into()).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep_until(end.into()).await;
    measuring.store(false, Ordering::Relaxed);
    let mut result = BrokerResult {
        delivered: delivered.load(Ordering::Relaxed),
        elapsed: spec.duration,
        ..BrokerResult::default()
    };
    for (published, latencies) in tasks.join_all().await {
        result.published += published;
        result.latencies_us.extend(latencies);
    }
    result.latencies_us.sort_unstable();
    result.errors = failures.count.load(Ordering::Relaxed);
    result.first_error = failures
        .first
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    for client in publishers.iter().chain(&subscribers) {
        let _ = client.disconnect().await;
    }
    Ok(result)
}

/// Connects `spec.subscribers` clients into one shared group on `topic_root/+`; each
/// counts into `delivered` what arrives while `measuring`.
async fn subscribe(
    spec: &BrokerSpec,
    run: &str,
    topic_root: &str,
    measuring: &Arc<AtomicBool>,
    delivered: &Arc<AtomicU64>,
) -> anyhow::Result<Vec<MqttClient>> {
    let mut subscribers = Vec::new();
    for i in 0..spec.subscribers {
        let client = client(
            &spec.address,
            format!("lps-bench-sub-{run}-{i}"),
            spec.receive_maximum,
        )
        .await?;
        let (measuring, delivered) = (measuring.clone(), delivered.clone());
        client
            .subscribe_with_options(
                format!("$share/lps-bench/{topic_root}/+"),
                SubscribeOptions {
                    qos: QoS::ExactlyOnce,
                    ..SubscribeOptions::default()
                },
                move |_message| {
                    if measuring.load(Ordering::Relaxed) {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )
            .await
            .context("subscribing")?;
        subscribers.push(client);
    }
    Ok(subscribers)
}

/// Publishes that failed in a run (all publishers together), and the first failure.
#[derive(Default)]
struct Failures {
    count: AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

/// One slot of a publisher's window: QoS 2 publishes one after the other until `end`.
struct Publishing {
    publisher: MqttClient,
    topic: String,
    payload: Vec<u8>,
    /// Publishes sent from here and complete by `end` are measured.
    measure_from: Instant,
    end: Instant,
    failures: Arc<Failures>,
}

impl Publishing {
    /// The measured publishes and their publish → PUBCOMP latencies, microseconds.
    async fn run(self) -> (u64, Vec<u32>) {
        let mut latencies = Vec::new();
        let mut published = 0u64;
        while Instant::now() < self.end {
            let sent = Instant::now();
            let options = PublishOptions {
                qos: QoS::ExactlyOnce,
                ..PublishOptions::default()
            };
            let outcome = self
                .publisher
                .publish_with_options(self.topic.as_str(), self.payload.clone(), options)
                .await;
            match outcome {
                Ok(PublishResult::Sent(_)) => {
                    let done = Instant::now();
                    if sent >= self.measure_from && done <= self.end {
                        published += 1;
                        let us = done.duration_since(sent).as_micros();
                        latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                    }
                }
                other => {
                    self.failures.count.fetch_add(1, Ordering::Relaxed);
                    self.failures
                        .first
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .get_or_insert_with(|| format!("{other:?}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        (published, latencies)
    }
}
