//! Measurements collected during a run: live counters for the progress display
//! and latency histograms for the report.
//!
//! Latencies go into HDR histograms in microseconds: three significant digits
//! over 1 µs .. 1 h costs a few hundred KiB per task and gives p99.9 without
//! keeping every sample.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histograms track, µs (one hour). Anything longer is
/// clamped: a message an hour late is a hang, and the report shows the max.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Significant decimal digits kept per value: 0.1% resolution.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// An empty latency histogram with the bounds every task uses, so they can be
/// merged without resizing.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// Records a latency given in nanoseconds, rounding up to whole microseconds
/// so a sub-microsecond latency still counts as a sample.
pub fn record_latency_ns(histogram: &mut Histogram<u64>, latency_ns: u64) {
    histogram.saturating_record(latency_ns.div_ceil(1_000).max(1));
}

/// Adds `source` into `total`.
pub fn merge(total: &mut Histogram<u64>, source: &Histogram<u64>) {
    total
        .add(source)
        .expect("histograms share bounds, so adding cannot overflow their range");
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub min_us: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarises `histogram`, or `None` when it holds no samples.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        Some(Self {
            samples: histogram.len(),
            min_us: histogram.min(),
            mean_us: histogram.mean(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        })
    }
}

/// Totals across all tasks, updated as they go; read by the progress display
/// and by the drain phase to know when every message has arrived.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages handed to the client library for sending.
    pub published: AtomicU64,
    /// Messages the broker confirmed (basic.ack to the publisher).
    pub confirmed: AtomicU64,
    /// Messages consumers received.
    pub consumed: AtomicU64,
}

impl Counters {
    /// Current (published, confirmed, consumed).
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.published.load(Ordering::Relaxed),
            self.confirmed.load(Ordering::Relaxed),
            self.consumed.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_distribution() {
        let mut histogram = latency_histogram();
        // 1..=1000 µs, one sample each.
        for latency_us in 1..=1000u64 {
            record_latency_ns(&mut histogram, latency_us * 1000);
        }
        let summary = LatencySummary::of(&histogram).expect("samples");
        assert_eq!(summary.samples, 1000);
        assert_eq!(summary.min_us, 1);
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
    }

    #[test]
    fn sub_microsecond_and_huge_latencies_are_kept() {
        let mut histogram = latency_histogram();
        record_latency_ns(&mut histogram, 0);
        record_latency_ns(&mut histogram, 400);
        record_latency_ns(&mut histogram, u64::MAX);
        let summary = LatencySummary::of(&histogram).expect("samples");
        assert_eq!(summary.samples, 3);
        assert_eq!(summary.min_us, 1);
        // Clamped to the top of the range, within its 0.1% resolution.
        assert!(summary.max_us >= LATENCY_MAX_US, "{}", summary.max_us);
    }

    #[test]
    fn the_json_report_carries_every_percentile() {
        let mut histogram = latency_histogram();
        record_latency_ns(&mut histogram, 250_000);
        let json = serde_json::to_value(LatencySummary::of(&histogram).expect("a sample"))
            .expect("serializable");
        for key in [
            "samples", "min_us", "mean_us", "p50_us", "p99_us", "p999_us", "max_us",
        ] {
            assert!(json[key].is_number(), "{key} missing from {json}");
        }
    }

    #[test]
    fn merging_adds_samples() {
        let mut total = latency_histogram();
        let mut part = latency_histogram();
        record_latency_ns(&mut part, 5_000);
        merge(&mut total, &part);
        merge(&mut total, &part);
        assert_eq!(total.len(), 2);
        assert_eq!(LatencySummary::of(&latency_histogram()), None);
    }
}
