//! `lps analyze`: what happened in a run folder, as numbers, CSV files and an HTML report.
//!
//! # Inputs
//!
//! A run folder (see [`crate::records`]) with `run.json` ([`RunInfo`]: topology, broker,
//! load window, drain), `client_ledger.jsonl` (one [`ClientRecord`] per request of the load
//! generator), `faults.jsonl`, `bridge_metrics.jsonl` (legacy-proxy-2 counters) and the
//! simulator ledger `logs/ars_simulation.ledger.jsonl` (one [`LedgerRecord`] per arrival at
//! the legacy backend, duplicates included). Missing JSONL files count as empty; a missing
//! or malformed `run.json`, or a malformed line anywhere, is an error naming the file (and
//! line).
//!
//! An *alarm* is a client record of kind `alarm`; an *arrival* is a simulator record with
//! command `ID_REQ_KC_STORE7D3BPACKET` and status 200 (404 and 499 records are not
//! deliveries; they are counted in `simulator_rejected`). Background requests (client kind
//! `background`, other simulator commands) are left out of every alarm figure and counted
//! in `background`. All times in the inputs are microseconds since the Unix epoch; `t = 0`
//! in series is the load start (`run.json` `load_start_us`).
//!
//! # Metrics (keys of [`Summary`] and of `summary.json`)
//!
//! - `sent`: alarm records in the client ledger. `acknowledged`: those with status `ok`
//!   (answered 200, possibly after retries); `failed` = `sent - acknowledged`.
//! - `delivered`: distinct acknowledged ids with at least one arrival.
//!   `lost`: acknowledged ids with no arrival at all (set difference of ids, so a duplicate
//!   cannot hide a loss). `unacknowledged_delivered`: ids the client never saw acknowledged
//!   that arrived anyway; `unknown_delivered`: arriving ids absent from the client ledger.
//! - `duplicates`: extra arrivals, Σ (n − 1) over ids arriving n > 1 times (any alarm id);
//!   `duplicate_ids`: how many ids arrived more than once.
//! - `client_errors`: failed sends, i.e. every attempt that did not end in a 200 answer:
//!   `attempts − 1` for an acknowledged alarm plus all `attempts` of a failed one.
//!   `retries`: Σ (`attempts` − 1) over alarms (total attempts minus records).
//! - `e2e_latency_ms`: client first send → simulator `end_us` (CMD-ENDE) of the *first*
//!   arrival of that id (earliest `start_us`), over acknowledged and delivered ids.
//! - `response_time_ms`: client first send → successful answer, over acknowledged alarms
//!   (what the alarm device sees; includes retries and their 1 s pauses).
//! - `sim_processing_ms`: simulator `end_us − start_us` over all arrivals (duplicates too).
//! - `per_hop_ms`, over acknowledged and delivered ids using the first arrival:
//!   `to_backend` = first send → simulator start; `backend` = simulator end − start;
//!   `back_to_client` = simulator end → client success, only for ids whose success came
//!   after the simulator finished (the legacy return path). In NG the client is answered
//!   once the broker holds the message (PUBCOMP), usually *before* the simulator sees it;
//!   those ids are counted in `acknowledged_before_backend` instead.
//! - `per_step`: per performance step (only when some alarm has `step > 0`): requests,
//!   acknowledged, average and maximum response time, and whether the step is within the
//!   EN 50136 limits (average ≤ 10 s and maximum ≤ 30 s).
//! - `throughput`: per-second buckets `t_s` (floor of seconds since load start; may be
//!   negative for stray early events) counting alarms sent (first send), acknowledged
//!   (success time) and delivered (first arrival of each distinct alarm id, by its
//!   `end_us`, acknowledged or not). Gaps are filled with zero buckets.
//! - `per_instance`: legacy-proxy-2 instance → messages forwarded during the run: the
//!   sum of positive increments of `bridge_forwarded_total` between consecutive samples,
//!   a drop counting as a restart from 0 (0, 10, 20, restart, 0, 5 → 25). The first
//!   sample is the baseline, so what an instance forwarded before sampling began is not
//!   counted. Empty for the legacy topology.
//! - `queueing`: `lambda_per_s` = acknowledged alarms whose first send lies in the load
//!   window, divided by the window length. `mu_per_s` = the simulator's service rate while
//!   busy: arrivals (all, duplicates included) divided by `busy_s`, the length of the union
//!   of their `[start_us, end_us]` intervals (time with at least one alarm in progress).
//!   `rho` = λ/μ: above 1 the backend cannot keep up and a backlog builds. With one worker
//!   μ is exactly 1/(mean service time); with several workers it is the rate while at
//!   least one alarm is in service, which is the capacity when the simulator is saturated
//!   (where ρ matters) and lies below it at light load (so ρ is then an upper bound).
//!   `peak_delivered_per_s` is the largest `throughput` delivered bucket, for comparison.
//! - `drain_s`: `run.json` `drained_us − load_end_us` in seconds (null when the run did not
//!   drain within its timeout). When `run.json` has no `drained_us` key at all it is
//!   `drain_observed_s`: the time from load end to the last first arrival of an
//!   acknowledged id (0 when all arrived before the load ended; null when any is lost).
//! - Percentiles use the nearest-rank method on an HdrHistogram of the sample (within
//!   0.01 %, see `analyze/latency.rs`); count, mean and max are exact; every statistic is
//!   null when its sample is empty (`count` 0).
//!
//! # Outputs of [`write_report`]
//!
//! `summary.json` (one key per topology), `summary.csv` (one row per topology),
//! `requests_<topology>.csv` (one row per alarm), `throughput_<topology>.csv` (the
//! `throughput` buckets), `e2e_<topology>.hgrm` and `response_<topology>.hgrm`
//! (HdrHistogram percentile distributions, milliseconds) and `report.html`: one
//! self-contained page with inline CSS and SVG, the topologies side by side, a definition
//! under every figure, and with two runs a table of their differences with the better
//! value marked. The CSV headers are the field names of serde row types, so they cannot
//! drift from the values. [`findings`] is the report of `lps reproduce`.

