//! Processing-time models.
//!
//! Model 0 is upstream's linear regression (seconds), clamped at 0:
//!
//! ```text
//! y = 0.034863623531346075 − 0.010397816715869023·PR1 + 0.06213722751379576·PR3
//!     + 4.643355320081699e-5·ReqType
//! ```
//!
//! where PR1 is the number of requests in
//! progress when a request arrived and PR3 the number that finished while it was in
//! progress. It gets *faster* under load, so it cannot show overload; the capacity models
//! (a fixed or exponentially distributed service time with a worker limit) can.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Coefficients of upstream's model 0.
const INTERCEPT: f64 = 0.034_863_623_531_346_075;
const PR1: f64 = -0.010_397_816_715_869_023;
const PR3: f64 = 0.062_137_227_513_795_76;
const REQ_TYPE: f64 = 4.643_355_320_081_699e-5;

/// Model 0's predicted processing time in seconds, clamped at 0.
pub fn regression0(pr1: u64, pr3: u64, req_type: u32) -> f64 {
    let y = INTERCEPT + PR1 * pr1 as f64 + PR3 * pr3 as f64 + REQ_TYPE * f64::from(req_type);
    y.max(0.0)
}

/// Which processing-time model the simulator uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// Upstream's regression model 0, re-predicted up to `corr_max` times as PR3 grows.
    Regression0 {
        /// How many times to re-predict (`-c/--corr-max`).
        corr_max: u32,
    },
    /// A fixed service time with at most `workers` requests served at once.
    Fixed {
        /// Concurrent requests served; the rest wait in a queue.
        workers: usize,
        /// Service time of each request.
        service: Duration,
    },
    /// An exponentially distributed service time with at most `workers` served at once.
    Exponential {
        /// Concurrent requests served; the rest wait in a queue.
        workers: usize,
        /// Mean service time.
        mean: Duration,
    },
    /// No delay at all: a ceiling for benchmarks.
    Zero,
}

impl Model {
    /// The worker limit, if the model has one.
    pub fn workers(&self) -> Option<usize> {
        match self {
            Self::Fixed { workers, .. } | Self::Exponential { workers, .. } => Some(*workers),
            Self::Regression0 { .. } | Self::Zero => None,
        }
    }
}

/// PR1/PR3 bookkeeping: requests in progress and requests finished.
#[derive(Debug, Default)]
pub struct Load {
    in_progress: AtomicU64,
    finished: AtomicU64,
}

impl Load {
    /// Registers an arrival; the guard keeps it in progress until dropped.
    pub fn arrive(&self) -> InProgress<'_> {
        let pr1 = self.in_progress.fetch_add(1, Ordering::AcqRel);
        InProgress {
            load: self,
            pr1,
            finished_at_arrival: self.finished.load(Ordering::Acquire),
            completed: false,
        }
    }

    /// Requests in progress now.
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }
}

/// One request in progress. Dropping it, also when the request is aborted, takes it out of
/// the in-progress count, so PR1 cannot leak; only [`InProgress::complete`] counts it as
/// finished for PR3.
#[derive(Debug)]
pub struct InProgress<'a> {
    load: &'a Load,
    /// Requests in progress when this one arrived.
    pub pr1: u64,
    finished_at_arrival: u64,
    completed: bool,
}

impl InProgress<'_> {
    /// Requests that finished since this one arrived.
    pub fn pr3(&self) -> u64 {
        self.load
            .finished
            .load(Ordering::Acquire)
            .saturating_sub(self.finished_at_arrival)
    }

    /// Marks the request as finished.
    pub fn complete(mut self) {
        self.completed = true;
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.load.in_progress.fetch_sub(1, Ordering::AcqRel);
        if self.completed {
            self.load.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression0_matches_the_formula() {
        assert!((regression0(0, 0, 9) - (INTERCEPT + 9.0 * REQ_TYPE)).abs() < 1e-15);
        assert!((regression0(1, 0, 9) - 0.024_883_7).abs() < 1e-6);
        assert!((regression0(2, 1, 9) - 0.076_623_8).abs() < 1e-6);
        assert_eq!(regression0(4, 0, 9), 0.0);
        assert_eq!(regression0(100, 0, 0), 0.0);
    }

    #[test]
    fn aborted_requests_do_not_leak() {
        let load = Load::default();
        let a = load.arrive();
        let b = load.arrive();
        assert_eq!((a.pr1, b.pr1), (0, 1));
        drop(b); // aborted: leaves progress, does not count as finished
        assert_eq!(load.in_progress(), 1);
        assert_eq!(a.pr3(), 0);
        let c = load.arrive();
        c.complete();
        assert_eq!(a.pr3(), 1);
        a.complete();
        assert_eq!(load.in_progress(), 0);
    }
}
