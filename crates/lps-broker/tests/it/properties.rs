//! Message properties pass through the broker unaltered (MQTT v5 §3.3.2.3): user properties
//! in order (MQTT-3.3.2-17, -18), and the request/response properties (§4.10).

use crate::wire::{Client, Prop, Publish, assert_props};
use crate::{Kind, against_both};

/// User properties a picky client would send: repeated keys, an empty pair, non-ASCII, and
/// the keys the unpatched `mqtt5` broker overwrote (`x-mqtt-client-id`, `x-mqtt-sender`).
fn sent() -> Vec<Prop> {
    vec![
        Prop::user("a", "2"),
        Prop::user("c", "3"),
        Prop::user("a", "1"),
        Prop::user("x-mqtt-client-id", "not-the-sender"),
        Prop::user("x-mqtt-sender", "someone"),
        Prop::user("", ""),
        Prop::user("schlüssel", "wert ✓"),
    ]
}

against_both!(user_properties_are_forwarded_unaltered_and_in_order);
async fn user_properties_are_forwarded_unaltered_and_in_order(port: u16, _: Kind) {
    let mut subscriber = Client::plain(port, "subscriber").await;
    subscriber.subscribe("props/#", 2).await;
    let mut publisher = Client::plain(port, "myclientid").await;
    for qos in 0..=2 {
        let topic = format!("props/qos{qos}");
        publisher
            .publish(Publish::new(&topic, "m").qos(qos).props(sent()))
            .await;
    }
    let mut live = subscriber.take(3).await;
    live.sort_by_key(|p| p.qos);
    for (qos, message) in (0..).zip(&live) {
        assert_eq!(message.topic, format!("props/qos{qos}"));
        // Nothing added, nothing removed, nothing reordered: the properties are exactly
        // what the publisher sent.
        assert_eq!(message.props, sent(), "QoS {qos}");
    }

    // A retained message keeps them too, when delivered to a later subscriber.
    publisher
        .publish(
            Publish::new("props/retained", "r")
                .qos(1)
                .retained()
                .props(sent()),
        )
        .await;
    let mut late = Client::plain(port, "late").await;
    late.subscribe("props/retained", 1).await;
    let retained = late.take(1).await.remove(0);
    assert!(retained.retain, "{retained:?}");
    assert_eq!(retained.props, sent());
}

against_both!(request_response_properties_are_forwarded);
async fn request_response_properties_are_forwarded(port: u16, _: Kind) {
    let mut responder = Client::plain(port, "responder").await;
    responder.subscribe("service/requests", 1).await;
    let mut requester = Client::plain(port, "requester").await;
    let response_topic = "client/requester/responses";
    requester.subscribe(response_topic, 1).await;
    let correlation = vec![0x00, 0x01, 0xFE, 0xFF, b'r', b'q'];
    let request = vec![
        Prop::PayloadFormat(1),
        Prop::ContentType("application/json".into()),
        Prop::ResponseTopic(response_topic.into()),
        Prop::CorrelationData(correlation.clone()),
        Prop::user("k", "v"),
    ];
    requester
        .publish(
            Publish::new("service/requests", r#"{"op":"ping"}"#)
                .qos(1)
                .props(request.clone()),
        )
        .await;

    let got = responder.take(1).await.remove(0);
    assert_props(&got.props, &request);
    let reply_to = got
        .props
        .iter()
        .find_map(|p| match p {
            Prop::ResponseTopic(t) => Some(t.clone()),
            _ => None,
        })
        .expect("a response topic");
    let echo: Vec<Prop> = got
        .props
        .iter()
        .filter(|p| matches!(p, Prop::CorrelationData(_)))
        .cloned()
        .collect();
    responder
        .publish(Publish::new(&reply_to, "pong").qos(1).props(echo))
        .await;

    let response = requester.take(1).await.remove(0);
    assert_eq!(response.topic, response_topic);
    assert_eq!(response.text(), "pong");
    assert_eq!(response.props, [Prop::CorrelationData(correlation)]);
}

against_both!(message_expiry_is_forwarded_reduced_by_the_time_queued);
async fn message_expiry_is_forwarded_reduced_by_the_time_queued(port: u16, _: Kind) {
    // §3.3.2.3.3: the broker forwards the Message Expiry Interval minus the time the
    // message waited (here under a second).
    let mut subscriber = Client::plain(port, "subscriber").await;
    subscriber.subscribe("expiry/#", 1).await;
    let mut publisher = Client::plain(port, "publisher").await;
    publisher
        .publish(
            Publish::new("expiry/live", "x")
                .qos(1)
                .props(vec![Prop::MessageExpiry(300)]),
        )
        .await;
    let got = subscriber.take(1).await.remove(0);
    let forwarded = got.props.iter().find_map(|p| match p {
        Prop::MessageExpiry(v) => Some(*v),
        _ => None,
    });
    assert!(
        matches!(forwarded, Some(299..=300)),
        "forwarded Message Expiry Interval {forwarded:?}"
    );
}
