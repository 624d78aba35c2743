//! A small inline-SVG plotter for the report: axes with tick labels, dots, lines, steps,
//! dashed vertical markers, bars and a legend. No scripts, no external resources.

use std::fmt::Write as _;

/// Canvas size (the SVG scales to its container through `viewBox`).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 44.0;

/// Colours for series, in order.
pub(crate) const PALETTE: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// Escapes text for HTML and SVG (content and attribute values).
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// One small circle per point.
    Dots,
    /// A polyline through the points.
    Line,
}

/// One named set of points.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub name: String,
    pub color: &'static str,
    pub mark: Mark,
    pub points: Vec<(f64, f64)>,
}

/// A dashed vertical marker with a label (fault injections).
#[derive(Debug, Clone)]
pub(crate) struct Marker {
    pub x: f64,
    pub label: String,
    pub color: &'static str,
}

/// An x/y chart.
#[derive(Debug, Clone, Default)]
pub(crate) struct Chart {
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (values ≤ 0 are clamped to the smallest positive value).
    pub x_log: bool,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
    /// Legend in the bottom-right corner instead of the top-right one.
    pub legend_bottom: bool,
}

/// A linear or base-10 logarithmic mapping of data onto a pixel range.
#[derive(Debug, Clone, Copy)]
struct Scale {
    min: f64,
    max: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Scale {
    fn map(&self, v: f64) -> f64 {
        let (v, min, max) = if self.log {
            (v.max(self.min).log10(), self.min.log10(), self.max.log10())
        } else {
            (v, self.min, self.max)
        };
        let span = if max > min { max - min } else { 1.0 };
        self.from + (v - min) / span * (self.to - self.from)
    }

    /// Tick positions in data units.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let lo = self.min.log10().floor() as i32;
            let hi = self.max.log10().ceil() as i32;
            return (lo..=hi)
                .map(|e| 10f64.powi(e))
                .filter(|t| *t >= self.min * 0.999 && *t <= self.max * 1.001)
                .collect();
        }
        let step = nice_step(self.max - self.min);
        let first = (self.min / step).ceil() * step;
        let mut out = Vec::new();
        let mut t = first;
        while t <= self.max + step * 1e-9 && out.len() < 50 {
            out.push(t);
            t += step;
        }
        out
    }
}

/// A 1-2-5 step giving about six ticks over `span`.
fn nice_step(span: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// A tick or value label: integers in full up to 10 000, then `k`/`M`; fractions with up
/// to three decimals, trailing zeros trimmed.
pub(crate) fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 10_000.0 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else if v.fract() == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 0.001 {
        trim(format!("{v:.3}"))
    } else {
        format!("{v:.1e}")
    }
}

/// A value printed on a bar: whole numbers in full.
fn exact(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        fmt_num(v)
    }
}

/// `12.500` → `12.5`, `3.000` → `3`.
fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// Data range of the points (and markers), padded so nothing sits on the frame.
fn range(values: impl Iterator<Item = f64>, log: bool, zero: bool) -> (f64, f64) {
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        min = min.min(v);
        max = max.max(v);
    }
    if !min.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let lo = 10f64.powf(min.log10().floor());
        let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
        return (lo, hi);
    }
    if zero {
        min = min.min(0.0);
    }
    if max <= min {
        max = min + 1.0;
    }
    let step = nice_step(max - min);
    ((min / step).floor() * step, (max / step).ceil() * step)
}

/// Horizontal grid lines at `y`'s ticks from `x0` to `x1`, labelled on the left.
fn y_grid(out: &mut String, y: &Scale, x0: f64, x1: f64) {
    for t in y.ticks() {
        let py = y.map(t);
        let _ = write!(
            out,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            py + 4.0,
            esc(&fmt_num(t))
        );
    }
}

