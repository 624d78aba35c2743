//! Per-hop latency of an experiment, from what the services already measure.
//!
//! Every HTTP service keeps a request-time histogram (`http_request_duration_seconds`,
//! request to response head) and legacy-proxy-2 one of its forwards
//! (`bridge_forward_duration_seconds`, receipt to the relay's answer). An experiment reads
//! their `_sum` and `_count` from each replica's `/metrics` when the load starts and again
//! after the drain, and writes the difference per program into [`HOPS_FILE`]; a replica
//! that restarted in between (a fault) counts from zero. Nothing is added on the request
//! path, so this is always on.
//!
//! [`shares`] turns those means, with the simulator's own processing time from its ledger
//! and the client → simulator time, into each hop's own share:
//!
//! - baseline: entry (ars-comp-1 minus ars-comp-2), relay (ars-comp-2 minus the simulator),
//!   simulator;
//! - NG: entry (ars-comp-1 minus legacy-proxy-1), legacy-proxy-1 → PUBCOMP (its whole
//!   request), broker (the rest of client → simulator start that the hops do not explain:
//!   the broker's queueing and delivery; an estimate, since the hops' own times include
//!   their return halves), legacy-proxy-2's forward (minus ars-comp-2), relay, simulator.
//!
//! Means, not percentiles: the sums of histograms subtract, their buckets would only give
//! coarse quantiles. `/healthz` and `/readyz` requests are in the HTTP histograms too; they
//! are a handful against thousands of alarms.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topology::Program;

/// The per-hop file of a run folder.
pub const HOPS_FILE: &str = "hops.json";

/// The histogram of a program's own time, if it has one.
fn histogram(program: Program) -> Option<&'static str> {
    match program {
        Program::ArsComp1 | Program::ArsComp2 | Program::LegacyProxy1 => {
            Some("http_request_duration_seconds")
        }
        Program::LegacyProxy2 => Some("bridge_forward_duration_seconds"),
        _ => None,
    }
}

/// One replica's histogram totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// Observations.
    pub count: f64,
    /// Their sum, seconds.
    pub sum: f64,
}

/// A program's requests between the two readings, over its replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// Requests (or forwards) measured.
    pub count: f64,
    /// Their total time, seconds.
    pub seconds: f64,
}

impl Timing {
    /// Mean time in milliseconds; `None` without requests.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.seconds / self.count * 1000.0)
    }
}

/// The `_sum` and `_count` of histogram `name` in a Prometheus text exposition.
pub fn parse(text: &str, name: &str) -> Option<Reading> {
    let value = |suffix: &str| {
        let series = format!("{name}{suffix}");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(series.as_str())?;
                // The series itself, not a longer name: labels or the value follow.
                let rest = rest.strip_prefix(|c| c == ' ' || c == '{')?;
                rest.rsplit(' ').next()?.parse::<f64>().ok()
            })
            .reduce(|a, b| a + b)
    };
    Some(Reading {
        count: value("_count")?,
        sum: value("_sum")?,
    })
}

/// Reads the histogram of every service in `services` (`name`, program, base URL) that
/// has one; a service that does not answer is left out.
pub async fn read(services: &[(String, Program, String)]) -> BTreeMap<String, Reading> {
    let Ok(client) = crate::supervisor::local_client(Duration::from_secs(2)) else {
        return BTreeMap::new();
    };
    let mut readings = BTreeMap::new();
    for (name, program, base) in services {
        let Some(metric) = histogram(*program) else {
            continue;
        };
        let Ok(response) = client.get(format!("{base}/metrics")).send().await else {
            continue;
        };
        let Ok(text) = response.text().await else {
            continue;
        };
        if let Some(reading) = parse(&text, metric) {
            readings.insert(name.clone(), reading);
        }
    }
    readings
}

/// The timing per program between `before` and `after` (a replica whose count went down
/// restarted, and counts from zero); replicas missing from `after` are left out.
pub fn difference(
    services: &[(String, Program, String)],
    before: &BTreeMap<String, Reading>,
    after: &BTreeMap<String, Reading>,
) -> BTreeMap<String, Timing> {
    let mut timings: BTreeMap<String, Timing> = BTreeMap::new();
    for (name, program, _) in services {
        let Some(end) = after.get(name) else {
            continue;
        };
        let start = before
            .get(name)
            .filter(|start| start.count <= end.count)
            .copied()
            .unwrap_or_default();
        let timing = timings.entry(program.name().to_owned()).or_default();
        timing.count += end.count - start.count;
        timing.seconds += end.sum - start.sum;
    }
    timings
}

/// Writes `timings` into the run folder `dir`.
pub fn write(dir: &Path, timings: &BTreeMap<String, Timing>) -> anyhow::Result<()> {
    std::fs::write(dir.join(HOPS_FILE), serde_json::to_vec_pretty(timings)?)?;
    Ok(())
}

