//! Fake endpoints and statistics for the relay tests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lps_netem::{Options, Profile, Shaper};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub const LOCAL: &str = "127.0.0.1:0";

pub fn local() -> SocketAddr {
    LOCAL.parse().unwrap()
}

/// Fails the test when `fut` takes longer than `secs`.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {secs} s"))
}

/// A relay to `target` shaped by `profile` both ways, with a fixed seed.
pub fn shaper(target: SocketAddr, profile: &str) -> Shaper {
    shaper_with(target, profile, profile, |_| {})
}

/// A relay with a profile per direction and options changed by `tweak`.
pub fn shaper_with(
    target: SocketAddr,
    forward: &str,
    reverse: &str,
    tweak: impl FnOnce(&mut Options),
) -> Shaper {
    let mut options = Options {
        forward: forward.parse::<Profile>().unwrap(),
        reverse: reverse.parse::<Profile>().unwrap(),
        seed: Some(42),
        ..Options::default()
    };
    tweak(&mut options);
    Shaper::start_with(local(), target, options).unwrap()
}

/// An echo server: every connection gets its bytes back, and a FIN after its FIN.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Every read of a sink server: when, and how many bytes.
pub type Arrivals = Arc<Mutex<Vec<(Instant, usize)>>>;

/// A server that reads everything and records each read.
pub async fn sink_server() -> (SocketAddr, Arrivals) {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrivals = Arrivals::default();
    let log = arrivals.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().push((Instant::now(), n));
                }
            });
        }
    });
    (addr, arrivals)
}

/// Writes `stream` full until `until`, then half-closes; returns the bytes written.
pub async fn write_until(mut stream: TcpStream, until: Instant) -> u64 {
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    let _ = tokio::time::timeout_at(until, async {
        loop {
            match stream.write(&chunk).await {
                Ok(n) if n > 0 => written += n as u64,
                _ => break,
            }
        }
    })
    .await;
    let _ = stream.shutdown().await;
    written
}

/// A deterministic byte stream that never repeats within a few MB (xorshift64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The `q`-quantile of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[rank]
}

/// Milliseconds since `start`.
pub fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}
