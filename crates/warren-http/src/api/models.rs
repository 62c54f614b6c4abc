//! `/api/models`: Warren's own endpoints. Each model version served on a
//! queue with its workers' statistics; loading a version at run time and
//! unloading one after its queue drains; the model events.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::auth::Credentials;
use crate::backlog;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::models::{DirectoryError, HistogramView, ModelStatus};
use crate::state::AppState;

/// How often an unloading version's queue and in-flight requests are
/// looked at.
const DRAIN_POLL: Duration = Duration::from_millis(50);

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
    Json(
        models
            .iter()
            .map(|model| model_json(&state, model))
            .collect(),
    )
}

fn model_json(state: &AppState, model: &ModelStatus) -> Value {
    let backlog = backlog::of_model(state, model);
    let (consumers, messages) = (backlog.consumers, backlog.messages);
    let stats = &model.stats;
    json!({
        "name": model.name,
        "version": model.version,
        "state": model.lifecycle.name(),
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
        "queued_tokens": state.inference.queued_tokens(model),
        "max_queued_tokens": model.max_queued_tokens,
        "requests": stats.requests,
        "replies": stats.replies,
        "poison": stats.poison,
        "expired": stats.expired,
        "failed_batches": stats.failed_batches,
        "batch_size": histogram_json(&stats.batch_size),
        "batch_wait_us": histogram_json(&stats.batch_wait_us),
        "queue_wait_us": histogram_json(&stats.queue_wait_us),
        "inference_us": histogram_json(&stats.inference_us),
    })
}

fn directory_error(error: DirectoryError) -> ApiError {
    match error {
        DirectoryError::Invalid(reason) => ApiError::BadRequest(reason),
        DirectoryError::Exists(reason) => ApiError::Conflict(reason),
        DirectoryError::NotFound(reason) => ApiError::NotFound(reason),
        DirectoryError::Failed(reason) => ApiError::Internal(reason),
        DirectoryError::Unsupported => ApiError::MethodNotAllowed,
    }
}

/// `PUT /api/models/{name}/versions/{version}` with a `[[model]]` entry
/// as JSON (its name and version from the path): loads the version,
/// warms it up and starts its workers, then answers 201. From then on it
/// takes the model's traffic if it is the newest version.
pub async fn load(
    State(state): State<AppState>,
    user: Credentials,
    Path((name, version)): Path<(String, String)>,
    JsonBody(entry): JsonBody<Value>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    user.require_administrator()?;
    let Value::Object(mut entry) = entry else {
        return Err(ApiError::BadRequest(
            "the body is a [[model]] entry as a JSON object".to_owned(),
        ));
    };
    for (key, value) in [("name", &name), ("version", &version)] {
        match entry.get(key) {
            Some(given) if given.as_str() != Some(value.as_str()) => {
                return Err(ApiError::BadRequest(format!(
                    "the body's {key} {given} is not the path's '{value}'"
                )));
            }
            _ => {
                entry.insert(key.to_owned(), json!(value));
            }
        }
    }
    let loaded = state
        .models
        .load(Value::Object(entry))
        .await
        .map_err(directory_error)?;
    Ok((StatusCode::CREATED, Json(model_json(&state, &loaded))))
}

/// `DELETE /api/models/{name}/versions/{version}`: takes the version out
/// of traffic at once and answers 202; its workers stop once its queue is
/// empty and no HTTP request to it is in flight, so every request it took
/// is answered.
pub async fn unload(
    State(state): State<AppState>,
    user: Credentials,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let model = state
        .models
        .versions(&name)
        .into_iter()
        .find(|model| model.version == version)
        .ok_or_else(|| ApiError::NotFound(format!("model '{name}' has no version '{version}'")))?;
    state
        .models
        .begin_unload(&name, &version)
        .map_err(directory_error)?;
    tokio::spawn(drain_then_unload(state.clone(), model));
    Ok(StatusCode::ACCEPTED)
}

async fn drain_then_unload(state: AppState, model: ModelStatus) {
    loop {
        let drained =
            backlog::of_model(&state, &model).messages == 0 && state.inference.idle(&model.queue);
        if drained {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    state
        .models
        .finish_unload(&model.name, &model.version)
        .await;
}

/// `GET /api/models/events`: the latest model events, oldest first.
pub async fn events(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    Json(Value::Array(state.models.events()))
}
