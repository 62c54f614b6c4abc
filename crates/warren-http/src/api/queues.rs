//! `/api/queues`: listing, declaring, deleting and purging queues.

use std::collections::HashMap;

use amq_protocol::protocol::{AMQPClass, queue};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_core::{ConsumerInfo, DELIVERY_COUNT_BUCKETS, DeliveryCounts, QueueInfo};

use crate::api::connections::consumer_json;
use crate::api::{declared, flag, message_stats, require_vhost};
use crate::auth::Credentials;
use crate::backlog;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::json::{json_to_table, table_to_json};
use crate::lenient;
use crate::models::ModelStatus;
use crate::session;
use crate::state::AppState;

/// A queue's delivery counts by range ("1", "2", "3", "4-5", "6-10",
/// "11+"): how many times its settled messages had been delivered.
pub fn delivery_counts_json(counts: &DeliveryCounts) -> Value {
    let mut ranges = serde_json::Map::new();
    let mut low = 1;
    for (index, count) in counts.buckets.iter().enumerate() {
        let name = match DELIVERY_COUNT_BUCKETS.get(index) {
            Some(high) if *high == low => high.to_string(),
            Some(high) => format!("{low}-{high}"),
            None => format!("{low}+"),
        };
        ranges.insert(name, json!(count));
        low = DELIVERY_COUNT_BUCKETS
            .get(index)
            .map_or(low, |high| high + 1);
    }
    Value::Object(ranges)
}

/// How long ago `at_ms` was, in ms; None stays None.
fn age_ms(now_ms: u64, at_ms: Option<u64>) -> Option<u64> {
    at_ms.map(|at| now_ms.saturating_sub(at))
}

pub fn queue_json(state: &AppState, queue: &QueueInfo) -> Value {
    let rates = state.rates.queue(&queue.vhost, &queue.name);
    let now_ms = warren_amqp::wall_clock_ms();
    json!({
        "name": queue.name,
        "vhost": queue.vhost,
        "type": if queue.quorum { "quorum" } else { "classic" },
        "durable": queue.durable,
        "auto_delete": queue.auto_delete,
        "exclusive": queue.exclusive,
        "arguments": table_to_json(&queue.arguments),
        "policy": queue.policy.policy,
        "operator_policy": queue.policy.operator_policy,
        "effective_policy_definition": table_to_json(&queue.policy.definition),
        "state": "running",
        "node": state.node.name,
        "messages": queue.ready + queue.unacked,
        "messages_ready": queue.ready,
        "messages_unacknowledged": queue.unacked,
        "message_bytes_ready": queue.ready_bytes,
        // Unacknowledged messages are always in memory here.
        "messages_ram": queue.ready_in_memory + queue.unacked,
        "messages_ready_ram": queue.ready_in_memory,
        "messages_paged_out": queue.ready - queue.ready_in_memory,
        "consumers": queue.consumers,
        "message_stats": message_stats(&queue.counts, &rates),
        // Warren's own: how long the head has waited and the oldest
        // delivery has been out, and how often settled messages had been
        // delivered (rabbitmq-server#6813).
        "oldest_ready_age_ms": age_ms(now_ms, queue.head_arrived_ms),
        "oldest_unacked_age_ms": age_ms(now_ms, queue.oldest_unacked_ms),
        "delivery_counts": delivery_counts_json(&queue.delivery_counts),
    })
}

/// `GET /api/queues` and `/api/queues/{vhost}`.
pub async fn list(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    if let Some(vhost) = &vhost {
        require_vhost(&state, &user, vhost)?;
    }
    let items = state.hub.read().broker().queue_infos(vhost.as_deref());
    let models = state.models.models();
    Ok(Json(Value::Array(
        items
            .iter()
            .filter(|item| user.sees_vhost(&state, &item.vhost))
            .map(|item| {
                let mut body = queue_json(&state, item);
                add_model(&state, &models, item, &mut body);
                body
            })
            .collect(),
    )))
}