pub mod findings;
mod latency;
mod report;
mod svg;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use rast_simulator::journal::{LEDGER_FILE, LedgerRecord};
use serde::{Deserialize, Serialize};

use latency::Latency;

use crate::records::{
    BRIDGE_METRICS, BridgeSample, CLIENT_LEDGER, ClientRecord, FAULTS, FaultRecord, FinalStatus,
    RUN_INFO, RequestKind, RunInfo, read_jsonl,
};

pub use report::{table, write_report};

/// The simulator command that carries alarms.
pub const ALARM_COMMAND: &str = lps_common::wire::STORE_COMMAND;

/// EN 50136 limit on a step's average response time, milliseconds.
pub(crate) const STEP_AVG_LIMIT_MS: f64 = 10_000.0;
/// EN 50136 limit on a step's maximum response time, milliseconds.
pub(crate) const STEP_MAX_LIMIT_MS: f64 = 30_000.0;

/// Distribution of a sample (milliseconds); every figure is null when `count` is 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Sample size.
    pub count: u64,
    /// Arithmetic mean.
    pub mean: Option<f64>,
    /// Median (nearest rank).
    pub p50: Option<f64>,
    /// 90th percentile (nearest rank).
    pub p90: Option<f64>,
    /// 99th percentile (nearest rank).
    pub p99: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

impl Stats {
    /// Statistics of `values` (see [`latency`] for the precision of the percentiles).
    pub fn of(values: Vec<f64>) -> Self {
        values.into_iter().collect::<Latency>().stats()
    }
}

/// Latency of each hop, over acknowledged and delivered ids (first arrival).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PerHop {
    /// Client first send → simulator start (`CMD-START`).
    pub to_backend: Stats,
    /// Simulator end − start.
    pub backend: Stats,
    /// Simulator end → client success, only for ids acknowledged after the simulator
    /// finished (the legacy return path).
    pub back_to_client: Stats,
    /// Ids acknowledged to the client before the simulator finished them (NG: the broker
    /// accepted the message; the backend sees it later).
    pub acknowledged_before_backend: u64,
    /// Each hop's own mean time and share, from the services' histograms
    /// ([`crate::hops`]); empty for a run without them.
    #[serde(default)]
    pub services: Vec<crate::hops::HopShare>,
}

/// One performance step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// The step (0-based).
    pub step: u32,
    /// First send of the step's first alarm, seconds since load start.
    pub start_s: f64,
    /// Alarms started in the step.
    pub requests: u64,
    /// Of those, acknowledged.
    pub acknowledged: u64,
    /// Average response time of the acknowledged ones.
    pub avg_response_ms: Option<f64>,
    /// Maximum response time of the acknowledged ones.
    pub max_response_ms: Option<f64>,
    /// Average ≤ 10 s and maximum ≤ 30 s (EN 50136); false when nothing was acknowledged.
    pub within_limits: bool,
}

