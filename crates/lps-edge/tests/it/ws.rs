//! MQTT over WebSocket through the edge into a real Mosquitto.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lps_common::config::{ENV_WS_ENABLED, ENV_WS_MAX_CONNECTIONS};
use lps_common::wire::HEALTHZ_PATH;
use lps_testkit::mosquitto::Mosquitto;
use mqtt5::{ConnectOptions, MqttClient, PublishResult};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{self, Edge, MqttReader, mqtt};

/// How long the soak test publishes at 100 msg/s. The seed ran 60 s
/// (`EDGE_SOAK_SECS=60 cargo test -p lps-edge --test it soak`); CI runs 5.
fn soak_secs() -> u64 {
    std::env::var("EDGE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// A direct (TCP) subscriber to `filter` on `broker`, collecting (topic, payload).
async fn subscriber(
    broker: &Mosquitto,
    filter: &str,
) -> (MqttClient, Arc<Mutex<Vec<(String, Vec<u8>)>>>) {
    lps_testkit::collector(broker, filter, |m| Some((m.topic, m.payload.to_vec()))).await
}

async fn wait_for<T>(what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The seed's client run: an MQTT v5 client over WebSocket publishes 100 msg/s at QoS 2
/// through the edge; every message arrives in order, the connection never drops (one
/// upgrade, no close), and keep-alive works across a silence longer than 1.5 keep-alives
/// (the broker would drop a client whose PINGREQs did not get through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_a_real_mqtt5_client_publishes_100_per_second_through_the_edge_without_a_drop() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (_sub, seen) = subscriber(&broker, "edge/soak").await;
    let client = MqttClient::new("soak-device");
    let options = ConnectOptions::new("soak-device").with_keep_alive(Duration::from_secs(1));
    client
        .connect_with_options(&edge.ws_url(), options)
        .await
        .expect("connect over WebSocket");
    let count = soak_secs() * 100;
    let start = tokio::time::Instant::now();
    for i in 0..count {
        // 100 msg/s on a fixed schedule, as the seed's client (sleep 10 ms per message).
        tokio::time::sleep_until(start + Duration::from_millis(10 * i)).await;
        let result = client
            .publish_qos2("edge/soak", format!("Payload {i}"))
            .await
            .expect("publish");
        assert!(
            matches!(result, PublishResult::Sent(_)),
            "message {i}: {result:?}"
        );
    }
    // Silence for 2.5 keep-alives: only PINGREQ/PINGRESP cross the edge.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let last = client.publish_qos2("edge/soak", "last").await.unwrap();
    assert!(
        matches!(last, PublishResult::Sent(_)),
        "after the silence: {last:?}"
    );
    let all = wait_for(
        "every message at the subscriber",
        Duration::from_secs(10),
        || {
            let seen = seen.lock().unwrap();
            (seen.len() as u64 > count).then(|| seen.clone())
        },
    )
    .await;
    let payloads: Vec<String> = all
        .iter()
        .map(|(_, p)| String::from_utf8(p.clone()).unwrap())
        .collect();
    let mut want: Vec<String> = (0..count).map(|i| format!("Payload {i}")).collect();
    want.push("last".into());
    assert_eq!(payloads, want, "every message once, in order");
    let metrics = edge.metrics().await;
    assert_eq!(
        harness::metric(&metrics, "edge_ws_accepted_total"),
        1.0,
        "one connection, no reconnect"
    );
    assert_eq!(harness::metric(&metrics, "edge_ws_connections"), 1.0);
    for reason in [
        "client_closed",
        "client_error",
        "broker_closed",
        "broker_error",
    ] {
        let series = format!("edge_ws_closed_total{{reason=\"{reason}\"}}");
        assert_eq!(harness::metric(&metrics, &series), 0.0, "{series}");
    }
    let log = broker.log();
    assert_eq!(
        log.matches("soak-device").count(),
        1,
        "the broker saw the device connect once and never go:\n{log}"
    );
    client.disconnect().await.unwrap();
    edge.wait_metric("edge_ws_connections", 0.0, Duration::from_secs(5))
        .await;
}

/// MQTT 3.1.1 written frame by frame: a CONNECT split over two WebSocket messages, two
/// packets in one message; PINGREQs are answered; the edge itself never pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_packets_cross_whatever_the_framing_and_the_edge_sends_no_pings() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (_sub, seen) = subscriber(&broker, "edge/frames").await;
    let mut ws = harness::ws_connect(&edge.ws_url(), Some("mqtt"))
        .await
        .unwrap();
    let connect = mqtt::connect("framed", 1, None);
    let (head, tail) = connect.split_at(5);
    ws.send(Message::Binary(head.to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(tail.to_vec().into()))
        .await
        .unwrap();
    let mut reader = MqttReader::new();
    assert_eq!(
        reader.next(&mut ws).await.unwrap(),
        (mqtt::CONNACK_TYPE, vec![0, 0])
    );
    let mut two = mqtt::publish("edge/frames", b"one");
    two.extend(mqtt::publish("edge/frames", b"two"));
    ws.send(Message::Binary(two.into())).await.unwrap();
    // Keep-alive 1 s, 3 s of PINGREQs every 500 ms: all answered, no WebSocket ping.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ws.send(Message::Binary(mqtt::PINGREQ.to_vec().into()))
            .await
            .unwrap();
        let (kind, _) = tokio::time::timeout(Duration::from_secs(2), reader.next(&mut ws))
            .await
            .expect("PINGRESP in time")
            .unwrap();
        assert_eq!(kind, mqtt::PINGRESP_TYPE);
    }
    assert_eq!(reader.pings_from_server, 0, "the edge must not ping");
    let seen = wait_for("both publishes", Duration::from_secs(5), || {
        let seen = seen.lock().unwrap();
        (seen.len() == 2).then(|| seen.clone())
    })
    .await;
    assert_eq!(seen[0].1, b"one");
    assert_eq!(seen[1].1, b"two");
    // A client's own ping is answered (by the WebSocket layer), and MQTT goes on.
    ws.send(Message::Ping(b"hi".to_vec().into())).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(pong, Some(Ok(Message::Pong(ref p))) if &p[..] == b"hi"),
        "{pong:?}"
    );
    ws.send(Message::Binary(mqtt::DISCONNECT.to_vec().into()))
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(2), reader.next(&mut ws))
        .await
        .unwrap();
    assert!(end.is_err(), "the broker closes after DISCONNECT: {end:?}");
}

