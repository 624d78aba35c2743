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
fn opt(v: Option<f64>, decimals: usize) -> String {
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
    let mut summaries = Vec::with_capacity(runs.len());
    let mut details = Vec::with_capacity(runs.len());
    for run in runs {
        let (summary, detail) =
            analyze(run).with_context(|| format!("analyzing {}", run.display()))?;
        summaries.push(summary);
        details.push(detail);
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let keys = keys(&summaries);

    // Through the structs rather than `serde_json::Value`, so fields keep their order.
    let json: std::collections::BTreeMap<&str, &Summary> =
        keys.iter().map(String::as_str).zip(&summaries).collect();
    let text = serde_json::to_string_pretty(&json).context("serializing the summary")?;
    write(&out_dir.join("summary.json"), &text)?;
    write(
        &out_dir.join("summary.csv"),
        &summary_csv(&keys, &summaries),
    )?;
    for (key, detail) in keys.iter().zip(&details) {
        write(
            &out_dir.join(format!("requests_{key}.csv")),
            &requests_csv(detail),
        )?;
    }
    write(
        &out_dir.join("report.html"),
        &html(&keys, &summaries, &details),
    )?;
    Ok(summaries)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A CSV field, quoted when it needs to be.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

fn csv_opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| format!("{v:.3}"))
}