fn frame(out: &mut String, id: &str, x: &Scale, y: &Scale, x_label: &str, y_label: &str) {
    let _ = write!(
        out,
        r#"<svg id="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="11">"#,
        esc(id)
    );
    let (x0, x1, y0, y1) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP);
    let _ = write!(
        out,
        r##"<rect x="{x0}" y="{y1}" width="{}" height="{}" fill="#fff" stroke="#999"/>"##,
        x1 - x0,
        y0 - y1
    );
    for t in x.ticks() {
        let px = x.map(t);
        let _ = write!(
            out,
            r##"<line x1="{px:.1}" y1="{y1}" x2="{px:.1}" y2="{y0}" stroke="#eee"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
            y0 + 14.0,
            esc(&fmt_num(t))
        );
    }
    y_grid(out, y, x0, x1);
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text><text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        HEIGHT - 8.0,
        esc(x_label),
        (y0 + y1) / 2.0,
        esc(y_label)
    );
}

fn legend(out: &mut String, entries: &[(&str, &str)], bottom: bool) {
    // About 6.5 px per character at font size 11.
    let longest = entries
        .iter()
        .map(|e| e.0.chars().count())
        .max()
        .unwrap_or(0);
    let width = 24.0 + longest as f64 * 6.5;
    let x = WIDTH - RIGHT - 6.0 - width;
    let height = entries.len() as f64 * 15.0 + 6.0;
    let top = if bottom {
        HEIGHT - BOTTOM - 4.0 - height
    } else {
        TOP + 4.0
    };
    let _ = write!(
        out,
        r##"<rect x="{x:.1}" y="{top:.1}" width="{width:.1}" height="{height:.1}" fill="#fff" fill-opacity="0.85" stroke="#ddd"/>"##
    );
    let mut y = top + 15.0;
    for (name, color) in entries {
        let _ = write!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            x + 6.0,
            y - 9.0,
            x + 20.0,
            esc(name)
        );
        y += 15.0;
    }
}

impl Chart {
    /// The chart as an `<svg id="…">` element.
    ///
    /// Longer than most (~85 lines) on purpose: it draws in paint order (frame, grid, axes,
    /// series, markers, legend) with the two scales it computes first; pieces of it would
    /// only pass those scales around.
    pub(crate) fn render(&self, id: &str) -> String {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .chain(self.markers.iter().map(|m| m.x));
        let (x_min, x_max) = range(xs, self.x_log, !self.x_log);
        let ys = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1));
        let (y_min, y_max) = range(ys, false, true);
        let x = Scale {
            min: x_min,
            max: x_max,
            log: self.x_log,
            from: LEFT,
            to: WIDTH - RIGHT,
        };
        let y = Scale {
            min: y_min,
            max: y_max,
            log: false,
            from: HEIGHT - BOTTOM,
            to: TOP,
        };
        let mut out = String::new();
        frame(&mut out, id, &x, &y, &self.x_label, &self.y_label);
        if self.series.iter().all(|s| s.points.is_empty()) {
            let _ = write!(
                out,
                r##"<text x="{}" y="{}" text-anchor="middle" fill="#777">no data</text>"##,
                WIDTH / 2.0,
                HEIGHT / 2.0
            );
        }
        for m in &self.markers {
            let px = x.map(m.x);
            let _ = write!(
                out,
                r#"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{}" stroke="{}" stroke-dasharray="4 3"/><text transform="translate({:.1} {}) rotate(-90)" text-anchor="end" fill="{}" font-size="10">{}</text>"#,
                HEIGHT - BOTTOM,
                m.color,
                px - 3.0,
                TOP + 4.0,
                m.color,
                esc(&m.label)
            );
        }
        for s in &self.series {
            match s.mark {
                Mark::Dots => {
                    let _ = write!(out, r#"<g fill="{}" fill-opacity="0.6">"#, s.color);
                    for &(px, py) in &s.points {
                        let _ = write!(
                            out,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6"/>"#,
                            x.map(px),
                            y.map(py)
                        );
                    }
                    out.push_str("</g>");
                }
                Mark::Line => {
                    out.push_str(r#"<polyline fill="none" stroke-width="1.5" stroke=""#);
                    out.push_str(s.color);
                    out.push_str(r#"" points=""#);
                    for &(px, py) in &s.points {
                        let _ = write!(out, "{:.1},{:.1} ", x.map(px), y.map(py));
                    }
                    out.push_str(r#""/>"#);
                }
            }
        }
        let entries: Vec<(&str, &str)> = self
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.color))
            .collect();
        if entries.len() > 1 || entries.first().is_some_and(|e| !e.0.is_empty()) {
            legend(&mut out, &entries, self.legend_bottom);
        }
        out.push_str("</svg>");
        out
    }
}

