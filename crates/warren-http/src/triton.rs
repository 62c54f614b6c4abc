//! Triton's extensions to the KServe v2 protocol that its clients call
//! (`tritonclient.http`, `perf_analyzer`): a model's configuration, its
//! statistics, and the index of the model repository. The answers are
//! shaped as Triton's, filled from what Warren knows of each model: its
//! `[[model]]` entry and its workers' metrics.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use crate::auth::Credentials;
use crate::error::ApiResult;
use crate::inference::{find_model, queue_state, signature};
use crate::models::{HistogramView, ModelStatus};
use crate::state::AppState;

/// `GET /v2/models/{name}/config`.
pub async fn config(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(config_of(&find_model(&state, &name, None)?)))
}

/// `GET /v2/models/{name}/versions/{version}/config`.
pub async fn version_config(
    State(state): State<AppState>,
    _user: Credentials,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(config_of(&find_model(&state, &name, Some(&version))?)))
}

/// A Triton data type name ("TYPE_FP32") for a KServe one ("FP32").
fn triton_type(datatype: &str) -> String {
    match datatype {
        "BYTES" => "TYPE_STRING".to_owned(),
        other => format!("TYPE_{other}"),
    }
}

/// The tensors of a signature in Triton's form: dimensions without the
/// batch dimension (`max_batch_size` stands for it), a string per batch
/// item written as `[1]` as Triton writes it.
fn triton_tensors(tensors: &Value) -> Value {
    let tensors = tensors.as_array().cloned().unwrap_or_default();
    Value::Array(
        tensors
            .iter()
            .map(|tensor| {
                let shape = tensor["shape"].as_array().cloned().unwrap_or_default();
                let dims = if shape.len() > 1 {
                    shape[1..].to_vec()
                } else {
                    vec![json!(1)]
                };
                json!({
                    "name": tensor["name"],
                    "data_type": triton_type(tensor["datatype"].as_str().unwrap_or("")),
                    "dims": dims,
                })
            })
            .collect(),
    )
}

fn config_of(model: &ModelStatus) -> Value {
    let (inputs, outputs) = signature(model);
    json!({
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": model.backend.as_deref().unwrap_or("onnxruntime"),
        "max_batch_size": model.batch_size_max,
        "input": triton_tensors(&inputs),
        "output": triton_tensors(&outputs),
        "dynamic_batching": {
            "max_queue_delay_microseconds": model.batch_delay_max_ms * 1_000,
        },
        "instance_group": [{
            "name": model.name,
            "kind": "KIND_CPU",
            "count": model.instances,
        }],
        "parameters": {
            "queue": {"string_value": model.queue},
            "task": {"string_value": model.task},
            "version": {"string_value": model.version},
        },
    })
}

/// `GET /v2/models/stats`: every model's statistics.
pub async fn all_stats(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    let stats: Vec<Value> = state.models.models().iter().map(stats_of).collect();
    Json(json!({"model_stats": stats}))
}

/// `GET /v2/models/{name}/stats`: every version's, as Triton answers.
pub async fn stats(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    find_model(&state, &name, None)?;
    let stats: Vec<Value> = state.models.versions(&name).iter().map(stats_of).collect();
    Ok(Json(json!({"model_stats": stats})))
}

/// `GET /v2/models/{name}/versions/{version}/stats`.
pub async fn version_stats(
    State(state): State<AppState>,
    _user: Credentials,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let model = find_model(&state, &name, Some(&version))?;
    Ok(Json(json!({"model_stats": [stats_of(&model)]})))
}

/// A Triton duration statistic from a histogram of microseconds.
fn duration(histogram: &HistogramView) -> Value {
    json!({"count": histogram.count, "ns": histogram.sum.saturating_mul(1_000)})
}

/// A model's statistics as Triton reports them. Requests are counted one
/// by one (`success`, `fail`, `queue`), batches as executions; the
/// inference time (`compute_infer`) is counted per batch, and a request's
/// time (`success.ns`) is its wait in the queue plus the inference time of
/// the batches. Warren does not time input and output conversion apart
/// from the inference, so those stay zero.
fn stats_of(model: &ModelStatus) -> Value {
    let stats = &model.stats;
    let zero = json!({"count": 0, "ns": 0});
    let queue = duration(&stats.queue_wait_us);
    let infer = duration(&stats.inference_us);
    let success_ns = stats
        .queue_wait_us
        .sum
        .saturating_add(stats.inference_us.sum)
        .saturating_mul(1_000);
    json!({
        "name": model.name,
        "version": model.version,
        "last_inference": stats.last_reply_unix_ms,
        "inference_count": stats.replies,
        "execution_count": stats.batch_size.count,
        "inference_stats": {
            "success": {"count": stats.replies, "ns": success_ns},
            "fail": {"count": stats.poison, "ns": 0},
            "queue": queue,
            "compute_input": zero,
            "compute_infer": infer,
            "compute_output": zero,
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": [],
    })
}

/// `POST /v2/repository/index`: every model, and whether it is ready
/// (a worker consumes its queue). A body of `{"ready": true}` lists only
/// the ready ones.
pub async fn repository_index(
    State(state): State<AppState>,
    _user: Credentials,
    crate::body::JsonBody(request): crate::body::JsonBody<Value>,
) -> Json<Value> {
    let ready_only = request
        .get("ready")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let index: Vec<Value> = state
        .models
        .models()
        .iter()
        .filter_map(|model| {
            let ready = queue_state(&state, model).0 > 0;
            if ready_only && !ready {
                return None;
            }
            let (state, reason) = match (ready, &model.backend) {
                (true, _) => ("READY", String::new()),
                (false, None) => ("LOADING", "the model is loading".to_owned()),
                (false, Some(_)) => (
                    "UNAVAILABLE",
                    format!("no worker consumes queue '{}'", model.queue),
                ),
            };
            Some(json!({
                "name": model.name,
                "version": model.version,
                "state": state,
                "reason": reason,
            }))
        })
        .collect();
    Json(Value::Array(index))
}
