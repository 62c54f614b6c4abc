//! `GET /api/models`: Warren's own endpoint, each model served on a
//! queue with its workers' statistics.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::auth::Credentials;
use crate::backlog;
use crate::models::HistogramView;
use crate::state::AppState;

fn histogram_json(histogram: &HistogramView) -> Value {
    json!({
        "count": histogram.count,
        "sum": histogram.sum,
        "buckets": histogram.buckets,
        "p50": histogram.quantile(0.5),
        "p99": histogram.quantile(0.99),
    })
}

pub async fn list(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    let models = state.models.models();
    let answer = models
        .iter()
        .map(|model| {
            let backlog = backlog::of_model(&state, model);
            let (consumers, messages) = (backlog.consumers, backlog.messages);
            let stats = &model.stats;
            json!({
                "name": model.name,
                "version": model.version,
                "queue": model.queue,
                "task": model.task,
                // tract is the fallback when ONNX Runtime is not found:
                // several times slower, so it is shown, not hidden.
                "backend": model.backend,
                "onnxruntime": model.onnxruntime.as_ref().map(|(library, version)| json!({
                    "library": library,
                    "version": version,
                })),
                "ready": consumers > 0,
                "consumers": consumers,
                "messages": messages,
                "service_rate": backlog.service_rate,
                "drain_seconds": backlog.drain_seconds,
                "requests": stats.requests,
                "replies": stats.replies,
                "poison": stats.poison,
                "failed_batches": stats.failed_batches,
                "batch_size": histogram_json(&stats.batch_size),
                "batch_wait_us": histogram_json(&stats.batch_wait_us),
                "queue_wait_us": histogram_json(&stats.queue_wait_us),
                "inference_us": histogram_json(&stats.inference_us),
            })
        })
        .collect();
    Json(Value::Array(answer))
}
