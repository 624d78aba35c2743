//! (d) Endings: FINs pass after the queued bytes, resets and failures reach the other
//! side at once, the relay's own shutdown cuts everything; and the bounds hold.

use std::time::Duration;

use lps_netem::Shaper;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::harness::{LOCAL, echo_server, pattern, shaper, shaper_with, within};

const PROFILE: &str = "delay=20ms,jitter=2ms,rate=50mbit";

/// Reads until EOF or an error; `Err` when the stream was reset.
async fn drain(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.map(|_| all)
}

/// Asserts that a new client of `relay` is reset within 5 s (`what`: what it waits for):
/// its connect or its read fails with a reset.
async fn assert_client_reset(relay: &Shaper, what: &str) {
    let got = within(5, what, async {
        let mut client = TcpStream::connect(relay.local_addr()).await?;
        drain(&mut client).await
    })
    .await;
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

/// A target that runs `serve` on its first connection.
async fn target<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await {
            serve(stream).await;
        }
    });
    addr
}

/// The client sends 300 kB and half-closes; the target sees all of it, then EOF, and its
/// answer still comes back over the other direction, followed by EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_passes_after_the_queued_bytes() {
    let addr = target(|mut stream| async move {
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        let count = got.len() as u64;
        let intact = got == pattern(300_000, 3);
        stream.write_all(&count.to_be_bytes()).await.unwrap();
        stream.write_all(&[u8::from(intact)]).await.unwrap();
    })
    .await;
    let relay = shaper(addr, PROFILE);
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    client.write_all(&pattern(300_000, 3)).await.unwrap();
    client.shutdown().await.unwrap();
    let answer = within(10, "answer after half-close", drain(&mut client))
        .await
        .unwrap();
    assert_eq!(answer.len(), 9, "count, intact flag, then EOF");
    assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), 300_000);
    assert_eq!(answer[8], 1, "the target got other bytes than were sent");
}

/// The target answers and closes: the client gets the answer, then EOF, one delay later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_close_reaches_the_client() {
    let addr = target(|mut stream| async move {
        stream.write_all(b"bye").await.unwrap();
    })
    .await;
    let relay = shaper(addr, PROFILE);
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let start = Instant::now();
    let got = within(5, "EOF from the target", drain(&mut client))
        .await
        .unwrap();
    assert_eq!(got, b"bye");
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A target that resets its connection: the client's read fails with a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_reset_resets_the_client() {
    let addr = target(|stream| async move {
        socket_reset(stream);
    })
    .await;
    let relay = shaper(addr, PROFILE);
    assert_client_reset(&relay, "reset from the target").await;
}

/// A client that resets: the target's read fails with a reset too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_resets_the_target() {
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let addr = target(|mut stream| async move {
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).await.unwrap();
        let _ = hello_tx.send(());
        let _ = seen_tx.send(drain(&mut stream).await.map_err(|e| e.kind()));
    })
    .await;
    let relay = shaper(addr, PROFILE);
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    // The relay is connected to the target once the target has the bytes.
    within(5, "hello at the target", hello_rx).await.unwrap();
    socket_reset(client);
    let seen = within(5, "reset at the target", seen_rx).await.unwrap();
    assert_eq!(seen, Err(std::io::ErrorKind::ConnectionReset));
}

/// Closes `stream` with a RST.
fn socket_reset(stream: TcpStream) {
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    drop(stream);
}

/// A target nobody listens on: the client is reset at once and the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_resets_the_client() {
    let closed = TcpListener::bind(LOCAL)
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let relay = shaper(closed, PROFILE);
    // The reset may come before the client's connect has returned.
    assert_client_reset(&relay, "reset for an unreachable target").await;
    assert_eq!(relay.stats().target_failures, 1);
}

/// Shutting the relay down resets the connections it carries, returns promptly, and
/// stops listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_connections_and_stops_listening() {
    let echo = echo_server().await;
    let relay = shaper(echo, PROFILE);
    let addr = relay.local_addr();
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    within(5, "ping", client.read_exact(&mut pong))
        .await
        .unwrap();
    assert_eq!(relay.stats().active, 1);
    within(2, "relay shutdown", relay.shutdown()).await;
    let got = within(2, "reset after shutdown", drain(&mut client)).await;
    assert_eq!(
        got.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

/// With `max_connections = 1`, a second client waits until the first is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_extra_clients_back() {
    let echo = echo_server().await;
    let relay = shaper_with(echo, "none", "none", |o| o.max_connections = 1);
    let mut first = TcpStream::connect(relay.local_addr()).await.unwrap();
    first.write_all(b"1").await.unwrap();
    let mut one = [0u8; 1];
    within(5, "first client", first.read_exact(&mut one))
        .await
        .unwrap();
    let mut second = TcpStream::connect(relay.local_addr()).await.unwrap();
    second.write_all(b"2").await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read_exact(&mut one)).await;
    assert!(
        early.is_err(),
        "the second client was served beyond the limit"
    );
    drop(first);
    within(
        5,
        "second client after the first left",
        second.read_exact(&mut one),
    )
    .await
    .unwrap();
    assert_eq!(&one, b"2");
}

/// A target that never reads: the relay queues at most its buffer, so the client's
/// writes stall after the socket buffers on the way (a few MB on loopback) are full,
/// far below 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_receiver_backpressures_the_sender() {
    let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
    let addr = target(|stream| async move {
        let _ = hold_rx.await;
        drop(stream);
    })
    .await;
    let relay = shaper(addr, "none");
    let mut client = TcpStream::connect(relay.local_addr()).await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let mut written = 0usize;
    let stalled = tokio::time::timeout(Duration::from_secs(5), async {
        while written < 64 << 20 {
            // A write that cannot finish within 500 ms counts as a stall.
            match tokio::time::timeout(Duration::from_millis(500), client.write(&chunk)).await {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    eprintln!(
        "a client could write {} kB to a target that never reads",
        written / 1024
    );
    assert!(stalled, "the client wrote {written} bytes without a stall");
    assert!(written > 256 * 1024);
    let _ = hold_tx.send(());
}