fn summary_csv(keys: &[String], summaries: &[Summary]) -> String {
    let mut out = String::from(
        "key,topology,broker,sent,acknowledged,failed,delivered,lost,duplicates,duplicate_ids,\
         unacknowledged_delivered,unknown_delivered,client_errors,retries,\
         e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,e2e_max_ms,e2e_mean_ms,\
         response_p50_ms,response_p90_ms,response_p99_ms,response_max_ms,response_mean_ms,\
         sim_p50_ms,sim_p99_ms,sim_max_ms,lambda_per_s,mu_per_s,rho,drain_s\n",
    );
    for (key, s) in keys.iter().zip(summaries) {
        let e = &s.e2e_latency_ms;
        let r = &s.response_time_ms;
        let p = &s.sim_processing_ms;
        let fields = [
            csv_field(key),
            csv_field(&s.topology),
            csv_field(s.broker.as_deref().unwrap_or("")),
            s.sent.to_string(),
            s.acknowledged.to_string(),
            s.failed.to_string(),
            s.delivered.to_string(),
            s.lost.to_string(),
            s.duplicates.to_string(),
            s.duplicate_ids.to_string(),
            s.unacknowledged_delivered.to_string(),
            s.unknown_delivered.to_string(),
            s.client_errors.to_string(),
            s.retries.to_string(),
            csv_opt(e.p50),
            csv_opt(e.p90),
            csv_opt(e.p99),
            csv_opt(e.max),
            csv_opt(e.mean),
            csv_opt(r.p50),
            csv_opt(r.p90),
            csv_opt(r.p99),
            csv_opt(r.max),
            csv_opt(r.mean),
            csv_opt(p.p50),
            csv_opt(p.p99),
            csv_opt(p.max),
            csv_opt(s.queueing.lambda_per_s),
            csv_opt(s.queueing.mu_per_s),
            csv_opt(s.queueing.rho),
            csv_opt(s.drain_s),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn requests_csv(detail: &Detail) -> String {
    let mut out = String::from("id,first_send_us,success_us,attempts,delivered_count,e2e_ms\n");
    for r in &detail.requests {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{}",
            csv_field(&r.id),
            r.first_send_us,
            r.success_us.map_or_else(String::new, |s| s.to_string()),
            r.attempts,
            r.delivered_count,
            csv_opt(r.e2e_ms)
        );
    }
    out
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

fn throughput_chart(summary: &Summary, id: &str) -> String {
    let line = |name: &str, color, pick: fn(&super::Bucket) -> u64| Series {
        name: name.to_owned(),
        color,
        mark: Mark::Line,
        points: summary
            .throughput
            .iter()
            .map(|b| (b.t_s as f64, pick(b) as f64))
            .collect(),
    };
    Chart {
        x_label: "seconds since load start".to_owned(),
        y_label: "alarms per second".to_owned(),
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
        let sorted = &detail.e2e_sorted;
        let n = sorted.len();
        let step = n.div_ceil(MAX_CDF_POINTS).max(1);
        let mut points: Vec<(f64, f64)> = (0..n)
            .step_by(step)
            .map(|k| (sorted[k], (k + 1) as f64 / n as f64))
            .collect();
        if let Some(last) = sorted.last()
            && (n - 1) % step != 0
        {
            points.push((*last, 1.0));
        }
        if let (Some(first), Some(last)) = (sorted.iter().find(|v| **v > 0.0), sorted.last()) {
            lo = lo.min(*first);
            hi = hi.max(*last);
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

const CSS: &str = "body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}\
table{border-collapse:collapse;margin:.5em 0 1.5em}\
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}\
th:first-child,td:first-child{text-align:left}\
thead th{background:#f3f3f3}\
figure{margin:1em 0 2em}figcaption{font-weight:bold;margin-bottom:.4em}\
.cols{display:grid;gap:1em}.cols>div{min-width:0}\
svg{width:100%;height:auto;border:1px solid #eee}\
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

/// A figure with one panel per topology side by side.
fn figure(
    out: &mut String,
    id: &str,
    caption: &str,
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
    out.push_str("</div></figure>");
}

fn html(keys: &[String], summaries: &[Summary], details: &[Detail]) -> String {
    let mut out = String::with_capacity(256 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>LPS report: {}</title><style>{CSS}</style></head><body>",
        esc(&keys.join(" vs "))
    );
    let _ = write!(
        out,
        "<h1>LPS report: {}</h1><p class=\"note\">Generated {} from ",
        esc(&keys.join(" vs ")),
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
    out.push_str(". Definitions of every figure: <code>lps analyze</code> documentation (module <code>lps::analyze</code>).</p>");

    out.push_str("<h2>Headline</h2>");
    html_table(&mut out, keys, summaries, HEADLINE);

    figure(
        &mut out,
        "plot-response-time",
        "Response time over time (first send → success), with fault injections",
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
        r#"<figure id="plot-latency-cdf"><figcaption>End-to-end latency distribution (client first send → first arrival at the simulator), CDF</figcaption><div style="max-width:900px">{}</div></figure>"#,
        cdf_chart(keys, details, "plot-latency-cdf-svg")
    );

    figure(
        &mut out,
        "plot-per-instance",
        "Messages forwarded per legacy-proxy-2 instance",
        keys,
        |i, key| {
            let s = &summaries[i];
            if s.per_instance.is_empty() {
                let why = if s.topology == "legacy" {
                    "The baseline topology has no legacy-proxy-2."
                } else {
                    "No bridge metrics were recorded."
                };
                format!("<p class=\"note\">{}</p>", esc(why))
            } else {
                let labels: Vec<String> = s.per_instance.keys().cloned().collect();
                let values: Vec<f64> = s.per_instance.values().map(|v| *v as f64).collect();
                svg::bars(
                    &format!("plot-per-instance-{key}"),
                    &labels,
                    &values,
                    "forwarded messages",
                )
            }
        },
    );

    figure(
        &mut out,
        "plot-throughput",
        "Throughput over time: alarms sent, acknowledged and delivered per second",
        keys,
        |i, key| throughput_chart(&summaries[i], &format!("plot-throughput-{key}")),
    );

    out.push_str("<h2>Details</h2>");
    html_table(&mut out, keys, summaries, DETAILS);
    out.push_str("<p class=\"note\">Per-hop latencies use each id's first arrival. \"back to client\" covers only ids acknowledged after the simulator finished (the legacy return path); in NG the client is answered once the broker holds the message, usually before the simulator sees it (\"acked before backend\"). μ is arrivals per second of simulator busy time (time with at least one alarm in progress); ρ = λ/μ.</p>");

    if summaries.iter().any(|s| !s.per_step.is_empty()) {
        out.push_str("<h2>Performance steps</h2><div class=\"cols\" style=\"grid-template-columns:repeat(auto-fit,minmax(360px,1fr))\">");
        for (key, s) in keys.iter().zip(summaries) {
            let _ = write!(
                out,
                "<div><h3>{}</h3><table><thead><tr><th>step</th><th>start s</th><th>requests</th><th>acked</th><th>avg ms</th><th>max ms</th><th>EN 50136</th></tr></thead><tbody>",
                esc(key)
            );
            for p in &s.per_step {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    p.step,
                    p.start_s,
                    p.requests,
                    p.acknowledged,
                    opt(p.avg_response_ms, 1),
                    opt(p.max_response_ms, 1),
                    if p.within_limits { "ok" } else { "exceeded" }
                );
            }
            out.push_str("</tbody></table></div>");
        }
        out.push_str("</div>");
    }

    if summaries.iter().any(|s| !s.faults.is_empty()) {
        out.push_str("<h2>Faults</h2><div class=\"cols\" style=\"grid-template-columns:repeat(auto-fit,minmax(360px,1fr))\">");
        for (key, s) in keys.iter().zip(summaries) {
            let _ = write!(
                out,
                "<div><h3>{}</h3><table><thead><tr><th>t s</th><th>service</th><th>action</th><th>how</th></tr></thead><tbody>",
                esc(key)
            );
            for f in &s.faults {
                let action = match f.action {
                    FaultAction::Stop => "stop",
                    FaultAction::Start => "start",
                };
                let _ = write!(
                    out,
                    "<tr><td>{:.1}</td><td>{}</td><td>{action}</td><td>{}</td></tr>",
                    secs(s.load_start_us, f.at_us),
                    esc(&f.service),
                    esc(&f.how)
                );
            }
            out.push_str("</tbody></table></div>");
        }
        out.push_str("</div>");
    }
    out.push_str("</body></html>\n");
    out
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
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("abc"), "abc");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
