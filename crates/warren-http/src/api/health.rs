//! RabbitMQ's health checks (`/api/health/checks/...`) and the aliveness
//! test, which Kubernetes probes and load balancers call: 200 with
//! `{"status": "ok"}` when the check passes, 503 with `"status":
//! "failed"` and a reason when it does not.

use amq_protocol::protocol::{AMQPClass, BasicProperties, queue};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::api::messages::take;
use crate::api::require_vhost;
use crate::auth::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::session;
use crate::state::AppState;

type Check = (StatusCode, Json<Value>);

fn passed(mut body: Value) -> Check {
    body["status"] = json!("ok");
    (StatusCode::OK, Json(body))
}

fn failed(reason: &str, mut body: Value) -> Check {
    body["status"] = json!("failed");
    body["reason"] = json!(reason);
    (StatusCode::SERVICE_UNAVAILABLE, Json(body))
}

/// The resource alarms in effect, as RabbitMQ lists them.
fn alarms_in_effect(state: &AppState) -> Vec<Value> {
    let alarms = state.hub.alarms();
    [("memory", alarms.memory), ("disk", alarms.disk)]
        .into_iter()
        .filter(|(_, raised)| *raised)
        .map(|(resource, _)| json!({"node": state.node.name, "resource": resource}))
        .collect()
}

/// `GET /api/health/checks/alarms`.
pub async fn alarms(State(state): State<AppState>, _user: Credentials) -> Check {
    alarm_check(&state, "There are alarms in effect in the cluster")
}

/// `GET /api/health/checks/local-alarms`: the same alarms, this node's
/// being the cluster's.
pub async fn local_alarms(State(state): State<AppState>, _user: Credentials) -> Check {
    alarm_check(&state, "There are alarms in effect on the node")
}

fn alarm_check(state: &AppState, reason: &str) -> Check {
    let alarms = alarms_in_effect(state);
    if alarms.is_empty() {
        passed(json!({}))
    } else {
        failed(reason, json!({"alarms": alarms}))
    }
}

/// `GET /api/health/checks/port-listener/{port}`.
pub async fn port_listener(
    State(state): State<AppState>,
    _user: Credentials,
    Path(port): Path<String>,
) -> ApiResult<Check> {
    let port: u64 = port
        .parse()
        .map_err(|_| ApiError::BadRequest("Invalid port".to_owned()))?;
    let ports: Vec<u16> = state
        .node
        .listeners()
        .iter()
        .map(|(_, address)| address.port())
        .collect();
    Ok(
        if ports.iter().any(|listening| u64::from(*listening) == port) {
            passed(json!({"port": port}))
        } else {
            failed(
                "No active listener",
                json!({"missing": port, "ports": ports}),
            )
        },
    )
}

/// RabbitMQ's lengths of the units `certificate-expiration` takes, in
/// seconds (a month is a twelfth of a year).
fn unit_seconds(unit: &str) -> Option<f64> {
    const DAY: f64 = 86_400.0;
    match unit.to_ascii_lowercase().as_str() {
        "days" => Some(DAY),
        "weeks" => Some(7.0 * DAY),
        "months" => Some(365.0 / 12.0 * DAY),
        "years" => Some(365.0 * DAY),
        _ => None,
    }
}

