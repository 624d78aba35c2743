//! Subscription identifiers (MQTT v5 §3.8.2.1.2, §3.3.4): each message carries the
//! identifiers of the subscriptions it matched, and none when those had none.

use std::collections::BTreeSet;

use crate::wire::{Client, Prop, Publish};
use crate::{Kind, against_both};

/// The subscription identifiers that came with a message on `topic`, which matches
/// `with_ids` subscriptions that have one: one PUBLISH with all of them, or one PUBLISH per
/// matching subscription (both allowed, MQTT-3.3.4-4/-5).
async fn ids_for(
    client: &mut Client,
    publisher: &mut Client,
    topic: &str,
    with_ids: usize,
) -> BTreeSet<u32> {
    publisher.publish(Publish::new(topic, "m").qos(1)).await;
    let mut ids = BTreeSet::new();
    loop {
        let message = client.take(1).await.remove(0);
        assert_eq!(message.topic, topic);
        ids.extend(message.subscription_ids());
        if ids.len() >= with_ids {
            return ids;
        }
    }
}

against_both!(subscription_identifiers_come_with_matching_messages);
async fn subscription_identifiers_come_with_matching_messages(port: u16, _: Kind) {
    let mut client = Client::plain(port, "subscriber").await;
    assert!(
        !client
            .connack
            .props
            .contains(&Prop::SubscriptionIdsAvailable(0)),
        "{:?}",
        client.connack
    );
    let id = |v| vec![Prop::SubscriptionId(v)];
    assert_eq!(client.subscribe_with("sid/#", 1, id(7)).await, 1);
    assert_eq!(client.subscribe_with("sid/a", 1, id(268_435_455)).await, 1);
    assert_eq!(client.subscribe_with("plain/+", 1, vec![]).await, 1);
    let mut publisher = Client::plain(port, "publisher").await;

    let both = ids_for(&mut client, &mut publisher, "sid/a", 2).await;
    assert_eq!(both, BTreeSet::from([7, 268_435_455]));
    let one = ids_for(&mut client, &mut publisher, "sid/b", 1).await;
    assert_eq!(one, BTreeSet::from([7]));
    let none = ids_for(&mut client, &mut publisher, "plain/x", 0).await;
    assert_eq!(none, BTreeSet::new());

    // Subscribing again replaces the subscription, identifier included (MQTT-3.8.4-3).
    assert_eq!(client.subscribe_with("sid/#", 1, vec![]).await, 1);
    client.unsubscribe("sid/a").await;
    let replaced = ids_for(&mut client, &mut publisher, "sid/b", 0).await;
    assert_eq!(replaced, BTreeSet::new());
}