/// Small packets go out one write each (the seed's latency rule); a burst of large ones
/// is coalesced into far fewer writes than messages, and arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_packets_are_written_at_once_and_large_bursts_coalesced() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (_sub, seen) = subscriber(&broker, "edge/batch/#").await;
    let (mut ws, _reader) =
        harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("batcher", 30, None)).await;
    let writes = "edge_ws_writes_total{direction=\"to_broker\"}";
    let messages = "edge_ws_messages_total{direction=\"to_broker\"}";
    let (w0, m0) = (edge.metric(writes).await, edge.metric(messages).await);

    // 50 small publishes (< 100 bytes each), sent in one burst.
    for i in 0..50 {
        ws.feed(Message::Binary(
            mqtt::publish("edge/batch/s", format!("{i}").as_bytes()).into(),
        ))
        .await
        .unwrap();
    }
    ws.flush().await.unwrap();
    wait_for("50 small messages", Duration::from_secs(5), || {
        (seen.lock().unwrap().len() == 50).then_some(())
    })
    .await;
    let (w1, m1) = (edge.metric(writes).await, edge.metric(messages).await);
    assert_eq!(m1 - m0, 50.0);
    assert_eq!(w1 - w0, 50.0, "each small packet is written at once");

    // 64 publishes of 4 KiB, sent in one burst: coalesced.
    let payload = vec![b'x'; 4096];
    for _ in 0..64 {
        ws.feed(Message::Binary(
            mqtt::publish("edge/batch/l", &payload).into(),
        ))
        .await
        .unwrap();
    }
    ws.flush().await.unwrap();
    wait_for("64 large messages", Duration::from_secs(5), || {
        (seen.lock().unwrap().len() == 114).then_some(())
    })
    .await;
    let (w2, m2) = (edge.metric(writes).await, edge.metric(messages).await);
    assert_eq!(m2 - m1, 64.0);
    assert!(w2 - w1 <= 32.0, "64 large messages took {} writes", w2 - w1);
    println!("coalescing: 64 messages of 4 KiB in {} writes", w2 - w1);
    assert!(
        seen.lock().unwrap()[50..]
            .iter()
            .all(|(_, p)| p == &payload)
    );
}

