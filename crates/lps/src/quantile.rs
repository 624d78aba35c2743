//! Quantiles of a sorted sample: the one implementation behind the figures `lps load` and
//! `lps bench` print.
//!
//! `lps analyze` reads whole ledgers into HdrHistograms (`analyze::latency`); the load
//! generators already hold their latencies sorted, so they index them directly and exactly:
//! the `q`-quantile is the element at index round((n − 1)·q).

/// The `q`-quantile (0..=1, clamped) of `sorted`, the element at index round((n − 1)·q);
/// `None` for an empty sample.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = (last as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted.get(i).copied()
}

/// The `q`-quantile of sorted latencies in microseconds, in milliseconds; 0 for an empty
/// sample.
pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    quantile(sorted_us, q).map_or(0.0, |us| f64::from(us) / 1000.0)
}

/// p50, p99 and max of sorted latencies in microseconds, in milliseconds: the latency
/// columns of a bench figure.
pub fn p50_p99_max_ms(sorted_us: &[u32]) -> [f64; 3] {
    [0.5, 0.99, 1.0].map(|q| quantile_ms(sorted_us, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_index_the_sorted_sample_by_rounded_rank() {
        let sample: Vec<u32> = (1..=101).map(|i| i * 1000).collect();
        assert_eq!(quantile(&sample, 0.0), Some(1000));
        assert_eq!(quantile(&sample, 0.5), Some(51_000));
        assert_eq!(quantile(&sample, 1.0), Some(101_000));
        assert_eq!(quantile(&sample, 2.0), Some(101_000));
        assert_eq!(quantile(&[1.5, 2.5], 0.5), Some(2.5));
        assert_eq!(quantile::<f64>(&[], 0.5), None);
        assert_eq!(p50_p99_max_ms(&sample), [51.0, 100.0, 101.0]);
        assert_eq!(p50_p99_max_ms(&[]), [0.0; 3]);
    }
}
