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
    let mut publishers = Vec::new();
    for i in 0..spec.publishers {
        publishers.push(client(&spec.address, format!("lps-bench-pub-{run}-{i}"), 65_535).await?);
    }

    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let payload = vec![b'x'; spec.payload];
    let mut tasks = tokio::task::JoinSet::new();
    for (i, publisher) in publishers.iter().enumerate() {
        for _ in 0..spec.window {
            let (publisher, payload) = (publisher.clone(), payload.clone());
            let topic = format!("{topic_root}/p{i}");
            let (errors, first_error) = (errors.clone(), first_error.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut published = 0u64;
                while Instant::now() < end {
                    let sent = Instant::now();
                    let options = PublishOptions {
                        qos: QoS::ExactlyOnce,
                        ..PublishOptions::default()
                    };
                    let outcome = publisher
                        .publish_with_options(topic.as_str(), payload.clone(), options)
                        .await;
                    match outcome {
                        Ok(PublishResult::Sent(_)) => {
                            let done = Instant::now();
                            if sent >= measure_from && done <= end {
                                published += 1;
                                let us = done.duration_since(sent).as_micros();
                                latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
                            }
                        }
                        other => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert_with(|| format!("{other:?}"));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (published, latencies)
            });
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
    result.errors = errors.load(Ordering::Relaxed);
    result.first_error = first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    for client in publishers.iter().chain(&subscribers) {
        let _ = client.disconnect().await;
    }
    Ok(result)
}
