//! Will messages (MQTT v5 §3.1.2.5, §3.1.3.2): published when a connection ends without
//! DISCONNECT 0x00, with the will's properties unaltered, after the Will Delay Interval,
//! and not at all if the client comes back within that delay.

use std::time::Duration;

use tokio::time::Instant;

use crate::wire::{Client, Connect, Prop, Publish, Will, assert_props};
use crate::{Kind, against_both};

fn will(props: Vec<Prop>) -> Will {
    Will {
        topic: "will/a".into(),
        payload: b"gone".to_vec(),
        qos: 1,
        retain: false,
        props,
    }
}

/// Properties a will carries to its subscribers (Will Delay Interval is the broker's, not
/// forwarded).
fn forwarded_props() -> Vec<Prop> {
    vec![
        Prop::PayloadFormat(1),
        Prop::ContentType("text/plain".into()),
        Prop::ResponseTopic("will/replies".into()),
        Prop::CorrelationData(vec![1, 2, 3]),
        Prop::user("a", "2"),
        Prop::user("c", "3"),
        Prop::user("x-mqtt-client-id", "as-set"),
    ]
}

async fn watcher(port: u16) -> Client {
    let mut watcher = Client::plain(port, "watcher").await;
    watcher.subscribe("will/#", 1).await;
    watcher
}

/// Publishes a marker on the will topic; returns the watcher's next message, which is the
/// marker unless a will came first.
async fn next_before_marker(port: u16, watcher: &mut Client) -> Publish {
    let mut other = Client::plain(port, "marker").await;
    other.publish(Publish::new("will/a", "marker").qos(1)).await;
    watcher.take(1).await.remove(0)
}

against_both!(will_is_published_on_abnormal_close_with_its_properties);
async fn will_is_published_on_abnormal_close_with_its_properties(port: u16, _: Kind) {
    let mut watcher = watcher(port).await;
    let client = Client::connect(port, Connect::new("mortal").will(will(forwarded_props()))).await;
    drop(client); // TCP closed without DISCONNECT
    let got = watcher.take(1).await.remove(0);
    assert_eq!(
        (got.topic.as_str(), got.text().as_str()),
        ("will/a", "gone")
    );
    assert_props(&got.props, &forwarded_props());

    // DISCONNECT 0x04 (Disconnect with Will Message) publishes it too.
    let client = Client::connect(port, Connect::new("mortal").will(will(vec![]))).await;
    client.disconnect_with(0x04).await;
    let got = watcher.take(1).await.remove(0);
    assert_eq!(got.text(), "gone");
}

against_both!(will_is_discarded_on_normal_disconnect);
async fn will_is_discarded_on_normal_disconnect(port: u16, _: Kind) {
    let mut watcher = watcher(port).await;
    let client = Client::connect(port, Connect::new("polite").will(will(vec![]))).await;
    client.disconnect().await;
    let first = next_before_marker(port, &mut watcher).await;
    assert_eq!(first.text(), "marker", "no will after DISCONNECT 0x00");
}

/// The Will Delay Interval of the tests below: long enough to tell from "at once" with
/// Mosquitto's one-second clock, short enough for a test.
const DELAY: u32 = 2;

against_both!(will_delay_postpones_the_will);
async fn will_delay_postpones_the_will(port: u16, _: Kind) {
    let mut watcher = watcher(port).await;
    let client = Client::connect(
        port,
        Connect::new("late")
            .session_expiry(60)
            .will(will(vec![Prop::WillDelay(DELAY)])),
    )
    .await;
    let dropped = Instant::now();
    drop(client);
    let got = watcher.take(1).await.remove(0);
    let after = dropped.elapsed();
    assert_eq!(got.text(), "gone");
    // A broker that counts whole seconds may publish up to a second early.
    assert!(
        after >= Duration::from_secs(u64::from(DELAY - 1)),
        "will after {after:?}, delay {DELAY} s"
    );
    assert!(got.props.is_empty(), "{got:?}");
}

against_both!(reconnecting_within_the_will_delay_cancels_the_will);
async fn reconnecting_within_the_will_delay_cancels_the_will(port: u16, _: Kind) {
    let mut watcher = watcher(port).await;
    let connect = Connect::new("back")
        .session_expiry(60)
        .will(will(vec![Prop::WillDelay(DELAY)]));
    drop(Client::connect(port, connect).await);
    let back = Client::connect(port, Connect::new("back").session_expiry(60).resume()).await;
    assert!(back.connack.session_present);
    // Past the delay (and a second of clock granularity), the will must still not be out.
    tokio::time::sleep(Duration::from_secs(u64::from(DELAY) + 1)).await;
    let first = next_before_marker(port, &mut watcher).await;
    assert_eq!(
        first.text(),
        "marker",
        "no will: the client came back in time"
    );
    drop(back);
}
