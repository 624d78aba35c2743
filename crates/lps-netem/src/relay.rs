//! One relayed connection: two pumps, one task per direction.
//!
//! A pump reads from one socket while it has room (at most `buffer_bytes` queued, like a
//! socket buffer: a slow receiver backpressures the sender), stamps what it read with
//! [`Link::schedule`], and writes each piece once it is due, gathering all due pieces
//! into one vectored write. Both the read and the write wait in one `select!`, so a pump
//! is a single task and the bytes are never copied.
//!
//! Endings: a FIN is passed on (shutdown of the write side) after the queued bytes are
//! delivered, and the other direction carries on (half-close). An error on either side,
//! or the relay's shutdown, stops both pumps and resets both sockets, so that neither
//! peer mistakes a cut stream for a complete one.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::Shared;
use crate::link::{Link, Piece};

/// The most one read takes.
const READ_MAX: usize = 64 * 1024;

/// How much earlier than due the timer is aimed. Tokio's timer rounds every wait up to
/// the next millisecond and then wakes late by a fraction of one; aiming a millisecond
/// early (at most half the wait, so that short delays are never skipped) puts the
/// deliveries on time on average, each within about ±1 ms.
const TIMER_EARLY: Duration = Duration::from_millis(1);

/// Waits shorter than this are not worth a timer: the piece is written at once.
const TIMER_NOW: Duration = Duration::from_micros(50);

/// The most pieces one vectored write gathers.
const MAX_IOV: usize = 64;

/// Which socket of a pump failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Read,
    Write,
}

enum Outcome {
    /// The source sent FIN and everything was delivered, FIN included.
    Closed,
    /// The connection or the relay was stopped.
    Cancelled,
    /// A socket failed.
    Failed(Side, io::Error),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::Failed(Side::Read, e) => write!(f, "read failed: {e}"),
            Self::Failed(Side::Write, e) => write!(f, "write failed: {e}"),
        }
    }
}

/// Relays `client` to the relay's target until both directions are closed, one fails,
/// or `cancel` fires.
pub(crate) async fn connection(client: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    shared.counters.active.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard(shared.clone());
    // The kernel completed the client's handshake at once. On the emulated link the SYN,
    // the SYN-ACK and then the first data cross it: nothing the client sends arrives
    // before two forward delays and a reverse one have passed.
    let handshake = Instant::now() + shared.forward.delay() * 2 + shared.reverse.delay();
    let Some(upstream) = dial(&shared, &cancel).await else {
        return reset(client);
    };
    // Small messages must not wait for Nagle: the emulated delay is the only one.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let conn = cancel.child_token();
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let forward = tokio::spawn({
        let (shared, conn) = (shared.clone(), conn.clone());
        async move {
            let link = &shared.forward;
            pump(
                client_read,
                upstream_write,
                link,
                shared.buffer_bytes,
                handshake,
                &conn,
            )
            .await
        }
    });
    let reverse = pump(
        upstream_read,
        client_write,
        &shared.reverse,
        shared.buffer_bytes,
        Instant::now(),
        &conn,
    )
    .await;
    let forward = forward.await;

    let (reverse_outcome, upstream_read, client_write) = reverse;
    let Ok((forward_outcome, client_read, upstream_write)) = forward else {
        // The forward task panicked and took its halves with it; dropping ours closes.
        warn!("the forward pump panicked");
        return;
    };
    let clean = matches!(
        (&forward_outcome, &reverse_outcome),
        (Outcome::Closed, Outcome::Closed)
    );
    debug!(forward = ?forward_outcome, reverse = ?reverse_outcome, "connection ended");
    if !clean {
        if let Ok(client) = client_read.reunite(client_write) {
            reset(client);
        }
        if let Ok(upstream) = upstream_read.reunite(upstream_write) {
            reset(upstream);
        }
    }
}

