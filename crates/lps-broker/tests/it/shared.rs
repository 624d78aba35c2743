//! Shared subscriptions with QoS 2 (MQTT v5 §4.8.2): each message goes to one member of the
//! group, exactly once, and every member gets a share. legacy-proxy-2 instances are such a
//! group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::wire::{Client, Packet, Publish};
use crate::{Kind, against_both};

/// Receives and completes QoS 2 messages until `done` is set and the broker has been quiet
/// for a moment (so a late duplicate would still be counted); returns the payloads.
async fn member(
    mut client: Client,
    done: Arc<AtomicBool>,
    seen: tokio::sync::mpsc::UnboundedSender<String>,
) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        match client.recv_within(Duration::from_millis(300)).await {
            Some(Ok(Packet::Publish(p))) => {
                assert_eq!(p.qos, 2, "{p:?}");
                client.ack(&p).await;
                let _ = seen.send(p.text());
                got.push(p.text());
            }
            Some(Ok(Packet::PubRel(id, _))) => client.pubcomp(id).await,
            Some(other) => panic!("unexpected {other:?}"),
            None if done.load(Ordering::SeqCst) => return got,
            None => {}
        }
    }
}

against_both!(share_group_delivers_qos2_exactly_once);
async fn share_group_delivers_qos2_exactly_once(port: u16, _: Kind) {
    const COUNT: usize = 300;
    let done = Arc::new(AtomicBool::new(false));
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut members = Vec::new();
    for i in 0..3 {
        let mut client = Client::plain(port, &format!("member-{i}")).await;
        client.subscribe("$share/bridges/work/t", 2).await;
        members.push(tokio::spawn(member(client, done.clone(), seen_tx.clone())));
    }
    let mut publisher = Client::plain(port, "publisher").await;
    for i in 0..COUNT {
        let reason = publisher
            .publish(Publish::new("work/t", i.to_string()).qos(2))
            .await;
        assert_eq!(reason, 0, "PUBREC for {i}");
    }
    for _ in 0..COUNT {
        tokio::time::timeout(crate::wire::DEADLINE, seen.recv())
            .await
            .expect("all messages within the deadline");
    }
    done.store(true, Ordering::SeqCst);

    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    let mut shares = Vec::new();
    for member in members {
        let got = member.await.expect("member");
        shares.push(got.len());
        for payload in got {
            *count.entry(payload).or_default() += 1;
        }
    }
    assert_eq!(count.len(), COUNT, "every message delivered");
    let duplicated: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "delivered more than once: {duplicated:?}"
    );
    assert!(
        shares.iter().all(|n| *n > 0),
        "every member gets a share: {shares:?}"
    );
}
