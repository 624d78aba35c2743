//! Dead letters against real brokers (Mosquitto and the embedded one): written with
//! `letter()`, listed, kept across a broker restart, refused for replay without a probe
//! answer, replayed to a subscriber of the source topic and cleared.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lps_common::dead_letters::{DeadLetter, letter, list, probe, replay};
use lps_common::mqtt::mqtt5::{
    ConnectOptions, Message, MqttClient, PublishResult, QoS, SubscribeOptions,
};
use lps_common::wire::{
    ATTEMPT_PROPERTY, DEAD_LETTER_TOPIC, PROBE_PROPERTY, PROBE_TOPIC, SHARE_GROUP, bridge_filters,
    probe_reply_topic,
};
use lps_testkit::mosquitto::Mosquitto;
use tokio::sync::mpsc;

/// The listing's quiet period in these tests.
const QUIET: Duration = Duration::from_millis(300);

/// A broker the scenario can restart on its persistence.
trait Restartable {
    fn port(&self) -> u16;
    /// Stops the broker the orderly way and starts it again on the same storage.
    async fn restart(&mut self);
}

impl Restartable for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }

    async fn restart(&mut self) {
        // SIGTERM: Mosquitto writes its snapshot, then starts from it.
        self.stop().await;
        Mosquitto::restart(self).await;
    }
}

/// The embedded broker on a storage folder that outlives it (the test kit's fixture
/// cannot restart).
struct EmbeddedOnDisk {
    dir: tempfile::TempDir,
    port: u16,
    broker: Option<lps_broker::Broker>,
}

impl EmbeddedOnDisk {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let broker = lps_broker::Broker::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            dir.path().join("data"),
        )
        .await
        .unwrap();
        Self {
            dir,
            port: broker.addr.port(),
            broker: Some(broker),
        }
    }
}

impl Restartable for EmbeddedOnDisk {
    fn port(&self) -> u16 {
        self.port
    }

    async fn restart(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.stop().await.unwrap();
        }
        let broker = lps_broker::Broker::start(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            self.dir.path().join("data"),
        )
        .await
        .unwrap();
        self.broker = Some(broker);
    }
}

/// A clean-session client (as `lps dead-letters` uses).
async fn client(port: u16, name: &str) -> MqttClient {
    let id = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    let client = MqttClient::with_options(
        ConnectOptions::new(id)
            .with_clean_start(true)
            .with_automatic_reconnect(false),
    );
    client.set_queue_on_disconnect(false).await;
    client
        .connect(&format!("mqtt://127.0.0.1:{port}"))
        .await
        .unwrap();
    client
}

/// Answers subscriber probes as legacy-proxy-2 does: the token back to the reply topic.
async fn answer_probes(port: u16) -> MqttClient {
    let client = client(port, "responder").await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let options = SubscribeOptions {
        qos: QoS::AtLeastOnce,
        ..SubscribeOptions::default()
    };
    client
        .subscribe_with_options(PROBE_TOPIC, options, move |m: Message| {
            let reply = m
                .properties
                .user_properties
                .iter()
                .find(|(k, _)| k == PROBE_PROPERTY)
                .map(|(_, v)| v.clone());
            if let Some(reply) = reply {
                let _ = tx.send((reply, m.payload));
            }
        })
        .await
        .unwrap();
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Some((reply, token)) = rx.recv().await {
            let _ = publisher.publish_qos1(reply, token).await;
        }
    });
    client
}

/// A member of legacy-proxy-2's shared group recording what arrives.
async fn group_member(port: u16) -> (MqttClient, Arc<Mutex<Vec<Message>>>) {
    let client = client(port, "member").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    for filter in bridge_filters(SHARE_GROUP) {
        let sink = seen.clone();
        let options = SubscribeOptions {
            qos: QoS::ExactlyOnce,
            ..SubscribeOptions::default()
        };
        client
            .subscribe_with_options(filter, options, move |m| sink.lock().unwrap().push(m))
            .await
            .unwrap();
    }
    (client, seen)
}

/// Publishes one dead letter the way legacy-proxy-2 does; returns its topic.
async fn dead_letter(
    writer: &MqttClient,
    (reason, detail, attempt, source, payload): &(&str, &str, u32, &str, &[u8]),
) -> String {
    let (topic, options) = letter(
        DEAD_LETTER_TOPIC,
        reason,
        detail,
        *attempt,
        source,
        "proxy2-1",
    );
    let result = writer
        .publish_with_options(topic.clone(), payload.to_vec(), options)
        .await
        .unwrap();
    assert!(
        matches!(result, PublishResult::Sent(d) if d.qos_used() == QoS::ExactlyOnce),
        "{result:?}"
    );
    topic
}

async fn timed_list(reader: &MqttClient, what: &str) -> Vec<DeadLetter> {
    let started = Instant::now();
    let letters = list(reader, DEAD_LETTER_TOPIC, QUIET).await.unwrap();
    eprintln!(
        "{what}: listed {} letters in {} ms (quiet period {} ms)",
        letters.len(),
        started.elapsed().as_millis(),
        QUIET.as_millis()
    );
    letters
}

