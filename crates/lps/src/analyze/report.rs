//! The outputs of `lps analyze`: the terminal table, `summary.json`, the CSV files and the
//! self-contained `report.html`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::svg::{self, Chart, Mark, Marker, PALETTE, Series, esc};
use super::{Detail, Stats, Summary, analyze};
use crate::records::FaultAction;

/// Most dots in a response-time scatter plot; beyond it the points are thinned per time
/// slice, keeping each slice's fastest and slowest request.
const MAX_SCATTER_POINTS: usize = 5_000;
/// Most points of a CDF curve.
const MAX_CDF_POINTS: usize = 1_000;

/// `v` with `decimals`, or `-` when absent.
pub(crate) fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

fn stat(s: &Stats, pick: fn(&Stats) -> Option<f64>) -> String {
    opt(pick(s), 1)
}

type Row = (&'static str, fn(&Summary) -> String);

/// The headline metrics (first rows of every table).
const HEADLINE: &[Row] = &[
    ("sent", |s| s.sent.to_string()),
    ("acknowledged", |s| s.acknowledged.to_string()),
    ("delivered", |s| s.delivered.to_string()),
    ("lost", |s| s.lost.to_string()),
    ("duplicates (ids)", |s| {
        format!("{} ({})", s.duplicates, s.duplicate_ids)
    }),
    ("drain s", |s| opt(s.drain_s, 2)),
    ("e2e p50 ms", |s| stat(&s.e2e_latency_ms, |x| x.p50)),
    ("e2e p99 ms", |s| stat(&s.e2e_latency_ms, |x| x.p99)),
];

/// Everything else, after the headline.
const DETAILS: &[Row] = &[
    ("broker", |s| {
        s.broker.clone().unwrap_or_else(|| "-".to_owned())
    }),
    ("load", |s| s.load.clone()),
    ("failed (never acked)", |s| s.failed.to_string()),
    ("unacked but delivered", |s| {
        s.unacknowledged_delivered.to_string()
    }),
    ("unknown ids delivered", |s| s.unknown_delivered.to_string()),
    ("simulator 404/499", |s| s.simulator_rejected.to_string()),
    ("client errors", |s| s.client_errors.to_string()),
    ("retries", |s| s.retries.to_string()),
    ("e2e p90 ms", |s| stat(&s.e2e_latency_ms, |x| x.p90)),
    ("e2e max ms", |s| stat(&s.e2e_latency_ms, |x| x.max)),
    ("e2e mean ms", |s| stat(&s.e2e_latency_ms, |x| x.mean)),
    ("response p50 ms", |s| stat(&s.response_time_ms, |x| x.p50)),
    ("response p90 ms", |s| stat(&s.response_time_ms, |x| x.p90)),
    ("response p99 ms", |s| stat(&s.response_time_ms, |x| x.p99)),
    ("response max ms", |s| stat(&s.response_time_ms, |x| x.max)),
    ("response mean ms", |s| {
        stat(&s.response_time_ms, |x| x.mean)
    }),
    ("simulator p50 ms", |s| {
        stat(&s.sim_processing_ms, |x| x.p50)
    }),
    ("simulator p99 ms", |s| {
        stat(&s.sim_processing_ms, |x| x.p99)
    }),
    ("simulator max ms", |s| {
        stat(&s.sim_processing_ms, |x| x.max)
    }),
    ("hop to backend p50 ms", |s| {
        stat(&s.per_hop_ms.to_backend, |x| x.p50)
    }),
    ("hop backend p50 ms", |s| {
        stat(&s.per_hop_ms.backend, |x| x.p50)
    }),
    ("hop back to client p50 ms", |s| {
        format!(
            "{} (n={})",
            stat(&s.per_hop_ms.back_to_client, |x| x.p50),
            s.per_hop_ms.back_to_client.count
        )
    }),
    ("acked before backend", |s| {
        s.per_hop_ms.acknowledged_before_backend.to_string()
    }),
    ("lambda /s", |s| opt(s.queueing.lambda_per_s, 2)),
    ("mu /s", |s| opt(s.queueing.mu_per_s, 2)),
    ("rho", |s| opt(s.queueing.rho, 3)),
    ("simulator busy s", |s| format!("{:.2}", s.queueing.busy_s)),
    ("peak delivered /s", |s| {
        s.queueing.peak_delivered_per_s.to_string()
    }),
    ("load window s", |s| {
        format!("{:.2}", s.queueing.load_window_s)
    }),
    ("drain observed s", |s| opt(s.drain_observed_s, 2)),
    ("per instance", |s| {
        if s.per_instance.is_empty() {
            "-".to_owned()
        } else {
            s.per_instance
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        }
    }),
    ("faults", |s| s.faults.len().to_string()),
    ("background sent/ok", |s| {
        format!("{}/{}", s.background.sent, s.background.acknowledged)
    }),
];

/// A plain-text side-by-side table of the summaries (for the terminal).
pub fn table(summaries: &[Summary]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = vec![(
        "topology".to_owned(),
        summaries.iter().map(|s| s.topology.clone()).collect(),
    )];
    for (label, value) in HEADLINE.iter().chain(DETAILS) {
        rows.push(((*label).to_owned(), summaries.iter().map(value).collect()));
    }
    let label_width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..summaries.len())
        .map(|i| {
            rows.iter()
                .map(|r| r.1[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (n, (label, values)) in rows.iter().enumerate() {
        let _ = write!(out, "{label:<label_width$}");
        for (value, width) in values.iter().zip(&widths) {
            let _ = write!(out, "  {value:>width$}");
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        if n == 0 {
            let total = label_width + widths.iter().map(|w| w + 2).sum::<usize>();
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

/// Key of each summary in `summary.json` and the file names: the topology, made unique
/// (`legacy`, `legacy-2`, ...) and safe for a file name.
fn keys(summaries: &[Summary]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for s in summaries {
        let base: String = s
            .topology
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let base = if base.is_empty() {
            "run".to_owned()
        } else {
            base
        };
        let mut key = base.clone();
        let mut n = 2;
        while keys.contains(&key) {
            key = format!("{base}-{n}");
            n += 1;
        }
        keys.push(key);
    }
    keys
}

/// Analyzes each run folder (one per topology: the folder's run.json says which), writes
/// `summary.json` (object with one key per topology: "legacy" and/or "ng"), CSV files and a
/// self-contained `report.html` into `out_dir`, and returns the summaries in the given order.
///
/// Two runs of the same topology get the keys `legacy` and `legacy-2`.
pub fn write_report(runs: &[PathBuf], out_dir: &Path) -> anyhow::Result<Vec<Summary>> {
    let (summaries, details) = analyze_all(runs)?;
    let keys = keys(&summaries);
    write_data(&keys, &summaries, &details, out_dir)?;
    write(
        &out_dir.join("report.html"),
        &html(&keys, &summaries, &details),
    )?;
    Ok(summaries)
}

/// Analyzes each run folder, in order.
pub(crate) fn analyze_all(runs: &[PathBuf]) -> anyhow::Result<(Vec<Summary>, Vec<Detail>)> {
    let mut summaries = Vec::with_capacity(runs.len());
    let mut details = Vec::with_capacity(runs.len());
    for run in runs {
        let (summary, detail) =
            analyze(run).with_context(|| format!("analyzing {}", run.display()))?;
        summaries.push(summary);
        details.push(detail);
    }
    Ok((summaries, details))
}

/// Writes `summary.json` (one key per summary), `summary.csv`, and per summary
/// `requests_<key>.csv`, `throughput_<key>.csv` and the HdrHistogram percentile files
/// `e2e_<key>.hgrm` and `response_<key>.hgrm` into `out_dir`.
pub(crate) fn write_data(
    keys: &[String],
    summaries: &[Summary],
    details: &[Detail],
    out_dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Through the structs rather than `serde_json::Value`, so fields keep their order.
    let json: std::collections::BTreeMap<&str, &Summary> =
        keys.iter().map(String::as_str).zip(summaries).collect();
    let text = serde_json::to_string_pretty(&json).context("serializing the summary")?;
    write(&out_dir.join("summary.json"), &text)?;
    write_csv(
        &out_dir.join("summary.csv"),
        keys.iter()
            .zip(summaries)
            .map(|(k, s)| SummaryRow::new(k, s)),
    )?;
    for ((key, summary), detail) in keys.iter().zip(summaries).zip(details) {
        write_csv(
            &out_dir.join(format!("requests_{key}.csv")),
            detail.requests.iter().map(|r| RequestCsvRow {
                id: &r.id,
                first_send_us: r.first_send_us,
                success_us: r.success_us,
                attempts: r.attempts,
                delivered_count: r.delivered_count,
                e2e_ms: r.e2e_ms,
            }),
        )?;
        write_csv(
            &out_dir.join(format!("throughput_{key}.csv")),
            &summary.throughput,
        )?;
        write(&out_dir.join(format!("e2e_{key}.hgrm")), &detail.e2e.hgrm())?;
        write(
            &out_dir.join(format!("response_{key}.hgrm")),
            &detail.response.hgrm(),
        )?;
    }
    Ok(())
}

pub(crate) fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Serializes a figure with three decimals (empty when absent), as every CSV float.
fn three_decimals<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&format!("{v:.3}")),
        None => s.serialize_str(""),
    }
}

/// One row of `summary.csv`; the header is these field names.
#[derive(Debug, serde::Serialize)]
struct SummaryRow<'a> {
    key: &'a str,
    topology: &'a str,
    broker: &'a str,
    sent: u64,
    acknowledged: u64,
    failed: u64,
    delivered: u64,
    lost: u64,
    duplicates: u64,
    duplicate_ids: u64,
    unacknowledged_delivered: u64,
    unknown_delivered: u64,
    client_errors: u64,
    retries: u64,
    #[serde(serialize_with = "three_decimals")]
    e2e_p50_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    e2e_p90_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    e2e_p99_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    e2e_max_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    e2e_mean_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    response_p50_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    response_p90_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    response_p99_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    response_max_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    response_mean_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    sim_p50_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    sim_p99_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    sim_max_ms: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    lambda_per_s: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    mu_per_s: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    rho: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    drain_s: Option<f64>,
}

impl<'a> SummaryRow<'a> {
    fn new(key: &'a str, s: &'a Summary) -> Self {
        let (e, r, p) = (&s.e2e_latency_ms, &s.response_time_ms, &s.sim_processing_ms);
        Self {
            key,
            topology: &s.topology,
            broker: s.broker.as_deref().unwrap_or(""),
            sent: s.sent,
            acknowledged: s.acknowledged,
            failed: s.failed,
            delivered: s.delivered,
            lost: s.lost,
            duplicates: s.duplicates,
            duplicate_ids: s.duplicate_ids,
            unacknowledged_delivered: s.unacknowledged_delivered,
            unknown_delivered: s.unknown_delivered,
            client_errors: s.client_errors,
            retries: s.retries,
            e2e_p50_ms: e.p50,
            e2e_p90_ms: e.p90,
            e2e_p99_ms: e.p99,
            e2e_max_ms: e.max,
            e2e_mean_ms: e.mean,
            response_p50_ms: r.p50,
            response_p90_ms: r.p90,
            response_p99_ms: r.p99,
            response_max_ms: r.max,
            response_mean_ms: r.mean,
            sim_p50_ms: p.p50,
            sim_p99_ms: p.p99,
            sim_max_ms: p.max,
            lambda_per_s: s.queueing.lambda_per_s,
            mu_per_s: s.queueing.mu_per_s,
            rho: s.queueing.rho,
            drain_s: s.drain_s,
        }
    }
}

/// One row of `requests_<key>.csv`.
#[derive(Debug, serde::Serialize)]
struct RequestCsvRow<'a> {
    id: &'a str,
    first_send_us: u64,
    success_us: Option<u64>,
    attempts: u32,
    delivered_count: u64,
    #[serde(serialize_with = "three_decimals")]
    e2e_ms: Option<f64>,
}

/// Writes `rows` as a CSV file with a header from the row type's fields.
fn write_csv<R: serde::Serialize>(
    path: &Path,
    rows: impl IntoIterator<Item = R>,
) -> anyhow::Result<()> {
    let mut writer =
        csv::Writer::from_path(path).with_context(|| format!("writing {}", path.display()))?;
    for row in rows {
        writer
            .serialize(row)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    writer
        .flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// Thins `points` to about `max`: per x slice the lowest and highest point and the first,
/// so outliers (the maximum in particular) always survive.
pub(crate) fn downsample(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let slices = (max / 3).max(1);
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.0), hi.max(p.0))
        });
    let width = if hi > lo {
        (hi - lo) / slices as f64
    } else {
        1.0
    };
    // (first, min, max) per slice.
    let mut kept: Vec<Option<[(f64, f64); 3]>> = vec![None; slices];
    for p in points {
        let i = (((p.0 - lo) / width) as usize).min(slices - 1);
        match &mut kept[i] {
            Some([_, min, max]) => {
                if p.1 < min.1 {
                    *min = p;
                }
                if p.1 > max.1 {
                    *max = p;
                }
            }
            slot @ None => *slot = Some([p, p, p]),
        }
    }
    let mut out = Vec::with_capacity(max);
    for [first, min, max] in kept.into_iter().flatten() {
        out.push(first);
        if min != first {
            out.push(min);
        }
        if max != first && max != min {
            out.push(max);
        }
    }
    out
}

/// The rolling mean of `pick` over the last `window_s` one-second buckets, at the end of
/// each second: a rate without the zig-zag of closed-loop traffic (which sends in bursts
/// once a second).
pub(crate) fn rolling_rate(
    buckets: &[super::Bucket],
    pick: fn(&super::Bucket) -> u64,
    window_s: i64,
) -> Vec<(f64, f64)> {
    let window_s = window_s.max(1);
    let mut sum = 0u64;
    let mut out = Vec::with_capacity(buckets.len());
    let mut first = 0;
    for b in buckets {
        sum += pick(b);
        while buckets[first].t_s <= b.t_s - window_s {
            sum -= pick(&buckets[first]);
            first += 1;
        }
        let span = (b.t_s - buckets[0].t_s + 1).min(window_s);
        out.push(((b.t_s + 1) as f64, sum as f64 / span as f64));
    }
    out
}

/// Seconds from `t0` to `at`.
fn secs(t0: u64, at: u64) -> f64 {
    (at as f64 - t0 as f64) / 1e6
}

fn fault_markers(summary: &Summary) -> Vec<Marker> {
    summary
        .faults
        .iter()
        .map(|f| {
            let (action, color) = match f.action {
                FaultAction::Stop => ("stop", "#d62728"),
                FaultAction::Start => ("start", "#2ca02c"),
            };
            Marker {
                x: secs(summary.load_start_us, f.at_us),
                label: format!("{} {action}", f.service),
                color,
            }
        })
        .collect()
}

fn response_chart(summary: &Summary, detail: &Detail, id: &str) -> String {
    let t0 = summary.load_start_us;
    let points: Vec<(f64, f64)> = detail
        .requests
        .iter()
        .filter_map(|r| r.response_ms.map(|ms| (secs(t0, r.first_send_us), ms)))
        .collect();
    let total = points.len();
    let points = downsample(points, MAX_SCATTER_POINTS);
    let name = if total > points.len() {
        format!("acknowledged: {} of {total} shown", points.len())
    } else {
        format!("acknowledged: {total}")
    };
    Chart {
        x_label: "seconds since load start (first send)".to_owned(),
        y_label: "response time, ms".to_owned(),
        x_log: false,
        series: vec![Series {
            name,
            color: PALETTE[0],
            mark: Mark::Dots,
            points,
        }],
        markers: fault_markers(summary),
        legend_bottom: false,
    }
    .render(id)
}

/// Seconds of the rolling mean of the throughput plot.
const THROUGHPUT_WINDOW_S: i64 = 5;

fn throughput_chart(summary: &Summary, id: &str) -> String {
    let line = |name: &str, color, pick: fn(&super::Bucket) -> u64| Series {
        name: name.to_owned(),
        color,
        mark: Mark::Line,
        points: rolling_rate(&summary.throughput, pick, THROUGHPUT_WINDOW_S),
    };
    Chart {
        x_label: "seconds since load start".to_owned(),
        y_label: format!("alarms per second ({THROUGHPUT_WINDOW_S} s rolling mean)"),
        x_log: false,
        series: vec![
            line("sent", PALETTE[0], |b| b.sent),
            line("acknowledged", PALETTE[2], |b| b.acknowledged),
            line("delivered", PALETTE[3], |b| b.delivered),
        ],
        markers: fault_markers(summary),
        legend_bottom: false,
    }
    .render(id)
}

fn cdf_chart(keys: &[String], details: &[Detail], id: &str) -> String {
    let mut series = Vec::new();
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for (i, (key, detail)) in keys.iter().zip(details).enumerate() {
        let n = detail.e2e.count();
        let points = detail.e2e.cdf(MAX_CDF_POINTS);
        if let (Some(first), Some(last)) = (points.iter().find(|p| p.0 > 0.0), points.last()) {
            lo = lo.min(first.0);
            hi = hi.max(last.0);
        }
        series.push(Series {
            name: format!("{key} (n={n})"),
            color: PALETTE[i % PALETTE.len()],
            mark: Mark::Line,
            points,
        });
    }
    Chart {
        x_label: "end-to-end latency, ms".to_owned(),
        y_label: "fraction of delivered alarms".to_owned(),
        // A log scale when the latencies span orders of magnitude (faults, backlogs).
        x_log: lo.is_finite() && hi / lo > 50.0,
        series,
        markers: Vec::new(),
        legend_bottom: true,
    }
    .render(id)
}

pub(crate) const CSS: &str = "body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th:first-child,td:first-child{text-align:left}\
thead th{background:#f3f3f3}\
figure{margin:1em 0 2em}figcaption{font-weight:bold;margin-bottom:.4em}\
.cols{display:grid;gap:1em}.cols>div{min-width:0}\
svg{width:100%;height:auto;border:1px solid #eee}\
.better{background:#e6f4e6;font-weight:bold}\
.note{color:#555;font-size:.9em}";

fn html_table(out: &mut String, keys: &[String], summaries: &[Summary], rows: &[Row]) {
    out.push_str("<table><thead><tr><th>metric</th>");
    for key in keys {
        let _ = write!(out, "<th>{}</th>", esc(key));
    }
    out.push_str("</tr></thead><tbody>");
    for (label, value) in rows {
        let _ = write!(out, "<tr><td>{}</td>", esc(label));
        for s in summaries {
            let _ = write!(out, "<td>{}</td>", esc(&value(s)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

/// A figure with one panel per topology side by side, its caption, and the definition of
/// what it shows under it.
fn figure(
    out: &mut String,
    (id, caption, definition): (&str, &str, &str),
    keys: &[String],
    panel: impl Fn(usize, &str) -> String,
) {
    let _ = write!(
        out,
        r#"<figure id="{}"><figcaption>{}</figcaption><div class="cols" style="grid-template-columns:repeat({},1fr)">"#,
        esc(id),
        esc(caption),
        keys.len().max(1)
    );
    for (i, key) in keys.iter().enumerate() {
        let _ = write!(out, "<div><h3>{}</h3>{}</div>", esc(key), panel(i, key));
    }
    let _ = write!(
        out,
        "</div><p class=\"note\">{}</p></figure>",
        esc(definition)
    );
}

/// Which way a compared metric is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Lower,
    Higher,
}

/// The metrics of the comparison table: label, value, which way is better.
/// A compared metric: label, value, which way is better.
type Compared = (&'static str, fn(&Summary) -> Option<f64>, Better);

const COMPARED: &[Compared] = &[
    (
        "acknowledged",
        |s| Some(s.acknowledged as f64),
        Better::Higher,
    ),
    ("delivered", |s| Some(s.delivered as f64), Better::Higher),
    ("lost", |s| Some(s.lost as f64), Better::Lower),
    ("duplicates", |s| Some(s.duplicates as f64), Better::Lower),
    (
        "client errors",
        |s| Some(s.client_errors as f64),
        Better::Lower,
    ),
    ("drain s", |s| s.drain_s, Better::Lower),
    ("e2e p50 ms", |s| s.e2e_latency_ms.p50, Better::Lower),
    ("e2e p99 ms", |s| s.e2e_latency_ms.p99, Better::Lower),
    ("e2e max ms", |s| s.e2e_latency_ms.max, Better::Lower),
    ("response p50 ms", |s| s.response_time_ms.p50, Better::Lower),
    ("response p99 ms", |s| s.response_time_ms.p99, Better::Lower),
    (
        "peak delivered /s",
        |s| Some(s.queueing.peak_delivered_per_s as f64),
        Better::Higher,
    ),
];

/// Two runs side by side: each metric, the difference (second − first) and the better
/// value marked (class `better`); nothing is marked on a tie or a missing value.
fn comparison(out: &mut String, keys: &[String], summaries: &[Summary]) {
    let ([ka, kb], [a, b]) = (keys, summaries) else {
        return;
    };
    let _ = write!(
        out,
        "<h2 id=\"comparison\">Differences</h2><table><thead><tr><th>metric</th><th>{}</th>\
         <th>{}</th><th>{} − {}</th></tr></thead><tbody>",
        esc(ka),
        esc(kb),
        esc(kb),
        esc(ka)
    );
    for (label, value, better) in COMPARED {
        let (va, vb) = (value(a), value(b));
        let winner = match (va, vb) {
            (Some(x), Some(y)) if x != y => Some((x < y) == (*better == Better::Lower)),
            _ => None,
        };
        let cell = |v: Option<f64>, wins: bool| {
            let class = if wins { " class=\"better\"" } else { "" };
            format!("<td{class}>{}</td>", opt(v, 1))
        };
        let diff = match (va, vb) {
            (Some(x), Some(y)) => format!("{:+.1}", y - x),
            _ => "-".to_owned(),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td>{}{}<td>{diff}</td></tr>",
            esc(label),
            cell(va, winner == Some(true)),
            cell(vb, winner == Some(false))
        );
    }
    out.push_str(
        "</tbody></table><p class=\"note\">The better value of each row is highlighted \
         (lower is better for losses, errors, drain and latencies; higher for acknowledged, \
         delivered and peak rate).</p>",
    );
}

fn html(keys: &[String], summaries: &[Summary], details: &[Detail]) -> String {
    let mut out = String::with_capacity(256 * 1024);
    header(&mut out, keys, summaries);
    out.push_str("<h2>Headline</h2>");
    html_table(&mut out, keys, summaries, HEADLINE);
    comparison(&mut out, keys, summaries);
    plots(&mut out, keys, summaries, details);
    out.push_str("<h2>Details</h2>");
    html_table(&mut out, keys, summaries, DETAILS);
    out.push_str("<p class=\"note\">Per-hop latencies use each id's first arrival. \"back to client\" covers only ids acknowledged after the simulator finished (the legacy return path); in NG the client is answered once the broker holds the message, usually before the simulator sees it (\"acked before backend\"). μ is arrivals per second of simulator busy time (time with at least one alarm in progress); ρ = λ/μ.</p>");
    per_topology_tables(&mut out, keys, summaries, "Performance steps", STEPS);
    per_topology_tables(&mut out, keys, summaries, "Faults", FAULTS_TABLE);
    per_topology_tables(&mut out, keys, summaries, "Per-hop latency", HOPS_TABLE);
    out.push_str("</body></html>\n");
    out
}

fn header(out: &mut String, keys: &[String], summaries: &[Summary]) {
    let title = esc(&keys.join(" vs "));
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>LPS report: {title}</title><style>{CSS}</style></head><body><h1>LPS report: {title}</h1><p class=\"note\">Generated {} from ",
        esc(&chrono::Utc::now()
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string())
    );
    for (i, s) in summaries.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            out,
            "{sep}<code>{}</code> ({})",
            esc(&s.run_dir),
            esc(&s.load)
        );
    }
    out.push_str(". Under each figure, the definition of what it shows; the definitions of every metric are in the <code>lps::analyze</code> module documentation (<code>crates/lps/src/analyze.rs</code>). Beside this page: <code>summary.json</code>, <code>summary.csv</code>, <code>requests_*.csv</code>, <code>throughput_*.csv</code> and the HdrHistogram percentile files <code>e2e_*.hgrm</code>, <code>response_*.hgrm</code>.</p>");
}

fn plots(out: &mut String, keys: &[String], summaries: &[Summary], details: &[Detail]) {
    figure(
        out,
        (
            "plot-response-time",
            "Response time over time, with fault injections",
            "One dot per acknowledged alarm at its first send: first send → successful answer, retries and their 1 s pauses included. Dashed lines: a service stopped (red) or started (green).",
        ),
        keys,
        |i, key| {
            response_chart(
                &summaries[i],
                &details[i],
                &format!("plot-response-time-{key}"),
            )
        },
    );
    let _ = write!(
        out,
        r#"<figure id="plot-latency-cdf"><figcaption>End-to-end latency distribution, CDF</figcaption><div style="max-width:900px">{}</div><p class="note">Client first send → end of the id's first arrival at the simulator (CMD-ENDE), over acknowledged and delivered alarms; from an HdrHistogram (4 significant digits), the same as the e2e_*.hgrm files.</p></figure>"#,
        cdf_chart(keys, details, "plot-latency-cdf-svg")
    );
    figure(
        out,
        (
            "plot-per-instance",
            "Messages forwarded per legacy-proxy-2 instance",
            "Sum of the increments of each instance's bridge_forwarded_total, sampled every second (a drop counts as a restart from 0).",
        ),
        keys,
        |i, key| per_instance_panel(&summaries[i], key),
    );
    figure(
        out,
        (
            "plot-throughput",
            "Throughput over time: alarms sent, acknowledged and delivered",
            "Rolling mean over 5 s of per-second counts: first sends, successful answers, and first arrivals of distinct alarm ids at the simulator (by the end of processing). A rolling mean, because closed-loop users send in bursts once a second. Dashed lines: faults.",
        ),
        keys,
        |i, key| throughput_chart(&summaries[i], &format!("plot-throughput-{key}")),
    );
}

fn per_instance_panel(s: &Summary, key: &str) -> String {
    if s.per_instance.is_empty() {
        let why = if s.topology == "legacy" {
            "The baseline topology has no legacy-proxy-2."
        } else {
            "No bridge metrics were recorded."
        };
        return format!("<p class=\"note\">{}</p>", esc(why));
    }
    let labels: Vec<String> = s.per_instance.keys().cloned().collect();
    let values: Vec<f64> = s.per_instance.values().map(|v| *v as f64).collect();
    svg::bars(
        &format!("plot-per-instance-{key}"),
        &labels,
        &values,
        "forwarded messages",
    )
}

/// A table per topology: its column headers and its rows from a summary.
type PerTopology = (&'static [&'static str], fn(&Summary) -> Vec<Vec<String>>);

const STEPS: PerTopology = (
    &[
        "step", "start s", "requests", "acked", "avg ms", "max ms", "EN 50136",
    ],
    |s| {
        s.per_step
            .iter()
            .map(|p| {
                vec![
                    p.step.to_string(),
                    format!("{:.1}", p.start_s),
                    p.requests.to_string(),
                    p.acknowledged.to_string(),
                    opt(p.avg_response_ms, 1),
                    opt(p.max_response_ms, 1),
                    (if p.within_limits { "ok" } else { "exceeded" }).to_owned(),
                ]
            })
            .collect()
    },
);

const FAULTS_TABLE: PerTopology = (&["t s", "service", "action", "how"], |s| {
    s.faults
        .iter()
        .map(|f| {
            let action = match f.action {
                FaultAction::Stop => "stop",
                FaultAction::Start => "start",
            };
            vec![
                format!("{:.1}", secs(s.load_start_us, f.at_us)),
                f.service.clone(),
                action.to_owned(),
                f.how.clone(),
            ]
        })
        .collect()
});

/// Each hop's own mean time and share of client send → simulator end ([`crate::hops`]
/// defines each hop).
const HOPS_TABLE: PerTopology = (&["hop", "own mean ms", "share"], |s| {
    s.per_hop_ms
        .services
        .iter()
        .map(|h| {
            vec![
                h.hop.clone(),
                format!("{:.2}", h.mean_ms),
                format!("{:.0} %", h.share * 100.0),
            ]
        })
        .collect()
});

/// A section with one table per topology, unless every table would be empty.
fn per_topology_tables(
    out: &mut String,
    keys: &[String],
    summaries: &[Summary],
    title: &str,
    (columns, rows): PerTopology,
) {
    let tables: Vec<Vec<Vec<String>>> = summaries.iter().map(rows).collect();
    if tables.iter().all(Vec::is_empty) {
        return;
    }
    let _ = write!(
        out,
        "<h2>{}</h2><div class=\"cols\" style=\"grid-template-columns:repeat(auto-fit,minmax(360px,1fr))\">",
        esc(title)
    );
    for (key, rows) in keys.iter().zip(tables) {
        let _ = write!(out, "<div><h3>{}</h3><table><thead><tr>", esc(key));
        for c in columns {
            let _ = write!(out, "<th>{}</th>", esc(c));
        }
        out.push_str("</tr></thead><tbody>");
        for row in rows {
            out.push_str("<tr>");
            for v in row {
                let _ = write!(out, "<td>{}</td>", esc(&v));
            }
            out.push_str("</tr>");
        }
        out.push_str("</tbody></table></div>");
    }
    out.push_str("</div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_keeps_the_maximum_and_bounds_the_count() {
        let mut points: Vec<(f64, f64)> = (0..20_000).map(|i| (i as f64, (i % 7) as f64)).collect();
        points.push((12_345.5, 1e6));
        let thinned = downsample(points, 5_000);
        assert!(thinned.len() <= 5_000, "{}", thinned.len());
        assert!(thinned.len() > 1_000);
        assert!(thinned.contains(&(12_345.5, 1e6)));
    }

    #[test]
    fn csv_rows_quote_what_needs_quoting_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        let rows = [RequestCsvRow {
            id: "a,\"b\"",
            first_send_us: 1,
            success_us: None,
            attempts: 2,
            delivered_count: 0,
            e2e_ms: Some(1.23456),
        }];
        write_csv(&path, &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "id,first_send_us,success_us,attempts,delivered_count,e2e_ms\n\"a,\"\"b\"\"\",1,,2,0,1.235\n"
        );
        let mut reader = csv::Reader::from_path(&path).unwrap();
        let back: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(&back[0][0], "a,\"b\"");
    }
}