/// Alarms per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Seconds since load start (floor).
    pub t_s: i64,
    /// First sends.
    pub sent: u64,
    /// Successful answers.
    pub acknowledged: u64,
    /// First arrivals of distinct alarm ids at the simulator.
    pub delivered: u64,
}

/// Queueing figures of the simulator as the bottleneck.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Queueing {
    /// Arrival rate λ: acknowledged alarms first sent in the load window, per second.
    pub lambda_per_s: Option<f64>,
    /// Service rate μ: arrivals at the simulator per second of busy time.
    pub mu_per_s: Option<f64>,
    /// Utilisation ρ = λ/μ.
    pub rho: Option<f64>,
    /// Load window length, seconds.
    pub load_window_s: f64,
    /// Union of the simulator's alarm processing intervals, seconds.
    pub busy_s: f64,
    /// Arrivals served (duplicates included).
    pub served: u64,
    /// Most first arrivals in one second.
    pub peak_delivered_per_s: u64,
}

/// Background production load (not part of the alarm figures).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Background {
    /// Background client records.
    pub sent: u64,
    /// Of those, answered 200.
    pub acknowledged: u64,
    /// Simulator records of other commands than the alarm command.
    pub simulator_arrivals: u64,
}

/// Everything computed for one run folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// `legacy` or `ng` (from `run.json`).
    pub topology: String,
    /// Broker (NG), else null.
    pub broker: Option<String>,
    /// Load description from `run.json`.
    pub load: String,
    /// The run folder analysed.
    pub run_dir: String,
    /// Load start, microseconds since the Unix epoch (`t = 0` of every series).
    pub load_start_us: u64,
    /// Load end, microseconds since the Unix epoch.
    pub load_end_us: u64,
    /// Alarm requests in the client ledger.
    pub sent: u64,
    /// Alarm requests answered 200.
    pub acknowledged: u64,
    /// Alarm requests never answered 200.
    pub failed: u64,
    /// Distinct acknowledged ids that arrived at the simulator.
    pub delivered: u64,
    /// Acknowledged ids that never arrived.
    pub lost: u64,
    /// Extra arrivals: Σ (n − 1) over ids arriving n > 1 times.
    pub duplicates: u64,
    /// Ids arriving more than once.
    pub duplicate_ids: u64,
    /// Ids never acknowledged to the client that arrived anyway.
    pub unacknowledged_delivered: u64,
    /// Arriving alarm ids absent from the client ledger.
    pub unknown_delivered: u64,
    /// Simulator alarm records with a status other than 200 (404, 499).
    pub simulator_rejected: u64,
    /// Failed sends: attempts − 1 per acknowledged alarm plus all attempts of failed ones.
    pub client_errors: u64,
    /// Total attempts − alarm records.
    pub retries: u64,
    /// Client first send → first arrival's end at the simulator.
    pub e2e_latency_ms: Stats,
    /// Client first send → success.
    pub response_time_ms: Stats,
    /// Simulator end − start over all arrivals.
    pub sim_processing_ms: Stats,
    /// Latency per hop.
    pub per_hop_ms: PerHop,
    /// Per performance step (empty unless the run had steps).
    pub per_step: Vec<StepStats>,
    /// Alarms per second.
    pub throughput: Vec<Bucket>,
    /// legacy-proxy-2 instance → forwarded messages.
    pub per_instance: BTreeMap<String, u64>,
    /// λ, μ, ρ.
    pub queueing: Queueing,
    /// Load end → every acknowledged id arrived, seconds (null: did not drain).
    pub drain_s: Option<f64>,
    /// The same, measured from the ledgers (null when an id is lost).
    pub drain_observed_s: Option<f64>,
    /// Background load counts.
    pub background: Background,
    /// The fault injections, in the order recorded.
    pub faults: Vec<FaultRecord>,
}

/// One alarm of the client ledger joined with the simulator (for plots and CSV).
#[derive(Debug, Clone)]
pub(crate) struct RequestRow {
    pub id: String,
    pub first_send_us: u64,
    pub success_us: Option<u64>,
    pub attempts: u32,
    pub delivered_count: u64,
    pub e2e_ms: Option<f64>,
    pub response_ms: Option<f64>,
}

