//! KServe v2 (Open Inference Protocol) over the models' queues.
//!
//! `POST /v2/models/{name}/infer` turns the request into messages on the
//! model's queue, each with a direct reply-to address, and waits for the
//! workers' replies: whichever worker takes a request answers it, in this
//! process or on another machine. The request is refused with 429 when
//! the model already has too many HTTP requests in flight or its queue is
//! full, rather than left to hang.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::models::ModelStatus;
use crate::session::{self, refusal};
use crate::state::AppState;
use warren_amqp::{Confirmation, DirectSession, Event};

/// Where workers send replies: RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How long a client is told to wait after a 429.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Per-model admission: how many HTTP requests each model may have in
/// flight.
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

    fn admit(&self, model: &str) -> ApiResult<OwnedSemaphorePermit> {
        let semaphore = Arc::clone(
            self.permits
                .lock()
                .entry(model.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.in_flight_max))),
        );
        semaphore
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                reason: format!(
                    "model '{model}' has {} requests in flight already",
                    self.in_flight_max
                ),
                retry_after: RETRY_AFTER,
            })
    }
}

fn find_model(state: &AppState, name: &str) -> ApiResult<ModelStatus> {
    state
        .models
        .model(name)
        .ok_or_else(|| ApiError::NotFound(format!("no model '{name}'")))
}

/// The model's queue's consumers (its workers) and waiting requests.
fn queue_state(state: &AppState, model: &ModelStatus) -> (usize, usize) {
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
        "extensions": [],
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

/// The tensors an HTTP client sends and receives, by task.
fn signature(task: &str) -> (Value, Value) {
    match task {
        "embedding" => (
            json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]),
        ),
        "classification" => (
            json!([{"name": "image", "datatype": "BYTES", "shape": [-1]}]),
            json!([{"name": "labels", "datatype": "BYTES", "shape": [-1]}]),
        ),
        // A tensor model takes and returns its own tensors, as its ONNX
        // graph declares them.
        _ => (json!([]), json!([])),
    }
}

pub async fn model_metadata(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let model = find_model(&state, &name)?;
    let (inputs, outputs) = signature(&model.task);
    Ok(Json(json!({
        "name": model.name,
        "versions": [model.version],
        "platform": "onnx",
        "inputs": inputs,
        "outputs": outputs,
        "parameters": {"queue": model.queue, "task": model.task},
    })))
}

pub async fn model_ready(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let model = find_model(&state, &name)?;
    Ok(if queue_state(&state, &model).0 > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

pub async fn infer_version(
    state: State<AppState>,
    user: Credentials,
    Path((name, version)): Path<(String, String)>,
    body: crate::body::JsonBody<Value>,
) -> ApiResult<impl IntoResponse> {
    let model = find_model(&state, &name)?;
    if model.version != version {
        return Err(ApiError::NotFound(format!(
            "model '{name}' has no version '{version}' (it serves version '{}')",
            model.version
        )));
    }
    infer(state, user, Path(name), body).await
}

/// `POST /v2/models/{name}/infer`.
pub async fn infer(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
    crate::body::JsonBody(request): crate::body::JsonBody<Value>,
) -> ApiResult<impl IntoResponse> {
    let model = find_model(&state, &name)?;
    let _permit = state.inference.admit(&model.name)?;
    let id = request.get("id").cloned();
    let messages = requests_for(&model, &request)?;
    let mut session = session::open(&state, &user, "/")?;
    let replies = round_trip(&state, &mut session, &model, messages).await?;
    let mut response = response_for(&model, replies)?;
    response["model_name"] = json!(model.name);
    response["model_version"] = json!(model.version);
    if let Some(id) = id {
        response["id"] = id;
    }
    Ok(Json(response))
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

/// The single input tensor of a task that takes a list of items.
fn byte_items<'a>(request: &'a Value, input: &str) -> ApiResult<Vec<&'a str>> {
    let inputs = request
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the request has no \"inputs\" list"))?;
    let [tensor] = inputs.as_slice() else {
        return Err(bad(format!(
            "expected one input tensor ('{input}'), got {}",
            inputs.len()
        )));
    };
    let datatype = tensor.get("datatype").and_then(Value::as_str);
    if datatype != Some("BYTES") {
        return Err(bad(format!(
            "input '{input}' must have datatype BYTES, not {}",
            datatype.unwrap_or("(none)")
        )));
    }
    let data = tensor
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("input '{input}' has no \"data\" list")))?;
    let items: Vec<&str> = data
        .iter()
        .map(|item| {
            item.as_str()
                .ok_or_else(|| bad(format!("input '{input}' holds a non-string")))
        })
        .collect::<ApiResult<_>>()?;
    if items.is_empty() {
        return Err(bad(format!("input '{input}' is empty")));
    }
    let count = tensor
        .get("shape")
        .and_then(Value::as_array)
        .map(|shape| shape.iter().filter_map(Value::as_u64).product::<u64>());
    if count != Some(items.len() as u64) {
        return Err(bad(format!(
            "input '{input}': its shape does not match its {} data items",
            items.len()
        )));
    }
    Ok(items)
}

fn requests_for(model: &ModelStatus, request: &Value) -> ApiResult<Vec<Request>> {
    match model.task.as_str() {
        "embedding" => Ok(byte_items(request, "text")?
            .into_iter()
            .map(|text| Request {
                body: text.as_bytes().to_vec(),
                content_type: "text/plain",
            })
            .collect()),
        "classification" => {
            use base64::Engine;
            byte_items(request, "image")?
                .into_iter()
                .map(|encoded| {
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map(|body| Request {
                            body,
                            content_type: "application/octet-stream",
                        })
                        .map_err(|_| bad("each image is a base64-encoded PNG or JPEG"))
                })
                .collect()
        }
        _ => Ok(vec![Request {
            body: serde_json::to_vec(request).expect("a JSON value serialises"),
            content_type: "application/json",
        }]),
    }
}

/// Publishes the requests with a direct reply-to address and collects one
/// reply per request, by correlation id.
async fn round_trip(
    state: &AppState,
    session: &mut DirectSession,
    model: &ModelStatus,
    requests: Vec<Request>,
) -> ApiResult<Vec<Reply>> {
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
        let properties = BasicProperties::default()
            .with_headers(headers.clone())
            .with_reply_to(ShortString::from(REPLY_TO))
            .with_correlation_id(ShortString::from(index.to_string()))
            .with_content_type(ShortString::from(request.content_type));
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
                    retry_after: RETRY_AFTER,
                });
            }
            Confirmation::Ack { returned: false } => {}
        }
    }
    let mut answers: Vec<Option<Reply>> = (0..requested).map(|_| None).collect();
    let mut missing = requested;
    let deadline = tokio::time::Instant::now() + state.config.inference_timeout;
    while missing > 0 {
        let delivery = match tokio::time::timeout_at(deadline, session.next_event()).await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "model '{}' did not answer within {:?}",
                    model.name, state.config.inference_timeout
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