/// A device that drops and reconnects at once with the same client id is accepted, and
/// the broker never had to kick a zombie: the edge closed the old TCP connection first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_the_same_client_id_meets_no_zombie() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    for round in 0..5 {
        let (ws, _) =
            harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("device-7", 60, None)).await;
        // Gone without DISCONNECT or Close: the TCP connection just ends.
        drop(ws);
        let (mut again, mut reader) =
            harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("device-7", 60, None)).await;
        again
            .send(Message::Binary(mqtt::PINGREQ.to_vec().into()))
            .await
            .unwrap();
        assert_eq!(
            reader.next(&mut again).await.unwrap().0,
            mqtt::PINGRESP_TYPE,
            "round {round}"
        );
        again
            .send(Message::Binary(mqtt::DISCONNECT.to_vec().into()))
            .await
            .unwrap();
        let _ = reader.next(&mut again).await;
    }
    let log = wait_for(
        "the broker logged 5 closed connections",
        Duration::from_secs(5),
        || {
            let log = broker.log();
            (log.matches("Client device-7 closed its connection").count() >= 5
                || log.contains("already connected"))
            .then_some(log)
        },
    )
    .await;
    assert!(
        !log.contains("already connected"),
        "a zombie session was kicked:\n{log}"
    );
}

/// A dropped WebSocket closes the broker side at once: the broker publishes the
/// device's will (it does so the moment the TCP connection ends) within milliseconds,
/// where keep-alive (60 s here) would take 90 s. Both an abrupt TCP end and a Close frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_websocket_closes_the_broker_side_within_milliseconds() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (_sub, wills) = subscriber(&broker, "edge/will/#").await;
    for (n, how) in ["tcp", "close-frame"].into_iter().enumerate() {
        let topic = format!("edge/will/{how}");
        let (mut ws, _) = harness::mqtt_over_ws(
            &edge.ws_url(),
            mqtt::connect(how, 60, Some((&topic, "gone"))),
        )
        .await;
        let start = Instant::now();
        if how == "tcp" {
            drop(ws);
        } else {
            ws.close(None).await.unwrap();
        }
        wait_for("the will", Duration::from_secs(5), || {
            (wills.lock().unwrap().len() > n).then_some(())
        })
        .await;
        let elapsed = start.elapsed();
        println!("teardown ({how}): will published {elapsed:?} after the WebSocket ended");
        assert!(elapsed < Duration::from_secs(1), "{how}: {elapsed:?}");
        assert_eq!(wills.lock().unwrap()[n].0, topic);
    }
    edge.wait_metric("edge_ws_connections", 0.0, Duration::from_secs(2))
        .await;
}

/// A broker restart drops the WebSocket side at once (the device reconnects instead of
/// talking to nothing), and the next connection reaches the restarted broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_drops_the_websocket_at_once() {
    let mut broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (mut ws, mut reader) =
        harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("victim", 60, None)).await;
    let start = Instant::now();
    broker.kill().await;
    let end = tokio::time::timeout(Duration::from_secs(5), reader.next(&mut ws))
        .await
        .expect("the WebSocket ends in time");
    let elapsed = start.elapsed();
    println!("teardown (broker killed): WebSocket closed {elapsed:?} later: {end:?}");
    assert!(end.is_err(), "{end:?}");
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    let closed = edge.metrics().await;
    let by_broker = harness::metric(&closed, "edge_ws_closed_total{reason=\"broker_closed\"}")
        + harness::metric(&closed, "edge_ws_closed_total{reason=\"broker_error\"}");
    assert_eq!(by_broker, 1.0, "{closed}");
    broker.restart().await;
    harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("victim", 60, None)).await;
}