/// Connects to the relay's target; `None` (counted and logged) when that fails, times out
/// or `cancel` fires.
async fn dial(shared: &Shared, cancel: &CancellationToken) -> Option<TcpStream> {
    let target = shared.target;
    let connect = tokio::select! {
        () = cancel.cancelled() => return None,
        r = tokio::time::timeout(shared.connect_timeout, TcpStream::connect(target)) => r,
    };
    match connect {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => {
            warn!(%target, error = %e, "cannot connect to the target; resetting the client");
        }
        Err(_) => {
            warn!(%target, timeout_ms = shared.connect_timeout.as_millis() as u64,
                "connecting to the target timed out; resetting the client");
        }
    }
    shared
        .counters
        .target_failures
        .fetch_add(1, Ordering::Relaxed);
    None
}

struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Closes `stream` with a RST (SO_LINGER 0), so that the peer sees the cut at once.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

/// Moves bytes from `src` to `dst` as `link` shapes them, none before `first_due`. Cancels `conn` when it fails,
/// so that the other direction stops too.
async fn pump(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    link: &Link,
    buffer_bytes: usize,
    first_due: Instant,
    conn: &CancellationToken,
) -> (Outcome, OwnedReadHalf, OwnedWriteHalf) {
    let mut queue: VecDeque<(Instant, Bytes)> = VecDeque::new();
    let mut queued = 0usize;
    let mut buf = BytesMut::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut last_due = first_due;
    let mut eof = false;
    let outcome = loop {
        if eof && queue.is_empty() {
            break match dst.shutdown().await {
                Ok(()) => Outcome::Closed,
                Err(e) => Outcome::Failed(Side::Write, e),
            };
        }
        let room = buffer_bytes.saturating_sub(queued).min(READ_MAX);
        let reading = !eof && room > 0;
        let gate = if reading {
            link.read_gate(Instant::now())
        } else {
            None
        };
        let head = queue.front().map(|(due, _)| *due);
        tokio::select! {
            biased;
            () = conn.cancelled() => break Outcome::Cancelled,
            written = write_due(&mut dst, &queue, head), if head.is_some() => match written {
                Ok(n) => {
                    queued -= n;
                    consume(&mut queue, n);
                }
                Err(e) => break Outcome::Failed(Side::Write, e),
            },
            read = read_some(&mut src, &mut buf, room, gate), if reading => match read {
                Ok(0) => eof = true,
                Ok(n) => {
                    let mut chunk = buf.split_to(n).freeze();
                    pieces.clear();
                    link.schedule(Instant::now(), n, &mut last_due, &mut pieces);
                    for piece in &pieces {
                        queue.push_back((piece.due, chunk.split_to(piece.len)));
                    }
                    queued += n;
                }
                Err(e) => break Outcome::Failed(Side::Read, e),
            },
        }
    };
    if matches!(outcome, Outcome::Failed(..)) {
        conn.cancel();
    }
    (outcome, src, dst)
}

/// Waits until the first piece is due, then writes it and every piece due by then.
async fn write_due(
    dst: &mut OwnedWriteHalf,
    queue: &VecDeque<(Instant, Bytes)>,
    head: Option<Instant>,
) -> io::Result<usize> {
    if let Some(due) = head {
        let wait = due.saturating_duration_since(Instant::now());
        if wait > TIMER_NOW {
            sleep_until(due - TIMER_EARLY.min(wait / 2)).await;
        }
    }
    let now = Instant::now();
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    for (due, bytes) in queue.iter().take(MAX_IOV) {
        if count > 0 && *due > now {
            break;
        }
        slices[count] = IoSlice::new(bytes);
        count += 1;
    }
    match dst.write_vectored(&slices[..count]).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(n),
    }
}

/// Drops the first `n` bytes of the queue.
fn consume(queue: &mut VecDeque<(Instant, Bytes)>, mut n: usize) {
    while n > 0 {
        let Some((_, front)) = queue.front_mut() else {
            return;
        };
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        queue.pop_front();
    }
}

/// Waits for `gate` (the shared bucket's queue), then reads at most `max` bytes.
async fn read_some(
    src: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    max: usize,
    gate: Option<Instant>,
) -> io::Result<usize> {
    if let Some(at) = gate {
        sleep_until(at).await;
    }
    // Earlier reads live on in the queue as slices of the same allocation; start a new
    // one when little is left rather than read a few bytes at a time.
    if buf.capacity() - buf.len() < max.min(4096) {
        buf.reserve(READ_MAX);
    }
    src.read_buf(&mut (&mut *buf).limit(max)).await
}
