//! KServe v2 (Open Inference Protocol) over the models' queues.
//!
//! `POST /v2/models/{name}/infer` turns the request into messages on the
//! model's queue, each with a direct reply-to address, and waits for the
//! workers' replies: whichever worker takes a request answers it, in this
//! process or on another machine. The request is refused with 429 when
//! the model already has too many HTTP requests in flight or its queue is
//! full, rather than left to hang, with a `Retry-After` of the time the
//! backlog is expected to take to drain (see [`crate::backlog`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Credentials;
use crate::backlog;
use crate::body::Body;
use crate::error::{ApiError, ApiResult};
use crate::models::{ModelStatus, TensorSpec};
use crate::session::{self, refusal};
use crate::state::AppState;
use crate::tensor_wire::InferBody;
use warren_amqp::{Confirmation, DirectSession, Event};

/// Where workers send replies: RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Admission: how many HTTP requests each model version (each model
/// queue) may have in flight.
pub struct Inference {
    in_flight_max: usize,
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Inference {
    pub fn new(in_flight_max: usize) -> Self {
        Self {
            in_flight_max,
            permits: Mutex::new(HashMap::new()),
        }
    }

    fn admit(&self, state: &AppState, model: &ModelStatus) -> ApiResult<OwnedSemaphorePermit> {
        let semaphore = Arc::clone(
            self.permits
                .lock()
                .entry(model.queue.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.in_flight_max))),
        );
        semaphore
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                reason: format!(
                    "model '{}' has {} requests in flight already",
                    model.name, self.in_flight_max
                ),
                retry_after: backlog::of_model(state, model).retry_after(),
            })
    }
}

/// The model `name` at `version`, or at its newest version when none is
/// asked for; 404 naming what is served otherwise.
pub(crate) fn find_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> ApiResult<ModelStatus> {
    let mut versions = state.models.versions(name);
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("no model '{name}'")));
    }
    let Some(version) = version else {
        return Ok(versions.pop().expect("not empty"));
    };
    match versions.iter().position(|model| model.version == version) {
        Some(index) => Ok(versions.swap_remove(index)),
        None => {
            let served: Vec<&str> = versions
                .iter()
                .map(|model| model.version.as_str())
                .collect();
            Err(ApiError::NotFound(format!(
                "model '{name}' has no version '{version}' (it serves {})",
                served.join(", ")
            )))
        }
    }
}

/// The model's queue's consumers (its workers) and waiting requests.
pub(crate) fn queue_state(state: &AppState, model: &ModelStatus) -> (usize, usize) {
    state
        .hub
        .read()
        .broker()
        .queue_info("/", &model.queue)
        .map_or((0, 0), |queue| (queue.consumers, queue.ready))
}

pub async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "warren",
        "version": env!("CARGO_PKG_VERSION"),
        // Triton's names for the extensions served (src/triton.rs and
        // src/tensor_wire.rs).
        "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
    }))
}

pub async fn live() -> StatusCode {
    StatusCode::OK
}

/// Ready when every model has a worker on its queue.
pub async fn ready(State(state): State<AppState>) -> StatusCode {
    let all_served = state
        .models
        .models()
        .iter()
        .all(|model| queue_state(&state, model).0 > 0);
    if all_served {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The tensors an HTTP client sends and receives: fixed by the task for
/// embeddings and classification, the graph's own for a tensor model (empty
/// lists until it has loaded).
pub(crate) fn signature(model: &ModelStatus) -> (Value, Value) {
    match model.task.as_str() {
        "embedding" => (
            json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]),
        ),
        "classification" => (
            json!([{"name": "image", "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": "labels", "datatype": "BYTES", "shape": [-1]}]),
        ),
        _ => {
            let tensors = |specs: &[TensorSpec]| -> Value {
                specs
                    .iter()
                    .map(|spec| {
                        json!({"name": spec.name, "datatype": spec.datatype, "shape": spec.shape})
                    })
                    .collect()
            };
            match &model.tensors {
                Some((inputs, outputs)) => (tensors(inputs), tensors(outputs)),
                None => (json!([]), json!([])),
            }
        }
    }
}

pub async fn model_metadata(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    metadata_of(&state, &find_model(&state, &name, None)?)
}

/// `GET /v2/models/{name}/versions/{version}`.
pub async fn version_metadata(
    State(state): State<AppState>,
    _user: Credentials,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    metadata_of(&state, &find_model(&state, &name, Some(&version))?)
}

