//! Persistent sessions (MQTT v5 §4.1, §4.4): a client that comes back with Clean Start 0
//! gets what was queued while it was away, its unacknowledged messages again with DUP and
//! their original packet ids, and the PUBRELs of handshakes left half done; a `$share`
//! member's session queues too. Retained messages (the bridges' dead letters) and sessions
//! survive a broker restart.

use std::net::SocketAddr;

use lps_testkit::Broker as _;
use lps_testkit::mosquitto::Mosquitto;

use crate::wire::{Client, Connect, Packet, Prop, Publish, assert_props};
use crate::{Kind, against_both};

/// A client with a session that outlives it by an hour.
fn durable(id: &str) -> Connect {
    Connect::new(id).session_expiry(3600)
}

async fn publish_all(port: u16, messages: &[(&str, u8, &str)]) {
    let mut publisher = Client::plain(port, "publisher").await;
    for (topic, qos, payload) in messages {
        let reason = publisher
            .publish(Publish::new(topic, *payload).qos(*qos))
            .await;
        assert_eq!(reason, 0, "{topic} {payload}");
    }
}

fn texts(messages: &[Publish], topic: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|p| p.topic == topic)
        .map(Publish::text)
        .collect()
}

against_both!(a_resumed_session_gets_what_was_queued_while_offline);
async fn a_resumed_session_gets_what_was_queued_while_offline(port: u16, _: Kind) {
    let mut client = Client::connect(port, durable("bridge")).await;
    client.subscribe("queue/q1", 1).await;
    client.subscribe("queue/q2", 2).await;
    client.disconnect().await;

    let mut messages = Vec::new();
    for i in 0..50 {
        messages.push(("queue/q1", 1, format!("one-{i}")));
        messages.push(("queue/q2", 2, format!("two-{i}")));
    }
    let borrowed: Vec<(&str, u8, &str)> = messages
        .iter()
        .map(|(t, q, p)| (*t, *q, p.as_str()))
        .collect();
    publish_all(port, &borrowed).await;

    let mut client = Client::connect(port, durable("bridge").resume()).await;
    assert!(client.connack.session_present, "{:?}", client.connack);
    let got = client.take(100).await;
    let want = |prefix: &str| (0..50).map(|i| format!("{prefix}-{i}")).collect::<Vec<_>>();
    assert_eq!(texts(&got, "queue/q1"), want("one"), "in order, each once");
    assert_eq!(texts(&got, "queue/q2"), want("two"), "in order, each once");
    assert_eq!(client.ping().await, [], "nothing more");
}

