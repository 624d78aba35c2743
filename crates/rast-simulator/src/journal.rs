//! The simulator's two records of every arrival, written by one background thread:
//!
//! - `ars_simulation.log`, upstream-compatible lines
//!   `[thread] YYYY-MM-DD HH:MM:SS.mmm [INFO ] UID: <uid>, CMD-START <cmd>` and
//!   `... UID: <uid>, CMD-ENDE  <cmd>` (the marker padded to 9 characters), then
//!   `... 200 OK: POST - /<cmd>`, in local time with milliseconds;
//! - `ars_simulation.ledger.jsonl`, one JSON object per arrival ([`LedgerRecord`]) for the
//!   analysis. Both files are appended to, so a duplicate delivery or a restart shows up
//!   as another line, never overwriting an earlier one.
//!
//! Requests hand entries over a bounded channel; the thread writes them in batches and
//! flushes whenever the channel is empty, so the files are current when the simulator is
//! idle and writes are batched under load.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Local};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{error, warn};

/// Name of the upstream-compatible log file.
pub const LOG_FILE: &str = "ars_simulation.log";
/// Name of the machine-readable ledger.
pub const LEDGER_FILE: &str = "ars_simulation.ledger.jsonl";

/// One arrival at the simulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRecord {
    /// The `Request-Id` header verbatim, else a random UUID.
    pub uid: String,
    /// The command from the path.
    pub cmd: String,
    /// Arrival, microseconds since the Unix epoch.
    pub start_us: u64,
    /// Answer (or abort), microseconds since the Unix epoch.
    pub end_us: u64,
    /// Status answered: 200, 404, or 499 when the client went away first.
    pub status: u16,
    /// Requests in progress on arrival (model 0's PR1).
    pub pr1: u64,
    /// Requests finished while this one was in progress (model 0's PR3).
    pub pr3: u64,
    /// Predicted processing time, seconds.
    pub pred_s: f64,
    /// HTTP version of the request, e.g. `HTTP/1.1`.
    pub proto: String,
}

/// What a request hands to the writer thread.
#[derive(Debug)]
pub enum Entry {
    /// `CMD-START` line.
    Start {
        /// When the request arrived.
        at: SystemTime,
        /// Worker thread name.
        thread: Arc<str>,
        /// Request uid.
        uid: Arc<str>,
        /// Command.
        cmd: &'static str,
    },
    /// `CMD-ENDE` and `200 OK` lines (only for status 200) and the ledger record.
    Finish {
        /// When the request finished.
        at: SystemTime,
        /// Worker thread name.
        thread: Arc<str>,
        /// The ledger record.
        record: LedgerRecord,
        /// Told once the lines are handed to the operating system, so a killed simulator
        /// never answered a request its ledger does not show.
        written: Option<tokio::sync::oneshot::Sender<()>>,
    },
}

/// The sending side; cheap to clone.
#[derive(Clone, Debug)]
pub struct Journal {
    tx: mpsc::Sender<Entry>,
}

/// The writer thread; [`Writer::close`] waits for it to write everything.
#[derive(Debug)]
pub struct Writer {
    thread: std::thread::JoinHandle<()>,
}

impl Journal {
    /// Opens (appending) both files in `dir` and starts the writer thread.
    pub fn open(dir: &Path) -> io::Result<(Self, Writer)> {
        std::fs::create_dir_all(dir)?;
        let log = append(&dir.join(LOG_FILE))?;
        let ledger = append(&dir.join(LEDGER_FILE))?;
        let (tx, rx) = mpsc::channel(65_536);
        let thread = std::thread::Builder::new()
            .name("sim-journal".into())
            .spawn(move || write_loop(rx, log, ledger))?;
        Ok((Self { tx }, Writer { thread }))
    }

    /// Queues an entry; waits when the writer is behind rather than dropping.
    pub async fn send(&self, entry: Entry) {
        if self.tx.send(entry).await.is_err() {
            error!("simulator journal is closed; entry lost");
        }
    }

    /// Queues an entry without waiting (for drop guards); says so if it cannot.
    pub fn try_send(&self, entry: Entry) {
        if let Err(e) = self.tx.try_send(entry) {
            warn!(error = %e, "simulator journal full or closed; entry lost");
        }
    }
}

impl Writer {
    /// Waits until every queued entry is written; returns once all `Journal`s are dropped.
    pub fn close(self) {
        if self.thread.join().is_err() {
            error!("simulator journal thread panicked");
        }
    }
}

/// Paths of the two files in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(LOG_FILE), dir.join(LEDGER_FILE))
}

fn append(path: &Path) -> io::Result<BufWriter<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
    // A process killed mid-write leaves a torn last line; end it, so that the first line
    // of this process is not glued to it (and lost with it).
    if ends_torn(&mut file)? {
        file.write_all(b"\n")?;
    }
    Ok(BufWriter::with_capacity(64 * 1024, file))
}

