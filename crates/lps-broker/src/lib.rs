//! The embedded MQTT v5 broker, for machines without Mosquitto: `lps service
//! embedded-broker` runs it as a process of its own, so faults can kill it like any other
//! service; the test kit runs it in-process to test the bridges against it.
//!
//! It is the `mqtt5` crate's broker (pinned with the client), chosen by running the
//! bridges' tests against it: research on this machine found it delivers QoS 2 exactly once
//! through `$share` groups, honours Receive Maximum (pushing back on publishers), resumes
//! sessions with their queued messages (also for a group whose only member was offline),
//! redelivers unacknowledged QoS 2 with DUP, and keeps its file storage across restarts.
//! rmqtt lost QoS 2 messages until reconfigured and refuses `$share` by default; rumqttd
//! failed exactly-once.
//!
//! Settings that differ from the crate's defaults, each for a reason: it listens on
//! 127.0.0.1 only (the default is every interface), stores its state in the run folder
//! (the default is a folder in the working directory), turns `$SYS` topics off, and lifts
//! the per-client queue limits (10,000 messages / 64 MiB, beyond which the oldest are
//! dropped) to 10 million messages / 4 GiB, so that a backlog is never dropped in an
//! experiment.
//!
//! The crate itself carries a local patch (`vendor/mqtt5`, the same 0.49.0 through
//! `[patch.crates-io]`; `vendor/mqtt5/LPS-PATCH.md` has the diff): the published broker adds
//! `x-mqtt-client-id` and `x-mqtt-sender` user properties to every message it forwards,
//! which MQTT v5 forbids (user properties go through unaltered and in order) and which tells
//! every subscriber every publisher's client id; it has no setting for that, so the patch
//! removes it. It also makes the broker send DISCONNECT with a reason on a bad topic alias,
//! and keeps a QoS 1/2 message for an online subscriber in the subscriber's stored queue
//! (written behind within 250 ms) instead of an in-memory lane: the published broker lost
//! the whole backlog of an online subscriber whose Receive Maximum window was full on a
//! SIGKILL, however long ago it had acknowledged it (`tests/it/crash.rs`).
//! `tests/it` checks the broker against the MQTT v5 specification side by side with
//! Mosquitto (README.adoc has the table).

#![warn(missing_docs, unreachable_pub)]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use mqtt5::broker::MqttBroker;
use mqtt5::broker::config::{BrokerConfig, StorageBackend, StorageConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A running embedded broker.
pub struct Broker {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Broker {
    /// Starts a broker on `addr` (port 0 picks a free one) with its state in `data`.
    pub async fn start(addr: SocketAddr, data: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let storage = StorageConfig::new()
            .with_backend(StorageBackend::File)
            .with_base_dir(data.clone())
            .with_persistence(true)
            .with_max_queued_messages_per_client(10_000_000)
            .with_max_queued_bytes_per_client(4 << 30);
        let config = BrokerConfig::new()
            .with_bind_address(addr)
            .with_storage(storage)
            .with_sys_topics_enabled(false);
        let mut broker = MqttBroker::with_config(config)
            .await
            .context("starting the embedded broker")?;
        let addr = broker
            .local_addr()
            .context("the embedded broker has no address")?;
        info!(%addr, data = %data.display(), "embedded MQTT broker listening");
        let shutdown = CancellationToken::new();
        let handle = broker.shutdown_handle();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            handle.shutdown();
        });
        let task = tokio::spawn(async move { broker.run().await.context("embedded broker") });
        Ok(Self {
            addr,
            shutdown,
            task,
        })
    }

    /// Stops the broker and waits until it is gone.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = self.task.await.context("embedded broker task")?;
        info!("embedded MQTT broker stopped");
        result
    }
}

/// Runs the broker on `127.0.0.1:port` with its state in `data` until `shutdown` fires.
pub async fn run(port: u16, data: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = Broker::start(SocketAddr::from(([127, 0, 0, 1], port)), data).await?;
    shutdown.cancelled().await;
    broker.stop().await
}