/// Per-request data behind a summary, kept out of `summary.json`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Detail {
    pub requests: Vec<RequestRow>,
    /// End-to-end latencies (client first send → first arrival's end).
    pub e2e: Latency,
    /// Response times (client first send → success).
    pub response: Latency,
}

/// Reads the run folder and computes its summary.
pub fn summarize(run_dir: &Path) -> anyhow::Result<Summary> {
    analyze(run_dir).map(|(summary, _)| summary)
}

/// Reads a JSON-lines file of the run, with the file in the error.
fn read<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Vec<T>> {
    read_jsonl(path).with_context(|| format!("reading {}", path.display()))
}

/// `to − from` in milliseconds, negative when `to` is earlier.
fn ms(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1000.0
}

/// Whole seconds from `t0` to `at` (floor).
fn second(t0: u64, at: u64) -> i64 {
    (at as i128 - t0 as i128).div_euclid(1_000_000) as i64
}

/// Messages forwarded per legacy-proxy-2 instance from its counter samples.
fn forwarded_per_instance(samples: &[BridgeSample]) -> BTreeMap<String, u64> {
    let mut by_service: BTreeMap<&str, Vec<&BridgeSample>> = BTreeMap::new();
    for s in samples {
        by_service.entry(&s.service).or_default().push(s);
    }
    by_service
        .into_iter()
        .map(|(service, mut samples)| {
            samples.sort_by_key(|s| s.at_us);
            let total = samples
                .windows(2)
                .map(|w| {
                    let (prev, cur) = (w[0].forwarded, w[1].forwarded);
                    // A drop means the instance restarted and counts again from 0.
                    if cur >= prev { cur - prev } else { cur }
                })
                .sum();
            (service.to_owned(), total)
        })
        .collect()
}

