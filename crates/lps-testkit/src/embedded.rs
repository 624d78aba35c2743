//! The embedded broker (`lps-broker`) in-process on an ephemeral port, with its storage in
//! a temporary folder.

use std::net::SocketAddr;

/// An embedded broker; stopped when dropped (or with [`Embedded::stop`]).
pub struct Embedded {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    broker: Option<lps_broker::Broker>,
    _dir: tempfile::TempDir,
}

impl Embedded {
    /// Starts a broker on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = lps_broker::Broker::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            dir.path().join("data"),
        )
        .await
        .expect("start the embedded broker");
        Self {
            port: broker.addr.port(),
            broker: Some(broker),
            _dir: dir,
        }
    }

    /// Stops the broker.
    pub async fn stop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop().await.expect("stop the embedded broker");
        }
    }
}

impl crate::Broker for Embedded {
    fn port(&self) -> u16 {
        self.port
    }
}

/// A real MQTT v5 broker (the embedded one, memory storage) whose CONNACK denies what the
/// bridges need: Maximum QoS below 2 and/or Shared Subscription Available = 0 (Mosquitto
/// 2.0 can lower its Maximum QoS, `max_qos`, but cannot turn shared subscriptions off).
/// Stopped when dropped.
pub struct Limited {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    shutdown: Option<mqtt5::broker::BrokerShutdownHandle>,
}

impl Limited {
    /// Starts a broker on `127.0.0.1:0` advertising `maximum_qos` and, when
    /// `shared_subscriptions` is false, Shared Subscription Available = 0.
    pub async fn start(maximum_qos: u8, shared_subscriptions: bool) -> Self {
        use mqtt5::broker::MqttBroker;
        use mqtt5::broker::config::{BrokerConfig, StorageBackend, StorageConfig};
        let mut config = BrokerConfig::new()
            .with_bind_address(SocketAddr::from(([127, 0, 0, 1], 0)))
            .with_storage(StorageConfig::new().with_backend(StorageBackend::Memory))
            .with_sys_topics_enabled(false)
            .with_maximum_qos(maximum_qos);
        config.shared_subscription_available = shared_subscriptions;
        let mut broker = MqttBroker::with_config(config)
            .await
            .expect("start the limited broker");
        let port = broker.local_addr().expect("its address").port();
        let shutdown = broker.shutdown_handle();
        tokio::spawn(async move {
            let _ = broker.run().await;
        });
        Self {
            port,
            shutdown: Some(shutdown),
        }
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        if let Some(handle) = self.shutdown.take() {
            handle.shutdown();
        }
    }
}

impl crate::Broker for Limited {
    fn port(&self) -> u16 {
        self.port
    }
}