/// The whole life of dead letters on `broker`.
async fn life_of_dead_letters(broker: &mut impl Restartable, name: &str) {
    let inputs: [(&str, &str, u32, &str, &[u8]); 3] = [
        (
            "not_json",
            "expected a JSON object",
            1,
            "proxy1/message",
            b"not json",
        ),
        (
            "rejected",
            "the target rejected it with 400 Bad Request",
            2,
            "proxy2-1/retry/message",
            br#"{"id":"1","body":"b","request_id":"101"}"#,
        ),
        (
            "too_large",
            "70000 bytes, more than MAX_PAYLOAD_BYTES 65536",
            1,
            "proxy3/message",
            br#"{"id":"3","body":"big","request_id":"103"}"#,
        ),
    ];
    let port = broker.port();
    let writer = client(port, "writer").await;
    let mut topics = Vec::new();
    for input in &inputs {
        topics.push(dead_letter(&writer, input).await);
    }
    writer.disconnect().await.unwrap();

    // Listed in key order (= publish order), with everything the letter said.
    let reader = client(port, "reader").await;
    let listed = timed_list(&reader, name).await;
    let listed_topics: Vec<&str> = listed.iter().map(|l| l.topic.as_str()).collect();
    assert_eq!(listed_topics, topics);
    for (letter, (reason, detail, attempt, source, payload)) in listed.iter().zip(&inputs) {
        assert_eq!(letter.reason, *reason);
        assert_eq!(letter.detail, *detail);
        assert_eq!(letter.attempt, *attempt);
        assert_eq!(letter.source_topic.as_deref(), Some(*source));
        assert_eq!(letter.payload, *payload);
        assert_eq!(letter.dead_lettered_by.as_deref(), Some("proxy2-1"));
        assert!(letter.dead_lettered_at.is_some());
    }
    let request_ids: Vec<Option<&str>> = listed.iter().map(|l| l.request_id.as_deref()).collect();
    assert_eq!(request_ids, [None, Some("101"), Some("103")]);
    // Listing consumes nothing.
    assert_eq!(timed_list(&reader, name).await, listed);
    reader.disconnect().await.unwrap();

    // Kept across an orderly broker restart.
    broker.restart().await;
    let reader = client(port, "reader").await;
    assert_eq!(
        timed_list(&reader, name).await,
        listed,
        "{name}: the letters after a restart"
    );

    // A member of the group but no probe answer: replay refuses and changes nothing.
    let (_member, seen) = group_member(port).await;
    let refused = replay(&reader, &listed, DEAD_LETTER_TOPIC)
        .await
        .expect_err("a replay without a probe answer");
    let message = format!("{refused:#}");
    assert!(
        message.contains("no legacy-proxy-2 answered the subscriber probe")
            && message.contains("nothing was replayed"),
        "{message}"
    );
    assert_eq!(timed_list(&reader, name).await, listed);
    assert!(seen.lock().unwrap().is_empty(), "nothing may be published");

    // With a probe answer: each payload reaches its source topic, then the letter goes.
    let _responder = answer_probes(port).await;
    assert!(
        probe(
            &reader,
            &probe_reply_topic("dead-letters-test"),
            Duration::from_secs(5)
        )
        .await
    );
    let report = replay(&reader, &listed, DEAD_LETTER_TOPIC).await.unwrap();
    let keys: Vec<String> = listed.iter().map(|l| l.key.clone()).collect();
    assert_eq!(report.replayed, keys);
    assert_eq!(report.failed, None);
    assert!(report.skipped.is_empty() && report.not_attempted.is_empty());
    let seen = lps_testkit::eventually("the replayed messages", Duration::from_secs(10), || {
        let seen = seen.clone();
        async move {
            let seen = seen.lock().unwrap();
            (seen.len() >= inputs.len()).then(|| seen.clone())
        }
    })
    .await;
    assert_eq!(seen.len(), inputs.len(), "each exactly once");
    for (_, _, _, source, payload) in &inputs {
        let delivered = seen
            .iter()
            .find(|m| m.topic == *source && m.payload == *payload)
            .unwrap_or_else(|| panic!("{source}: payload not delivered"));
        assert!(
            !delivered
                .properties
                .user_properties
                .iter()
                .any(|(k, _)| k == ATTEMPT_PROPERTY),
            "a replay starts afresh: no attempt property"
        );
    }
    assert!(timed_list(&reader, name).await.is_empty());
    assert!(timed_list(&reader, name).await.is_empty());
    reader.disconnect().await.unwrap();

    // The clearing is kept across a restart too.
    broker.restart().await;
    let reader = client(port, "reader").await;
    assert!(
        timed_list(&reader, name).await.is_empty(),
        "{name}: cleared letters came back after a restart"
    );
}

#[tokio::test]
async fn mosquitto_keeps_lists_and_replays_dead_letters() {
    let mut broker = Mosquitto::start().await;
    life_of_dead_letters(&mut broker, "mosquitto").await;
}

#[tokio::test]
async fn embedded_broker_keeps_lists_and_replays_dead_letters() {
    let mut broker = EmbeddedOnDisk::start().await;
    life_of_dead_letters(&mut broker, "embedded").await;
}

/// How long listing takes with a realistic pile of letters.
async fn list_many(port: u16, name: &str) {
    const N: usize = 1000;
    let writer = client(port, "writer").await;
    let input = (
        "rejected",
        "400",
        1,
        "proxy1/message",
        &br#"{"request_id":"1"}"#[..],
    );
    for _ in 0..N {
        dead_letter(&writer, &input).await;
    }
    let reader = client(port, "reader").await;
    let letters = timed_list(&reader, name).await;
    assert_eq!(letters.len(), N);
    assert!(letters.windows(2).all(|w| w[0].key < w[1].key));
}

#[tokio::test]
async fn mosquitto_lists_a_thousand_letters() {
    let broker = Mosquitto::start().await;
    list_many(broker.port, "mosquitto, 1000").await;
}

#[tokio::test]
async fn embedded_broker_lists_a_thousand_letters() {
    let broker = EmbeddedOnDisk::start().await;
    list_many(broker.port, "embedded, 1000").await;
}