/// A model version's metadata; `versions` lists every version served,
/// oldest first.
fn metadata_of(state: &AppState, model: &ModelStatus) -> ApiResult<Json<Value>> {
    let versions: Vec<String> = state
        .models
        .versions(&model.name)
        .into_iter()
        .map(|model| model.version)
        .collect();
    let (inputs, outputs) = signature(model);
    Ok(Json(json!({
        "name": model.name,
        "versions": versions,
        "platform": "onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {"queue": model.queue, "task": model.task, "version": model.version},
    })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    Ok(readiness(&state, &find_model(&state, &name, None)?))
}

/// `GET /v2/models/{name}/versions/{version}/ready`.
pub async fn version_ready(
    State(state): State<AppState>,
    _user: Credentials,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    Ok(readiness(
        &state,
        &find_model(&state, &name, Some(&version))?,
    ))
}

fn readiness(state: &AppState, model: &ModelStatus) -> StatusCode {
    if queue_state(state, model).0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// `POST /v2/models/{name}/infer`: to the newest version, or to the one
/// the `Warren-Model-Version` header names. The body is JSON, or a JSON
/// header and binary tensor data (see [`crate::tensor_wire`]).
pub async fn infer(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    let version = match headers.get(VERSION_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| bad(format!("the {VERSION_HEADER} header is not text")))?,
        ),
    };
    let model = find_model(&state, &name, version)?;
    serve(&state, &user, &model, &headers, body).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn infer_version(
    State(state): State<AppState>,
    user: Credentials,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    let model = find_model(&state, &name, Some(&version))?;
    serve(&state, &user, &model, &headers, body).await
}

/// The header that picks a model's version for `/v2/models/{name}/infer`.
pub const VERSION_HEADER: &str = "warren-model-version";

async fn serve(
    state: &AppState,
    user: &Credentials,
    model: &ModelStatus,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let _permit = state.inference.admit(state, model)?;
    let request = InferBody::parse(headers, body)?;
    let id = request.json.get("id").cloned();
    let outputs = request.output_choice()?;
    let (_, known_outputs) = signature(model);
    if let Some(known) = known_outputs.as_array().filter(|known| !known.is_empty()) {
        let names: Vec<&str> = known
            .iter()
            .filter_map(|output| output["name"].as_str())
            .collect();
        outputs.check_known(&names)?;
    }
    let expires_after = request.timeout()?;
    let messages = requests_for(model, request)?;
    let mut session = session::open(state, user, "/")?;
    let replies = round_trip(state, &mut session, model, messages, expires_after).await?;
    let mut response = response_for(model, replies)?;
    response["model_name"] = json!(model.name);
    response["model_version"] = json!(model.version);
    if let Some(id) = id {
        response["id"] = id;
    }
    outputs.respond(response)
}

/// One queue message: its body and content type.
struct Request {
    body: Vec<u8>,
    content_type: &'static str,
}

/// A worker's answer to one request.
struct Reply {
    body: Vec<u8>,
    /// The worker's reason when it refused the input (`x-warren-error`).
    error: Option<String>,
}

fn bad(reason: impl Into<String>) -> ApiError {
    ApiError::BadRequest(reason.into())
}

/// The elements of the single input tensor of a task that takes a list of
/// items; a JSON string becomes an item through `from_json`.
fn byte_items(
    request: &InferBody,
    input: &str,
    from_json: impl Fn(&str) -> ApiResult<Vec<u8>>,
) -> ApiResult<Vec<Vec<u8>>> {
    let inputs = request.inputs()?;
    if inputs.len() != 1 {
        return Err(bad(format!(
            "expected one input tensor ('{input}'), got {}",
            inputs.len()
        )));
    }
    let items = request.byte_elements(0, from_json)?;
    if items.is_empty() {
        return Err(bad(format!("input '{input}' is empty")));
    }
    Ok(items)
}

fn requests_for(model: &ModelStatus, request: InferBody) -> ApiResult<Vec<Request>> {
    match model.task.as_str() {
        "embedding" => byte_items(&request, "text", |text| Ok(text.as_bytes().to_vec()))?
            .into_iter()
            .map(|text| {
                if std::str::from_utf8(&text).is_err() {
                    return Err(bad("each text is UTF-8"));
                }
                Ok(Request {
                    body: text,
                    content_type: "text/plain",
                })
            })
            .collect(),
        "classification" => {
            use base64::Engine;
            // In JSON an image is base64; as binary data, its own bytes.
            let decode = |encoded: &str| {
                base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|_| bad("each image is a base64-encoded PNG or JPEG"))
            };
            Ok(byte_items(&request, "image", decode)?
                .into_iter()
                .map(|body| Request {
                    body,
                    content_type: "application/octet-stream",
                })
                .collect())
        }
        _ => Ok(vec![Request {
            body: serde_json::to_vec(&request.into_json()?).expect("a JSON value serialises"),
            content_type: "application/json",
        }]),
    }
}

/// Publishes the requests with a direct reply-to address and collects one
/// reply per request, by correlation id. A request with a timeout of its
/// own expires in the queue after it (the broker dead-letters it, reason
/// `expired`, before any worker spends time on it), and the answer is
/// awaited no longer than that.
async fn round_trip(
    state: &AppState,
    session: &mut DirectSession,
    model: &ModelStatus,
    requests: Vec<Request>,
    expires_after: Option<Duration>,
) -> ApiResult<Vec<Reply>> {
    let wait = expires_after.map_or(state.config.inference_timeout, |timeout| {
        timeout.min(state.config.inference_timeout)
    });
    // AMQP's expiration is in whole milliseconds; a request never expires
    // before its timeout.
    let expiration = expires_after.map(|timeout| {
        let millis = timeout.as_nanos().div_ceil(1_000_000).max(1);
        ShortString::from(millis.to_string())
    });
    let consume = basic::Consume {
        queue: REPLY_TO.into(),
        no_ack: true,
        ..basic::Consume::default()
    };
    session::call(
        session,
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)),
    )
    .await?;
    let mut confirms = Vec::with_capacity(requests.len());
    let mut headers = FieldTable::default();
    // RabbitMQ's name for the publishing time, which workers turn into
    // the queue-wait histogram.
    headers.insert(
        "timestamp_in_ms".into(),
        AMQPValue::LongLongInt(warren_amqp::wall_clock_ms() as i64),
    );
    for (index, request) in requests.into_iter().enumerate() {
        let mut properties = BasicProperties::default()
            .with_headers(headers.clone())
            .with_reply_to(ShortString::from(REPLY_TO))
            .with_correlation_id(ShortString::from(index.to_string()))
            .with_content_type(ShortString::from(request.content_type));
        if let Some(expiration) = &expiration {
            properties = properties.with_expiration(expiration.clone());
        }
        let publish = basic::Publish {
            exchange: "".into(),
            routing_key: model.queue.as_str().into(),
            mandatory: true,
            immediate: false,
        };
        let body = Bytes::from(request.body);
        confirms.push(
            session
                .publish(publish, properties, body)
                .await
                .map_err(refusal)?,
        );
    }
    let requested = confirms.len();
    for sequence in confirms {
        match session.confirmation(sequence).await.map_err(refusal)? {
            Confirmation::Ack { returned: true } => {
                return Err(ApiError::Unavailable(format!(
                    "model '{}' has no queue '{}' yet",
                    model.name, model.queue
                )));
            }
            Confirmation::Nack => {
                return Err(ApiError::TooManyRequests {
                    reason: format!("the queue of model '{}' is full", model.name),
                    retry_after: backlog::of_model(state, model).retry_after(),
                });
            }
            Confirmation::Ack { returned: false } => {}
        }
    }
    let mut answers: Vec<Option<Reply>> = (0..requested).map(|_| None).collect();
    let mut missing = requested;
    let deadline = tokio::time::Instant::now() + wait;
    while missing > 0 {
        let delivery = match tokio::time::timeout_at(deadline, session.next_event()).await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "model '{}' did not answer within {wait:?}",
                    model.name
                )));
            }
            Ok(Ok(Event::Delivery(delivery))) => delivery,
            Ok(_) => return Err(ApiError::Unavailable("the reply consumer ended".to_owned())),
        };
        let message = &delivery.message;
        let Some(index) = message
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|id| id.as_str().parse::<usize>().ok())
            .filter(|index| *index < answers.len())
        else {
            continue;
        };
        let error = message
            .properties
            .headers()
            .as_ref()
            .and_then(|headers| headers.inner().get("x-warren-error").cloned())
            .map(|value| match value {
                AMQPValue::LongString(text) => {
                    String::from_utf8_lossy(text.as_bytes()).into_owned()
                }
                other => format!("{other:?}"),
            });
        if answers[index].is_none() {
            missing -= 1;
        }
        answers[index] = Some(Reply {
            body: message.body.to_vec(),
            error,
        });
    }
    Ok(answers.into_iter().flatten().collect())
}

