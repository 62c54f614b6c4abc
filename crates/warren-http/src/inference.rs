//! KServe v2 (Open Inference Protocol) over the models' queues.
//!
//! `POST /v2/models/{name}/infer` turns the request into messages on the
//! model's queue, each with a direct reply-to address, and waits for the
//! workers' replies: whichever worker takes a request answers it, in this
//! process or on another machine. The request is refused with 429 when
//! the model already has too many HTTP requests in flight or its queue is
//! full, rather than left to hang, with a `Retry-After` of the time the
//! backlog is expected to take to drain (see [`crate::backlog`]).
//!
//! With `Prefer: respond-async` the request becomes a job instead: its
//! messages carry the job's id as `message_id` and no reply-to, the answer
//! is 202 with the job's address, and the result is kept by the job store
//! (see [`crate::jobs`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Credentials;
use crate::backlog;
use crate::body::Body;
use crate::error::{ApiError, ApiResult};
use crate::jobs;
use crate::models::{Lifecycle, ModelStatus, TensorSpec};
use crate::session::{self, refusal};
use crate::state::AppState;
use crate::tensor_wire::{InferBody, OutputChoice};
use warren_amqp::{Confirmation, DirectSession, Event};

/// Where workers send replies: RabbitMQ's direct reply-to pseudo-queue.
const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Admission: how many HTTP requests each model version (each model
/// queue) may have in flight, and how many tokens for a text model with
/// `max_queued_tokens`.
pub struct Inference {
    in_flight_max: usize,
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Per model queue: its budget of queued tokens, and what is left.
    tokens: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

/// The cost counted for a request while its model is loading (no
/// tokenizer to ask yet): one token per four bytes of text, the usual
/// rule of thumb for English, at least one.
fn estimated_tokens(body: &[u8]) -> usize {
    body.len().div_ceil(4).max(1)
}

impl Inference {
    pub fn new(in_flight_max: usize) -> Self {
        Self {
            in_flight_max,
            permits: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Whether no HTTP request is in flight to the model version's queue.
    pub fn idle(&self, queue: &str) -> bool {
        self.permits
            .lock()
            .get(queue)
            .is_none_or(|semaphore| semaphore.available_permits() == self.in_flight_max)
    }

    /// The tokens HTTP requests to the model version's queue have waiting
    /// or running; None when it has no budget.
    pub fn queued_tokens(&self, model: &ModelStatus) -> Option<usize> {
        let budget = model.max_queued_tokens?;
        let tokens = self.tokens.lock();
        Some(match tokens.get(&model.queue) {
            Some((size, semaphore)) if *size == budget => {
                budget.saturating_sub(semaphore.available_permits())
            }
            _ => 0,
        })
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

    /// Takes the request's tokens from the model version's budget, held
    /// until it is answered: 413 for a request larger than the whole
    /// budget, 429 while too many are queued. None when the version has no
    /// budget.
    fn admit_tokens(
        &self,
        state: &AppState,
        model: &ModelStatus,
        requests: &[Request],
    ) -> ApiResult<Option<OwnedSemaphorePermit>> {
        let Some(budget) = model.max_queued_tokens else {
            return Ok(None);
        };
        let cost: usize = requests
            .iter()
            .map(|request| {
                state
                    .models
                    .request_cost(
                        &model.name,
                        &model.version,
                        &request.body,
                        request.content_type,
                    )
                    .unwrap_or_else(|| estimated_tokens(&request.body))
            })
            .sum();
        if cost > budget {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request has {cost} tokens, more than model '{}' may queue in all \
                 (max_queued_tokens {budget})",
                model.name
            )));
        }
        let semaphore = {
            let mut tokens = self.tokens.lock();
            let entry = tokens
                .entry(model.queue.clone())
                .or_insert_with(|| (budget, Arc::new(Semaphore::new(budget))));
            // A version loaded again on the same queue with another budget
            // starts a new count; permits of the old one go back to it.
            if entry.0 != budget {
                *entry = (budget, Arc::new(Semaphore::new(budget)));
            }
            Arc::clone(&entry.1)
        };
        let permits =
            u32::try_from(cost).expect("cost is within the budget, which validation keeps to u32");
        Arc::clone(&semaphore)
            .try_acquire_many_owned(permits)
            .map(Some)
            .map_err(|_| ApiError::TooManyRequests {
                reason: format!(
                    "model '{}' has {} of its {budget} queued tokens taken; this request needs {cost}",
                    model.name,
                    budget.saturating_sub(semaphore.available_permits()),
                ),
                retry_after: backlog::of_model(state, model).retry_after(),
            })
    }
}

/// The model `name` at `version`, or at its newest version serving when
/// none is asked for (the newest loading one while none serves yet);
/// 404 naming what is served otherwise. A version being unloaded is not
/// found.
pub(crate) fn find_model(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> ApiResult<ModelStatus> {
    let mut versions: Vec<ModelStatus> = state
        .models
        .versions(name)
        .into_iter()
        .filter(|model| model.lifecycle != Lifecycle::Draining)
        .collect();
    if versions.is_empty() {
        return Err(ApiError::NotFound(format!("no model '{name}'")));
    }
    let Some(version) = version else {
        let newest_serving = versions
            .iter()
            .rposition(|model| model.lifecycle == Lifecycle::Serving);
        return Ok(match newest_serving {
            Some(index) => versions.swap_remove(index),
            None => versions.pop().expect("not empty"),
        });
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

/// The model version a request goes to, with its admission permit held.
/// A version that began draining between being found and being admitted
/// is looked up again: an unload waits for the permits of its version to
/// come back, so no request admitted to it is ever left behind.
fn route(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> ApiResult<(ModelStatus, OwnedSemaphorePermit)> {
    loop {
        let model = find_model(state, name, version)?;
        let permit = state.inference.admit(state, &model)?;
        let draining = state.models.lifecycle(name, &model.version) == Some(Lifecycle::Draining);
        if !draining {
            return Ok((model, permit));
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
    serve(&state, &user, &name, version, &headers, body).await
}

/// `POST /v2/models/{name}/versions/{version}/infer`.
pub async fn infer_version(
    State(state): State<AppState>,
    user: Credentials,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<Response> {
    serve(&state, &user, &name, Some(&version), &headers, body).await
}

/// The header that picks a model's version for `/v2/models/{name}/infer`.
pub const VERSION_HEADER: &str = "warren-model-version";

async fn serve(
    state: &AppState,
    user: &Credentials,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    // Without a data directory there is nowhere to keep a job, and the
    // preference is ignored, as RFC 7240 lets a server do.
    let asynchronous = state.jobs.is_some() && jobs::prefers_async(headers);
    // A job holds its permit only while it is being queued.
    let (model, _permit) = route(state, name, version)?;
    let model = &model;
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
    let tokens = state.inference.admit_tokens(state, model, &messages)?;
    let mut session = session::open(state, user, "/")?;
    if asynchronous {
        let submission = JobRequest {
            request_id: id,
            outputs,
            expires_after,
            tokens,
        };
        return submit_job(state, &mut session, model, messages, submission).await;
    }
    let replies = round_trip(state, &mut session, model, messages, expires_after).await?;
    let mut response = response_for(model, replies)?;
    response["model_name"] = json!(model.name);
    response["model_version"] = json!(model.version);
    if let Some(id) = id {
        response["id"] = id;
    }
    outputs.respond(response)
}

/// What a job keeps of its request besides the messages.
struct JobRequest {
    request_id: Option<Value>,
    outputs: OutputChoice,
    expires_after: Option<Duration>,
    /// The job's queued tokens, held until it finishes.
    tokens: Option<OwnedSemaphorePermit>,
}

/// Queues the requests as a job and answers 202 at once, with where to
/// ask for the result (`Location`). The requests are persistent and
/// confirmed, and the job recorded on disk, before the answer: a job
/// accepted is never lost to a broker that dies.
async fn submit_job(
    state: &AppState,
    session: &mut DirectSession,
    model: &ModelStatus,
    requests: Vec<Request>,
    job: JobRequest,
) -> ApiResult<Response> {
    let store = state.jobs.as_ref().expect("checked by the caller");
    if store.len() >= store.config().jobs_max {
        return Err(ApiError::TooManyRequests {
            reason: format!(
                "the broker keeps {} jobs already; fetch or delete finished ones",
                store.config().jobs_max
            ),
            retry_after: backlog::of_model(state, model).retry_after(),
        });
    }
    let id = jobs::new_job_id();
    let submitted_ms = warren_amqp::wall_clock_ms();
    // Where the job will stand: behind what waits now.
    let baseline = state
        .hub
        .read()
        .broker()
        .queue_info("/", &model.queue)
        .map_or((0, 0), |queue| {
            (
                queue.ready as u64,
                queue.counts.delivered + queue.counts.got,
            )
        });
    let parts = requests.len();
    let messages = requests
        .into_iter()
        .enumerate()
        .map(|(index, request)| {
            let mut headers = request_headers();
            jobs::part_headers(&mut headers, index, parts);
            let properties = request_properties(&request, headers, job.expires_after)
                .with_message_id(ShortString::from(id.clone()))
                .with_correlation_id(ShortString::from(index.to_string()))
                .with_delivery_mode(2);
            (properties, Bytes::from(request.body))
        })
        .collect();
    publish_requests(state, session, model, messages).await?;
    let submission = jobs::Submission {
        model: model.name.clone(),
        version: model.version.clone(),
        queue: model.queue.clone(),
        parts,
        submitted_ms,
        deadline_ms: job
            .expires_after
            .map(|timeout| submitted_ms + timeout.as_millis() as u64),
        request_id: job.request_id,
        outputs: job.outputs,
    };
    store
        .submitted(id.clone(), submission, baseline, job.tokens)
        .await?;
    let status = jobs::describe(state, &id).await?;
    let location = format!("/v2/jobs/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [
            (header::LOCATION, location),
            (
                header::HeaderName::from_static("preference-applied"),
                "respond-async".to_owned(),
            ),
        ],
        Json(status),
    )
        .into_response())
}

/// One queue message: its body and content type.
struct Request {
    body: Vec<u8>,
    content_type: &'static str,
}

/// A worker's answer to one request.
pub(crate) struct Reply {
    pub body: Vec<u8>,
    /// The worker's reason when it refused the input (`x-warren-error`).
    pub error: Option<String>,
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

/// The headers every request carries: RabbitMQ's name for the publishing
/// time, which workers turn into the queue-wait histogram.
fn request_headers() -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "timestamp_in_ms".into(),
        AMQPValue::LongLongInt(warren_amqp::wall_clock_ms() as i64),
    );
    headers
}

/// A request's properties: its content type and headers, and an
/// expiration when the request has a timeout of its own (AMQP's is in
/// whole milliseconds, rounded up so that a request never expires before
/// its timeout).
fn request_properties(
    request: &Request,
    headers: FieldTable,
    expires_after: Option<Duration>,
) -> BasicProperties {
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_content_type(ShortString::from(request.content_type));
    match expires_after {
        None => properties,
        Some(timeout) => {
            let millis = timeout.as_nanos().div_ceil(1_000_000).max(1);
            properties.with_expiration(ShortString::from(millis.to_string()))
        }
    }
}

/// Publishes requests to the model's queue and waits for the broker to
/// confirm every one: 503 when the queue does not exist, 429 when it is
/// full.
async fn publish_requests(
    state: &AppState,
    session: &mut DirectSession,
    model: &ModelStatus,
    messages: Vec<(BasicProperties, Bytes)>,
) -> ApiResult<()> {
    let mut confirms = Vec::with_capacity(messages.len());
    for (properties, body) in messages {
        let publish = basic::Publish {
            exchange: "".into(),
            routing_key: model.queue.as_str().into(),
            mandatory: true,
            immediate: false,
        };
        confirms.push(
            session
                .publish(publish, properties, body)
                .await
                .map_err(refusal)?,
        );
    }
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
    Ok(())
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
    let requested = requests.len();
    let headers = request_headers();
    let messages = requests
        .into_iter()
        .enumerate()
        .map(|(index, request)| {
            let properties = request_properties(&request, headers.clone(), expires_after)
                .with_reply_to(ShortString::from(REPLY_TO))
                .with_correlation_id(ShortString::from(index.to_string()));
            (properties, Bytes::from(request.body))
        })
        .collect();
    publish_requests(state, session, model, messages).await?;
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

/// The KServe response a model's replies make, in request order.
pub(crate) fn response_for(model: &ModelStatus, replies: Vec<Reply>) -> ApiResult<Value> {
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
