//! The files of a run folder, as written by `lps up`/`lps load`/`lps experiment` and read
//! by `lps analyze`. All times are microseconds since the Unix epoch (`*_us`).
//!
//! ```text
//! <run>/
//!   run.json                    RunInfo: topology, start/end of load, drain
//!   client_ledger.jsonl         one ClientRecord per request the load generator made
//!   faults.jsonl                one FaultRecord per stop/start of a service
//!   bridge_metrics.jsonl        BridgeSample: legacy-proxy-2 counters, scraped every second
//!   logs/ars_simulation.ledger.jsonl   the simulator's ledger (rast_simulator::journal::LedgerRecord)
//!   logs/ars_simulation.log     the simulator's upstream-compatible log
//!   logs/<service>.log          each service's log
//! ```

use std::io::{self, BufRead, Write};
use std::path::Path;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Name of the client ledger in a run folder.
pub const CLIENT_LEDGER: &str = "client_ledger.jsonl";
/// Name of the fault log in a run folder.
pub const FAULTS: &str = "faults.jsonl";
/// Name of the bridge metrics samples in a run folder.
pub const BRIDGE_METRICS: &str = "bridge_metrics.jsonl";
/// Name of the run description in a run folder.
pub const RUN_INFO: &str = "run.json";

/// What kind of request a client record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// An alarm sent to an entry service (`POST /api/v1/simple`), retried until success.
    Alarm,
    /// Background production load straight to the simulator, no request id, no retry.
    Background,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalStatus {
    /// Answered 200 (acknowledged).
    Ok,
    /// Still failing when the load stopped (never acknowledged).
    Failed,
}

/// One request of the load generator, across all its attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// The `Request-Id`, kept across retries (empty for background requests).
    pub id: String,
    /// Alarm or background.
    pub kind: RequestKind,
    /// The user (closed-loop) or 0 (open-loop).
    pub user: u32,
    /// The performance step (0-based) the request started in; 0 outside step loads.
    pub step: u32,
    /// First send.
    pub first_send_us: u64,
    /// When the successful answer arrived.
    pub success_us: Option<u64>,
    /// Sends made (1 when the first succeeded).
    pub attempts: u32,
    /// Base URLs tried, in order (one per attempt).
    pub endpoints: Vec<String>,
    /// HTTP status of the last attempt (0 when it failed without an answer).
    pub last_status: u16,
    /// How it ended.
    pub status: FinalStatus,
}

impl ClientRecord {
    /// Response time: first send to success, milliseconds.
    pub fn response_ms(&self) -> Option<f64> {
        self.success_us
            .map(|s| s.saturating_sub(self.first_send_us) as f64 / 1000.0)
    }
}

/// What happened to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Stopped (SIGKILL, SIGTERM or `docker compose stop`).
    Stop,
    /// Started again.
    Start,
}

/// One fault-injection event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// When it happened.
    pub at_us: u64,
    /// The service (compose name, e.g. `proxy2-1`).
    pub service: String,
    /// Stop or start.
    pub action: FaultAction,
    /// How: `SIGKILL`, `SIGTERM`, `compose`.
    pub how: String,
}

/// Counters of one legacy-proxy-2 at one moment (`/metrics` scraped during a run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeSample {
    /// When scraped.
    pub at_us: u64,
    /// The instance, e.g. `proxy2-1`.
    pub service: String,
    /// `bridge_forwarded_total` (resets when the instance restarts).
    pub forwarded: u64,
    /// `bridge_retried_total`.
    pub retried: u64,
    /// Sum of `bridge_dead_lettered_total`.
    pub dead_lettered: u64,
}

/// The run as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `legacy` or `ng`.
    pub topology: String,
    /// Broker used (NG), e.g. `mosquitto`.
    pub broker: Option<String>,
    /// Load description, e.g. `failover 1 user` or `rate 200/s`.
    pub load: String,
    /// Load start.
    pub load_start_us: u64,
    /// Load end.
    pub load_end_us: u64,
    /// When every acknowledged id had arrived at the simulator (None: not within the timeout).
    pub drained_us: Option<u64>,
    /// Where the topology ran: `local` or `compose FILE` (absent in older run folders).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// What the run did not measure, and why (e.g. no bridge metrics from compose).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    epoch_us(SystemTime::now())
}

pub use rast_simulator::journal::epoch_us;

/// Reads a JSON-lines file; a missing file is empty.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> io::Result<Vec<T>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for (n, line) in io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}:{}: {e}", path.display(), n + 1),
            )
        })?);
    }
    Ok(out)
}

/// Follows a JSON-lines file another process appends to: each [`JsonlTail::read_new`]
/// parses only the complete lines written since the last call, so polling a growing
/// ledger reads each line once and never a half-written one.
#[derive(Debug)]
pub struct JsonlTail {
    path: std::path::PathBuf,
    offset: u64,
}

impl JsonlTail {
    /// Follows `path` from its beginning (a missing file reads as empty).
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
        }
    }

    /// The records of the lines completed since the last call.
    pub fn read_new<T: DeserializeOwned>(&mut self) -> io::Result<Vec<T>> {
        use std::io::{Read, Seek};
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(io::SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut out = Vec::new();
        for line in bytes[..complete].split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            out.push(serde_json::from_slice(line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} at byte {}: {e}", self.path.display(), self.offset),
                )
            })?);
        }
        self.offset += complete as u64;
        Ok(out)
    }
}

/// Appends `records` to a JSON-lines file.
pub fn append_jsonl<T: Serialize>(path: &Path, records: &[T]) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut out = io::BufWriter::new(file);
    for record in records {
        serde_json::to_writer(&mut out, record)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_reads_each_complete_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut tail = JsonlTail::new(&path);
        assert!(tail.read_new::<u32>().unwrap().is_empty(), "missing file");
        std::fs::write(&path, "1\n2\n3").unwrap();
        assert_eq!(
            tail.read_new::<u32>().unwrap(),
            [1, 2],
            "half-written 3 waits"
        );
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"4\n\n5\n").unwrap();
        assert_eq!(tail.read_new::<u32>().unwrap(), [34, 5]);
        assert!(tail.read_new::<u32>().unwrap().is_empty());
    }
}
