//! Measures what a relay adds, per profile, on 127.0.0.1: the round-trip time of 64-byte
//! ping-pongs and the rate of a one-connection bulk transfer, against a direct
//! connection. The figures of the README come from
//!
//! ```text
//! cargo run --release -p lps-netem --example measure
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lps_netem::{Options, Profile, Shaper};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

#[path = "../tests/it/pingpong.rs"]
mod pingpong;

use pingpong::ping_pongs;

const LOCAL: &str = "127.0.0.1:0";

#[tokio::main]
async fn main() {
    let echo = echo_server().await;
    let (sink, received) = sink_server().await;
    println!("| path | RTT median | p5 | p95 | σ (IQR) | bulk, 1 connection |");
    println!("|---|---|---|---|---|---|");
    row("direct", echo, sink, &received, 1).await;
    for spec in ["none", "lan", "upstream"] {
        let options = Options {
            seed: Some(1),
            ..Options::symmetric(spec.parse::<Profile>().unwrap())
        };
        let to_echo = Shaper::start_with(LOCAL.parse().unwrap(), echo, options.clone()).unwrap();
        let to_sink = Shaper::start_with(LOCAL.parse().unwrap(), sink, options).unwrap();
        let clients = if spec == "upstream" { 8 } else { 1 };
        row(
            &format!("relay `{spec}`"),
            to_echo.local_addr(),
            to_sink.local_addr(),
            &received,
            clients,
        )
        .await;
        to_echo.shutdown().await;
        to_sink.shutdown().await;
    }
}

async fn row(name: &str, echo: SocketAddr, sink: SocketAddr, received: &AtomicU64, clients: usize) {
    let rtts = ping_pongs(echo, clients, 400 / clients).await;
    let q = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    let rate = bulk(sink, received, Duration::from_secs(3)).await;
    println!(
        "| {name} | {:.3} ms | {:.3} | {:.3} | {:.2} ms | {} |",
        q(0.5),
        q(0.05),
        q(0.95),
        (q(0.75) - q(0.25)) / 1.349,
        if rate > 1e8 {
            format!("{:.2} GB/s", rate / 1e9)
        } else {
            format!("{:.3} Mbit/s", rate * 8.0 / 1e6)
        }
    );
}

/// Bytes per second the sink receives from one sender in the last two thirds of `span`.
async fn bulk(sink: SocketAddr, received: &AtomicU64, span: Duration) -> f64 {
    let mut stream = TcpStream::connect(sink).await.unwrap();
    let chunk = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(span, async {
            while stream.write_all(&chunk).await.is_ok() {}
        })
        .await;
    });
    tokio::time::sleep_until(start + span / 3).await;
    let before = received.load(Ordering::Relaxed);
    tokio::time::sleep_until(start + span).await;
    let after = received.load(Ordering::Relaxed);
    writer.await.unwrap();
    (after - before) as f64 / (span.as_secs_f64() * 2.0 / 3.0)
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn sink_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, received)
}
