//! A durable replay journal: what the bridge acknowledged in the last replay window, on disk.
//!
//! Mosquitto persists by snapshot, so a broker killed between two snapshots forgets messages
//! it already completed. The in-memory replay window covers a broker crash alone; this journal
//! also covers the bridge dying with it (a host crash): each payload is appended concurrently
//! with its publish and is durable (`fdatasync`) before the 200 goes out.
//!
//! - **Group commit.** One writer thread owns the files. [`Journal::append`] sends its payload
//!   over a bounded channel; the writer takes everything queued, writes it with one
//!   `write_all`, calls `sync_data` once and answers every appender of that batch. Blocking
//!   file I/O never runs on the async worker threads.
//! - **Record format.** `len: u32 LE | unix millis: u64 LE | crc32(len, millis, payload): u32
//!   LE | payload`. Reading a segment stops at the first torn or corrupt record (a crash
//!   mid-write) and logs how many bytes it ignored.
//! - **Bounded disk.** Segments `<name>.<seq>.journal`. The writer starts a new segment once
//!   the current one is older than the window, and deletes a segment once its successor is
//!   older than the window (every record in it is then out of the window): normally two files,
//!   holding at most two windows of traffic.
//! - **Recovery.** [`Journal::open`] reads every segment and returns the payloads stamped
//!   within the window of the *newest* record (a restart may come much later), oldest first.
//!   It records them again in a fresh segment, stamped now, before deleting the old segments:
//!   they stay recoverable across further crashes until newer traffic pushes them out of the
//!   window. The caller should append them again when it publishes them again (a new
//!   acknowledgement the broker may forget just as well).
//!
//! Timestamps are wall-clock so they make sense after a restart; they never go backwards
//! within a journal (a clock stepped back stamps records with the newest time seen, which
//! replays more, never less). A clock stepped *forward* by more than the window between two
//! records leaves the records before the step out of the next replay.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Bytes before each payload: length, timestamp, checksum.
const HEADER_LEN: usize = 16;
const SEGMENT_SUFFIX: &str = ".journal";

/// Resource bounds of a [`Journal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Appends waiting for the writer; beyond it [`Journal::append`] waits for room.
    pub queue: usize,
    /// Bytes one group commit writes at most (a single larger record goes alone).
    pub max_batch_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 4096,
            max_batch_bytes: 4 << 20,
        }
    }
}

/// Totals since [`Journal::open`], for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Records made durable.
    pub records: u64,
    /// Group commits (`fdatasync` calls) that succeeded.
    pub syncs: u64,
    /// Bytes made durable, headers included.
    pub bytes: u64,
    /// Group commits that failed (each answered all its appenders with an error).
    pub failed_commits: u64,
}

#[derive(Debug, Default)]
struct Counters {
    records: AtomicU64,
    syncs: AtomicU64,
    bytes: AtomicU64,
    failed_commits: AtomicU64,
}

#[derive(Debug)]
struct Append {
    payload: Arc<Vec<u8>>,
    done: oneshot::Sender<io::Result<()>>,
}

/// Handle to the journal's writer thread; cheap to clone. The writer stops once every handle
/// is dropped and the queue is drained.
#[derive(Debug, Clone)]
pub struct Journal {
    tx: mpsc::Sender<Append>,
    counters: Arc<Counters>,
}