/// Reads the run folder's timings; `None` when the run has none (an older run, or a
/// compose run whose inner services have no host port).
pub fn load(dir: &Path) -> Option<BTreeMap<String, Timing>> {
    let text = std::fs::read(dir.join(HOPS_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// One hop's own time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopShare {
    /// The hop.
    pub hop: String,
    /// Its own mean time, milliseconds (the broker's may be negative: an estimate).
    pub mean_ms: f64,
    /// Its part of the whole, client send → simulator end (mean), in `[0, 1]` unless the
    /// estimate is off.
    pub share: f64,
}

/// Each hop's own mean time and share, from `timings` (by program name), the client →
/// simulator start mean and the simulator's processing mean; empty when a hop's timing
/// is missing.
pub fn shares(
    timings: &BTreeMap<String, Timing>,
    to_backend_ms: Option<f64>,
    backend_ms: Option<f64>,
) -> Vec<HopShare> {
    let mean = |program: Program| timings.get(program.name()).and_then(Timing::mean_ms);
    let (Some(entry), Some(relay), Some(to_backend), Some(backend)) = (
        mean(Program::ArsComp1),
        mean(Program::ArsComp2),
        to_backend_ms,
        backend_ms,
    ) else {
        return Vec::new();
    };
    let hops: Vec<(&str, f64)> = match (mean(Program::LegacyProxy1), mean(Program::LegacyProxy2)) {
        (Some(lp1), Some(lp2)) => {
            let (entry_own, lp2_own, relay_own) = (entry - lp1, lp2 - relay, relay - backend);
            vec![
                ("entry (ars-comp-1)", entry_own),
                ("legacy-proxy-1 → PUBCOMP", lp1),
                (
                    "broker: queueing and delivery (estimate)",
                    to_backend - entry_own - lp1 - lp2_own - relay_own,
                ),
                ("legacy-proxy-2 forward", lp2_own),
                ("relay (ars-comp-2)", relay_own),
                ("simulator", backend),
            ]
        }
        (None, None) => vec![
            ("entry (ars-comp-1)", entry - relay),
            ("relay (ars-comp-2)", relay - backend),
            ("simulator", backend),
        ],
        _ => return Vec::new(),
    };
    let whole = to_backend + backend;
    hops.into_iter()
        .map(|(hop, mean_ms)| HopShare {
            hop: hop.to_owned(),
            mean_ms,
            share: if whole > 0.0 { mean_ms / whole } else { 0.0 },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP http_request_duration_seconds Time from request to response head.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_sum 2.5
http_request_duration_seconds_count 10
http_request_duration_seconds_bucket{le=\"0.0005\"} 1
http_request_duration_seconds_sum_other 99
";

    #[test]
    fn reads_the_sum_and_count_of_the_named_histogram_only() {
        let r = parse(TEXT, "http_request_duration_seconds").unwrap();
        assert_eq!((r.count, r.sum), (10.0, 2.5));
        assert_eq!(parse(TEXT, "bridge_forward_duration_seconds"), None);
    }

    #[test]
    fn a_restarted_replica_counts_from_zero() {
        let services = vec![
            ("a-1".to_owned(), Program::ArsComp2, String::new()),
            ("a-2".to_owned(), Program::ArsComp2, String::new()),
        ];
        let reading = |count, sum| Reading { count, sum };
        let before = BTreeMap::from([
            ("a-1".to_owned(), reading(10.0, 1.0)),
            ("a-2".to_owned(), reading(50.0, 5.0)),
        ]);
        // a-2 restarted: its 4 requests since are all it has.
        let after = BTreeMap::from([
            ("a-1".to_owned(), reading(30.0, 3.0)),
            ("a-2".to_owned(), reading(4.0, 0.8)),
        ]);
        let t = &difference(&services, &before, &after)["ars-comp-2"];
        assert_eq!(t.count, 24.0);
        assert!((t.seconds - 2.8).abs() < 1e-9);
    }

    #[test]
    fn ng_hops_add_up_to_client_send_to_simulator_end() {
        let timing = |mean_ms: f64| Timing {
            count: 100.0,
            seconds: mean_ms / 10.0,
        };
        let timings = BTreeMap::from([
            ("ars-comp-1".to_owned(), timing(12.0)),
            ("legacy-proxy-1".to_owned(), timing(10.0)),
            ("legacy-proxy-2".to_owned(), timing(7.0)),
            ("ars-comp-2".to_owned(), timing(5.0)),
        ]);
        let hops = shares(&timings, Some(40.0), Some(4.0));
        let names: Vec<&str> = hops.iter().map(|h| h.hop.as_str()).collect();
        assert_eq!(names.len(), 6, "{names:?}");
        let get = |name: &str| {
            hops.iter()
                .find(|h| h.hop.starts_with(name))
                .unwrap()
                .mean_ms
        };
        assert!((get("entry") - 2.0).abs() < 1e-9);
        assert!((get("legacy-proxy-1") - 10.0).abs() < 1e-9);
        assert!((get("legacy-proxy-2") - 2.0).abs() < 1e-9);
        assert!((get("relay") - 1.0).abs() < 1e-9);
        assert!((get("broker") - 25.0).abs() < 1e-9);
        let total: f64 = hops.iter().map(|h| h.share).sum();
        assert!((total - 1.0).abs() < 1e-9, "{total}");
    }

    #[test]
    fn the_baseline_has_three_hops_and_a_missing_timing_gives_none() {
        let timing = |mean_ms: f64| Timing {
            count: 10.0,
            seconds: mean_ms / 100.0,
        };
        let mut timings = BTreeMap::from([
            ("ars-comp-1".to_owned(), timing(9.0)),
            ("ars-comp-2".to_owned(), timing(6.0)),
        ]);
        assert_eq!(shares(&timings, Some(5.0), Some(4.0)).len(), 3);
        timings.remove("ars-comp-2");
        assert!(shares(&timings, Some(5.0), Some(4.0)).is_empty());
    }
}
