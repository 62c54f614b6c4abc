//! The deployed models as the HTTP side sees them: each `[[model]]`'s
//! queue and task, and its workers' metrics.

use std::sync::{Arc, OnceLock};

use warren_http::models::{HistogramView, ModelDirectory, ModelStats, ModelStatus, TensorSpec};
use warren_infer::deploy::{ModelConfig, TaskKind};
use warren_infer::metrics::{HistogramSnapshot, ModelMetrics};
use warren_infer::runtime::onnx::loaded_library;
use warren_infer::tensor::TensorInfo;

/// Empty until the models are loaded: the HTTP server starts first, so
/// that the broker answers while large models load.
#[derive(Default)]
pub struct DeployedModels {
    models: OnceLock<Vec<(ModelConfig, Arc<ModelMetrics>)>>,
}

impl DeployedModels {
    /// Makes the loaded models visible; only the first call counts.
    pub fn set(&self, configs: &[ModelConfig], metrics: &[Arc<ModelMetrics>]) {
        let _ = self.models.set(
            configs
                .iter()
                .cloned()
                .zip(metrics.iter().cloned())
                .collect(),
        );
    }
}

fn spec(info: &TensorInfo) -> TensorSpec {
    TensorSpec {
        name: info.name.clone(),
        datatype: info.data_type.map(|datatype| datatype.name().to_owned()),
        shape: info
            .shape
            .iter()
            .map(|dimension| dimension.map_or(-1, |size| size as i64))
            .collect(),
    }
}

fn view(histogram: HistogramSnapshot) -> HistogramView {
    HistogramView {
        buckets: histogram.buckets,
        count: histogram.count,
        sum: histogram.sum,
    }
}

impl ModelDirectory for DeployedModels {
    fn models(&self) -> Vec<ModelStatus> {
        let Some(models) = self.models.get() else {
            return Vec::new();
        };
        models
            .iter()
            .map(|(config, metrics)| {
                let snapshot = metrics.snapshot();
                ModelStatus {
                    name: config.name.clone(),
                    version: config.version.clone(),
                    queue: config.queue.clone(),
                    task: match config.task {
                        TaskKind::Embedding => "embedding",
                        TaskKind::Classification => "classification",
                        TaskKind::Tensor => "tensor",
                    }
                    .to_owned(),
                    batch_size_max: config.batch_size_max,
                    batch_delay_max_ms: config.batch_delay_max_ms,
                    instances: config.instances,
                    backend: metrics.backend.get().map(|backend| (*backend).to_owned()),
                    onnxruntime: loaded_library().map(|library| {
                        (library.path.display().to_string(), library.version.clone())
                    }),
                    tensors: metrics.tensors.get().map(|(inputs, outputs)| {
                        (
                            inputs.iter().map(spec).collect(),
                            outputs.iter().map(spec).collect(),
                        )
                    }),
                    stats: ModelStats {
                        requests: snapshot.requests,
                        replies: snapshot.replies,
                        poison: snapshot.poison,
                        failed_batches: snapshot.failed_batches,
                        batch_size: view(snapshot.batch_size),
                        batch_wait_us: view(snapshot.batch_wait_us),
                        queue_wait_us: view(snapshot.queue_wait_us),
                        inference_us: view(snapshot.inference_us),
                        last_reply_unix_ms: snapshot.last_reply_unix_ms,
                    },
                }
            })
            .collect()
    }
}