impl Journal {
    /// Opens (creating `dir`) the journal of `name`; returns it and the payloads recorded
    /// within `window` of the newest record (what to publish again after a crash), oldest
    /// first. Blocking: call it before serving or from `spawn_blocking`.
    pub fn open(
        dir: &Path,
        name: &str,
        window: Duration,
        limits: Limits,
    ) -> io::Result<(Self, Vec<Vec<u8>>)> {
        check_arguments(name, window, limits)?;
        fs::create_dir_all(dir)?;
        let old_segments = list_segments(dir, name)?;
        let records = read_segments(&old_segments)?;
        let found = records.len();
        let (newest, replay) = replay_window(records, window);

        let counters = Arc::new(Counters::default());
        let mut writer = Writer {
            dir: dir.to_owned(),
            name: name.to_owned(),
            window,
            segments: VecDeque::new(),
            file: None,
            next_seq: old_segments.last().map_or(0, |(seq, _)| seq + 1),
            last_ts: newest,
            buf: Vec::new(),
            counters: Arc::clone(&counters),
        };
        writer.commit(replay.iter().map(Vec::as_slice))?;
        for (_, path) in &old_segments {
            // A leftover segment only replays its records again after the next restart.
            if let Err(err) = fs::remove_file(path) {
                warn!(file = %path.display(), %err, "could not delete an old journal segment");
            }
        }
        info!(
            dir = %dir.display(),
            name,
            segments = old_segments.len(),
            records = found,
            replay = replay.len(),
            "journal opened"
        );

        let (tx, rx) = mpsc::channel(limits.queue);
        std::thread::Builder::new()
            .name(format!("journal-{name}"))
            .spawn(move || writer.run(rx, limits.max_batch_bytes))?;
        Ok((Self { tx, counters }, replay))
    }

    /// Appends one payload; resolves once it is durable (fdatasync), group-committed with
    /// every append that arrived meanwhile. Err when the disk fails (the caller answers 503).
    /// Dropping the future does not withdraw the payload.
    pub async fn append(&self, payload: Arc<Vec<u8>>) -> io::Result<()> {
        if u32::try_from(payload.len()).is_err() {
            return Err(invalid(format!(
                "journal payload of {} bytes exceeds the record limit",
                payload.len()
            )));
        }
        let (done, result) = oneshot::channel();
        self.tx
            .send(Append { payload, done })
            .await
            .map_err(|_| writer_stopped())?;
        result.await.map_err(|_| writer_stopped())?
    }

    /// Totals since [`Journal::open`].
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            records: c.records.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            failed_commits: c.failed_commits.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    started: Instant,
}

