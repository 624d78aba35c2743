//! Latency samples as HdrHistograms: the one quantile implementation of `lps analyze`.
//!
//! Values are recorded in whole microseconds (the resolution of every ledger) with four
//! significant digits, so a percentile is within 0.01 % of the sample's nearest-rank value;
//! it is reported as the lowest value of its histogram bucket (exact for values that fall
//! on a bucket's edge, such as whole milliseconds below ~2 s). The count, the mean and the
//! maximum are kept exactly beside the histogram. Negative values (clock steps between
//! ledgers) count as 0 in the histogram and as they are in the mean.

use std::fmt::Write as _;

use hdrhistogram::Histogram;

use super::Stats;

/// Significant decimal digits of every histogram.
const SIGFIG: u8 = 4;

/// A latency sample in milliseconds.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    hist: Histogram<u64>,
    sum_ms: f64,
    max_ms: Option<f64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            hist: Histogram::new(SIGFIG).expect("4 significant digits are supported"),
            sum_ms: 0.0,
            max_ms: None,
        }
    }
}

impl FromIterator<f64> for Latency {
    fn from_iter<I: IntoIterator<Item = f64>>(values: I) -> Self {
        let mut latency = Self::default();
        for v in values {
            latency.record(v);
        }
        latency
    }
}

impl Latency {
    /// Adds one value, milliseconds.
    pub fn record(&mut self, ms: f64) {
        let us = (ms * 1000.0).round().max(0.0) as u64;
        // Auto-resizing: only a value beyond i64::MAX / 2 µs is out of range (clamped).
        if self.hist.record(us).is_err() {
            self.hist.saturating_record(us);
        }
        self.sum_ms += ms;
        self.max_ms = Some(self.max_ms.map_or(ms, |m| m.max(ms)));
    }

    /// Sample size.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The `q`-quantile (0-1), nearest rank, milliseconds; `None` for an empty sample.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        (self.count() > 0).then(|| {
            let us = self.hist.lowest_equivalent(self.hist.value_at_quantile(q));
            us as f64 / 1000.0
        })
    }

    /// Count, mean, p50, p90, p99 and max.
    pub fn stats(&self) -> Stats {
        let n = self.count();
        Stats {
            count: n,
            mean: (n > 0).then(|| self.sum_ms / n as f64),
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            max: self.max_ms,
        }
    }

    /// The empirical CDF as `(ms, fraction at or below)` at each recorded bucket, thinned
    /// to about `max` points (the last point is always kept).
    pub fn cdf(&self, max: usize) -> Vec<(f64, f64)> {
        let n = self.count() as f64;
        let points: Vec<(f64, f64)> = self
            .hist
            .iter_recorded()
            .map(|v| {
                (
                    self.hist.lowest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
                    v.count_since_last_iteration() as f64,
                )
            })
            .scan(0.0, |seen, (ms, count)| {
                *seen += count;
                Some((ms, *seen / n))
            })
            .collect();
        let step = points.len().div_ceil(max.max(1)).max(1);
        let last = points.last().copied();
        let mut thinned: Vec<(f64, f64)> = points.into_iter().step_by(step).collect();
        if let Some(last) = last
            && thinned.last() != Some(&last)
        {
            thinned.push(last);
        }
        thinned
    }

    /// The percentile distribution in HdrHistogram's `.hgrm` text format (values in
    /// milliseconds), as `HistogramLogProcessor` and the online plotter read it.
    pub fn hgrm(&self) -> String {
        let mut out = format!(
            "{:>12} {:>14} {:>10} {:>14}\n\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        if self.count() > 0 {
            for v in self.hist.iter_quantiles(5) {
                let q = v.quantile_iterated_to();
                let value = self.hist.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0;
                let _ = write!(out, "{value:12.3} {q:14.12}");
                let count = (q * self.count() as f64).round() as u64;
                if q < 1.0 {
                    let _ = writeln!(out, " {count:10} {:14.2}", 1.0 / (1.0 - q));
                } else {
                    let _ = writeln!(out, " {count:10}");
                }
            }
        }
        let stdev = self.hist.stdev() / 1000.0;
        let _ = write!(
            out,
            "#[Mean    = {:12.3}, StdDeviation   = {stdev:12.3}]\n\
             #[Max     = {:12.3}, Total count    = {:12}]\n\
             #[Buckets = {:12}, SubBuckets     = {:12}]\n",
            self.stats().mean.unwrap_or(0.0),
            self.max_ms.unwrap_or(0.0),
            self.count(),
            self.hist.buckets(),
            self.hist.distinct_values(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_ends_at_the_maximum_and_counts_everything() {
        let latency: Latency = (1..=1000).map(f64::from).collect();
        let text = latency.hgrm();
        let rows: Vec<(f64, f64, u64)> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                )
            })
            .collect();
        let last = rows.last().unwrap();
        assert!((last.0 - 1000.0).abs() <= 0.1, "{last:?}");
        assert_eq!((last.1, last.2), (1.0, 1000));
        assert!(
            rows.windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1)
        );
        assert!(text.contains("Total count    =         1000"), "{text}");
    }

    #[test]
    fn the_cdf_reaches_one_at_the_maximum() {
        let latency: Latency = (0..5000).map(|i| f64::from(i % 700)).collect();
        let cdf = latency.cdf(100);
        assert!(cdf.len() <= 101, "{}", cdf.len());
        let last = cdf.last().unwrap();
        assert!(
            (last.0 - 699.0).abs() <= 699.0 * 1e-4 && last.1 == 1.0,
            "{last:?}"
        );
        assert!(cdf.windows(2).all(|w| w[0] <= w[1]));
    }
}
