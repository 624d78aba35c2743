//! Retained messages (MQTT v5 §3.3.1.3): set, replace, clear; RETAIN 1 only on the copy a
//! new subscription gets. That they survive a restart is in `sessions`.

use crate::wire::{Client, Publish};
use crate::{Kind, against_both};

/// Subscribes a fresh client to `topic` and returns the first message it gets, after the
/// publisher sent a non-retained `marker` there: a retained message is sent on SUBSCRIBE,
/// so it comes before the marker, and a marker first means nothing was retained.
async fn first_after_subscribing(
    port: u16,
    id: &str,
    topic: &str,
    publisher: &mut Client,
) -> Publish {
    let mut client = Client::plain(port, id).await;
    client.subscribe(topic, 1).await;
    publisher
        .publish(Publish::new(topic, "marker").qos(1))
        .await;
    let first = client.take(1).await.remove(0);
    if first.text() != "marker" {
        let marker = client.take(1).await.remove(0);
        assert_eq!(marker.text(), "marker", "after {first:?}");
    }
    first
}

against_both!(retained_messages_are_set_replaced_and_cleared);
async fn retained_messages_are_set_replaced_and_cleared(port: u16, _: Kind) {
    let topic = "legacy_proxy/dead_letter/k1";
    let mut publisher = Client::plain(port, "publisher").await;

    // Set: a new subscriber gets it, flagged RETAIN.
    publisher
        .publish(Publish::new(topic, "one").qos(1).retained())
        .await;
    let mut live = Client::plain(port, "live").await;
    live.subscribe("legacy_proxy/dead_letter/#", 1).await;
    let first = live.take(1).await.remove(0);
    assert_eq!((first.text().as_str(), first.retain), ("one", true));

    // Replace: a subscriber already there gets it as a normal message (RETAIN 0,
    // MQTT-3.3.1-9 without Retain As Published); a new one gets only the newest.
    publisher
        .publish(Publish::new(topic, "two").qos(1).retained())
        .await;
    let replaced = live.take(1).await.remove(0);
    assert_eq!((replaced.text().as_str(), replaced.retain), ("two", false));
    let newest = first_after_subscribing(port, "new-1", topic, &mut publisher).await;
    assert_eq!((newest.text().as_str(), newest.retain), ("two", true));
    let _marker = live.take(1).await;

    // Clear: an empty retained payload removes it (MQTT-3.3.1-6) and is still delivered to
    // the subscribers there (MQTT-3.3.1-7: "processed normally").
    publisher
        .publish(Publish::new(topic, "").qos(1).retained())
        .await;
    let cleared = live.take(1).await.remove(0);
    assert!(cleared.payload.is_empty(), "{cleared:?}");
    let after_clear = first_after_subscribing(port, "new-2", topic, &mut publisher).await;
    assert_eq!(
        (after_clear.text().as_str(), after_clear.retain),
        ("marker", false),
        "nothing retained after the clear"
    );
}

against_both!(retain_handling_and_retain_as_published);
async fn retain_handling_and_retain_as_published(port: u16, _: Kind) {
    let mut publisher = Client::plain(port, "publisher").await;
    publisher
        .publish(Publish::new("rh/t", "kept").qos(1).retained())
        .await;
    // Retain Handling 2: no retained messages on SUBSCRIBE (§3.8.3.1). Retain As
    // Published (bit 3): live retained messages keep RETAIN 1.
    let mut client = Client::plain(port, "rap").await;
    assert_eq!(
        client.subscribe_with("rh/t", 0x20 | 0x08 | 1, vec![]).await,
        1
    );
    publisher
        .publish(Publish::new("rh/t", "live").qos(1).retained())
        .await;
    let first = client.take(1).await.remove(0);
    assert_eq!((first.text().as_str(), first.retain), ("live", true));
}