/// Owns the segment files; runs on its own thread.
struct Writer {
    dir: PathBuf,
    name: String,
    window: Duration,
    /// Live segments, oldest first; the last one is being written.
    segments: VecDeque<Segment>,
    /// The current segment; `None` after an I/O error, so the next commit starts a new one
    /// instead of writing after bytes of unknown state.
    file: Option<File>,
    next_seq: u64,
    last_ts: u64,
    buf: Vec<u8>,
    counters: Arc<Counters>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Append>, max_batch_bytes: usize) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = HEADER_LEN + first.payload.len();
            batch.push(first);
            while bytes < max_batch_bytes {
                let Ok(next) = rx.try_recv() else { break };
                bytes += HEADER_LEN + next.payload.len();
                batch.push(next);
            }
            let result = self.commit(batch.iter().map(|a: &Append| a.payload.as_slice()));
            if let Err(err) = &result {
                self.counters.failed_commits.fetch_add(1, Ordering::Relaxed);
                error!(
                    dir = %self.dir.display(),
                    %err,
                    records = batch.len(),
                    "journal write failed; answering those requests with an error"
                );
            }
            for append in batch.drain(..) {
                let answer = match &result {
                    Ok(()) => Ok(()),
                    Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
                };
                // The appender may have given up waiting; the record stays written.
                let _ = append.done.send(answer);
            }
        }
        debug!(name = %self.name, "journal writer stopped");
    }

    /// Writes `payloads` in one `write_all` and makes them durable with one `sync_data`.
    fn commit<'a>(&mut self, payloads: impl Iterator<Item = &'a [u8]>) -> io::Result<()> {
        self.buf.clear();
        let mut count = 0;
        let mut payloads = payloads.peekable();
        if payloads.peek().is_none() {
            return Ok(());
        }
        let rotate = self
            .segments
            .back()
            .is_none_or(|s| s.started.elapsed() >= self.window);
        if rotate || self.file.is_none() {
            self.start_segment()?;
        }
        let ts = unix_millis().max(self.last_ts);
        for payload in payloads {
            encode(&mut self.buf, ts, payload)?;
            count += 1;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("journal segment not open"));
        };
        let written = file.write_all(&self.buf).and_then(|()| file.sync_data());
        if let Err(err) = written {
            self.file = None;
            return Err(err);
        }
        self.last_ts = ts;
        self.counters.records.fetch_add(count, Ordering::Relaxed);
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Starts a new segment (durably: its directory entry too), then deletes the segments
    /// whose records have all left the window.
    fn start_segment(&mut self) -> io::Result<()> {
        self.file = None;
        let path = segment_path(&self.dir, &self.name, self.next_seq);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        File::open(&self.dir)?.sync_all()?;
        self.next_seq += 1;
        debug!(file = %path.display(), "journal segment started");
        self.segments.push_back(Segment {
            path,
            started: Instant::now(),
        });
        self.file = Some(file);
        // Every record of a segment predates its successor's start.
        while self.segments.len() >= 2 && self.segments[1].started.elapsed() >= self.window {
            let Some(old) = self.segments.pop_front() else {
                break;
            };
            match fs::remove_file(&old.path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => {
                    warn!(file = %old.path.display(), %err, "could not delete a journal segment");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Refuses a journal `name` that is not a plain file name, and a zero window or queue.
fn check_arguments(name: &str, window: Duration, limits: Limits) -> io::Result<()> {
    if name.is_empty() || name.contains(['/', '\\', '\0']) {
        return Err(invalid(format!(
            "journal name {name:?}: expected a non-empty file name without path separators"
        )));
    }
    if window.is_zero() || limits.queue == 0 {
        return Err(invalid(format!(
            "journal {name}: window {window:?} and queue {} must be positive",
            limits.queue
        )));
    }
    Ok(())
}

/// Every record of `segments` (oldest first), up to the first torn or corrupt one of each
/// (logged).
fn read_segments(segments: &[(u64, PathBuf)]) -> io::Result<Vec<(u64, Vec<u8>)>> {
    let mut records = Vec::new();
    for (_, path) in segments {
        let data = fs::read(path)?;
        let ignored = decode(&data, &mut records);
        if ignored > 0 {
            warn!(
                file = %path.display(),
                ignored_bytes = ignored,
                "journal segment ends in a torn or corrupt record; ignored the rest"
            );
        }
    }
    Ok(records)
}

/// The newest stamp of `records` (0 for none) and the payloads stamped within `window` of
/// it, oldest first; warns when that stamp lies in the future.
fn replay_window(records: Vec<(u64, Vec<u8>)>, window: Duration) -> (u64, Vec<Vec<u8>>) {
    let newest = records.iter().map(|(ts, _)| *ts).max().unwrap_or(0);
    let cutoff = newest.saturating_sub(millis(window));
    let replay: Vec<Vec<u8>> = records
        .into_iter()
        .filter(|(ts, _)| *ts >= cutoff)
        .map(|(_, payload)| payload)
        .collect();
    if newest > unix_millis().saturating_add(millis(window)) {
        warn!(
            newest_ms = newest,
            "journal records are stamped in the future (clock stepped back?); \
             new records keep the newest stamp until the clock catches up"
        );
    }
    (newest, replay)
}

fn segment_path(dir: &Path, name: &str, seq: u64) -> PathBuf {
    dir.join(format!("{name}.{seq}{SEGMENT_SUFFIX}"))
}

/// The segments of `name` in `dir`, oldest first.
fn list_segments(dir: &Path, name: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let prefix = format!("{name}.");
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let seq = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(segments)
}

fn encode(buf: &mut Vec<u8>, ts: u64, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| invalid(format!("payload of {} bytes too large", payload.len())))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.extend_from_slice(&checksum(len, ts, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

fn checksum(len: u32, ts: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len.to_le_bytes());
    crc.update(&ts.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// Appends the records of one segment to `out` as `(unix millis, payload)`, up to the first
/// torn or corrupt one; returns how many bytes it ignored from there.
fn decode(mut data: &[u8], out: &mut Vec<(u64, Vec<u8>)>) -> usize {
    while let Some((len, rest)) = data.split_first_chunk::<4>() {
        let Some((ts, rest)) = rest.split_first_chunk::<8>() else {
            break;
        };
        let Some((crc, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let (len, ts, crc) = (
            u32::from_le_bytes(*len),
            u64::from_le_bytes(*ts),
            u32::from_le_bytes(*crc),
        );
        let Some(payload) = usize::try_from(len).ok().and_then(|n| rest.get(..n)) else {
            break;
        };
        if checksum(len, ts, payload) != crc {
            break;
        }
        out.push((ts, payload.to_vec()));
        data = &rest[payload.len()..];
    }
    data.len()
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn writer_stopped() -> io::Error {
    io::Error::other("journal writer stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::future::join_all;

    const WINDOW: Duration = Duration::from_secs(5);

    fn open(dir: &Path, window: Duration) -> (Journal, Vec<Vec<u8>>) {
        Journal::open(dir, "lp1", window, Limits::default()).expect("open journal")
    }

    fn payload(i: usize) -> Arc<Vec<u8>> {
        Arc::new(format!("message {i}").into_bytes())
    }

    fn segment_files(dir: &Path) -> Vec<(u64, PathBuf)> {
        list_segments(dir, "lp1").expect("list segments")
    }

    #[tokio::test]
    async fn round_trip_survives_repeated_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, replay) = open(dir.path(), WINDOW);
        assert!(replay.is_empty());
        for i in 0..3 {
            journal.append(payload(i)).await.expect("append");
        }
        assert_eq!(journal.stats().records, 3);
        drop(journal);

        let expected: Vec<Vec<u8>> = (0..3).map(|i| payload(i).to_vec()).collect();
        let (journal, replay) = open(dir.path(), WINDOW);
        assert_eq!(replay, expected);
        // Recorded again in a fresh segment, the old one deleted: a second crash before the
        // replay was published loses nothing.
        assert_eq!(segment_files(dir.path()).len(), 1);
        drop(journal);
        let (_journal, replay) = open(dir.path(), WINDOW);
        assert_eq!(replay, expected);
    }

    #[tokio::test]
    async fn window_is_anchored_at_the_newest_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Written long ago (1970): relative to now, everything would be out of the window.
        let mut older = Vec::new();
        for (ts, body) in [(1_000, "a"), (2_000, "b"), (8_000, "c")] {
            encode(&mut older, ts, body.as_bytes()).expect("encode");
        }
        let mut newer = Vec::new();
        encode(&mut newer, 9_000, b"d").expect("encode");
        fs::write(segment_path(dir.path(), "lp1", 3), older).expect("write");
        fs::write(segment_path(dir.path(), "lp1", 4), newer).expect("write");

        let (_journal, replay) = open(dir.path(), WINDOW);
        assert_eq!(replay, vec![b"c".to_vec(), b"d".to_vec()]);
        let segments = segment_files(dir.path());
        assert_eq!(segments.len(), 1, "old segments deleted: {segments:?}");
        assert_eq!(segments[0].0, 5, "the new segment follows the old ones");
    }

    #[tokio::test]
    async fn torn_or_corrupt_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(dir.path(), WINDOW);
        for i in 0..3 {
            journal.append(payload(i)).await.expect("append");
        }
        drop(journal);
        let [(_, path)] = segment_files(dir.path()).try_into().expect("one segment");
        let clean = fs::read(&path).expect("read");

        // A record cut mid-payload, a zero-filled tail, a flipped payload byte.
        let mut torn = clean.clone();
        encode(&mut torn, unix_millis(), b"cut short").expect("encode");
        torn.truncate(torn.len() - 3);
        let mut zeros = clean.clone();
        zeros.extend_from_slice(&[0; 4096]);
        let mut flipped = clean.clone();
        if let Some(last) = flipped.last_mut() {
            *last ^= 0x01;
        }
        let two: Vec<Vec<u8>> = (0..2).map(|i| payload(i).to_vec()).collect();
        let three: Vec<Vec<u8>> = (0..3).map(|i| payload(i).to_vec()).collect();
        for (damaged, expected) in [(torn, &three), (zeros, &three), (flipped, &two)] {
            for (_, old) in segment_files(dir.path()) {
                fs::remove_file(old).expect("remove");
            }
            fs::write(&path, damaged).expect("write");
            let (journal, replay) = open(dir.path(), WINDOW);
            assert_eq!(&replay, expected);
            // The journal goes on after the damage.
            journal
                .append(payload(9))
                .await
                .expect("append after damage");
        }
    }

    #[tokio::test]
    async fn rotation_keeps_disk_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let window = Duration::from_millis(40);
        let (journal, _) = open(dir.path(), window);
        let start = Instant::now();
        let mut i = 0;
        let mut max_files = 0;
        while start.elapsed() < window * 10 {
            journal.append(payload(i)).await.expect("append");
            i += 1;
            max_files = max_files.max(segment_files(dir.path()).len());
            // Lets wall-clock time pass; nothing waits on another task here.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop(journal);
        let segments = segment_files(dir.path());
        assert!(
            max_files <= 2,
            "at most two segments on disk, saw {max_files}"
        );
        assert!(
            segments.last().is_some_and(|(seq, _)| *seq >= 5),
            "rotated several times: {segments:?}"
        );
        let (_journal, replay) = open(dir.path(), window);
        assert!(
            !replay.is_empty() && replay.len() < i,
            "{} of {i}",
            replay.len()
        );
        assert_eq!(replay.last(), Some(&payload(i - 1).to_vec()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(dir.path(), WINDOW);
        let tasks: Vec<_> = (0..64)
            .map(|t| {
                let journal = journal.clone();
                tokio::spawn(async move {
                    let appends = (0..50).map(|i| journal.append(payload(t * 50 + i)));
                    join_all(appends)
                        .await
                        .into_iter()
                        .collect::<io::Result<()>>()
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("append");
        }
        let stats = journal.stats();
        assert_eq!(stats.records, 3200);
        assert!(
            stats.syncs * 4 < stats.records,
            "expected batches, got {stats:?}"
        );
        drop(journal);
        let (_journal, replay) = open(dir.path(), WINDOW);
        assert_eq!(replay.len(), 3200);
    }

    #[tokio::test]
    async fn disk_failure_is_an_error_then_recovers() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("journal");
        let window = Duration::from_millis(20);
        let (journal, _) = open(&dir, window);
        journal.append(payload(0)).await.expect("append");
        fs::remove_dir_all(&dir).expect("remove dir");
        // The next append needs a new segment (the window passed) and cannot create it.
        tokio::time::sleep(window).await;
        let err = journal.append(payload(1)).await.expect_err("no directory");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert_eq!(journal.stats().failed_commits, 1);
        fs::create_dir(&dir).expect("create dir");
        journal
            .append(payload(2))
            .await
            .expect("append after repair");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = Limits::default();
        let bad_name = Journal::open(dir.path(), "a/b", WINDOW, limits).map(|_| ());
        let no_window = Journal::open(dir.path(), "a", Duration::ZERO, limits).map(|_| ());
        assert_eq!(
            bad_name.map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidInput)
        );
        assert_eq!(
            no_window.map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidInput)
        );
    }

    /// Cost of the journal on this machine: appends/s, syncs and latency of 150-byte payloads
    /// from 64 concurrent tasks and from one. `JOURNAL_BENCH_DIR` picks the disk (default: a
    /// temporary directory).
    /// `cargo test --release -p legacy-proxy-1 --lib journal::tests::bench -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark; run by hand"]
    async fn bench_append() {
        const APPENDS: usize = 20_000;
        let root = match std::env::var_os("JOURNAL_BENCH_DIR") {
            Some(dir) => tempfile::tempdir_in(dir),
            None => tempfile::tempdir(),
        }
        .expect("tempdir");
        for tasks in [64, 16, 1] {
            let dir = root.path().join(format!("tasks-{tasks}"));
            let (journal, _) = open(&dir, WINDOW);
            let body = Arc::new(vec![b'x'; 150]);
            let cpu_before = process_cpu_ticks();
            let start = Instant::now();
            let workers: Vec<_> = (0..tasks)
                .map(|t| {
                    let (journal, body) = (journal.clone(), Arc::clone(&body));
                    let count = APPENDS / tasks + usize::from(t < APPENDS % tasks);
                    tokio::spawn(async move {
                        let mut latencies = Vec::with_capacity(count);
                        for _ in 0..count {
                            let sent = Instant::now();
                            journal.append(Arc::clone(&body)).await.expect("append");
                            latencies.push(sent.elapsed());
                        }
                        latencies
                    })
                })
                .collect();
            let mut latencies = Vec::with_capacity(APPENDS);
            for worker in workers {
                latencies.extend(worker.await.expect("task"));
            }
            let elapsed = start.elapsed();
            let tail = latencies_and_cpu(&mut latencies, cpu_before);
            let stats = journal.stats();
            println!(
                "tasks={tasks} appends={} elapsed={elapsed:.2?} appends/s={:.0} syncs={} \
                 records/sync={:.1} {tail}",
                latencies.len(),
                latencies.len() as f64 / elapsed.as_secs_f64(),
                stats.syncs,
                stats.records as f64 / stats.syncs.max(1) as f64,
            );
        }
    }

    /// The service's load shape: requests arrive at a fixed rate (10 every millisecond,
    /// 10,000/s for 2 s), each appending concurrently with the others.
    /// `cargo test --release -p legacy-proxy-1 --lib journal::tests::bench -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark; run by hand"]
    async fn bench_append_at_rate() {
        const PER_MS: usize = 10;
        const MILLIS: usize = 2_000;
        let root = tempfile::tempdir().expect("tempdir");
        let (journal, _) = open(root.path(), WINDOW);
        let body = Arc::new(vec![b'x'; 150]);
        let cpu_before = process_cpu_ticks();
        let start = Instant::now();
        let mut ticks = tokio::time::interval(Duration::from_millis(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut appends = Vec::with_capacity(PER_MS * MILLIS);
        for _ in 0..MILLIS {
            ticks.tick().await;
            for _ in 0..PER_MS {
                let (journal, body) = (journal.clone(), Arc::clone(&body));
                appends.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    journal.append(body).await.expect("append");
                    sent.elapsed()
                }));
            }
        }
        let mut latencies = Vec::with_capacity(appends.len());
        for append in appends {
            latencies.push(append.await.expect("task"));
        }
        let elapsed = start.elapsed();
        let tail = latencies_and_cpu(&mut latencies, cpu_before);
        let stats = journal.stats();
        println!(
            "rate={}/s appends={} elapsed={elapsed:.2?} syncs={} syncs/s={:.0} records/sync={:.1} \
             {tail}",
            PER_MS * 1000,
            latencies.len(),
            stats.syncs,
            stats.syncs as f64 / elapsed.as_secs_f64(),
            stats.records as f64 / stats.syncs.max(1) as f64,
        );
    }

    /// The end of a benchmark's line: p50, p99 and max of `latencies` (sorted here), and the
    /// CPU time used since `cpu_before`.
    fn latencies_and_cpu(latencies: &mut [Duration], cpu_before: Option<(u64, u64)>) -> String {
        let cpu = process_cpu_ticks()
            .zip(cpu_before)
            .map(|((u1, s1), (u0, s0))| {
                format!("user={}ms sys={}ms", (u1 - u0) * 10, (s1 - s0) * 10)
            });
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        format!(
            "p50={:.2?} p99={:.2?} max={:.2?} cpu: {}",
            at(0.5),
            at(0.99),
            at(1.0),
            cpu.unwrap_or_default()
        )
    }

    /// User and system CPU time of this process in clock ticks (100 Hz on Linux).
    fn process_cpu_ticks() -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/self/stat").ok()?;
        let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    }
}
