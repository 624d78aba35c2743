//! Flow control (MQTT v5 §4.9): the broker never has more unacknowledged QoS 1 and 2
//! messages out to a client than the client's Receive Maximum (MQTT-3.3.4-9), sends more as
//! acknowledgements come back, in order, and never resends within a connection however late
//! the acknowledgement (MQTT-4.4.0-1): what a bridge deferring its acks relies on.

use std::collections::VecDeque;

use crate::wire::{Client, Connect, DEADLINE, Packet, Prop, Publish};
use crate::{Kind, against_both};

/// Publishes `count` messages `0..count` on `topic` at `qos` from a task of its own: a
/// broker may hold a publisher's acknowledgements while its subscribers are slow.
fn publish_in_background(
    port: u16,
    topic: &'static str,
    qos: u8,
    count: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut publisher = Client::plain(port, "publisher").await;
        for i in 0..count {
            let reason = publisher
                .publish(Publish::new(topic, i.to_string()).qos(qos))
                .await;
            assert!(reason < 0x80, "message {i} refused: {reason:#04x}");
        }
    })
}

/// Every PUBLISH the broker had sent before answering a PINGREQ.
async fn sent_before_ping(client: &mut Client) -> Vec<Publish> {
    client
        .ping()
        .await
        .into_iter()
        .map(|p| match p {
            Packet::Publish(p) => p,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

against_both!(receive_maximum_caps_unacknowledged_messages);
async fn receive_maximum_caps_unacknowledged_messages(port: u16, _: Kind) {
    const WINDOW: usize = 3;
    const COUNT: usize = 10;
    let mut subscriber = Client::connect(
        port,
        Connect::new("slow").prop(Prop::ReceiveMaximum(WINDOW as u16)),
    )
    .await;
    subscriber.subscribe("flow/t", 1).await;
    let publisher = publish_in_background(port, "flow/t", 1, COUNT);

    let mut unacked = VecDeque::new();
    for _ in 0..WINDOW {
        unacked.push_back(subscriber.next_publish().await);
    }
    // Every message is at the broker (both acknowledge publishers while a subscriber's
    // window is full), so anything more it would send is sent before PINGRESP.
    tokio::time::timeout(DEADLINE, publisher)
        .await
        .expect("the publisher finishes")
        .expect("publisher");
    assert_eq!(
        sent_before_ping(&mut subscriber).await,
        [],
        "over the window"
    );
    // One acknowledgement, one more message.
    let oldest = unacked.pop_front().expect("a message");
    subscriber.ack(&oldest).await;
    unacked.push_back(subscriber.next_publish().await);
    assert_eq!(
        sent_before_ping(&mut subscriber).await,
        [],
        "over the window"
    );

    let mut order: Vec<Publish> = vec![oldest];
    for message in unacked.drain(..) {
        subscriber.ack(&message).await;
        order.push(message);
    }
    order.extend(subscriber.take(COUNT - order.len()).await);
    let payloads: Vec<String> = order.iter().map(Publish::text).collect();
    let want: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
    assert_eq!(payloads, want, "in order, each once");
    assert!(
        order.iter().all(|p| !p.dup),
        "no resend within the connection"
    );
}

against_both!(receive_maximum_holds_under_pressure);
async fn receive_maximum_holds_under_pressure(port: u16, _: Kind) {
    const WINDOW: usize = 8;
    const COUNT: usize = 400;
    let mut subscriber = Client::connect(
        port,
        Connect::new("pressed").prop(Prop::ReceiveMaximum(WINDOW as u16)),
    )
    .await;
    subscriber.subscribe("pressure/t", 2).await;
    let publisher = publish_in_background(port, "pressure/t", 2, COUNT);

    // Wait for a full window, check nothing more is out, then acknowledge it all at once:
    // the broker refills the window while the publisher keeps pushing.
    let mut received: Vec<Publish> = Vec::with_capacity(COUNT);
    let mut most = 0;
    while received.len() < COUNT {
        let mut window = Vec::new();
        while window.len() < WINDOW.min(COUNT - received.len()) {
            window.push(subscriber.next_publish().await);
        }
        window.extend(sent_before_ping(&mut subscriber).await);
        most = most.max(window.len());
        for message in &window {
            subscriber.ack(message).await;
        }
        received.extend(window);
    }
    let payloads: Vec<String> = received.iter().map(Publish::text).collect();
    let want: Vec<String> = (0..COUNT).map(|i| i.to_string()).collect();
    assert_eq!(payloads, want, "in order, each once");
    assert!(
        most <= WINDOW,
        "{most} unacknowledged, Receive Maximum {WINDOW}"
    );
    publisher.await.expect("publisher");
}
