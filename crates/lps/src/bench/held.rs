//! Connections held open at once: many HTTP/1.1 keep-alive connections, each opened with
//! one request, then left idle together, then each used once more. What it measures is the
//! relay's memory per idle connection and whether it keeps them all.
//!
//! Raw sockets, not hyper: ten thousand client connections must cost this process little
//! more than their sockets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::generator::Target;

/// Requests in flight while the connections open and are used again: the relay's pool
/// to the simulator stays small, so the memory measured is the idle connections'.
const CONCURRENCY: usize = 64;

/// What holding connections did.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// Connections that answered 200 twice: when opened and after the hold.
    pub ok: u64,
    /// Connections that failed to open, to answer, or to answer again.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Latencies of the first request on each connection, µs, sorted.
    pub latencies_us: Vec<u32>,
}

/// Opens `count` connections to `target`, a request on each; holds them all idle for
/// `hold`; then a request on each again.
pub(super) async fn run(target: &Target, count: usize, body: Bytes, hold: Duration) -> Held {
    let request = Arc::new(request(target, &body));
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (request, permits, addr) = (request.clone(), permits.clone(), target.addr);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let started = Instant::now();
            let mut stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            exchange(&mut stream, &request).await?;
            let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
            anyhow::Ok((stream, us))
        });
    }
    let mut held = Held::default();
    let mut open = Vec::with_capacity(count);
    for joined in tasks.join_all().await {
        match joined {
            Ok((stream, us)) => {
                open.push(stream);
                held.latencies_us.push(us);
            }
            Err(e) => held.fail(&e),
        }
    }
    held.latencies_us.sort_unstable();
    tokio::time::sleep(hold).await;
    let mut tasks = tokio::task::JoinSet::new();
    for mut stream in open {
        let (request, permits) = (request.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            exchange(&mut stream, &request)
                .await
                .context("after the hold")
        });
    }
    for result in tasks.join_all().await {
        match result {
            Ok(()) => held.ok += 1,
            Err(e) => held.fail(&e),
        }
    }
    held
}

impl Held {
    fn fail(&mut self, error: &anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{error:#}"));
    }
}

/// The bytes of one keep-alive `POST` of `body` to `target`.
fn request(target: &Target, body: &Bytes) -> Vec<u8> {
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        target.path,
        target.addr,
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// Sends `request` and reads the whole answer, which must be a 200 with a
/// `Content-Length` body, within 30 s.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(30), async {
        stream.write_all(request).await?;
        let mut buffer = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed before answering");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let status = head.lines().next().unwrap_or_default().to_owned();
        anyhow::ensure!(status.starts_with("http/1.1 200"), "answered {status}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length in the answer")?;
        let mut remaining = (head_end + length).saturating_sub(buffer.len());
        while remaining > 0 {
            let n = stream.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "closed within the answer");
            remaining = remaining.saturating_sub(n);
        }
        Ok(())
    })
    .await
    .context("no answer within 30 s")?
}

/// Raises this process's soft limit on open files to the hard limit (children, the
/// services, inherit it); returns the limit now in force.
pub(super) fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
