//! Per-model counters and histograms, updated by the workers without
//! locks and read as a snapshot (by the HTTP API and Prometheus
//! exporter).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::tensor::TensorInfo;

/// Upper bounds of the batch size buckets (requests).
const BATCH_SIZE_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024];
/// Upper bounds of the duration buckets, in microseconds: 100 µs to 10 s.
const DURATION_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A histogram with fixed buckets; a value above the last bound counts in
/// an overflow bucket.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One per bound, plus the overflow bucket.
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistogramSnapshot {
    /// (upper bound, observations at or under it but over the previous
    /// bound); the last entry's bound is None (overflow).
    pub buckets: Vec<(Option<u64>, u64)>,
    pub count: u64,
    pub sum: u64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(Option<u64>, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(index, count)| {
                (
                    self.bounds.get(index).copied(),
                    count.load(Ordering::Relaxed),
                )
            })
            .collect();
        HistogramSnapshot {
            count: buckets.iter().map(|(_, count)| count).sum(),
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// What one model's workers did since the start.
#[derive(Debug)]
pub struct ModelMetrics {
    pub model: String,
    pub queue: String,
    /// Requests taken from the queue.
    pub requests: AtomicU64,
    /// Replies published and confirmed.
    pub replies: AtomicU64,
    /// Requests dead-lettered as undecodable.
    pub poison: AtomicU64,
    /// Requests dead-lettered because they expired before the model ran
    /// them.
    pub expired: AtomicU64,
    /// Batches whose inference failed (their requests were requeued).
    pub failed_batches: AtomicU64,
    pub batch_size: Histogram,
    /// How long the first request of a batch waited for the batch to fill.
    pub batch_wait_us: Histogram,
    /// How long requests waited in the queue (for those that carry their
    /// publishing time).
    pub queue_wait_us: Histogram,
    pub inference_us: Histogram,
    /// When the last batch was answered, in milliseconds since the Unix
    /// epoch; 0 before the first.
    pub last_reply_unix_ms: AtomicU64,
    /// The backend running the model ("onnxruntime" or "tract"), once it
    /// is loaded.
    pub backend: OnceLock<&'static str>,
    /// A tensor model's inputs and outputs as its graph declares them, once
    /// it is loaded.
    pub tensors: OnceLock<(Vec<TensorInfo>, Vec<TensorInfo>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelMetricsSnapshot {
    pub model: String,
    pub queue: String,
    pub requests: u64,
    pub replies: u64,
    pub poison: u64,
    pub expired: u64,
    pub failed_batches: u64,
    pub batch_size: HistogramSnapshot,
    pub batch_wait_us: HistogramSnapshot,
    pub queue_wait_us: HistogramSnapshot,
    pub inference_us: HistogramSnapshot,
    pub last_reply_unix_ms: u64,
}

impl ModelMetrics {
    pub fn new(model: &str, queue: &str) -> Self {
        Self {
            model: model.to_owned(),
            queue: queue.to_owned(),
            requests: AtomicU64::new(0),
            replies: AtomicU64::new(0),
            poison: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            failed_batches: AtomicU64::new(0),
            batch_size: Histogram::new(BATCH_SIZE_BOUNDS),
            batch_wait_us: Histogram::new(DURATION_BOUNDS_US),
            queue_wait_us: Histogram::new(DURATION_BOUNDS_US),
            inference_us: Histogram::new(DURATION_BOUNDS_US),
            last_reply_unix_ms: AtomicU64::new(0),
            backend: OnceLock::new(),
            tensors: OnceLock::new(),
        }
    }

    pub fn snapshot(&self) -> ModelMetricsSnapshot {
        ModelMetricsSnapshot {
            model: self.model.clone(),
            queue: self.queue.clone(),
            requests: self.requests.load(Ordering::Relaxed),
            replies: self.replies.load(Ordering::Relaxed),
            poison: self.poison.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            batch_size: self.batch_size.snapshot(),
            batch_wait_us: self.batch_wait_us.snapshot(),
            queue_wait_us: self.queue_wait_us.snapshot(),
            inference_us: self.inference_us.snapshot(),
            last_reply_unix_ms: self.last_reply_unix_ms.load(Ordering::Relaxed),
        }
    }
}

impl ModelMetricsSnapshot {
    /// One log line's worth: what the model served since the start.
    pub fn log_summary(&self) {
        let mean =
            |histogram: &HistogramSnapshot| histogram.sum as f64 / histogram.count.max(1) as f64;
        tracing::info!(
            model = %self.model,
            queue = %self.queue,
            requests = self.requests,
            replies = self.replies,
            poison = self.poison,
            expired = self.expired,
            failed_batches = self.failed_batches,
            batches = self.batch_size.count,
            mean_batch_size = format!("{:.1}", mean(&self.batch_size)),
            mean_inference_ms = format!("{:.2}", mean(&self.inference_us) / 1000.0),
            "model served"
        );
    }
}

pub(crate) fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::new(&[1, 10, 100]);
        for value in [0, 1, 2, 10, 11, 1_000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(
            snapshot.buckets,
            vec![(Some(1), 2), (Some(10), 2), (Some(100), 1), (None, 1)]
        );
        assert_eq!((snapshot.count, snapshot.sum), (6, 1_024));
    }
}
