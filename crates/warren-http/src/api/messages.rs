//! Publishing and getting messages over HTTP: RabbitMQ's
//! `.../publish` and `.../get` forms, and plain POSTs whose body is the
//! message.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::ShortString;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{exchange_from_path, exchanges, queues};
use crate::auth::Credentials;
use crate::body::{Body, JsonBody};
use crate::error::{ApiError, ApiResult};
use crate::json::{json_to_properties, payload_to_json, properties_to_json};
use crate::lenient;
use crate::session::{self, publish_confirmed, refusal};
use crate::state::AppState;
use warren_amqp::{DirectSession, Reply};
use warren_core::Message;

#[derive(Debug, Deserialize)]
pub struct PublishForm {
    #[serde(default)]
    routing_key: String,
    payload: String,
    #[serde(default = "string_encoding")]
    payload_encoding: String,
    #[serde(default)]
    properties: Value,
}

fn string_encoding() -> String {
    "string".to_owned()
}

/// `POST /api/exchanges/{vhost}/{name}/publish`.
pub async fn publish(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(form): JsonBody<PublishForm>,
) -> ApiResult<Json<Value>> {
    let exchange = exchanges::find(&state, &user, &vhost, &name)?;
    let body = match form.payload_encoding.as_str() {
        "string" => form.payload.into_bytes(),
        "base64" => STANDARD
            .decode(form.payload.as_bytes())
            .map_err(|error| ApiError::BadRequest(format!("payload is not base64: {error}")))?,
        other => {
            return Err(ApiError::BadRequest(format!(
                "payload_encoding is \"string\" or \"base64\", not \"{other}\""
            )));
        }
    };
    let properties = json_to_properties(&form.properties)?;
    let mut session = session::open(&state, &user, &vhost)?;
    let routed = publish_confirmed(
        &mut session,
        &exchange.name,
        &form.routing_key,
        Bytes::from(body),
        properties,
    )
    .await?;
    Ok(Json(json!({ "routed": routed })))
}

#[derive(Debug, Deserialize)]
pub struct GetForm {
    #[serde(default = "one", deserialize_with = "lenient::number")]
    count: usize,
    #[serde(default = "requeue_mode")]
    ackmode: String,
    #[serde(default = "auto_encoding")]
    encoding: String,
    #[serde(default, deserialize_with = "lenient::optional_number")]
    truncate: Option<usize>,
}

fn one() -> usize {
    1
}

fn requeue_mode() -> String {
    "ack_requeue_true".to_owned()
}

fn auto_encoding() -> String {
    "auto".to_owned()
}

/// `POST /api/queues/{vhost}/{name}/get`: takes up to `count` messages,
/// then requeues, acks or rejects them as `ackmode` says. Requeued
/// messages are all taken first, so a count of 5 sees 5 different ones.
pub async fn get(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(form): JsonBody<GetForm>,
) -> ApiResult<Json<Value>> {
    queues::find(&state, &user, &vhost, &name)?;
    let (no_ack, requeue) = match form.ackmode.as_str() {
        "ack_requeue_true" | "reject_requeue_true" => (false, true),
        "ack_requeue_false" => (true, false),
        "reject_requeue_false" => (false, false),
        other => {
            return Err(ApiError::BadRequest(format!(
                "ackmode '{other}' is not ack_requeue_true, ack_requeue_false, \
                 reject_requeue_true or reject_requeue_false"
            )));
        }
    };
    let allow_text = match form.encoding.as_str() {
        "auto" => true,
        "base64" => false,
        other => {
            return Err(ApiError::BadRequest(format!(
                "encoding is \"auto\" or \"base64\", not \"{other}\""
            )));
        }
    };
    if form.count == 0 || form.count > state.config.get_count_max {
        return Err(ApiError::BadRequest(format!(
            "count must be from 1 to {}",
            state.config.get_count_max
        )));
    }
    let mut session = session::open(&state, &user, &vhost)?;
    let messages = take(&mut session, &name, form.count, no_ack).await?;
    if let Some(last) = messages.last()
        && !no_ack
    {
        // One nack with `multiple` settles them all, in order.
        let nack = basic::Nack {
            delivery_tag: last.delivery_tag,
            multiple: true,
            requeue,
        };
        session
            .send(AMQPClass::Basic(basic::AMQPMethod::Nack(nack)))
            .map_err(refusal)?;
    }
    let answer = messages
        .iter()
        .map(|message| {
            let body = &message.message.body;
            let shown = match form.truncate {
                Some(limit) if limit < body.len() => &body[..limit],
                _ => &body[..],
            };
            let (payload, payload_encoding) = payload_to_json(shown, allow_text);
            json!({
                "payload": payload,
                "payload_encoding": payload_encoding,
                "payload_bytes": body.len(),
                "redelivered": message.redelivered,
                "exchange": message.message.exchange.as_str(),
                "routing_key": message.message.routing_key.as_str(),
                "message_count": message.message_count,
                "properties": properties_to_json(&message.message.properties),
            })
        })
        .collect();
    Ok(Json(Value::Array(answer)))
}

