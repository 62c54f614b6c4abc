//! `/api/connections`, `/api/channels`, `/api/consumers`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use warren_amqp::ConnectionInfo;
use warren_core::{ChannelInfo, ChannelMode, ConnectionId, ConsumerInfo};

use crate::api::require_vhost;
use crate::auth::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::json::table_to_json;
use crate::state::AppState;

fn connection_json(state: &AppState, info: &ConnectionInfo, channels: usize) -> Value {
    json!({
        "name": info.name(),
        "node": state.node.name,
        // RabbitMQ's words for its management plugin's own connections.
        "type": if info.direct { "direct" } else { "network" },
        "protocol": if info.direct { "Direct 0-9-1" } else { "AMQP 0-9-1" },
        "state": "running",
        "user": info.user,
        "vhost": info.vhost,
        "peer_host": info.peer.ip().to_string(),
        "peer_port": info.peer.port(),
        "host": info.local.ip().to_string(),
        "port": info.local.port(),
        "channels": channels,
        "channel_max": info.channel_max,
        "frame_max": info.frame_max_bytes,
        "timeout": info.heartbeat_s,
        "connected_at": info.connected_at_ms,
        "client_properties": table_to_json(&info.client_properties),
    })
}

pub async fn list(State(state): State<AppState>, user: Credentials) -> Json<Value> {
    let connections: Vec<(ConnectionInfo, usize)> = {
        let hub = state.hub.read();
        hub.connection_infos()
            .into_iter()
            .filter(|info| user.sees_connection_of(&info.user))
            .map(|info| {
                let channels = hub.broker().channel_count(info.id);
                (info, channels)
            })
            .collect()
    };
    Json(Value::Array(
        connections
            .iter()
            .map(|(info, channels)| connection_json(&state, info, *channels))
            .collect(),
    ))
}

/// The connection, or 404; a connection the user may not see is not found.
fn find(state: &AppState, user: &Credentials, name: &str) -> ApiResult<(ConnectionInfo, usize)> {
    let hub = state.hub.read();
    hub.connection_infos()
        .into_iter()
        .find(|info| info.name() == name && user.sees_connection_of(&info.user))
        .map(|info| {
            let channels = hub.broker().channel_count(info.id);
            (info, channels)
        })
        .ok_or_else(|| ApiError::NotFound(format!("no connection '{name}'")))
}

pub async fn show(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let (info, channels) = find(&state, &user, &name)?;
    Ok(Json(connection_json(&state, &info, channels)))
}

/// Closes the connection with 320 CONNECTION_FORCED, as RabbitMQ does.
pub async fn close(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let (info, _) = find(&state, &user, &name)?;
    let reason = format!("Closed via management API by user '{}'", user.user);
    if state.hub.read().close_connection(info.id, &reason) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no connection '{name}'")))
    }
}

fn channel_name(connection: &ConnectionInfo, number: u16) -> String {
    format!("{} ({number})", connection.name())
}

fn connection_of(connections: &[ConnectionInfo], id: ConnectionId) -> Option<&ConnectionInfo> {
    connections.iter().find(|info| info.id == id)
}

fn channel_json(channel: &ChannelInfo, connection: &ConnectionInfo) -> Value {
    json!({
        "name": channel_name(connection, channel.number),
        "number": channel.number,
        "connection_details": {
            "name": connection.name(),
            "peer_host": connection.peer.ip().to_string(),
            "peer_port": connection.peer.port(),
        },
        "user": connection.user,
        "vhost": channel.vhost,
        "prefetch_count": channel.prefetch_count,
        "global_prefetch_count": channel.global_prefetch_count,
        "consumer_count": channel.consumers,
        "messages_unacknowledged": channel.unacked,
        "confirm": channel.mode == ChannelMode::Confirm,
        "transactional": channel.mode == ChannelMode::Transactional,
        "state": "running",
    })
}

pub async fn channels(State(state): State<AppState>, user: Credentials) -> Json<Value> {
    let (channels, connections) = {
        let hub = state.hub.read();
        (hub.broker().channel_infos(), hub.connection_infos())
    };
    Json(Value::Array(
        channels
            .iter()
            .filter_map(|channel| {
                connection_of(&connections, channel.connection)
                    .filter(|connection| user.sees_connection_of(&connection.user))
                    .map(|connection| channel_json(channel, connection))
            })
            .collect(),
    ))
}

pub fn consumer_json(consumer: &ConsumerInfo, connections: &[ConnectionInfo]) -> Value {
    let channel_details = match connection_of(connections, consumer.connection) {
        Some(connection) => json!({
            "name": channel_name(connection, consumer.channel),
            "number": consumer.channel,
            "connection_name": connection.name(),
            "peer_host": connection.peer.ip().to_string(),
            "peer_port": connection.peer.port(),
            "user": connection.user,
        }),
        None => json!({"number": consumer.channel}),
    };
    json!({
        "consumer_tag": consumer.tag,
        "queue": {"name": consumer.queue, "vhost": consumer.vhost},
        "channel_details": channel_details,
        "ack_required": consumer.ack_required,
        "exclusive": consumer.exclusive,
        "prefetch_count": consumer.prefetch_count,
        "priority": consumer.priority,
        "active": consumer.active,
        "activity_status": if consumer.active { "up" } else { "waiting" },
        "arguments": {},
    })
}

/// `GET /api/consumers` and `/api/consumers/{vhost}`.
pub async fn consumers(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    if let Some(vhost) = &vhost {
        require_vhost(&state, &user, vhost)?;
    }
    let (consumers, connections) = {
        let hub = state.hub.read();
        (
            hub.broker().consumer_infos(vhost.as_deref()),
            hub.connection_infos(),
        )
    };
    Ok(Json(Value::Array(
        consumers
            .iter()
            .filter(|consumer| user.sees_vhost(&state, &consumer.vhost))
            .map(|consumer| consumer_json(consumer, &connections))
            .collect(),
    )))
}