/// Refusals happen before the upgrade, with a status that says why: 502 when the broker
/// is down, 503 above `WS_MAX_CONNECTIONS`, 400 for a WebSocket that is not MQTT, 404
/// when the bridge is off; `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_refused_with_a_status_that_says_why() {
    use tokio_tungstenite::tungstenite::Error;
    let status = |r: Result<harness::Ws, Error>| match r {
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
        Ok(_) => 101,
    };
    let down = lps_testkit::ClosedPort::new();
    let edge = Edge::start(down.port, &[]).await;
    assert_eq!(
        status(harness::ws_connect(&edge.ws_url(), Some("mqtt")).await),
        502
    );
    assert_eq!(
        edge.metric("edge_ws_rejected_total{reason=\"broker_unreachable\"}")
            .await,
        1.0
    );
    assert_eq!(harness::http_get(edge.http, HEALTHZ_PATH).await.0, 200);
    drop(edge);

    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[(ENV_WS_MAX_CONNECTIONS, "1")]).await;
    assert_eq!(
        status(harness::ws_connect(&edge.ws_url(), Some("chat")).await),
        400
    );
    let (first, _) = harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("one", 60, None)).await;
    assert_eq!(
        status(harness::ws_connect(&edge.ws_url(), Some("mqtt")).await),
        503
    );
    assert_eq!(
        edge.metric("edge_ws_rejected_total{reason=\"limit\"}")
            .await,
        1.0
    );
    drop(first);
    edge.wait_metric("edge_ws_connections", 0.0, Duration::from_secs(2))
        .await;
    harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("two", 60, None)).await;

    let off = Edge::start(broker.port, &[(ENV_WS_ENABLED, "false")]).await;
    assert_eq!(
        status(harness::ws_connect(&off.ws_url(), Some("mqtt")).await),
        404
    );
    assert_eq!(harness::http_get(off.http, HEALTHZ_PATH).await.0, 200);
}

/// On shutdown every bridge gets Close 1001 (going away) and the edge stops in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_bridges_with_going_away() {
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    let (mut ws, mut reader) =
        harness::mqtt_over_ws(&edge.ws_url(), mqtt::connect("leaver", 60, None)).await;
    let stopping = tokio::spawn(edge.stop());
    let end = tokio::time::timeout(Duration::from_secs(2), reader.next(&mut ws))
        .await
        .unwrap()
        .unwrap_err();
    assert!(end.contains("Away"), "{end}");
    tokio::time::timeout(Duration::from_secs(3), stopping)
        .await
        .unwrap()
        .unwrap();
}

/// The seed's own client, paho-mqtt over WebSocket, MQTT 3.1.1 and 5, at 100 msg/s:
/// every message arrives in order and neither client disconnects. The Python is
/// `LPS_PAHO_PYTHON`, else the one of the Locust venv (`scripts/locust-env.sh`, which
/// installs paho-mqtt with Locust); `EDGE_SOAK_SECS=60` for the seed's 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_the_seeds_client_publishes_through_the_edge() {
    let python = match std::env::var("LPS_PAHO_PYTHON") {
        Ok(python) => python,
        Err(_) => {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/locust-env.sh");
            let venv = tokio::time::timeout(
                Duration::from_secs(300),
                tokio::process::Command::new("bash").arg(script).output(),
            )
            .await
            .expect("scripts/locust-env.sh within 5 minutes")
            .expect("run scripts/locust-env.sh");
            assert!(venv.status.success(), "scripts/locust-env.sh failed");
            let locust = String::from_utf8_lossy(&venv.stdout);
            let locust = std::path::Path::new(locust.lines().last().expect("its last line").trim());
            locust.with_file_name("python").display().to_string()
        }
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho/seed_client.py");
    let broker = Mosquitto::start().await;
    let edge = Edge::start(broker.port, &[]).await;
    for version in ["3.1.1", "5"] {
        let output = tokio::process::Command::new(&python)
            .args([script, "127.0.0.1", &edge.http.port().to_string()])
            .arg(soak_secs().to_string())
            .arg(version)
            .output()
            .await
            .expect("run python");
        let stdout = String::from_utf8_lossy(&output.stdout);
        println!("{stdout}");
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metrics = edge.metrics().await;
    assert_eq!(harness::metric(&metrics, "edge_ws_accepted_total"), 4.0);
    assert_eq!(
        harness::metric(&metrics, "edge_ws_closed_total{reason=\"broker_error\"}"),
        0.0
    );
}