/// Total length of the union of `[start, end]` intervals, microseconds.
fn union_us(mut intervals: Vec<(u64, u64)>) -> u64 {
    intervals.sort_unstable();
    let mut total = 0;
    let mut current: Option<(u64, u64)> = None;
    for (start, end) in intervals {
        let end = end.max(start);
        current = match current {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + current.map_or(0, |(s, e)| e - s)
}

/// First arrival and arrival count of one alarm id at the simulator.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    count: u64,
    start_us: u64,
    end_us: u64,
}

/// Reads a run folder and computes its summary and per-request detail.
pub(crate) fn analyze(run_dir: &Path) -> anyhow::Result<(Summary, Detail)> {
    let info_path = run_dir.join(RUN_INFO);
    let text = std::fs::read_to_string(&info_path)
        .with_context(|| format!("reading {}", info_path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", info_path.display()))?;
    let has_drained = value.get("drained_us").is_some();
    let info: RunInfo = serde_json::from_value(value)
        .with_context(|| format!("parsing {}", info_path.display()))?;
    let client: Vec<ClientRecord> = read(&run_dir.join(CLIENT_LEDGER))?;
    let faults: Vec<FaultRecord> = read(&run_dir.join(FAULTS))?;
    let samples: Vec<BridgeSample> = read(&run_dir.join(BRIDGE_METRICS))?;
    let sim: Vec<LedgerRecord> = read(&run_dir.join("logs").join(LEDGER_FILE))?;
    let (mut summary, detail) =
        compute(info, has_drained, run_dir, &client, faults, &samples, &sim);
    if let Some(timings) = crate::hops::load(run_dir) {
        let hop = &summary.per_hop_ms;
        summary.per_hop_ms.services =
            crate::hops::shares(&timings, hop.to_backend.mean, hop.backend.mean);
    }
    Ok((summary, detail))
}

/// The summary and detail of one run from its parsed inputs, in named steps: the
/// simulator side ([`arrivals`]), the client side ([`client_side`]), [`steps`],
/// [`throughput`], [`queueing`] and [`drain`].
fn compute(
    info: RunInfo,
    has_drained: bool,
    run_dir: &Path,
    client: &[ClientRecord],
    faults: Vec<FaultRecord>,
    samples: &[BridgeSample],
    sim: &[LedgerRecord],
) -> (Summary, Detail) {
    let t0 = info.load_start_us;
    let sim_side = arrivals(sim);
    let side = client_side(client, &sim_side.arrivals, &info);
    let alarms = &side.alarms;
    let throughput = throughput(alarms, &sim_side.arrivals, t0);
    let peak_delivered_per_s = throughput.iter().map(|b| b.delivered).max().unwrap_or(0);
    let queueing = queueing(&info, &side, &sim_side, peak_delivered_per_s);
    let (drain_s, drain_observed_s) = drain(&info, has_drained, &side);
    let e2e: Latency = side.e2e.iter().copied().collect();
    let response: Latency = side.response.iter().copied().collect();
    let arrivals = &sim_side.arrivals;
    let summary = Summary {
        topology: info.topology,
        broker: info.broker,
        load: info.load,
        run_dir: run_dir.display().to_string(),
        load_start_us: info.load_start_us,
        load_end_us: info.load_end_us,
        sent: alarms.len() as u64,
        acknowledged: alarms
            .iter()
            .filter(|r| r.status == FinalStatus::Ok)
            .count() as u64,
        failed: alarms
            .iter()
            .filter(|r| r.status == FinalStatus::Failed)
            .count() as u64,
        delivered: side.delivered,
        lost: side.lost,
        duplicates: arrivals.values().map(|a| a.count - 1).sum(),
        duplicate_ids: arrivals.values().filter(|a| a.count > 1).count() as u64,
        unacknowledged_delivered: side.unacknowledged_delivered,
        unknown_delivered: side.unknown_delivered,
        simulator_rejected: sim_side.rejected,
        client_errors: side.client_errors,
        retries: side.retries,
        e2e_latency_ms: e2e.stats(),
        response_time_ms: response.stats(),
        sim_processing_ms: Stats::of(sim_side.processing),
        per_hop_ms: PerHop {
            to_backend: Stats::of(side.to_backend),
            backend: Stats::of(side.backend),
            back_to_client: Stats::of(side.back_to_client),
            acknowledged_before_backend: side.acknowledged_before_backend,
            services: Vec::new(),
        },
        per_step: steps(alarms, t0),
        throughput,
        per_instance: forwarded_per_instance(samples),
        queueing,
        drain_s,
        drain_observed_s,
        background: Background {
            sent: side.background_sent,
            acknowledged: side.background_acknowledged,
            simulator_arrivals: sim_side.background_arrivals,
        },
        faults,
    };
    let detail = Detail {
        requests: side.rows,
        e2e,
        response,
    };
    (summary, detail)
}

/// The simulator side of a run.
struct SimulatorSide<'a> {
    /// First arrival and count per alarm id (status 200 only).
    arrivals: HashMap<&'a str, Arrival>,
    /// Records of other commands.
    background_arrivals: u64,
    /// Alarm records with another status than 200.
    rejected: u64,
    /// `end − start` of every alarm arrival, ms.
    processing: Vec<f64>,
    /// `[start, end]` of every alarm arrival.
    busy: Vec<(u64, u64)>,
}

/// First arrival per id, background and rejected records.
fn arrivals(sim: &[LedgerRecord]) -> SimulatorSide<'_> {
    let mut side = SimulatorSide {
        arrivals: HashMap::new(),
        background_arrivals: 0,
        rejected: 0,
        processing: Vec::new(),
        busy: Vec::new(),
    };
    for r in sim {
        if r.cmd != ALARM_COMMAND {
            side.background_arrivals += 1;
            continue;
        }
        if r.status != 200 {
            side.rejected += 1;
            continue;
        }
        side.processing.push(ms(r.start_us, r.end_us));
        side.busy.push((r.start_us, r.end_us));
        side.arrivals
            .entry(&r.uid)
            .and_modify(|a| {
                a.count += 1;
                if (r.start_us, r.end_us) < (a.start_us, a.end_us) {
                    a.start_us = r.start_us;
                    a.end_us = r.end_us;
                }
            })
            .or_insert(Arrival {
                count: 1,
                start_us: r.start_us,
                end_us: r.end_us,
            });
    }
    side
}

/// The client side of a run, joined with the arrivals.
#[derive(Default)]
struct ClientSide<'a> {
    alarms: Vec<&'a ClientRecord>,
    acked: HashSet<&'a str>,
    background_sent: u64,
    background_acknowledged: u64,
    delivered: u64,
    lost: u64,
    unacknowledged_delivered: u64,
    unknown_delivered: u64,
    client_errors: u64,
    retries: u64,
    response: Vec<f64>,
    e2e: Vec<f64>,
    to_backend: Vec<f64>,
    backend: Vec<f64>,
    back_to_client: Vec<f64>,
    acknowledged_before_backend: u64,
    rows: Vec<RequestRow>,
    /// Latest end of a first arrival of an acknowledged id.
    last_first_arrival: Option<u64>,
    /// Acknowledged alarms first sent within the load window (λ).
    lambda_count: u64,
}

