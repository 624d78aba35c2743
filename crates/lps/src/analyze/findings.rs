//! The report of `lps reproduce`: each of upstream's findings next to ours, each with its
//! figure.
//!
//! Findings and how ours are measured (every cell is one run folder, see
//! [`crate::reproduce`]):
//!
//! - **window**: NG under netem, performance steps, no faults, with legacy-proxy-2's window
//!   at 1 and at 32. *Delivery rate* = distinct alarm ids delivered ÷ seconds from the load
//!   start to the end of the last second with a delivery (the chain's sustained rate,
//!   backlog included). The ratios are window 32 ÷ window 1 for the rate and window 1 ÷
//!   window 32 for the median end-to-end latency: above 1, the wider window is faster.
//! - **drain**: `drain_s` of every cell (load end → every acknowledged id arrived, by ids).
//! - **loss**: `lost` and `duplicates` of every cell, by id (set difference; Σ (n − 1)).
//! - **steps**: `per_step` of the performance cells: average and maximum response time per
//!   step against the EN 50136 limits (10 s, 30 s).
//! - **queueing**: λ, μ, ρ of every cell ([`super::Queueing`]), and the chain's ρ: λ ÷ the
//!   delivery rate (upstream's μ was the chain's rate, not the backend's).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::report::{CSS, analyze_all, opt, rolling_rate, write as write_file, write_data};
use super::svg::{Chart, Mark, PALETTE, Series, esc};
use super::{STEP_AVG_LIMIT_MS, STEP_MAX_LIMIT_MS, Summary};
use crate::reproduce::{Cell, LoadKind, Scale};

/// The cells the window finding compares.
pub const WINDOW_1_CELL: &str = "ng-steps-none-netem-w1";
/// See [`WINDOW_1_CELL`].
pub const WINDOW_32_CELL: &str = "ng-steps-none-netem-w32";

/// Seconds of the rolling window of throughput plots.
const ROLLING_S: i64 = 3;

/// Upstream's finding and ours, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Short key (`window`, `drain`, `loss`, `steps`, `queueing`).
    pub key: &'static str,
    /// What the finding is about.
    pub title: &'static str,
    /// What upstream reported.
    pub upstream: &'static str,
    /// What this run measured.
    pub ours: String,
}

/// The window comparison in numbers (`findings.json` `window`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowComparison {
    /// Delivery rate with window 1, per second.
    pub w1_rate_per_s: Option<f64>,
    /// Delivery rate with window 32, per second.
    pub w32_rate_per_s: Option<f64>,
    /// w32 rate ÷ w1 rate.
    pub rate_ratio: Option<f64>,
    /// Median end-to-end latency with window 1, ms.
    pub w1_e2e_p50_ms: Option<f64>,
    /// Median end-to-end latency with window 32, ms.
    pub w32_e2e_p50_ms: Option<f64>,
    /// w1 p50 ÷ w32 p50.
    pub latency_ratio: Option<f64>,
}

/// One cell's row of `findings.json`.
#[derive(Debug, Clone, Serialize)]
pub struct CellResult {
    /// The cell.
    #[serde(flatten)]
    pub cell: Cell,
    /// Its run folder.
    pub run_dir: PathBuf,
    /// Delivered ids per second, load start → last delivery.
    pub delivery_rate_per_s: Option<f64>,
    /// λ ÷ delivery rate.
    pub chain_rho: Option<f64>,
}

/// `findings.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Findings {
    /// The scale the matrix ran at.
    pub scale: Scale,
    /// Wall time of the experiments, seconds.
    pub elapsed_s: f64,
    /// Upstream against ours.
    pub findings: Vec<Finding>,
    /// The window finding in numbers.
    pub window: WindowComparison,
    /// Every cell.
    pub cells: Vec<CellResult>,
}

/// What [`write`] produced.
#[derive(Debug)]
pub struct Written {
    /// `report.html`.
    pub path: PathBuf,
    /// The findings as a plain-text table.
    pub table: String,
    /// Cells analysed.
    pub cells: usize,
}

