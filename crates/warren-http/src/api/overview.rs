//! `/api/overview`, `/api/whoami`, `/api/vhosts`.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use crate::api::{message_stats, require_vhost};
use crate::auth::Credentials;
use crate::error::ApiResult;
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
        "cluster_name": node.name,
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
