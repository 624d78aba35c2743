//! (c) Bytes arrive intact and in order under jitter and loss stalls.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::harness::{echo_server, ms_since, pattern, quantile, shaper, shaper_with, within};

/// 4 MiB of a non-repeating pattern through an echo server, with jitter as large as the
/// delay and 0.5 % of the segments stalled each way: what comes back is what went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_jitter_and_loss_stalls_both_ways() {
    const LEN: usize = 4 << 20;
    let echo = echo_server().await;
    let relay = shaper(
        echo,
        "delay=5ms,jitter=5ms,rate=200mbit,burst=64kb,loss=0.5%,rto=20ms",
    );
    let stream = TcpStream::connect(relay.local_addr()).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sent = pattern(LEN, 9);
    let writer = tokio::spawn({
        let sent = sent.clone();
        async move {
            for chunk in sent.chunks(10_000) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        }
    });
    let start = Instant::now();
    let mut back = Vec::with_capacity(LEN);
    within(30, "echo of 4 MiB", r.read_to_end(&mut back))
        .await
        .unwrap();
    writer.await.unwrap();
    let stats = relay.stats();
    eprintln!(
        "4 MiB echoed in {:.0} ms; segments stalled: {} forward, {} reverse",
        ms_since(start),
        stats.forward.segments_lost,
        stats.reverse.segments_lost
    );
    assert_eq!(back.len(), LEN);
    let first_diff = sent.iter().zip(&back).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the echo differs from what was sent");
    // The losses happened (≈ 14 expected each way), so the stalls were exercised.
    assert!(stats.forward.segments_lost > 0 && stats.reverse.segments_lost > 0);
}

/// Every segment lost one way: each ping-pong takes delay + RTO, 10 + 100 ms, within
/// −5 %/+15 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_segment_arrives_one_rto_late() {
    let echo = echo_server().await;
    let relay = shaper_with(echo, "delay=10ms,loss=100%,rto=100ms", "none", |_| {});
    let mut stream = TcpStream::connect(relay.local_addr()).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut rtts = Vec::new();
    for _ in 0..8 {
        let start = Instant::now();
        stream.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        within(5, "stalled ping", stream.read_exact(&mut pong))
            .await
            .unwrap();
        assert_eq!(&pong, b"ping");
        rtts.push(ms_since(start));
    }
    rtts.sort_by(f64::total_cmp);
    let median = quantile(&rtts, 0.5);
    eprintln!("loss=100%, rto=100ms, delay=10ms: median RTT {median:.1} ms");
    assert!(
        (104.5..=126.5).contains(&median),
        "median {median:.1} ms, expected 110 ms"
    );
    assert_eq!(relay.stats().forward.segments_lost, 8);
}