/// `GET /api/health/checks/certificate-expiration/{within}/{unit}`: fails
/// when a certificate of a TLS listener (its own, or its CA file's)
/// expires within that time, is not valid yet, or cannot be read, with
/// RabbitMQ's body naming each such listener.
pub async fn certificate_expiration(
    State(state): State<AppState>,
    _user: Credentials,
    Path((within, unit)): Path<(String, String)>,
) -> ApiResult<Check> {
    let within: i64 = within
        .parse()
        .map_err(|_| ApiError::BadRequest("Invalid expiration value.".to_owned()))?;
    let unit = unit_seconds(&unit).ok_or_else(|| {
        ApiError::BadRequest(
            "Time unit not recognised. Supported units: days, weeks, months, years.".to_owned(),
        )
    })?;
    let Some(files) = &state.node.tls_files else {
        return Ok(passed(json!({})));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let deadline = now.saturating_add((within as f64 * unit) as i64);
    let expiring = |path: Option<&std::path::Path>| -> Value {
        let Some(path) = path else {
            return json!([]);
        };
        match warren_amqp::tls::certificate_expiries(path) {
            Err(reason) => json!({"error": reason}),
            Ok(expiries) => Value::Array(
                expiries
                    .iter()
                    .filter(|expiry| expiry.not_yet_valid || expiry.not_after_unix < deadline)
                    .map(|expiry| {
                        if expiry.not_yet_valid {
                            json!({"error": "Certificate is not yet valid"})
                        } else {
                            json!(expiry.not_after)
                        }
                    })
                    .collect(),
            ),
        }
    };
    let certfile = expiring(Some(&files.cert_file));
    let cacertfile = expiring(files.ca_file.as_deref());
    let is_empty = |value: &Value| value.as_array().is_some_and(Vec::is_empty);
    if is_empty(&certfile) && is_empty(&cacertfile) {
        return Ok(passed(json!({})));
    }
    let mut tls_listeners: Vec<(&str, std::net::SocketAddr)> = Vec::new();
    if let Some(address) = state.node.amqps_address {
        tls_listeners.push(("amqp/ssl", address));
    }
    if state.config.tls.is_some() {
        tls_listeners.push(("https", state.node.http_address));
    }
    let expired: Vec<Value> = tls_listeners
        .iter()
        .map(|(protocol, address)| {
            json!({
                "node": state.node.name,
                "protocol": protocol,
                "interface": address.ip().to_string(),
                "port": address.port(),
                "certfile": files.cert_file.display().to_string(),
                "cacertfile": files.ca_file.as_ref().map(|path| path.display().to_string()),
                "certfile_expires_on": certfile,
                "cacertfile_expires_on": cacertfile,
            })
        })
        .collect();
    Ok(failed("Certificates expiring", json!({"expired": expired})))
}

/// `GET /api/health/checks/protocol-listener/{protocol}`; `amqp091` and
/// `amqp0-9-1` name AMQP too and are answered as `amqp`, as in RabbitMQ;
/// `https` is served when the HTTP listener is.
pub async fn protocol_listener(
    State(state): State<AppState>,
    _user: Credentials,
    Path(protocol): Path<String>,
) -> Check {
    let served: Vec<&str> = state
        .node
        .listeners()
        .iter()
        .map(|(protocol, _)| *protocol)
        .collect();
    let asked = match protocol.to_ascii_lowercase().as_str() {
        "amqp" | "amqp091" | "amqp0-9-1" | "amqp0.9.1" => "amqp",
        "amqps" | "amqp/ssl" => "amqp/ssl",
        "http" | "https" | "management" => "http",
        _ => "",
    };
    if served.contains(&asked) {
        passed(json!({"protocol": asked}))
    } else {
        failed(
            "No active listener",
            json!({"missing": protocol, "protocols": served}),
        )
    }
}

/// `GET /api/health/checks/virtual-hosts`: every vhost runs as long as
/// the broker does.
pub async fn virtual_hosts(_user: Credentials) -> Check {
    passed(json!({}))
}

/// `GET /api/health/checks/node-is-quorum-critical` (and the mirror-sync
/// check that RabbitMQ 3.x has): a single node is never the one whose
/// shutdown would take a quorum queue below its majority.
pub async fn not_critical(_user: Credentials) -> Check {
    passed(json!({"reason": "single node cluster"}))
}

/// The queue the aliveness test uses, as in RabbitMQ.
const ALIVENESS_QUEUE: &str = "aliveness-test";
const ALIVENESS_BODY: &[u8] = b"test_message";

/// `GET /api/aliveness-test/{vhost}`: declares `aliveness-test` in the
/// vhost, publishes a message to it and gets it back.
pub async fn aliveness(
    State(state): State<AppState>,
    user: Credentials,
    Path(vhost): Path<String>,
) -> ApiResult<Check> {
    require_vhost(&state, &user, &vhost)?;
    let mut session = session::open(&state, &user, &vhost)?;
    // Not durable, as RabbitMQ declares it; it stays for the next test.
    let declare = queue::Declare {
        queue: ALIVENESS_QUEUE.into(),
        durable: false,
        ..queue::Declare::default()
    };
    session::call(
        &mut session,
        AMQPClass::Queue(queue::AMQPMethod::Declare(declare)),
    )
    .await?;
    let routed = session::publish_confirmed(
        &mut session,
        "",
        ALIVENESS_QUEUE,
        Bytes::from_static(ALIVENESS_BODY),
        BasicProperties::default(),
    )
    .await?;
    if !routed {
        return Ok(failed("the test message was not routed", json!({})));
    }
    let got = take(&mut session, ALIVENESS_QUEUE, 1, true).await?;
    Ok(match got.first() {
        Some(message) if message.message.body[..] == *ALIVENESS_BODY => passed(json!({})),
        _ => failed("the test message did not come back", json!({})),
    })
}