fn response_for(model: &ModelStatus, replies: Vec<Reply>) -> ApiResult<Value> {
    if let Some(reason) = replies.iter().find_map(|reply| reply.error.clone()) {
        return Err(bad(format!(
            "model '{}' refused the input: {reason}",
            model.name
        )));
    }
    let parse = |reply: &Reply| -> ApiResult<Value> {
        serde_json::from_slice(&reply.body).map_err(|error| {
            ApiError::Internal(format!(
                "model '{}' sent a reply that is not JSON: {error}",
                model.name
            ))
        })
    };
    match model.task.as_str() {
        "embedding" => {
            let mut data = Vec::new();
            let mut dimension = 0;
            for reply in &replies {
                let vector = parse(reply)?;
                let values = vector.as_array().cloned().unwrap_or_default();
                dimension = values.len();
                data.extend(values);
            }
            Ok(json!({"outputs": [{
                "name": "embedding",
                "datatype": "FP32",
                "shape": [replies.len(), dimension],
                "data": data,
            }]}))
        }
        "classification" => {
            let labels: Vec<String> = replies
                .iter()
                .map(|reply| String::from_utf8_lossy(&reply.body).into_owned())
                .collect();
            Ok(json!({"outputs": [{
                "name": "labels",
                "datatype": "BYTES",
                "shape": [labels.len()],
                "data": labels,
            }]}))
        }
        _ => {
            let reply = replies
                .first()
                .ok_or_else(|| ApiError::Internal("no reply".to_owned()))?;
            parse(reply)
        }
    }
}
