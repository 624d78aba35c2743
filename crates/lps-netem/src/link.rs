//! One direction of a relay: the emulated link every connection through it shares.
//!
//! [`Link::schedule`] turns the bytes of one read into pieces, each with the instant it
//! may be delivered. Per segment of [`SEGMENT_BYTES`]:
//!
//! 1. netem: `delay + N(0, jitter)` after it was read (truncated at ±4σ and at 0);
//! 2. tbf: the token bucket, shared by all connections, lets it leave no sooner than its
//!    frame's tokens are there (GCRA: the bucket is a "theoretical arrival time");
//! 3. loss: a lost segment arrives one RTO later, as its retransmission would;
//! 4. order: never before the previous segment of the same connection, because TCP hands
//!    bytes to the application in order (what the receiver of a reordered stream sees).
//!
//! Segments due within [`MERGE`] of each other are merged into one piece: Tokio's timer
//! has a millisecond resolution anyway.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::profile::{Profile, SEGMENT_BYTES, SEGMENT_OVERHEAD_BYTES};

/// Segments due closer together than this are delivered together.
pub(crate) const MERGE: Duration = Duration::from_millis(1);

/// How many frames may wait in the bucket's queue before readers stop reading: netem's
/// default `limit 1000` (packets), which is what bounded upstream's queue (a child qdisc
/// replaces tbf's own `latency` limit).
const QUEUE_LIMIT_FRAMES: f64 = 1000.0;

/// A stretch of bytes and when it may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub len: usize,
    pub due: Instant,
}

/// Counters of one direction.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes: AtomicU64,
    pub segments_lost: AtomicU64,
}

/// One direction of the relay, shared by its connections.
#[derive(Debug)]
pub(crate) struct Link {
    passthrough: bool,
    delay: f64,
    jitter: f64,
    loss: f64,
    rho: f64,
    rto: Duration,
    state: Mutex<State>,
    pub counters: Counters,
}

#[derive(Debug)]
struct State {
    rng: SmallRng,
    /// The second value of the last Box–Muller pair.
    spare_normal: Option<f64>,
    /// netem's `crndstate.last` for the loss draws.
    loss_last: f64,
    bucket: Option<Bucket>,
}

/// A token bucket as a GCRA: `tat` is when the bucket will be full again.
#[derive(Debug)]
struct Bucket {
    secs_per_byte: f64,
    /// `burst / rate`: how far ahead of now `tat` may run without waiting.
    tau: Duration,
    /// How far beyond `tau` the bookings may run before readers wait.
    queue: Duration,
    tat: Instant,
}

impl Bucket {
    fn new(rate_bps: u64, burst_bytes: u64, now: Instant) -> Self {
        let secs_per_byte = 8.0 / rate_bps as f64;
        let frame = (SEGMENT_BYTES + SEGMENT_OVERHEAD_BYTES) as f64;
        Self {
            secs_per_byte,
            tau: Duration::from_secs_f64(burst_bytes as f64 * secs_per_byte),
            queue: Duration::from_secs_f64(QUEUE_LIMIT_FRAMES * frame * secs_per_byte),
            tat: now,
        }
    }

    /// When a frame of `bytes` arriving at `at` leaves; takes its tokens.
    fn book(&mut self, at: Instant, bytes: usize) -> Instant {
        let cost = Duration::from_secs_f64(bytes as f64 * self.secs_per_byte);
        let start = self.tat.max(at);
        let leaves = (start + cost)
            .checked_sub(self.tau)
            .map_or(at, |t| t.max(at));
        self.tat = start + cost;
        leaves
    }
}