fn ends_torn(file: &mut File) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

fn write_loop(
    mut rx: mpsc::Receiver<Entry>,
    mut log: BufWriter<File>,
    mut ledger: BufWriter<File>,
) {
    let mut failed = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(entry) = next {
            if let Err(e) = write_entry(&entry, &mut log, &mut ledger)
                && !failed
            {
                error!(error = %e, "cannot write the simulator journal");
                failed = true;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = log.flush().and_then(|()| ledger.flush())
            && !failed
        {
            error!(error = %e, "cannot flush the simulator journal");
            failed = true;
        }
    }
}

fn write_entry(entry: &Entry, log: &mut impl Write, ledger: &mut impl Write) -> io::Result<()> {
    match entry {
        Entry::Start {
            at,
            thread,
            uid,
            cmd,
        } => {
            writeln!(
                log,
                "[{thread}] {} [INFO ] UID: {uid}, {:<9} {cmd}",
                stamp(*at),
                "CMD-START"
            )
        }
        Entry::Finish {
            at, thread, record, ..
        } => {
            if record.status == 200 {
                let t = stamp(*at);
                writeln!(
                    log,
                    "[{thread}] {t} [INFO ] UID: {}, {:<9} {}",
                    record.uid, "CMD-ENDE", record.cmd
                )?;
                writeln!(log, "[{thread}] {t} [INFO ] 200 OK: POST - /{}", record.cmd)?;
            }
            serde_json::to_writer(&mut *ledger, record)?;
            ledger.write_all(b"\n")
        }
    }
}

fn stamp(at: SystemTime) -> impl std::fmt::Display {
    DateTime::<Local>::from(at).format("%Y-%m-%d %H:%M:%S%.3f")
}

/// Microseconds since the Unix epoch.
pub fn epoch_us(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Reads a ledger file (for tests and the analysis).
pub fn read_ledger(path: &Path) -> io::Result<Vec<LedgerRecord>> {
    let text = std::fs::read_to_string(path)?;
    let mut records = Vec::new();
    let mut torn = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            // A line torn by a simulator killed mid-write; the rest is intact.
            Err(_) => torn += 1,
        }
    }
    if torn > 0 {
        tracing::warn!(file = %path.display(), torn, "ledger lines torn by a crash were skipped");
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_match_upstream_format() {
        let at = SystemTime::now();
        let mut log = Vec::new();
        let mut ledger = Vec::new();
        let record = LedgerRecord {
            uid: "42".into(),
            cmd: "ID_REQ_KC_STORE7D3BPACKET".into(),
            start_us: 1,
            end_us: 2,
            status: 200,
            pr1: 0,
            pr3: 0,
            pred_s: 0.035,
            proto: "HTTP/1.1".into(),
        };
        let thread: Arc<str> = Arc::from("worker");
        write_entry(
            &Entry::Start {
                at,
                thread: thread.clone(),
                uid: Arc::from("42"),
                cmd: "ID_REQ_KC_STORE7D3BPACKET",
            },
            &mut log,
            &mut ledger,
        )
        .unwrap();
        write_entry(
            &Entry::Finish {
                at,
                thread,
                record: record.clone(),
                written: None,
            },
            &mut log,
            &mut ledger,
        )
        .unwrap();
        let text = String::from_utf8(log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].ends_with("[INFO ] UID: 42, CMD-START ID_REQ_KC_STORE7D3BPACKET"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].ends_with("[INFO ] UID: 42, CMD-ENDE  ID_REQ_KC_STORE7D3BPACKET"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].ends_with("[INFO ] 200 OK: POST - /ID_REQ_KC_STORE7D3BPACKET"),
            "{}",
            lines[2]
        );
        // `[worker] 2026-11-22 10:00:00.123 [INFO ]`: date, time with milliseconds.
        let stamp = &lines[0]["[worker] ".len().."[worker] ".len() + 23];
        assert!(
            chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S%.3f").is_ok(),
            "{stamp}"
        );
        let parsed: LedgerRecord = serde_json::from_slice(&ledger).unwrap();
        assert_eq!(parsed, record);
    }

    #[test]
    fn a_torn_last_line_is_ended_and_skipped_not_glued_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        let line = |uid: &str| {
            format!(
                r#"{{"uid":"{uid}","cmd":"X","start_us":1,"end_us":2,"status":200,"pr1":0,"pr3":0,"pred_s":0.0,"proto":"HTTP/1.1"}}"#
            )
        };
        // A complete record, then half a record: a simulator killed mid-write.
        std::fs::write(&path, format!("{}\n{}", line("1"), &line("2")[..20])).unwrap();
        let mut writer = append(&path).unwrap();
        writeln!(writer, "{}", line("3")).unwrap();
        writer.flush().unwrap();
        let uids: Vec<String> = read_ledger(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.uid)
            .collect();
        assert_eq!(uids, ["1", "3"]);
    }
}