/// For a model's queue, Warren's own `model` object beside RabbitMQ's
/// fields (which KEDA's RabbitMQ scaler reads and which stay as they
/// are): the model, its measured service rate and the expected time to
/// drain the queue.
fn add_model(state: &AppState, models: &[ModelStatus], queue: &QueueInfo, body: &mut Value) {
    if queue.vhost != "/" {
        return;
    }
    let Some(model) = models.iter().find(|model| model.queue == queue.name) else {
        return;
    };
    let backlog = backlog::of_queue(state, queue);
    body["model"] = json!({
        "name": model.name,
        "version": model.version,
        "service_rate": backlog.service_rate,
        "drain_seconds": backlog.drain_seconds,
    });
}

/// The queue, or 404 naming it.
pub fn find(state: &AppState, user: &Credentials, vhost: &str, name: &str) -> ApiResult<QueueInfo> {
    require_vhost(state, user, vhost)?;
    state
        .hub
        .read()
        .broker()
        .queue_info(vhost, name)
        .ok_or_else(|| ApiError::NotFound(format!("no queue '{name}' in vhost '{vhost}'")))
}

pub async fn show(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let queue = find(&state, &user, &vhost, &name)?;
    let (consumers, connections): (Vec<ConsumerInfo>, _) = {
        let hub = state.hub.read();
        (
            hub.broker().consumers_of(&vhost, &name),
            hub.connection_infos(),
        )
    };
    let mut body = queue_json(&state, &queue);
    add_model(&state, &state.models.models(), &queue, &mut body);
    body["consumer_details"] = Value::Array(
        consumers
            .iter()
            .map(|consumer| consumer_json(consumer, &connections))
            .collect(),
    );
    Ok(Json(body))
}

/// Other fields RabbitMQ's tools send (`node`) are ignored, as RabbitMQ
/// does.
#[derive(Debug, Deserialize)]
pub struct QueueSettings {
    #[serde(default = "durable_by_default", deserialize_with = "lenient::boolean")]
    durable: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    auto_delete: bool,
    #[serde(default)]
    arguments: Value,
}

/// RabbitMQ's management API declares durable queues unless told not to.
fn durable_by_default() -> bool {
    true
}

/// `PUT /api/queues/{vhost}/{name}`: 201 when created, 204 when an
/// equivalent queue existed, 400 when it exists with other settings.
pub async fn declare(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(settings): JsonBody<QueueSettings>,
) -> ApiResult<StatusCode> {
    require_vhost(&state, &user, &vhost)?;
    if name.is_empty() || name.len() > 255 {
        return Err(ApiError::BadRequest(
            "a queue name is 1 to 255 bytes".to_owned(),
        ));
    }
    let arguments = json_to_table(&settings.arguments, "arguments")?;
    let existed = state
        .hub
        .read()
        .broker()
        .queue_info(&vhost, &name)
        .is_some();
    let mut session = session::open(&state, &user, &vhost)?;
    let declare = queue::Declare {
        queue: name.as_str().into(),
        durable: settings.durable,
        auto_delete: settings.auto_delete,
        arguments,
        ..queue::Declare::default()
    };
    session::call(
        &mut session,
        AMQPClass::Queue(queue::AMQPMethod::Declare(declare)),
    )
    .await?;
    Ok(declared(existed))
}

/// `DELETE /api/queues/{vhost}/{name}` with RabbitMQ's `if-empty` and
/// `if-unused` conditions.
pub async fn delete(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let if_empty = flag(query.get("if-empty"))?;
    let if_unused = flag(query.get("if-unused"))?;
    find(&state, &user, &vhost, &name)?;
    let mut session = session::open(&state, &user, &vhost)?;
    let delete = queue::Delete {
        queue: name.as_str().into(),
        if_empty,
        if_unused,
        nowait: false,
    };
    session::call(
        &mut session,
        AMQPClass::Queue(queue::AMQPMethod::Delete(delete)),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/queues/{vhost}/{name}/contents`: purge.
pub async fn purge(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    find(&state, &user, &vhost, &name)?;
    let mut session = session::open(&state, &user, &vhost)?;
    let purge = queue::Purge {
        queue: name.as_str().into(),
        nowait: false,
    };
    session::call(
        &mut session,
        AMQPClass::Queue(queue::AMQPMethod::Purge(purge)),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
