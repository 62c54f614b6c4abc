//! `/api/nodes`, `/api/extensions` and `/api/cluster-name`: the node as
//! RabbitMQ's management API describes one, with the fields operators
//! graph and alert on (memory, file descriptors, disk, uptime, alarms).
//! Warren is one node, so the list has one entry.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The longest cluster name, as for any short string in AMQP.
pub const CLUSTER_NAME_BYTES_MAX: usize = 255;

/// What `/proc` says of this process; None where it cannot be read (a
/// field is then left out rather than made up).
struct ProcessFacts {
    fd_used: Option<u64>,
    fd_total: Option<u64>,
    threads: Option<u64>,
    threads_max: Option<u64>,
}

impl ProcessFacts {
    fn read() -> Self {
        let fd_used = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as u64);
        // "Max open files            1024                 1048576              files"
        let fd_total = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                limits
                    .lines()
                    .find_map(|line| line.strip_prefix("Max open files"))
                    .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            });
        let threads = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Threads:"))
                    .and_then(|count| count.trim().parse().ok())
            });
        let threads_max = std::fs::read_to_string("/proc/sys/kernel/threads-max")
            .ok()
            .and_then(|text| text.trim().parse().ok());
        Self {
            fd_used,
            fd_total,
            threads,
            threads_max,
        }
    }
}

/// Open file descriptors and their limit, for the node and the metrics.
pub fn file_descriptors() -> (Option<u64>, Option<u64>) {
    let facts = ProcessFacts::read();
    (facts.fd_used, facts.fd_total)
}

fn exchange_types() -> Value {
    let described = |name: &str, description: &str| json!({"name": name, "description": description, "enabled": true});
    json!([
        described(
            "direct",
            "AMQP direct exchange, as per the AMQP specification"
        ),
        described(
            "fanout",
            "AMQP fanout exchange, as per the AMQP specification"
        ),
        described(
            "headers",
            "AMQP headers exchange, as per the AMQP specification"
        ),
        described(
            "topic",
            "AMQP topic exchange, as per the AMQP specification"
        ),
    ])
}

/// One node's description.
pub fn node_json(state: &AppState) -> Value {
    let node = &state.node;
    let facts = ProcessFacts::read();
    let alarms = state.hub.alarms();
    let memory = state.hub.memory();
    let (disk_free, connections) = {
        let hub = state.hub.read();
        let disk_free = hub
            .broker()
            .message_log()
            .and_then(|log| log.available_bytes().ok());
        (disk_free, hub.broker().totals().connections)
    };
    let processors = std::thread::available_parallelism().map_or(1, usize::from);
    let listeners: Vec<Value> = node
        .listeners()
        .into_iter()
        .map(|(protocol, address)| {
            json!({"protocol": protocol, "port": address.port(),
                   "ip_address": address.ip().to_string()})
        })
        .collect();
    let mut answer = json!({
        "name": node.name,
        "type": "disc",
        "running": true,
        "being_drained": false,
        "os_pid": std::process::id().to_string(),
        "uptime": node.started.elapsed().as_millis() as u64,
        "processors": processors,
        "rates_mode": "basic",
        "mem_used": memory.used_bytes(),
        "mem_limit": memory.limit_bytes(),
        "mem_alarm": alarms.memory,
        "mem_calculation_strategy": "rss",
        "disk_free_limit": node.disk_free_limit_bytes,
        "disk_free_alarm": alarms.disk,
        // Each AMQP connection holds one socket.
        "sockets_used": connections,
        "partitions": [],
        "exchange_types": exchange_types(),
        "auth_mechanisms": [
            {"name": "PLAIN", "description": "SASL PLAIN authentication mechanism", "enabled": true},
            {"name": "AMQPLAIN", "description": "QPid AMQPLAIN mechanism", "enabled": true},
            {"name": "EXTERNAL", "description": "TLS client certificate", "enabled": node.amqps_address.is_some()},
        ],
        "listeners": listeners,
        "db_dir": node.data_dir.as_ref().map(|dir| dir.display().to_string()),
        "enabled_plugins": [],
        "applications": [{"name": "warren", "description": "Warren", "version": env!("CARGO_PKG_VERSION")}],
    });
    let optional = [
        ("disk_free", disk_free),
        ("fd_used", facts.fd_used),
        ("fd_total", facts.fd_total),
        // A socket takes a file descriptor, so there can be no more of
        // them than descriptors.
        ("sockets_total", facts.fd_total),
        // RabbitMQ's Erlang processes; Warren's threads are the nearest
        // thing, bounded by the kernel's limit.
        ("proc_used", facts.threads),
        ("proc_total", facts.threads_max),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            answer[key] = json!(value);
        }
    }
    answer
}

/// `GET /api/nodes`.
pub async fn list(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    Json(json!([node_json(&state)]))
}

/// `GET /api/nodes/{name}`: 404 for a node other than this one.
pub async fn show(
    State(state): State<AppState>,
    _user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    if name != state.node.name {
        return Err(ApiError::NotFound(format!("no node '{name}'")));
    }
    Ok(Json(node_json(&state)))
}

/// `GET /api/extensions`: the management UI's plugins; Warren has none.
pub async fn extensions(_user: Credentials) -> Json<Value> {
    Json(json!([]))
}

/// `GET /api/cluster-name`.
pub async fn cluster_name(State(state): State<AppState>, _user: Credentials) -> Json<Value> {
    Json(json!({"name": state.node.cluster_name()}))
}

#[derive(Debug, Deserialize)]
pub struct ClusterName {
    name: String,
}

/// `PUT /api/cluster-name` (administrators): kept across restarts.
pub async fn set_cluster_name(
    State(state): State<AppState>,
    user: Credentials,
    JsonBody(body): JsonBody<ClusterName>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    if body.name.is_empty() || body.name.len() > CLUSTER_NAME_BYTES_MAX {
        return Err(ApiError::BadRequest(format!(
            "a cluster name is 1 to {CLUSTER_NAME_BYTES_MAX} bytes"
        )));
    }
    state
        .node
        .set_cluster_name(&body.name)
        .map_err(|error| ApiError::Internal(format!("keeping the cluster name failed: {error}")))?;
    Ok(StatusCode::NO_CONTENT)
}
