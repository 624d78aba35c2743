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