/// Alarms and background records, the id sets (loss), and per alarm its figures.
fn client_side<'a>(
    client: &'a [ClientRecord],
    arrivals: &HashMap<&str, Arrival>,
    info: &RunInfo,
) -> ClientSide<'a> {
    let mut side = ClientSide::default();
    for r in client {
        match r.kind {
            RequestKind::Alarm => side.alarms.push(r),
            RequestKind::Background => {
                side.background_sent += 1;
                if r.status == FinalStatus::Ok {
                    side.background_acknowledged += 1;
                }
            }
        }
    }
    side.acked = side
        .alarms
        .iter()
        .filter(|r| r.status == FinalStatus::Ok)
        .map(|r| r.id.as_str())
        .collect();
    let known: HashSet<&str> = side.alarms.iter().map(|r| r.id.as_str()).collect();
    side.delivered = side
        .acked
        .iter()
        .filter(|id| arrivals.contains_key(*id))
        .count() as u64;
    side.lost = side.acked.len() as u64 - side.delivered;
    side.unacknowledged_delivered = known
        .iter()
        .filter(|id| !side.acked.contains(*id) && arrivals.contains_key(*id))
        .count() as u64;
    side.unknown_delivered = arrivals.keys().filter(|id| !known.contains(*id)).count() as u64;
    side.rows.reserve(side.alarms.len());
    for r in side.alarms.clone() {
        let row = side.alarm(r, arrivals.get(r.id.as_str()), info);
        side.rows.push(row);
    }
    side
}

impl ClientSide<'_> {
    /// Adds one alarm's retries, latencies and hop times; returns its CSV row.
    fn alarm(&mut self, r: &ClientRecord, arrival: Option<&Arrival>, info: &RunInfo) -> RequestRow {
        let ok = r.status == FinalStatus::Ok;
        self.retries += u64::from(r.attempts.saturating_sub(1));
        self.client_errors += u64::from(if ok {
            r.attempts.saturating_sub(1)
        } else {
            r.attempts
        });
        let response_ms = if ok { r.response_ms() } else { None };
        let mut e2e_ms = None;
        if ok {
            self.response.extend(response_ms);
            if (info.load_start_us..=info.load_end_us).contains(&r.first_send_us) {
                self.lambda_count += 1;
            }
            if let Some(a) = arrival {
                let latency = ms(r.first_send_us, a.end_us);
                e2e_ms = Some(latency);
                self.e2e.push(latency);
                self.to_backend.push(ms(r.first_send_us, a.start_us));
                self.backend.push(ms(a.start_us, a.end_us));
                match r.success_us {
                    Some(s) if s >= a.end_us => self.back_to_client.push(ms(a.end_us, s)),
                    _ => self.acknowledged_before_backend += 1,
                }
                self.last_first_arrival = self.last_first_arrival.max(Some(a.end_us));
            }
        }
        RequestRow {
            id: r.id.clone(),
            first_send_us: r.first_send_us,
            success_us: r.success_us,
            attempts: r.attempts,
            delivered_count: arrival.map_or(0, |a| a.count),
            e2e_ms,
            response_ms,
        }
    }
}

/// Per performance step (empty unless some alarm has `step > 0`).
fn steps(alarms: &[&ClientRecord], t0: u64) -> Vec<StepStats> {
    if !alarms.iter().any(|r| r.step > 0) {
        return Vec::new();
    }
    let mut steps: BTreeMap<u32, Vec<&ClientRecord>> = BTreeMap::new();
    for r in alarms {
        steps.entry(r.step).or_default().push(r);
    }
    steps
        .into_iter()
        .map(|(step, records)| {
            let times: Vec<f64> = records
                .iter()
                .filter(|r| r.status == FinalStatus::Ok)
                .filter_map(|r| r.response_ms())
                .collect();
            let avg = (!times.is_empty()).then(|| times.iter().sum::<f64>() / times.len() as f64);
            let max = times.iter().copied().reduce(f64::max);
            let start = records.iter().map(|r| r.first_send_us).min().unwrap_or(t0);
            StepStats {
                step,
                start_s: ms(t0, start) / 1000.0,
                requests: records.len() as u64,
                acknowledged: records
                    .iter()
                    .filter(|r| r.status == FinalStatus::Ok)
                    .count() as u64,
                avg_response_ms: avg,
                max_response_ms: max,
                within_limits: avg.is_some_and(|a| a <= STEP_AVG_LIMIT_MS)
                    && max.is_some_and(|m| m <= STEP_MAX_LIMIT_MS),
            }
        })
        .collect()
}

