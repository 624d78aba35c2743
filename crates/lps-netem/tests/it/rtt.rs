//! (a) The round-trip time a relay adds to small request/response ping-pongs.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::harness::{echo_server, ms_since, quantile, shaper, shaper_with, within};
use crate::pingpong::ping_pongs;

/// Upstream's profile both ways: the RTT gains two delays of N(30 ms, 3 ms), so a median
/// of 60 ms and σ = √2 · 3 = 4.24 ms. Tolerances: median within −5 %/+10 % (Tokio's
/// timer rounds each wait up to the next millisecond, and a busy machine only adds),
/// σ estimated from the interquartile range within 3.0-7.5 ms, the 5th percentile no
/// lower than 50 ms. 256 samples, about 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_profile_adds_two_normal_delays_per_round_trip() {
    let echo = echo_server().await;
    let direct = within(10, "direct ping-pongs", ping_pongs(echo, 1, 50)).await;
    let base = quantile(&direct, 0.5);
    let relay = shaper(echo, "upstream");
    let rtts = within(20, "ping-pongs", ping_pongs(relay.local_addr(), 8, 32)).await;
    let added: Vec<f64> = rtts.iter().map(|r| r - base).collect();
    let (p5, p25, p50, p75, p95) = (
        quantile(&added, 0.05),
        quantile(&added, 0.25),
        quantile(&added, 0.5),
        quantile(&added, 0.75),
        quantile(&added, 0.95),
    );
    let mean = added.iter().sum::<f64>() / added.len() as f64;
    let sigma = (p75 - p25) / 1.349;
    eprintln!(
        "upstream, both ways, n={}: added RTT mean {mean:.2} ms, p5 {p5:.2}, p25 {p25:.2}, \
         median {p50:.2}, p75 {p75:.2}, p95 {p95:.2}, σ(IQR) {sigma:.2} ms; direct RTT {base:.3} ms",
        added.len()
    );
    assert!(
        (57.0..=66.0).contains(&p50),
        "median {p50:.2} ms, expected 60 ms −5 %/+10 %"
    );
    assert!(
        (3.0..=6.5).contains(&sigma),
        "σ {sigma:.2} ms, expected 4.24 ms"
    );
    assert!(p5 >= 50.0, "5th percentile {p5:.2} ms, expected ≥ 50 ms");
    assert!(relay.stats().forward.bytes >= 64 * 256);
}

/// A profile on one direction only: the RTT gains one delay. Median within −5 %/+15 %
/// of 20 ms with no jitter, the interquartile range under 2 ms (the upper tail is left
/// to the machine's noise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_profile_adds_one_delay() {
    let echo = echo_server().await;
    let relay = shaper_with(echo, "delay=20ms", "none", |_| {});
    let rtts = within(20, "ping-pongs", ping_pongs(relay.local_addr(), 4, 25)).await;
    let (p25, p50, p75) = (
        quantile(&rtts, 0.25),
        quantile(&rtts, 0.5),
        quantile(&rtts, 0.75),
    );
    eprintln!(
        "delay=20ms one way, n={}: RTT p25 {p25:.2}, median {p50:.2}, p75 {p75:.2} ms",
        rtts.len()
    );
    assert!(
        (19.0..=23.0).contains(&p50),
        "median {p50:.2} ms, expected 20 ms"
    );
    assert!(p75 - p25 < 2.0, "IQR {:.2} ms without jitter", p75 - p25);
}

/// A new connection pays for its handshake: the first ping-pong over a fresh connection
/// with 20 ms one way takes SYN + data = 40 ms, the next ones 20 ms (medians within
/// −5 %/+15 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_pays_for_its_handshake() {
    let echo = echo_server().await;
    let relay = shaper_with(echo, "delay=20ms", "none", |_| {});
    let (mut first, mut second) = (Vec::new(), Vec::new());
    within(20, "fresh connections", async {
        for _ in 0..10 {
            let mut stream = TcpStream::connect(relay.local_addr()).await.unwrap();
            stream.set_nodelay(true).unwrap();
            for rtts in [&mut first, &mut second] {
                let start = Instant::now();
                stream.write_all(b"ping").await.unwrap();
                stream.read_exact(&mut [0u8; 4]).await.unwrap();
                rtts.push(ms_since(start));
            }
        }
    })
    .await;
    first.sort_by(f64::total_cmp);
    second.sort_by(f64::total_cmp);
    let (first, second) = (quantile(&first, 0.5), quantile(&second, 0.5));
    eprintln!("delay=20ms one way: first ping-pong {first:.2} ms, second {second:.2} ms");
    assert!(
        (38.0..=46.0).contains(&first),
        "first {first:.2} ms, expected 40 ms"
    );
    assert!(
        (19.0..=23.0).contains(&second),
        "second {second:.2} ms, expected 20 ms"
    );
}

/// `lan` (1 ms ± 0.1 ms each way) is as precise as Tokio's millisecond timer allows:
/// every round trip gains at least 1 ms (half of each delay is never skipped), the median
/// stays under 5 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_profile_adds_about_a_millisecond_each_way() {
    let echo = echo_server().await;
    let relay = shaper(echo, "lan");
    let rtts = within(20, "ping-pongs", ping_pongs(relay.local_addr(), 1, 100)).await;
    let (p5, p50) = (quantile(&rtts, 0.05), quantile(&rtts, 0.5));
    eprintln!(
        "lan both ways, n={}: RTT p5 {p5:.2}, median {p50:.2} ms",
        rtts.len()
    );
    assert!(p5 >= 1.0, "p5 {p5:.2} ms: the delay was skipped");
    assert!(p50 <= 5.0, "median {p50:.2} ms, expected about 2-3 ms");
}
