//! lps-netem: network emulation for kernels without `sch_netem`, as a shaping TCP relay.
//!
//! Upstream shaped every proxy container's interface with `tc` (SPEC §5): a token bucket
//! of 5 Mbit/s (burst 18 kB) feeding netem, delay 30 ms ± 3 ms (normal), loss 0.01 % with
//! 25 % correlation. The kernels here have no `sch_netem`, so a local run puts a
//! [`Shaper`] on each shaped hop instead: it listens on loopback and relays every accepted
//! connection to the hop's target, shaping each direction with a [`Profile`].
//!
//! The model, per direction, per segment of 1448 bytes (`src/link.rs` has the details):
//! - **delay**: `delay + N(0, jitter)`, truncated at ±4σ and at 0;
//! - **rate**: a token bucket (frames with their 66 bytes of headers, as tbf counts them)
//!   shared by all connections through the relay in that direction, as upstream's bucket
//!   on the container's interface was; readers stop reading while more than netem's 1000
//!   frames wait for it;
//! - **loss**: a lost segment still arrives, one RTO later, as its retransmission would;
//!   netem's correlated draws decide which;
//! - **order**: bytes of one connection are delivered in order, never earlier than the
//!   ones before them (what TCP hands an application even when netem reorders packets);
//! - **handshake**: a new connection's first bytes arrive no sooner than a SYN, a SYN-ACK
//!   and the data itself would have crossed the link (2 forward + 1 reverse delays).
//!
//! Upstream's ingress policing at 100 Mbit/s is covered by the 5 Mbit/s bucket: every
//! shaped direction is 20 times tighter, and the unshaped senders of a run (load
//! generator, simulator) stay far below 100 Mbit/s.
//!
//! Bounds: at most `buffer_bytes` (256 KiB) queued per connection and direction, so a
//! slow receiver backpressures the sender as a socket buffer would; at most
//! `max_connections` connections (further ones wait in the listen backlog). A FIN is
//! passed on after the queued bytes; a reset, an error or the relay's shutdown resets
//! both sides.
//!
//! In process: [`Shaper::start`] (tests and the `lps` CLI). As a process ([`main`], e.g.
//! `lps service lps-netem`): `NETEM_LISTEN`, `NETEM_TARGET`, `NETEM_PROFILE`,
//! `NETEM_REVERSE_PROFILE`, `NETEM_BUFFER_BYTES`, `NETEM_MAX_CONNECTIONS`,
//! `NETEM_CONNECT_TIMEOUT_MS`, `NETEM_SEED`, `LISTEN_BACKLOG`, and the logging variables
//! of `lps-common` (`SERVICE_NAME`, `LOG`, `LOG_FORMAT`, `LOG_DIR`); [`config`] documents
//! each.

#![warn(missing_docs, unreachable_pub)]

pub mod config;
mod link;
pub mod profile;
mod relay;

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

pub use config::Config;
pub use profile::{Profile, ProfileError};

use link::Link;

/// How a relay runs, besides where it listens and relays to.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Shapes client → target.
    pub forward: Profile,
    /// Shapes target → client.
    pub reverse: Profile,
    /// Most bytes queued per connection and direction (default 256 KiB).
    pub buffer_bytes: usize,
    /// Most connections relayed at once (default 1024).
    pub max_connections: usize,
    /// How long connecting to the target may take (default 5 s).
    pub connect_timeout: Duration,
    /// Listen backlog (default 4096).
    pub backlog: u32,
    /// Seed of the random draws (jitter, loss); `None`: a random one.
    pub seed: Option<u64>,
}

impl Options {
    /// `profile` in both directions, default limits.
    pub fn symmetric(profile: Profile) -> Self {
        Self {
            forward: profile.clone(),
            reverse: profile,
            ..Self::default()
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            forward: Profile::default(),
            reverse: Profile::default(),
            buffer_bytes: 256 * 1024,
            max_connections: 1024,
            connect_timeout: Duration::from_secs(5),
            backlog: 4096,
            seed: None,
        }
    }
}