/// Distinct ids delivered per second from the load start to the end of the last second
/// with a delivery; `None` when nothing was delivered.
pub fn delivery_rate(s: &Summary) -> Option<f64> {
    let last = s
        .throughput
        .iter()
        .filter(|b| b.t_s >= 0 && b.delivered > 0)
        .map(|b| b.t_s)
        .max()?;
    let delivered: u64 = s
        .throughput
        .iter()
        .filter(|b| b.t_s >= 0)
        .map(|b| b.delivered)
        .sum();
    Some(delivered as f64 / (last + 1) as f64)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Analyzes the run folder of every cell and writes `summary.json`, the CSV files,
/// `findings.json` and `report.html` into `out`.
pub fn write(
    cells: &[Cell],
    runs: &[(String, PathBuf)],
    scale: &Scale,
    elapsed: Duration,
    out: &Path,
) -> anyhow::Result<Written> {
    let dirs: Vec<PathBuf> = runs.iter().map(|(_, d)| d.clone()).collect();
    let keys: Vec<String> = runs.iter().map(|(k, _)| k.clone()).collect();
    let (summaries, details) = analyze_all(&dirs)?;
    write_data(&keys, &summaries, &details, out)?;
    let results: Vec<CellResult> = cells
        .iter()
        .zip(&summaries)
        .zip(&dirs)
        .map(|((cell, s), dir)| {
            let rate = delivery_rate(s);
            CellResult {
                cell: cell.clone(),
                run_dir: dir.clone(),
                delivery_rate_per_s: rate,
                chain_rho: ratio(s.queueing.lambda_per_s, rate),
            }
        })
        .collect();
    let view = View {
        cells: &results,
        summaries: &summaries,
    };
    let window = view.window();
    let findings = Findings {
        scale: scale.clone(),
        elapsed_s: elapsed.as_secs_f64(),
        findings: view.findings(&window, scale),
        window,
        cells: results.clone(),
    };
    let text = serde_json::to_string_pretty(&findings).context("serializing the findings")?;
    write_file(&out.join("findings.json"), &text)?;
    let path = out.join("report.html");
    write_file(&path, &view.html(&findings))?;
    Ok(Written {
        path,
        table: table(&findings.findings),
        cells: results.len(),
    })
}

/// The findings as a plain-text table (finding, upstream, ours).
pub fn table(findings: &[Finding]) -> String {
    let mut out = String::from("| finding | upstream | ours |\n|---|---|---|\n");
    for f in findings {
        let _ = writeln!(out, "| {} | {} | {} |", f.title, f.upstream, f.ours);
    }
    out
}

/// A column of a per-cell table: its header and its value.
type Column = (&'static str, fn(&CellResult, &Summary) -> String);

/// The cells and their summaries, in matrix order.
struct View<'a> {
    cells: &'a [CellResult],
    summaries: &'a [Summary],
}

impl View<'_> {
    fn get(&self, name: &str) -> Option<(&CellResult, &Summary)> {
        self.cells
            .iter()
            .zip(self.summaries)
            .find(|(c, _)| c.cell.name == name)
    }

    fn all(&self) -> impl Iterator<Item = (&CellResult, &Summary)> {
        self.cells.iter().zip(self.summaries)
    }

    fn window(&self) -> WindowComparison {
        let (Some((c1, s1)), Some((c32, s32))) =
            (self.get(WINDOW_1_CELL), self.get(WINDOW_32_CELL))
        else {
            return WindowComparison::default();
        };
        WindowComparison {
            w1_rate_per_s: c1.delivery_rate_per_s,
            w32_rate_per_s: c32.delivery_rate_per_s,
            rate_ratio: ratio(c32.delivery_rate_per_s, c1.delivery_rate_per_s),
            w1_e2e_p50_ms: s1.e2e_latency_ms.p50,
            w32_e2e_p50_ms: s32.e2e_latency_ms.p50,
            latency_ratio: ratio(s1.e2e_latency_ms.p50, s32.e2e_latency_ms.p50),
        }
    }

    fn findings(&self, w: &WindowComparison, scale: &Scale) -> Vec<Finding> {
        vec![
            Finding {
                key: "window",
                title: "NG under netem: window 1 collapses, a wider window removes the collapse",
                upstream: "NG chain with netem and max_inflight_messages 1 served ~22 msg/s \
                           under ~300 requests/s",
                ours: format!(
                    "delivered {}/s with window 1, {}/s with 32 ({}× faster); e2e p50 {} ms vs \
                     {} ms ({}×)",
                    opt(w.w1_rate_per_s, 1),
                    opt(w.w32_rate_per_s, 1),
                    opt(w.rate_ratio, 2),
                    opt(w.w1_e2e_p50_ms, 0),
                    opt(w.w32_e2e_p50_ms, 0),
                    opt(w.latency_ratio, 1)
                ),
            },
            Finding {
                key: "drain",
                title: "Drain time after the load",
                upstream: "2707 s (~45 min) after 1 h 48 min of load; measured as \"the log \
                           stopped growing for 2 s\"",
                ours: self.drain_summary(),
            },
            Finding {
                key: "loss",
                title: "Lost and duplicate alarms, by id",
                upstream: "counted with grep on log lines; run here with its own \
                           configuration, ~45 % of the requests answered 200 never reached \
                           the backend",
                ours: self.loss_summary(),
            },
            Finding {
                key: "steps",
                title: "Response time per performance step, EN 50136 stop",
                upstream: "steps of 250·k users, 60 s each with 60 s pauses; stop when a \
                           step's average exceeds 10 s or its maximum 30 s",
                ours: self.steps_summary(scale),
            },
            Finding {
                key: "queueing",
                title: "λ, μ, ρ",
                upstream: "λ = 302.51 msg/s, μ = 22.36 msg/s, ρ ≈ 13.53: an unstable queue",
                ours: self.queueing_summary(),
            },
        ]
    }

    fn drain_summary(&self) -> String {
        let undrained: Vec<&str> = self
            .all()
            .filter(|(_, s)| s.drain_s.is_none())
            .map(|(c, _)| c.cell.name.as_str())
            .collect();
        let longest = self
            .all()
            .filter_map(|(c, s)| s.drain_s.map(|d| (d, c.cell.name.as_str())))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = match longest {
            Some((d, name)) => format!("longest {d:.1} s ({name})"),
            None => "no cell drained".to_owned(),
        };
        if let Some((_, s)) = self.get(WINDOW_1_CELL) {
            let _ = write!(out, "; NG window 1 under netem {} s", opt(s.drain_s, 1));
        }
        if undrained.is_empty() {
            out.push_str("; every cell drained");
        } else {
            let _ = write!(out, "; not drained: {}", undrained.join(", "));
        }
        out
    }

    fn loss_summary(&self) -> String {
        let acked: u64 = self.summaries.iter().map(|s| s.acknowledged).sum();
        let lost: u64 = self.summaries.iter().map(|s| s.lost).sum();
        let dups: u64 = self.summaries.iter().map(|s| s.duplicates).sum();
        let dup_ids: u64 = self.summaries.iter().map(|s| s.duplicate_ids).sum();
        let with_loss: Vec<&str> = self
            .all()
            .filter(|(_, s)| s.lost > 0)
            .map(|(c, _)| c.cell.name.as_str())
            .collect();
        let mut out = format!(
            "{lost} lost of {acked} acknowledged, {dups} duplicates ({dup_ids} ids) over {} \
             cells",
            self.cells.len()
        );
        if !with_loss.is_empty() {
            let _ = write!(out, "; losses in {}", with_loss.join(", "));
        }
        out
    }

    fn steps_summary(&self, scale: &Scale) -> String {
        let steps: Vec<(&str, &super::StepStats)> = self
            .all()
            .filter(|(c, _)| c.cell.load == LoadKind::Steps)
            .flat_map(|(c, s)| s.per_step.iter().map(|p| (c.cell.name.as_str(), p)))
            .collect();
        let exceeded = steps.iter().filter(|(_, p)| !p.within_limits).count();
        let worst = steps
            .iter()
            .filter_map(|(n, p)| p.max_response_ms.map(|m| (m, *n, p)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let mut out = format!(
            "steps of {}·k users, {:.0} s each with {:.0} s pauses: {} steps, {exceeded} over \
             the limits",
            scale.step_users,
            scale.step.as_secs_f64(),
            scale.pause.as_secs_f64(),
            steps.len()
        );
        if let Some((max, name, p)) = worst {
            let _ = write!(
                out,
                "; worst step {} of {name}: avg {} ms, max {max:.0} ms",
                p.step,
                opt(p.avg_response_ms, 0)
            );
        }
        out
    }

    fn queueing_summary(&self) -> String {
        let Some((c, s)) = self.get(WINDOW_1_CELL) else {
            return "-".to_owned();
        };
        let q = &s.queueing;
        format!(
            "NG window 1 under netem: λ = {}/s, chain μ = {}/s, chain ρ = {}; simulator μ = \
             {}/s, ρ = {}",
            opt(q.lambda_per_s, 1),
            opt(c.delivery_rate_per_s, 1),
            opt(c.chain_rho, 2),
            opt(q.mu_per_s, 1),
            opt(q.rho, 3)
        )
    }

    /// The page, section by section in reading order. Long (~100 lines) because it is that
    /// list of sections, each one call with its title and definition; splitting it would
    /// only move the list.
    fn html(&self, findings: &Findings) -> String {
        let mut out = String::with_capacity(128 * 1024);
        let _ = write!(
            out,
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>LPS: \
             upstream's findings reproduced</title><style>{CSS}</style><style>.text td,th{{text-align:left}}\
             figure.cells{{display:inline-block;vertical-align:top;margin-right:2em;\
             max-width:40em}}</style></head><body><h1>Upstream's findings, reproduced</h1><p class=\"note\">{} experiments at the \
             <b>{}</b> scale in {:.0} s, generated {}. Every cell is a run folder with its own \
             <code>lps analyze</code> outputs; <code>summary.json</code>, the CSV files and \
             <code>findings.json</code> are beside this page.</p>",
            self.cells.len(),
            findings.scale.name,
            findings.elapsed_s,
            esc(&chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string())
        );
        out.push_str(
            "<h2>Findings</h2><table><thead><tr><th>finding</th><th>upstream</th>\
             <th>ours</th><th>figure</th></tr></thead><tbody class=\"text\">",
        );
        for f in &findings.findings {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><a href=\"#fig-{}\">figure</a></td></tr>",
                esc(f.title),
                esc(f.upstream),
                esc(&f.ours),
                f.key
            );
        }
        out.push_str("</tbody></table>");
        self.window_figure(&mut out);
        self.cell_table(
            &mut out,
            "drain",
            "Drain time after the load, per cell",
            "Load end → every acknowledged id arrived at the simulator, seconds (by ids; \
             empty: not within the drain timeout).",
            &[("drain s", |_, s| opt(s.drain_s, 2))],
        );
        self.cell_table(
            &mut out,
            "loss",
            "Lost and duplicate alarms by id, per cell",
            "lost = acknowledged ids that never arrived (set difference); duplicates = Σ (n − 1) \
             over ids arriving n > 1 times; ids = how many ids arrived more than once.",
            &[
                ("sent", |_, s| s.sent.to_string()),
                ("acknowledged", |_, s| s.acknowledged.to_string()),
                ("delivered", |_, s| s.delivered.to_string()),
                ("lost", |_, s| s.lost.to_string()),
                ("duplicates (ids)", |_, s| {
                    format!("{} ({})", s.duplicates, s.duplicate_ids)
                }),
            ],
        );
        self.steps_figure(&mut out);
        self.cell_table(
            &mut out,
            "queueing",
            "λ, μ, ρ per cell",
            "λ = acknowledged alarms first sent in the load window ÷ its length; simulator μ = \
             arrivals ÷ simulator busy time; ρ = λ/μ. Chain μ = delivery rate (distinct ids \
             delivered ÷ load start → last delivery), chain ρ = λ ÷ chain μ: upstream's μ was \
             the chain's rate.",
            &[
                ("λ /s", |_, s| opt(s.queueing.lambda_per_s, 2)),
                ("simulator μ /s", |_, s| opt(s.queueing.mu_per_s, 2)),
                ("ρ", |_, s| opt(s.queueing.rho, 3)),
                ("chain μ /s", |c, _| opt(c.delivery_rate_per_s, 2)),
                ("chain ρ", |c, _| opt(c.chain_rho, 2)),
            ],
        );
        self.cell_table(
            &mut out,
            "hops",
            "Per-hop latency per cell",
            "Each hop's own mean time in ms and its share of client send → simulator end, from \
             the services' request-time histograms read at the load's start and after the \
             drain: entry = ars-comp-1 minus its next hop; legacy-proxy-1 → PUBCOMP = its whole \
             request; broker = client → simulator start minus the hops' own times (queueing \
             and delivery; an estimate); legacy-proxy-2 forward and relay = their time minus \
             the next hop's; simulator = its ledger's processing time.",
            &[("hops: own mean ms (share)", |_, s| {
                let hops: Vec<String> = s
                    .per_hop_ms
                    .services
                    .iter()
                    .map(|h| format!("{} {:.1} ({:.0} %)", h.hop, h.mean_ms, h.share * 100.0))
                    .collect();
                if hops.is_empty() {
                    "-".to_owned()
                } else {
                    hops.join("; ")
                }
            })],
        );
        out.push_str("</body></html>\n");
        out
    }

    fn window_figure(&self, out: &mut String) {
        let mut series = Vec::new();
        for (i, name) in [WINDOW_1_CELL, WINDOW_32_CELL].into_iter().enumerate() {
            let Some((_, s)) = self.get(name) else {
                continue;
            };
            series.push(Series {
                name: format!("{name} delivered"),
                color: PALETTE[i],
                mark: Mark::Line,
                points: rolling_rate(&s.throughput, |b| b.delivered, ROLLING_S),
            });
        }
        if let Some((_, s)) = self.get(WINDOW_1_CELL) {
            series.push(Series {
                name: "sent (offered, window 1)".to_owned(),
                color: PALETTE[2],
                mark: Mark::Dots,
                points: rolling_rate(&s.throughput, |b| b.sent, ROLLING_S),
            });
        }
        let chart = Chart {
            x_label: "seconds since load start".to_owned(),
            y_label: format!("alarms per second ({ROLLING_S} s rolling mean)"),
            series,
            ..Chart::default()
        }
        .render("fig-window-svg");
        let _ = write!(
            out,
            "<figure id=\"fig-window\"><figcaption>NG under netem, performance steps: \
             delivered alarms per second with legacy-proxy-2's window at 1 and at 32\
             </figcaption><div style=\"max-width:900px\">{chart}</div><p class=\"note\">\
             Rolling mean over {ROLLING_S} s of the distinct alarm ids whose first arrival at \
             the simulator ended in each second; \"sent\" is the first sends of the window-1 \
             run (what the load offered). Delivery rate = delivered ids ÷ seconds from the \
             load start to the last delivery.</p></figure>"
        );
    }

    fn steps_figure(&self, out: &mut String) {
        let mut series = Vec::new();
        for (i, (c, s)) in self
            .all()
            .filter(|(c, _)| c.cell.load == LoadKind::Steps)
            .enumerate()
        {
            series.push(Series {
                name: c.cell.name.clone(),
                color: PALETTE[i % PALETTE.len()],
                mark: if i < PALETTE.len() {
                    Mark::Line
                } else {
                    Mark::Dots
                },
                points: s
                    .per_step
                    .iter()
                    .filter_map(|p| p.max_response_ms.map(|m| (f64::from(p.step), m)))
                    .collect(),
            });
        }
        let chart = Chart {
            x_label: "performance step".to_owned(),
            y_label: "maximum response time, ms".to_owned(),
            series,
            legend_bottom: true,
            ..Chart::default()
        }
        .render("fig-steps-svg");
        let _ = write!(
            out,
            "<figure id=\"fig-steps\"><figcaption>Response time per performance step \
             (EN 50136: average ≤ {:.0} s and maximum ≤ {:.0} s, else the load stops)\
             </figcaption><div style=\"max-width:900px\">{chart}</div><p class=\"note\">\
             Response time = first send → successful answer, retries included, over the \
             step's acknowledged alarms.</p>",
            STEP_AVG_LIMIT_MS / 1000.0,
            STEP_MAX_LIMIT_MS / 1000.0
        );
        out.push_str(
            "<table><thead><tr><th>cell</th><th>step</th><th>requests</th><th>acked</th>\
             <th>avg ms</th><th>max ms</th><th>EN 50136</th></tr></thead><tbody>",
        );
        for (c, s) in self.all().filter(|(c, _)| c.cell.load == LoadKind::Steps) {
            for p in &s.per_step {
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                     <td>{}</td></tr>",
                    esc(&c.cell.name),
                    p.step,
                    p.requests,
                    p.acknowledged,
                    opt(p.avg_response_ms, 1),
                    opt(p.max_response_ms, 1),
                    if p.within_limits { "ok" } else { "exceeded" }
                );
            }
        }
        out.push_str("</tbody></table></figure>");
    }

    /// A figure that is a table: one row per cell, the given columns.
    fn cell_table(
        &self,
        out: &mut String,
        key: &str,
        caption: &str,
        note: &str,
        columns: &[Column],
    ) {
        let _ = write!(
            out,
            "<figure id=\"fig-{key}\" class=\"cells\"><figcaption>{}</figcaption><table>\
             <thead><tr><th>cell</th>",
            esc(caption)
        );
        for (label, _) in columns {
            let _ = write!(out, "<th>{}</th>", esc(label));
        }
        out.push_str("</tr></thead><tbody>");
        for (c, s) in self.all() {
            let _ = write!(out, "<tr><td>{}</td>", esc(&c.cell.name));
            for (_, value) in columns {
                let _ = write!(out, "<td>{}</td>", esc(&value(c, s)));
            }
            out.push_str("</tr>");
        }
        let _ = write!(
            out,
            "</tbody></table><p class=\"note\">{}</p></figure>",
            esc(note)
        );
    }
}
