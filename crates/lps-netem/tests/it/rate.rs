//! (b) The rate of bulk transfers.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::harness::{Arrivals, shaper, sink_server, within, write_until};

/// Payload bytes per second through `rate=5mbit`: the bucket counts frames of 1514 bytes
/// for 1448 of payload, as tbf does.
const GOODPUT: f64 = 5e6 / 8.0 * 1448.0 / 1514.0;

/// Bytes per second the sink received from `skip` after its first byte, for `span`
/// (skipping the burst and the delay at the start).
fn measured_rate(arrivals: &Arrivals, skip: Duration, span: Duration) -> f64 {
    let log = arrivals.lock().unwrap();
    let first = log.first().expect("nothing arrived").0;
    let (from, to) = (first + skip, first + skip + span);
    let bytes: usize = log
        .iter()
        .filter(|(t, _)| *t > from && *t <= to)
        .map(|(_, n)| n)
        .sum();
    bytes as f64 / span.as_secs_f64()
}

/// `connections` bulk senders through one relay with upstream's profile for 3 s; the
/// payload rate from 0.5 s to 2.5 s after the first byte arrived.
async fn bulk(connections: usize) -> f64 {
    let (sink, arrivals) = sink_server().await;
    let relay = shaper(sink, "upstream");
    let until = Instant::now() + Duration::from_secs(3);
    let mut senders = Vec::new();
    for _ in 0..connections {
        let stream = TcpStream::connect(relay.local_addr()).await.unwrap();
        senders.push(tokio::spawn(write_until(stream, until)));
    }
    for sender in senders {
        within(10, "bulk sender", sender).await.unwrap();
    }
    measured_rate(
        &arrivals,
        Duration::from_millis(500),
        Duration::from_secs(2),
    )
}

/// One connection gets 5 Mbit/s of frames: within ±10 % of 597 787 B/s of payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_runs_at_the_bucket_rate() {
    let rate = bulk(1).await;
    eprintln!(
        "upstream, 1 connection: {rate:.0} B/s = {:.3} Mbit/s payload ({:+.1} % of {GOODPUT:.0} B/s)",
        rate * 8.0 / 1e6,
        (rate / GOODPUT - 1.0) * 100.0
    );
    assert!(
        (rate / GOODPUT - 1.0).abs() < 0.10,
        "{rate:.0} B/s vs {GOODPUT:.0}"
    );
}

/// Three connections through the same relay share one bucket: together within ±10 % of
/// the same 597 787 B/s, not three times it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_share_the_bucket() {
    let rate = bulk(3).await;
    eprintln!(
        "upstream, 3 connections: {rate:.0} B/s = {:.3} Mbit/s payload together ({:+.1} %)",
        rate * 8.0 / 1e6,
        (rate / GOODPUT - 1.0) * 100.0
    );
    assert!(
        (rate / GOODPUT - 1.0).abs() < 0.10,
        "{rate:.0} B/s vs {GOODPUT:.0}"
    );
}
