//! `/api/overview`, `/api/whoami`, `/api/vhosts`, and the memory high
//! watermark (`/api/vm-memory-high-watermark`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_amqp::alarms::MemoryWatermark;

use crate::api::{message_stats, require_vhost};
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub async fn overview(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    let totals = state.hub.read().broker().totals();
    let rates = state.rates.broker();
    let mut stats = message_stats(&totals.counts, &rates);
    stats["return_unroutable"] = json!(totals.counts.unroutable);
    stats["return_unroutable_details"] = json!({"rate": rates.unroutable});
    stats["confirm"] = json!(state.hub.confirmed());
    stats["confirm_details"] = json!({"rate": rates.confirmed});
    let node = &state.node;
    Json(json!({
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "management_version": env!("CARGO_PKG_VERSION"),
        "rabbitmq_version": warren_amqp::RABBITMQ_COMPATIBLE_VERSION,
        "node": node.name,
        "cluster_name": node.cluster_name(),
        "rates_mode": "basic",
        "object_totals": {
            "connections": totals.connections,
            "channels": totals.channels,
            "exchanges": totals.exchanges,
            "queues": totals.queues,
            "consumers": totals.consumers,
        },
        "queue_totals": {
            "messages": totals.ready + totals.unacked,
            "messages_ready": totals.ready,
            "messages_unacknowledged": totals.unacked,
        },
        "message_stats": stats,
        // As RabbitMQ's /api/nodes names them.
        "mem_used": state.hub.memory().used_bytes(),
        "mem_limit": state.hub.memory().limit_bytes(),
        "mem_alarm": state.hub.alarms().memory,
        "disk_free_alarm": state.hub.alarms().disk,
        "listeners": [
            {"protocol": "amqp", "node": node.name,
             "ip_address": node.amqp_address.ip().to_string(), "port": node.amqp_address.port()},
            {"protocol": "http", "node": node.name,
             "ip_address": node.http_address.ip().to_string(), "port": node.http_address.port()},
        ],
    }))
}

pub async fn whoami(user: Credentials) -> Json<Value> {
    let tags: Vec<&str> = user.tags.iter().collect();
    Json(json!({"name": user.user, "tags": tags}))
}

/// The vhosts this user may see.
pub async fn vhosts(State(state): State<AppState>, user: Credentials) -> Json<Value> {
    let names = state.access().vhosts();
    Json(Value::Array(
        names
            .iter()
            .filter(|name| user.sees_vhost(&state, name))
            .map(|name| vhost_json(&state, name))
            .collect(),
    ))
}

pub async fn vhost(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    require_vhost(&state, &user, &name)?;
    Ok(Json(vhost_json(&state, &name)))
}

fn vhost_json(state: &AppState, name: &str) -> Value {
    let queues = state.hub.read().broker().queue_infos(Some(name));
    let ready: usize = queues.iter().map(|queue| queue.ready).sum();
    let unacked: usize = queues.iter().map(|queue| queue.unacked).sum();
    json!({
        "name": name,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
    })
}

/// The memory high watermark, as a fraction or in bytes, with the limit it
/// makes, the memory in use and whether the alarm is raised.
pub async fn memory_watermark(
    State(state): State<AppState>,
    user: Credentials,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let memory = state.hub.memory();
    let mut answer = match memory.watermark() {
        MemoryWatermark::Relative(fraction) => json!({"relative": fraction}),
        MemoryWatermark::Absolute(bytes) => json!({"absolute": bytes}),
    };
    answer["limit"] = json!(memory.limit_bytes());
    answer["used"] = json!(memory.used_bytes());
    answer["alarm"] = json!(state.hub.alarms().memory);
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutWatermark {
    relative: Option<f64>,
    absolute: Option<u64>,
}

/// Changes the watermark while the broker runs, as `rabbitmqctl
/// set_vm_memory_high_watermark` does; it is not kept across a restart
/// (the configuration file's value is).
pub async fn put_memory_watermark(
    State(state): State<AppState>,
    user: Credentials,
    JsonBody(body): JsonBody<PutWatermark>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let watermark = match (body.relative, body.absolute) {
        (Some(fraction), None) => MemoryWatermark::Relative(fraction),
        (None, Some(bytes)) => MemoryWatermark::Absolute(bytes),
        _ => {
            return Err(ApiError::BadRequest(
                "give either \"relative\" (a fraction of memory) or \"absolute\" (bytes)"
                    .to_owned(),
            ));
        }
    };
    state
        .hub
        .memory()
        .set_watermark(watermark)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