/// A vertical bar chart: one bar per label, value printed above it.
pub(crate) fn bars(id: &str, labels: &[String], values: &[f64], y_label: &str) -> String {
    let (_, y_max) = range(values.iter().copied(), false, true);
    let y = Scale {
        min: 0.0,
        max: y_max,
        log: false,
        from: HEIGHT - BOTTOM,
        to: TOP,
    };
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg id="{}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="11">"#,
        esc(id)
    );
    let (x0, x1, y0) = (LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM);
    let _ = write!(
        out,
        r##"<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#999"/><line x1="{x0}" y1="{TOP}" x2="{x0}" y2="{y0}" stroke="#999"/>"##
    );
    y_grid(&mut out, &y, x0, x1);
    let _ = write!(
        out,
        r#"<text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (y0 + TOP) / 2.0,
        esc(y_label)
    );
    if labels.is_empty() {
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#777">no data</text>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
    }
    let slot = (x1 - x0) / labels.len().max(1) as f64;
    for (i, (label, value)) in labels.iter().zip(values).enumerate() {
        let cx = x0 + slot * (i as f64 + 0.5);
        let top = y.map(*value);
        let w = (slot * 0.6).min(80.0);
        let _ = write!(
            out,
            r#"<rect x="{:.1}" y="{top:.1}" width="{w:.1}" height="{:.1}" fill="{}"/><text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{cx:.1}" y="{}" text-anchor="middle">{}</text>"#,
            cx - w / 2.0,
            (y0 - top).max(0.0),
            PALETTE[i % PALETTE.len()],
            top - 4.0,
            esc(&exact(*value)),
            y0 + 14.0,
            esc(label)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short_and_exact_where_it_matters() {
        let cases = [
            (0.0, "0"),
            (0.1, "0.1"),
            (0.15, "0.15"),
            (2.5, "2.5"),
            (80.0, "80"),
            (32_305.0, "32.3k"),
            (9_999.0, "9999"),
            (2_500_000.0, "2.5M"),
            (-5.0, "-5"),
        ];
        for (v, text) in cases {
            assert_eq!(fmt_num(v), text, "{v}");
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn linear_ticks_cover_the_range_with_nice_steps() {
        let s = Scale {
            min: 0.0,
            max: 100.0,
            log: false,
            from: 0.0,
            to: 100.0,
        };
        assert_eq!(s.ticks(), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert!((s.map(50.0) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn log_ticks_are_decades() {
        let (min, max) = range([3.0, 4_000.0].into_iter(), true, false);
        let s = Scale {
            min,
            max,
            log: true,
            from: 0.0,
            to: 1.0,
        };
        assert_eq!(s.ticks(), vec![1.0, 10.0, 100.0, 1_000.0, 10_000.0]);
    }

    #[test]
    fn chart_has_id_series_markers_and_escaped_labels() {
        let chart = Chart {
            x_label: "t <s>".to_owned(),
            y_label: "ms".to_owned(),
            x_log: false,
            series: vec![Series {
                name: "a&b".to_owned(),
                color: PALETTE[0],
                mark: Mark::Dots,
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            }],
            markers: vec![Marker {
                x: 0.5,
                label: "proxy2-1 stop".to_owned(),
                color: "#000",
            }],
            legend_bottom: false,
        };
        let svg = chart.render("plot-x");
        assert!(svg.starts_with(r#"<svg id="plot-x""#));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("stroke-dasharray") && svg.contains("proxy2-1 stop"));
        assert!(svg.contains("t &lt;s&gt;") && svg.contains("a&amp;b"));
        assert!(svg.ends_with("</svg>"));
    }
}