/// Alarms sent, acknowledged and delivered per second since `t0`, gaps filled.
fn throughput(alarms: &[&ClientRecord], arrivals: &HashMap<&str, Arrival>, t0: u64) -> Vec<Bucket> {
    let mut buckets: BTreeMap<i64, Bucket> = BTreeMap::new();
    for r in alarms {
        bucket(&mut buckets, second(t0, r.first_send_us)).sent += 1;
        if r.status == FinalStatus::Ok
            && let Some(s) = r.success_us
        {
            bucket(&mut buckets, second(t0, s)).acknowledged += 1;
        }
    }
    for a in arrivals.values() {
        bucket(&mut buckets, second(t0, a.end_us)).delivered += 1;
    }
    fill_gaps(buckets)
}

/// λ, μ, ρ (see the module documentation).
fn queueing(
    info: &RunInfo,
    client: &ClientSide<'_>,
    sim: &SimulatorSide<'_>,
    peak_delivered_per_s: u64,
) -> Queueing {
    let load_window_s = ms(info.load_start_us, info.load_end_us) / 1000.0;
    let busy_s = union_us(sim.busy.clone()) as f64 / 1e6;
    let served = sim.processing.len() as u64;
    let lambda_per_s = (load_window_s > 0.0).then(|| client.lambda_count as f64 / load_window_s);
    let mu_per_s = (busy_s > 0.0).then(|| served as f64 / busy_s);
    let rho = match (lambda_per_s, mu_per_s) {
        (Some(l), Some(m)) => Some(l / m),
        _ => None,
    };
    Queueing {
        lambda_per_s,
        mu_per_s,
        rho,
        load_window_s,
        busy_s,
        served,
        peak_delivered_per_s,
    }
}

/// `(drain_s, drain_observed_s)`: from `run.json`'s `drained_us` when it has the key, and
/// from the ledgers.
fn drain(info: &RunInfo, has_drained: bool, client: &ClientSide<'_>) -> (Option<f64>, Option<f64>) {
    let observed = if client.lost == 0 && !client.acked.is_empty() {
        client
            .last_first_arrival
            .map(|last| (ms(info.load_end_us, last) / 1000.0).max(0.0))
    } else {
        None
    };
    let drain_s = if has_drained {
        info.drained_us
            .map(|d| (ms(info.load_end_us, d) / 1000.0).max(0.0))
    } else {
        observed
    };
    (drain_s, observed)
}

/// The (possibly new, empty) bucket of second `t_s`.
fn bucket(buckets: &mut BTreeMap<i64, Bucket>, t_s: i64) -> &mut Bucket {
    buckets.entry(t_s).or_insert_with(|| empty_bucket(t_s))
}

fn empty_bucket(t_s: i64) -> Bucket {
    Bucket {
        t_s,
        sent: 0,
        acknowledged: 0,
        delivered: 0,
    }
}

/// The buckets in order with empty seconds in between added (unless the span is absurd,
/// e.g. a stray timestamp, when only the non-empty buckets are kept).
fn fill_gaps(buckets: BTreeMap<i64, Bucket>) -> Vec<Bucket> {
    const MAX_SPAN_S: i64 = 1_000_000;
    let (Some(first), Some(last)) = (buckets.keys().next(), buckets.keys().next_back()) else {
        return Vec::new();
    };
    if last - first > MAX_SPAN_S {
        return buckets.into_values().collect();
    }
    (*first..=*last)
        .map(|t_s| {
            buckets
                .get(&t_s)
                .copied()
                .unwrap_or_else(|| empty_bucket(t_s))
        })
        .collect()
}

#[cfg(test)]
mod tests;