/// A message `basic.get` took.
pub(crate) struct Taken {
    delivery_tag: u64,
    redelivered: bool,
    /// Messages left in the queue after this one.
    message_count: u32,
    pub message: Arc<Message>,
}

pub(crate) async fn take(
    session: &mut DirectSession,
    queue: &str,
    count: usize,
    no_ack: bool,
) -> ApiResult<Vec<Taken>> {
    let mut messages = Vec::with_capacity(count);
    while messages.len() < count {
        let get = basic::Get {
            queue: queue.into(),
            no_ack,
        };
        let reply = session
            .call(AMQPClass::Basic(basic::AMQPMethod::Get(get)))
            .await
            .map_err(refusal)?;
        match reply {
            Reply::WithContent(AMQPClass::Basic(basic::AMQPMethod::GetOk(got)), message) => {
                messages.push(Taken {
                    delivery_tag: got.delivery_tag,
                    redelivered: got.redelivered,
                    message_count: got.message_count,
                    message,
                });
            }
            _ => break,
        }
    }
    Ok(messages)
}

/// `POST /api/queues/{vhost}/{name}/messages`: the body is the message,
/// published to the queue through the default exchange.
pub async fn post_to_queue(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    queues::find(&state, &user, &vhost, &name)?;
    post(&state, &user, &vhost, "", &name, &query, &headers, body).await
}

/// `POST /api/exchanges/{vhost}/{name}/messages?routing_key=KEY`.
pub async fn post_to_exchange(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Body(body): Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let exchange = exchanges::find(&state, &user, &vhost, &name)?;
    let routing_key = query.get("routing_key").cloned().unwrap_or_default();
    let exchange_name = exchange_from_path(&exchange.name).to_owned();
    post(
        &state,
        &user,
        &vhost,
        &exchange_name,
        &routing_key,
        &query,
        &headers,
        body,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn post(
    state: &AppState,
    user: &Credentials,
    vhost: &str,
    exchange: &str,
    routing_key: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let properties = properties_from_headers(query, headers)?;
    let mut session = session::open(state, user, vhost)?;
    let routed = publish_confirmed(&mut session, exchange, routing_key, body, properties).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "routed": routed }))))
}

/// Message properties of a plain POST: `Content-Type`, `X-Message-Id`,
/// `X-Correlation-Id`, `X-Reply-To`, `X-Expiration`, `X-Priority`, and
/// persistent unless `?persistent=false`.
fn properties_from_headers(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> ApiResult<BasicProperties> {
    let text = |name: &str| -> ApiResult<Option<String>> {
        match headers.get(name) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .map(|value| Some(value.to_owned()))
                .map_err(|_| ApiError::BadRequest(format!("header {name} is not ASCII text"))),
        }
    };
    let persistent = crate::api::flag(query.get("persistent"))
        .map(|flag| flag || !query.contains_key("persistent"))?;
    let mut properties =
        BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 });
    if let Some(content_type) = text(header::CONTENT_TYPE.as_str())? {
        properties = properties.with_content_type(ShortString::from(content_type));
    }
    if let Some(value) = text("x-message-id")? {
        properties = properties.with_message_id(ShortString::from(value));
    }
    if let Some(value) = text("x-correlation-id")? {
        properties = properties.with_correlation_id(ShortString::from(value));
    }
    if let Some(value) = text("x-reply-to")? {
        properties = properties.with_reply_to(ShortString::from(value));
    }
    if let Some(value) = text("x-expiration")? {
        properties = properties.with_expiration(ShortString::from(value));
    }
    if let Some(value) = text("x-priority")? {
        let priority: u8 = value.parse().map_err(|_| {
            ApiError::BadRequest(format!("X-Priority must be 0 to 255, not '{value}'"))
        })?;
        properties = properties.with_priority(priority);
    }
    Ok(properties)
}