impl Link {
    pub(crate) fn new(profile: &Profile, seed: u64, now: Instant) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let loss_last = rng.random::<f64>();
        Self {
            passthrough: profile.is_passthrough(),
            delay: profile.delay.as_secs_f64(),
            jitter: profile.jitter.as_secs_f64(),
            loss: profile.loss_percent / 100.0,
            rho: profile.correlation_percent / 100.0,
            rto: profile.rto,
            state: Mutex::new(State {
                rng,
                spare_normal: None,
                loss_last,
                bucket: profile
                    .rate_bps
                    .map(|rate| Bucket::new(rate, profile.burst_bytes, now)),
            }),
            counters: Counters::default(),
        }
    }

    /// The mean one-way delay.
    pub(crate) fn delay(&self) -> Duration {
        Duration::from_secs_f64(self.delay)
    }

    /// When a reader should read again, if the bucket's queue is full: the bookings run
    /// more than netem's 1000 frames past the bucket. `None`: read now.
    pub(crate) fn read_gate(&self, now: Instant) -> Option<Instant> {
        if self.passthrough {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = state.bucket.as_ref()?;
        let ahead = Duration::from_secs_f64(self.delay) + bucket.tau + bucket.queue;
        (bucket.tat > now + ahead).then(|| bucket.tat - ahead)
    }

    /// Appends to `out` the pieces the `len` bytes read at `now` are delivered in.
    /// `last_due` is the connection's latest due instant in this direction.
    pub(crate) fn schedule(
        &self,
        now: Instant,
        len: usize,
        last_due: &mut Instant,
        out: &mut Vec<Piece>,
    ) {
        self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
        if self.passthrough {
            out.push(Piece {
                len,
                due: now.max(*last_due),
            });
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let mut lost = 0;
        let mut piece_start = None;
        let mut left = len;
        while left > 0 {
            let seg = left.min(SEGMENT_BYTES);
            left -= seg;
            let mut due = now + self.sample_delay(state);
            if let Some(bucket) = state.bucket.as_mut() {
                due = bucket.book(due, seg + SEGMENT_OVERHEAD_BYTES);
            }
            if self.loss > 0.0 && self.lost(state) {
                due += self.rto;
                lost += 1;
            }
            due = due.max(*last_due);
            *last_due = due;
            match (out.last_mut(), piece_start) {
                (Some(piece), Some(start)) if due - start < MERGE => {
                    piece.len += seg;
                    piece.due = due;
                }
                _ => {
                    out.push(Piece { len: seg, due });
                    piece_start = Some(due);
                }
            }
        }
        if lost > 0 {
            self.counters
                .segments_lost
                .fetch_add(lost, Ordering::Relaxed);
        }
    }

    fn sample_delay(&self, state: &mut State) -> Duration {
        if self.jitter == 0.0 {
            return Duration::from_secs_f64(self.delay);
        }
        let z = normal(state).clamp(-4.0, 4.0);
        Duration::from_secs_f64((self.delay + z * self.jitter).max(0.0))
    }

    /// netem's `loss_event` for the random model with correlation (`get_crandom`).
    fn lost(&self, state: &mut State) -> bool {
        let u: f64 = state.rng.random();
        let value = if self.rho == 0.0 {
            u
        } else {
            let v = u * (1.0 - self.rho) + state.loss_last * self.rho;
            state.loss_last = v;
            v
        };
        value < self.loss
    }
}

/// A standard normal sample (Box–Muller, both values used).
fn normal(state: &mut State) -> f64 {
    if let Some(z) = state.spare_normal.take() {
        return z;
    }
    // 1 − u is in (0, 1]: ln never sees 0.
    let u1 = 1.0 - state.rng.random::<f64>();
    let u2: f64 = state.rng.random();
    let r = (-2.0 * u1.ln()).sqrt();
    let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
    state.spare_normal = Some(r * sin);
    r * cos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(spec: &str, seed: u64, now: Instant) -> Link {
        Link::new(&spec.parse().unwrap(), seed, now)
    }

    #[test]
    fn passthrough_is_one_piece_due_now() {
        let now = Instant::now();
        let mut out = Vec::new();
        let mut last = now;
        link("none", 1, now).schedule(now, 100_000, &mut last, &mut out);
        assert_eq!(
            out,
            [Piece {
                len: 100_000,
                due: now
            }]
        );
    }

    #[test]
    fn jitter_is_normal_with_the_configured_moments() {
        let now = Instant::now();
        let link = link("delay=30ms,jitter=3ms", 7, now);
        let mut state = link.state.lock().unwrap();
        let n = 100_000;
        let samples: Vec<f64> = (0..n)
            .map(|_| link.sample_delay(&mut state).as_secs_f64() * 1e3)
            .collect();
        let mean = samples.iter().sum::<f64>() / n as f64;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 30.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 3.0).abs() < 0.05, "std {}", var.sqrt());
        let within_1sd = samples.iter().filter(|x| (**x - 30.0).abs() < 3.0).count();
        let share = within_1sd as f64 / n as f64;
        assert!((share - 0.6827).abs() < 0.01, "share within 1σ {share}");
    }

    #[test]
    fn bucket_lets_the_burst_through_then_paces_at_the_rate() {
        let now = Instant::now();
        // 1 Mbit/s = 125 000 B/s, burst 18 kB = 12 frames of 1514 B.
        let link = link("rate=1mbit,burst=18kb", 1, now);
        let mut out = Vec::new();
        let mut last = now;
        link.schedule(now, 100 * SEGMENT_BYTES, &mut last, &mut out);
        let total: usize = out.iter().map(|p| p.len).sum();
        assert_eq!(total, 100 * SEGMENT_BYTES);
        // The first pieces (the burst) are due at once.
        assert_eq!(out[0].due, now);
        // The last frame leaves when 100 frames less the burst have been paid for.
        let expected = (100.0 * 1514.0 - 18.0 * 1024.0) / 125_000.0;
        let got = (out.last().unwrap().due - now).as_secs_f64();
        assert!((got - expected).abs() < 1e-3, "{got} vs {expected}");
        // Due times never go backwards.
        assert!(out.windows(2).all(|w| w[0].due <= w[1].due));
    }

    #[test]
    fn the_bucket_is_shared_by_connections() {
        let now = Instant::now();
        let link = link("rate=1mbit,burst=18kb", 1, now);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut last_a, mut last_b) = (now, now);
        link.schedule(now, 50 * SEGMENT_BYTES, &mut last_a, &mut a);
        link.schedule(now, 50 * SEGMENT_BYTES, &mut last_b, &mut b);
        let expected = (100.0 * 1514.0 - 18.0 * 1024.0) / 125_000.0;
        let got = (b.last().unwrap().due - now).as_secs_f64();
        assert!((got - expected).abs() < 1e-3, "{got} vs {expected}");
    }

    #[test]
    fn jitter_never_reorders_a_connection() {
        let now = Instant::now();
        let link = link("delay=5ms,jitter=5ms", 3, now);
        let mut out = Vec::new();
        let mut last = now;
        for i in 0..200 {
            link.schedule(
                now + Duration::from_micros(i * 100),
                3000,
                &mut last,
                &mut out,
            );
        }
        assert!(out.windows(2).all(|w| w[0].due <= w[1].due));
    }

    #[test]
    fn losses_stall_by_the_rto() {
        let now = Instant::now();
        let link = link("loss=100%,rto=250ms", 1, now);
        let mut out = Vec::new();
        let mut last = now;
        link.schedule(now, 10, &mut last, &mut out);
        assert_eq!(out[0].due - now, Duration::from_millis(250));
        assert_eq!(link.counters.segments_lost.load(Ordering::Relaxed), 1);
    }

    /// netem's correlated draws shrink the spread of the uniform values, so a small loss
    /// probability with correlation loses far fewer segments than it says. Faithful to
    /// upstream; the README gives the figures.
    #[test]
    fn netem_correlation_lowers_the_effective_loss() {
        let now = Instant::now();
        let n = 2_000_000;
        let count = |spec: &str| {
            let link = link(spec, 11, now);
            let mut state = link.state.lock().unwrap();
            (0..n).filter(|_| link.lost(&mut state)).count() as f64 / n as f64
        };
        let plain = count("loss=1%");
        assert!((plain - 0.01).abs() < 0.0005, "{plain}");
        let correlated = count("loss=1%,correlation=25%");
        assert!(correlated < plain * 0.5, "{correlated}");
        eprintln!("loss=1%: {plain:.5}; with correlation=25%: {correlated:.6}");
    }
}
