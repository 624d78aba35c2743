//! Topic aliases (MQTT v5 §3.3.2.3.4), both directions: the broker resolves a client's
//! aliases within the Topic Alias Maximum it announced, refuses invalid ones, and never
//! sends a client an alias above the maximum that client announced.

use std::collections::HashMap;

use crate::wire::{Client, Closed, Connect, DEADLINE, Prop, Publish};
use crate::{Kind, against_both};

against_both!(topic_aliases_from_the_client_are_resolved);
async fn topic_aliases_from_the_client_are_resolved(port: u16, _: Kind) {
    // This subscriber announces no Topic Alias Maximum: it must get full topic names and
    // no Topic Alias property (MQTT-3.3.2-8).
    let mut subscriber = Client::plain(port, "subscriber").await;
    subscriber.subscribe("alias/#", 1).await;
    let mut publisher = Client::plain(port, "publisher").await;
    let maximum = publisher.connack.topic_alias_maximum();
    assert!(maximum >= 2, "Topic Alias Maximum {maximum}");
    let sends = [
        ("alias/a", 1, "a1"), // sets alias 1
        ("", 1, "a2"),        // uses it
        ("alias/b", maximum, "b1"),
        ("", maximum, "b2"),
        ("alias/c", 1, "c1"), // remaps alias 1
        ("", 1, "c2"),
        ("", maximum, "b3"),
    ];
    for (topic, alias, payload) in sends {
        let reason = publisher
            .publish(
                Publish::new(topic, payload)
                    .qos(1)
                    .props(vec![Prop::TopicAlias(alias)]),
            )
            .await;
        assert_eq!(reason, 0, "PUBACK for {payload}");
    }
    let mut got: Vec<(String, String)> = subscriber
        .take(sends.len())
        .await
        .into_iter()
        .map(|p| {
            assert_eq!(p.topic_alias(), None, "{p:?}");
            (p.text(), p.topic)
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [
        ("a1", "alias/a"),
        ("a2", "alias/a"),
        ("b1", "alias/b"),
        ("b2", "alias/b"),
        ("b3", "alias/b"),
        ("c1", "alias/c"),
        ("c2", "alias/c"),
    ]
    .iter()
    .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
    .collect();
    assert_eq!(got, want);
}

against_both!(invalid_topic_aliases_are_refused);
async fn invalid_topic_aliases_are_refused(port: u16, _: Kind) {
    // The broker MUST close the connection on a Protocol Error and SHOULD send DISCONNECT
    // with the reason first (MQTT-4.13.1-1, §4.13.1).
    // Alias 0 is not permitted (MQTT-3.3.2-8).
    let mut client = Client::plain(port, "zero").await;
    client
        .publish_nowait(
            Publish::new("alias/x", "x")
                .qos(1)
                .props(vec![Prop::TopicAlias(0)]),
        )
        .await;
    let zero = client.closed(DEADLINE).await;
    // An empty topic with an alias the broker does not know (§3.3.4).
    let mut client = Client::plain(port, "unknown").await;
    client
        .publish_nowait(
            Publish::new("", "x")
                .qos(1)
                .props(vec![Prop::TopicAlias(1)]),
        )
        .await;
    let unknown = client.closed(DEADLINE).await;
    // 0 is outside the aliases the broker allows: Topic Alias invalid (0x94) or, as
    // Mosquitto reads it, Protocol Error (0x82). An alias never set is a Protocol Error.
    assert!(
        matches!(zero, Closed::Disconnect(0x94 | 0x82)),
        "alias 0: {zero:?}"
    );
    assert_eq!(unknown, Closed::Disconnect(0x82), "unknown alias");
}

against_both!(topic_aliases_to_the_client_stay_within_its_maximum);
async fn topic_aliases_to_the_client_stay_within_its_maximum(port: u16, _: Kind) {
    let mut subscriber = Client::connect(
        port,
        Connect::new("subscriber").prop(Prop::TopicAliasMaximum(2)),
    )
    .await;
    subscriber.subscribe("out/#", 1).await;
    let mut publisher = Client::plain(port, "publisher").await;
    let topics = ["out/a", "out/b", "out/c", "out/d", "out/e"];
    let mut want = Vec::new();
    for round in 0..4 {
        for topic in topics {
            let payload = format!("{topic}#{round}");
            publisher
                .publish(Publish::new(topic, payload.as_str()).qos(1))
                .await;
            want.push((payload, topic.to_owned()));
        }
    }
    // Resolve aliases in the order the broker sent them, as a client must.
    let mut aliases: HashMap<u16, String> = HashMap::new();
    let mut used = 0;
    let mut got = Vec::new();
    for message in subscriber.take(want.len()).await {
        let topic = match message.topic_alias() {
            None => message.topic.clone(),
            Some(alias) => {
                used += 1;
                assert!((1..=2).contains(&alias), "alias {alias} over the maximum 2");
                if !message.topic.is_empty() {
                    aliases.insert(alias, message.topic.clone());
                }
                aliases
                    .get(&alias)
                    .unwrap_or_else(|| panic!("alias {alias} used before it was set"))
                    .clone()
            }
        };
        got.push((message.text(), topic));
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Sending aliases is optional for a server ("MAY", §3.3.2.3.4). Recorded: neither
    // broker does, so this direction is a client's concern only with other brokers.
    assert_eq!(used, 0, "aliases sent: {used}");
}
