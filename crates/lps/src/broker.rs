//! The embedded MQTT v5 broker, for machines without Mosquitto: `lps service
//! embedded-broker` runs it as a process of its own, so faults can kill it like any other
//! service.
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

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use mqtt5::broker::MqttBroker;
use mqtt5::broker::config::{BrokerConfig, StorageBackend, StorageConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Runs the broker on `127.0.0.1:port` with its state in `data` until `shutdown` fires.
pub async fn run(port: u16, data: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let storage = StorageConfig::new()
        .with_backend(StorageBackend::File)
        .with_base_dir(data.clone())
        .with_persistence(true)
        .with_max_queued_messages_per_client(10_000_000)
        .with_max_queued_bytes_per_client(4 << 30);
    let config = BrokerConfig::new()
        .with_bind_address(SocketAddr::from(([127, 0, 0, 1], port)))
        .with_storage(storage)
        .with_sys_topics_enabled(false);
    let mut broker = MqttBroker::with_config(config)
        .await
        .context("starting the embedded broker")?;
    info!(addr = ?broker.local_addr(), data = %data.display(), "embedded MQTT broker listening");
    let handle = broker.shutdown_handle();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        handle.shutdown();
    });
    broker.run().await.context("embedded broker")?;
    info!("embedded MQTT broker stopped");
    Ok(())
}

/// `lps service embedded-broker`: port from `HTTP_PORT`-style `MQTT_PORT`, data folder from
/// `BROKER_DATA`, logging like the services; SIGTERM/SIGINT stop it.
pub fn main() -> std::process::ExitCode {
    use lps_common::config::{Env, ProcessEnv};
    let env = Env::new(&ProcessEnv);
    let port = env
        .number("MQTT_PORT", 1883u16, 1, u16::MAX)
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    let data = PathBuf::from(env.string("BROKER_DATA", "broker-data"));
    let telemetry = lps_common::telemetry::TelemetryConfig::from_env(&env, "embedded-broker")
        .unwrap_or_else(|e| lps_common::exit_on_config_error(&e));
    lps_common::service::main(&telemetry, async move {
        run(port, data, lps_common::server::shutdown_on_signals()).await
    })
}
