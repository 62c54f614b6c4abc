//! What the HTTP side knows of the models `warren serve` runs: their
//! queues and their workers' statistics. The binary fills this in from the
//! model deployment, so that this crate knows nothing of machine learning.

/// A histogram with fixed buckets: (upper bound, count in the bucket), the
/// last bound None (overflow).
#[derive(Debug, Clone, Default)]
pub struct HistogramView {
    pub buckets: Vec<(Option<u64>, u64)>,
    pub count: u64,
    pub sum: u64,
}

impl HistogramView {
    /// The bucket bound under which `quantile` of the observations fall
    /// (the last finite bound for the overflow bucket); None when empty.
    pub fn quantile(&self, quantile: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let wanted = (quantile * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        let mut last_bound = 0;
        for (bound, count) in &self.buckets {
            seen += count;
            if let Some(bound) = bound {
                last_bound = *bound;
            }
            if seen >= wanted {
                return Some(bound.unwrap_or(last_bound));
            }
        }
        Some(last_bound)
    }
}

#[derive(Debug, Clone, Default)]
pub struct ModelStats {
    pub requests: u64,
    pub replies: u64,
    pub poison: u64,
    pub expired: u64,
    pub failed_batches: u64,
    pub batch_size: HistogramView,
    pub batch_wait_us: HistogramView,
    pub queue_wait_us: HistogramView,
    pub inference_us: HistogramView,
    /// When the last batch was answered, in milliseconds since the Unix
    /// epoch; 0 before the first.
    pub last_reply_unix_ms: u64,
}

/// One tensor of a model's signature, as KServe describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// KServe's name ("FP32"); None when the graph does not say.
    pub datatype: Option<String>,
    /// -1 for a dimension that varies.
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub name: String,
    pub version: String,
    /// The queue its requests go to.
    pub queue: String,
    /// "embedding", "classification" or "tensor": how an HTTP inference
    /// request is turned into queue messages.
    pub task: String,
    /// The most requests a worker runs as one batch, and how long it waits
    /// for a batch to fill.
    pub batch_size_max: usize,
    pub batch_delay_max_ms: u64,
    /// Workers (instances of the model) in this process.
    pub instances: usize,
    /// The most tokens its HTTP requests may have queued or running at
    /// once; None for no limit.
    pub max_queued_tokens: Option<usize>,
    /// "onnxruntime" or "tract", once the model is loaded.
    pub backend: Option<String>,
    /// The ONNX Runtime library the process loaded, and its version.
    pub onnxruntime: Option<(String, Option<String>)>,
    /// A tensor model's inputs and outputs, once it is loaded.
    pub tensors: Option<(Vec<TensorSpec>, Vec<TensorSpec>)>,
    pub lifecycle: Lifecycle,
    pub stats: ModelStats,
}

/// Where a model version is in its life: traffic goes to versions that
/// serve, never to one being unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Loading and warming up; given traffic only while no version of the
    /// model serves yet (at start, requests wait in the queue).
    Loading,
    Serving,
    /// Being unloaded: no new traffic; its workers finish its queue.
    Draining,
}

impl Lifecycle {
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Loading => "loading",
            Lifecycle::Serving => "serving",
            Lifecycle::Draining => "draining",
        }
    }
}

/// Why a model version could not be loaded or unloaded.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
    #[error("this broker does not load models at run time")]
    Unsupported,
}

/// A load in progress.
pub type Loading = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<ModelStatus, DirectoryError>> + Send>,
>;

pub trait ModelDirectory: Send + Sync {
    fn models(&self) -> Vec<ModelStatus>;

    /// Where one version is in its life; None when it is not served. The
    /// default builds every version's status; a directory that can answer
    /// cheaply should, as it is asked once per inference request.
    fn lifecycle(&self, name: &str, version: &str) -> Option<Lifecycle> {
        self.models()
            .into_iter()
            .find(|model| model.name == name && model.version == version)
            .map(|model| model.lifecycle)
    }

    /// What one request body costs the version, as its workers count it
    /// (tokens for a text model); None while the version is not loaded,
    /// or for a body it would refuse.
    fn request_cost(
        &self,
        _name: &str,
        _version: &str,
        _body: &[u8],
        _content_type: &str,
    ) -> Option<usize> {
        None
    }

    /// Loads a new version from a `[[model]]` entry (as JSON), warms it up
    /// and starts its workers; it is given traffic once it serves.
    fn load(&self, _entry: serde_json::Value) -> Loading {
        Box::pin(async { Err(DirectoryError::Unsupported) })
    }

    /// Takes a version out of traffic: it drains from here on.
    fn begin_unload(&self, _name: &str, _version: &str) -> Result<(), DirectoryError> {
        Err(DirectoryError::Unsupported)
    }

    /// Stops a drained version's workers and forgets it.
    fn finish_unload(
        &self,
        _name: &str,
        _version: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async {})
    }

    /// The latest model events (loads, switches, unloads) as published on
    /// `amq.warren.model-events`, oldest first.
    fn events(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// Every version of the model `name`, oldest first (see
    /// [`compare_versions`]).
    fn versions(&self, name: &str) -> Vec<ModelStatus> {
        let mut versions: Vec<ModelStatus> = self
            .models()
            .into_iter()
            .filter(|model| model.name == name)
            .collect();
        versions.sort_by(|a, b| compare_versions(&a.version, &b.version));
        versions
    }
}

/// How versions order, the newest last: as numbers when both are (Triton's
/// numbered versions: 10 after 9), otherwise as text (so that dates,
/// 2026-01-31, order too).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// No models: `warren serve` without `[[model]]`.
pub struct NoModels;

impl ModelDirectory for NoModels {
    fn models(&self) -> Vec<ModelStatus> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_versions_order_as_numbers_and_others_as_text() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("9", "10"), Less);
        assert_eq!(compare_versions("2026-01-31", "2025-12-01"), Greater);
        assert_eq!(compare_versions("1", "1"), Equal);
    }

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let histogram = HistogramView {
            buckets: vec![(Some(1), 50), (Some(8), 45), (Some(32), 5), (None, 0)],
            count: 100,
            sum: 0,
        };
        assert_eq!(histogram.quantile(0.5), Some(1));
        assert_eq!(histogram.quantile(0.9), Some(8));
        assert_eq!(histogram.quantile(0.99), Some(32));
        assert_eq!(HistogramView::default().quantile(0.5), None);
    }
}
