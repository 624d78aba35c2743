//! Keep alive (MQTT v5 §3.1.2.10, §3.2.2.3.14): the broker closes a connection silent for
//! one and a half keep-alive periods (MQTT-3.1.2-22), using its Server Keep Alive instead of
//! the client's when it announces one (MQTT-3.2.2-21); a client that pings stays connected.

use std::time::Duration;

use lps_testkit::mosquitto::Mosquitto;
use tokio::time::Instant;

use crate::wire::{Client, Closed, Connect};
use crate::{Kind, against_both};

/// Connects with Keep Alive `client_keep_alive`, expects CONNACK to announce
/// `server_keep_alive`, then stays silent: the broker must close the connection after one
/// and a half of the keep alive in force, not before one.
async fn silent_client_is_closed(
    port: u16,
    client_keep_alive: u16,
    server_keep_alive: Option<u16>,
) {
    let mut client =
        Client::connect(port, Connect::new("silent").keep_alive(client_keep_alive)).await;
    assert_eq!(
        client.connack.server_keep_alive(),
        server_keep_alive,
        "{:?}",
        client.connack
    );
    let in_force = Duration::from_secs(u64::from(server_keep_alive.unwrap_or(client_keep_alive)));
    let start = Instant::now();
    // Mosquitto checks keep alives on a one-second clock: allow two seconds more.
    let closed = client
        .closed(in_force * 3 / 2 + Duration::from_secs(2))
        .await;
    let after = start.elapsed();
    assert!(
        after >= in_force,
        "closed after {after:?}, keep alive {in_force:?}"
    );
    // DISCONNECT 0x8D (Keep Alive timeout) before closing is allowed, not required.
    assert!(
        matches!(closed, Closed::Eof | Closed::Disconnect(0x8D)),
        "{closed:?}"
    );
}

against_both!(a_silent_client_is_disconnected_after_one_and_a_half_keep_alives);
async fn a_silent_client_is_disconnected_after_one_and_a_half_keep_alives(port: u16, _: Kind) {
    // As LPS configures them, neither broker announces a Server Keep Alive.
    silent_client_is_closed(port, 1, None).await;
}

against_both!(a_client_that_pings_stays_connected);
async fn a_client_that_pings_stays_connected(port: u16, _: Kind) {
    let mut client = Client::connect(port, Connect::new("pinger").keep_alive(1)).await;
    // Twice the one and a half keep alives a silent client gets.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(client.ping().await, []);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

/// A broker's Server Keep Alive replaces the client's: a client asking for 60 s is held to
/// the broker's 1 s. Neither broker sends one as LPS configures it, so each is started with
/// the setting that makes it: `max_keepalive` for Mosquitto, `server_keep_alive` for the
/// embedded broker's engine (mqtt5's `BrokerConfig`, which `lps-broker` leaves unset).
mod the_server_keep_alive_replaces_the_clients {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        use mqtt5::broker::MqttBroker;
        use mqtt5::broker::config::{BrokerConfig, StorageBackend, StorageConfig};

        let mut config = BrokerConfig::new()
            .with_bind_address(([127, 0, 0, 1], 0))
            .with_storage(StorageConfig::new().with_backend(StorageBackend::Memory))
            .with_sys_topics_enabled(false);
        config.server_keep_alive = Some(Duration::from_secs(1));
        let mut broker = MqttBroker::with_config(config).await.expect("broker");
        let port = broker.local_addr().expect("bound").port();
        let shutdown = broker.shutdown_handle();
        let running = tokio::spawn(async move { broker.run().await });
        silent_client_is_closed(port, 60, Some(1)).await;
        shutdown.shutdown();
        running.await.expect("broker task").expect("broker run");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mosquitto() {
        let broker = Mosquitto::start_with(&["max_keepalive 1"]).await;
        silent_client_is_closed(broker.port, 60, Some(1)).await;
    }
}