/// Counters of a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections being relayed now.
    pub active: u64,
    /// Connections reset because the target could not be reached.
    pub target_failures: u64,
    /// Client → target.
    pub forward: DirectionStats,
    /// Target → client.
    pub reverse: DirectionStats,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// Bytes read from the sender.
    pub bytes: u64,
    /// Segments "lost", each delivered one RTO late.
    pub segments_lost: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    target_failures: AtomicU64,
}

/// What the connections of one relay share.
#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    forward: Link,
    reverse: Link,
    buffer_bytes: usize,
    connect_timeout: Duration,
    counters: Counters,
}

impl Shared {
    fn new(target: SocketAddr, options: &Options) -> Self {
        let seed = options.seed.unwrap_or_else(rand::random);
        let now = tokio::time::Instant::now();
        Self {
            target,
            forward: Link::new(&options.forward, seed, now),
            reverse: Link::new(&options.reverse, seed.wrapping_add(1), now),
            buffer_bytes: options.buffer_bytes.max(1),
            connect_timeout: options.connect_timeout,
            counters: Counters::default(),
        }
    }

    fn stats(&self) -> Stats {
        let direction = |link: &Link| DirectionStats {
            bytes: link.counters.bytes.load(Ordering::Relaxed),
            segments_lost: link.counters.segments_lost.load(Ordering::Relaxed),
        };
        Stats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            active: self.counters.active.load(Ordering::Relaxed),
            target_failures: self.counters.target_failures.load(Ordering::Relaxed),
            forward: direction(&self.forward),
            reverse: direction(&self.reverse),
        }
    }
}

/// A running relay. Dropping it stops it too, without waiting.
#[derive(Debug)]
pub struct Shaper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Shaper {
    /// Listens on `listen` (port 0 picks one: see [`Shaper::local_addr`]) and relays each
    /// connection to `target`, shaped by `profile` in both directions. Needs a Tokio
    /// runtime (an error, not a panic, without one).
    pub fn start(listen: SocketAddr, target: SocketAddr, profile: Profile) -> io::Result<Self> {
        Self::start_with(listen, target, Options::symmetric(profile))
    }

    /// As [`Shaper::start`], with a profile per direction and other limits.
    pub fn start_with(
        listen: SocketAddr,
        target: SocketAddr,
        options: Options,
    ) -> io::Result<Self> {
        tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let listener = lps_common::server::bind(listen, options.backlog)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(target, &options));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            options.max_connections,
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            shared,
            shutdown,
            task: Some(task),
        })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters now.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stops accepting, resets every relayed connection, and returns once all are gone.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Relays each connection accepted on `listener` to `target`, shaped per `options`, until
/// `shutdown` fires; then resets the connections and returns once they are gone.
pub async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    options: Options,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared::new(target, &options));
    accept_loop(listener, shared, options.max_connections, shutdown).await;
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let local = listener.local_addr().ok();
    info!(listen = ?local, target = %shared.target, "relaying");
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        // A free slot first: beyond the limit, clients wait in the listen backlog.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("relay", %peer);
        tracker.spawn(
            {
                let (shared, shutdown) = (shared.clone(), shutdown.clone());
                async move {
                    relay::connection(stream, shared, shutdown).await;
                    drop(slot);
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    info!(listen = ?local, "relay stopped");
}

/// Binds `config.listen` and relays until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let listener = lps_common::server::bind(config.listen, config.options.backlog)
        .with_context(|| format!("binding {} (NETEM_LISTEN)", config.listen))?;
    info!(forward = %config.options.forward, reverse = %config.options.reverse, "network profile");
    serve(
        listener,
        config.target,
        config.options,
        lps_common::server::shutdown_on_signals(),
    )
    .await;
    Ok(())
}

/// The process entry point: configuration from the environment (one line and exit 64
/// when invalid), logging, then [`run`].
pub fn main() -> ExitCode {
    lps_common::service::main_from_env(Config::from_lookup, |c| &c.telemetry, run)
}