against_both!(unacknowledged_messages_are_resent_with_dup_on_resume);
async fn unacknowledged_messages_are_resent_with_dup_on_resume(port: u16, _: Kind) {
    let mut client = Client::connect(port, durable("bridge")).await;
    client.subscribe("redo/#", 2).await;
    publish_all(
        port,
        &[
            ("redo/q1", 1, "one"),
            ("redo/q2", 2, "two"),
            ("redo/q2", 2, "three"),
        ],
    )
    .await;
    let mut first = client.take_unacked(3).await;
    first.sort_by_key(Publish::text);
    // "three" gets PUBREC; the connection drops before the PUBREL is answered.
    let three = first
        .iter()
        .find(|p| p.text() == "three")
        .expect("three")
        .clone();
    client.ack(&three).await;
    match client.recv().await {
        Packet::PubRel(id, 0) => assert_eq!(id, three.packet_id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    drop(client);

    // MQTT-4.4.0-1: on resume, unacknowledged PUBLISH packets again with DUP and their
    // original packet ids, and the PUBREL again (the message itself is not resent).
    let mut client = Client::connect(port, durable("bridge").resume()).await;
    assert!(client.connack.session_present);
    let mut resent = Vec::new();
    let mut pubrels = Vec::new();
    while resent.len() < 2 || pubrels.is_empty() {
        match client.recv().await {
            Packet::Publish(p) => resent.push(p),
            Packet::PubRel(id, _) => pubrels.push(id),
            other => panic!("unexpected {other:?}"),
        }
    }
    resent.sort_by_key(Publish::text);
    for (before, again) in first.iter().filter(|p| p.text() != "three").zip(&resent) {
        assert_eq!(again.text(), before.text());
        assert!(again.dup, "DUP on {again:?}");
        assert_eq!(again.packet_id, before.packet_id, "{}", again.text());
    }
    assert_eq!(pubrels, [three.packet_id]);
    client.pubcomp(three.packet_id).await;
    for message in &resent {
        client.ack(message).await;
    }
    assert_eq!(client.ping().await, [], "nothing more");
}

against_both!(a_share_group_member_offline_keeps_its_messages);
async fn a_share_group_member_offline_keeps_its_messages(port: u16, _: Kind) {
    let mut member = Client::connect(port, durable("only-member")).await;
    member.subscribe("$share/bridges/offline/t", 2).await;
    member.disconnect().await;
    let messages: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let sends: Vec<(&str, u8, &str)> = messages
        .iter()
        .map(|p| ("offline/t", 2, p.as_str()))
        .collect();
    publish_all(port, &sends).await;
    let mut member = Client::connect(port, durable("only-member").resume()).await;
    let got: Vec<String> = member.take(20).await.iter().map(Publish::text).collect();
    assert_eq!(got, messages);
}

/// A broker that can be restarted on the same port with the same storage.
enum Restartable {
    Embedded {
        addr: SocketAddr,
        dir: tempfile::TempDir,
        broker: Option<lps_broker::Broker>,
    },
    Mosquitto(Mosquitto),
}

impl Restartable {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = lps_broker::Broker::start(([127, 0, 0, 1], 0).into(), dir.path().join("data"))
            .await
            .expect("start the embedded broker");
        Self::Embedded {
            addr: broker.addr,
            dir,
            broker: Some(broker),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Self::Embedded { addr, .. } => addr.port(),
            Self::Mosquitto(broker) => broker.port(),
        }
    }

    /// Stops the broker cleanly and starts it again.
    async fn restart(&mut self) {
        match self {
            Self::Embedded { addr, dir, broker } => {
                if let Some(running) = broker.take() {
                    running.stop().await.expect("stop the embedded broker");
                }
                *broker = Some(
                    lps_broker::Broker::start(*addr, dir.path().join("data"))
                        .await
                        .expect("restart the embedded broker"),
                );
            }
            Self::Mosquitto(broker) => {
                broker.stop().await;
                broker.restart().await;
            }
        }
    }
}

mod retained_messages_and_sessions_survive_a_restart {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded() {
        super::survives_a_restart(Restartable::embedded().await, Kind::Embedded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mosquitto() {
        let broker = Restartable::Mosquitto(Mosquitto::start().await);
        super::survives_a_restart(broker, Kind::Mosquitto).await;
    }
}

async fn survives_a_restart(mut broker: Restartable, kind: Kind) {
    let dead_letter = "legacy_proxy/dead_letter/req-1";
    let letter_props = vec![
        Prop::ContentType("application/json".into()),
        Prop::user("reason", "rejected"),
    ];
    let port = broker.port();
    let mut publisher = Client::plain(port, "publisher").await;
    publisher
        .publish(
            Publish::new(dead_letter, "{}")
                .qos(1)
                .retained()
                .props(letter_props.clone()),
        )
        .await;
    drop(publisher);
    // The bridges connect with Clean Start 0 from the first connection on.
    let mut bridge = Client::connect(port, durable("bridge").resume()).await;
    bridge.subscribe("plain/t", 2).await;
    bridge.subscribe("$share/bridges/shared/t", 2).await;
    bridge.disconnect().await;
    // A session that began with Clean Start 1 is as durable by the specification (§4.1).
    let mut fresh = Client::connect(port, durable("fresh")).await;
    fresh.subscribe("plain/t", 2).await;
    fresh.disconnect().await;
    publish_all(
        port,
        &[("plain/t", 2, "queued-1"), ("shared/t", 2, "queued-2")],
    )
    .await;

    broker.restart().await;
    let port = broker.port();

    let mut reader = Client::plain(port, "reader").await;
    reader.subscribe("legacy_proxy/dead_letter/#", 1).await;
    let letter = reader.take(1).await.remove(0);
    assert_eq!((letter.topic.as_str(), letter.retain), (dead_letter, true));
    assert_props(&letter.props, &letter_props);

    let mut bridge = Client::connect(port, durable("bridge").resume()).await;
    assert!(bridge.connack.session_present, "{:?}", bridge.connack);
    let mut queued: Vec<String> = bridge.take(2).await.iter().map(Publish::text).collect();
    queued.sort();
    assert_eq!(queued, ["queued-1", "queued-2"]);

    let mut fresh = Client::connect(port, durable("fresh").resume()).await;
    match kind {
        Kind::Embedded => {
            assert!(fresh.connack.session_present, "{:?}", fresh.connack);
            assert_eq!(fresh.take(1).await[0].text(), "queued-1");
        }
        // Known difference: Mosquitto 2.0.21 writes to its persistence file only the
        // sessions whose connection began with Clean Start 0; this one is gone.
        Kind::Mosquitto => assert!(!fresh.connack.session_present, "{:?}", fresh.connack),
    }
    drop(fresh);

    // The subscriptions came back too, without subscribing again.
    publish_all(
        port,
        &[("shared/t", 2, "new-shared"), ("plain/t", 2, "new-plain")],
    )
    .await;
    let next = bridge.take(1).await.remove(0);
    match kind {
        Kind::Embedded => {
            assert_eq!(next.text(), "new-shared");
            assert_eq!(bridge.take(1).await[0].text(), "new-plain");
        }
        // Known difference: Mosquitto does not restore shared subscriptions from its
        // persistence file; a bridge must SUBSCRIBE again on every CONNACK (ours do).
        Kind::Mosquitto => {
            assert_eq!(
                next.text(),
                "new-plain",
                "the shared message was not routed"
            );
            assert_eq!(bridge.ping().await, []);
        }
    }
}
