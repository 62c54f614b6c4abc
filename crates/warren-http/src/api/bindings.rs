//! `/api/bindings` and the binding lists of queues and exchanges.

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use warren_core::{BindingInfo, DestinationKind};

use crate::api::{exchange_from_path, exchanges, queues, require_vhost};
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::json::table_to_json;
use crate::session;
use crate::state::AppState;

/// RabbitMQ's `properties_key`, which names a binding in a path: the
/// routing key, form-encoded ("~" when empty), or that, "~" and a hash of
/// the arguments when it has some. Encoded as RabbitMQ encodes it, a key
/// such as `rk.#` is `rk.%23`, which tools percent-encode once more in
/// the path (`rk.%2523`).
pub fn properties_key(binding: &BindingInfo) -> String {
    let routing_key = form_encode(&binding.routing_key);
    if binding.arguments.inner().is_empty() {
        if routing_key.is_empty() {
            "~".to_owned()
        } else {
            routing_key
        }
    } else {
        let arguments = table_to_json(&binding.arguments).to_string();
        // FNV-1a: stable across runs and platforms, which a path needs.
        let hash = arguments
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
                (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
            });
        format!("{routing_key}~{hash:016x}")
    }
}

/// `application/x-www-form-urlencoded` encoding: letters, digits and
/// `~_.-` as they are, a space as `+`, any other byte as `%XX`.
fn form_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b' ' => encoded.push('+'),
            _ if byte.is_ascii_alphanumeric() || matches!(byte, b'~' | b'_' | b'.' | b'-') => {
                encoded.push(byte as char)
            }
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

fn binding_json(binding: &BindingInfo) -> Value {
    json!({
        "source": binding.source,
        "vhost": binding.vhost,
        "destination": binding.destination,
        "destination_type": match binding.destination_kind {
            DestinationKind::Queue => "queue",
            DestinationKind::Exchange => "exchange",
        },
        "routing_key": binding.routing_key,
        "arguments": table_to_json(&binding.arguments),
        "properties_key": properties_key(binding),
    })
}

fn bindings_where(
    state: &AppState,
    user: &Credentials,
    vhost: Option<&str>,
    keep: impl Fn(&BindingInfo) -> bool,
) -> Json<Value> {
    let bindings = state.hub.read().broker().binding_infos(vhost);
    Json(Value::Array(
        bindings
            .iter()
            .filter(|binding| user.sees_vhost(state, &binding.vhost) && keep(binding))
            .map(binding_json)
            .collect(),
    ))
}

/// `GET /api/bindings` and `/api/bindings/{vhost}`.
pub async fn list(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    if let Some(vhost) = &vhost {
        require_vhost(&state, &user, vhost)?;
    }
    Ok(bindings_where(&state, &user, vhost.as_deref(), |_| true))
}

pub async fn of_queue(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    queues::find(&state, &user, &vhost, &name)?;
    Ok(bindings_where(&state, &user, Some(&vhost), |binding| {
        binding.destination_kind == DestinationKind::Queue && binding.destination == name
    }))
}

pub async fn from_exchange(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let exchange = exchanges::find(&state, &user, &vhost, &name)?;
    Ok(bindings_where(&state, &user, Some(&vhost), |binding| {
        binding.source == exchange.name
    }))
}

pub async fn to_exchange(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let exchange = exchanges::find(&state, &user, &vhost, &name)?;
    Ok(bindings_where(&state, &user, Some(&vhost), |binding| {
        binding.destination_kind == DestinationKind::Exchange
            && binding.destination == exchange.name
    }))
}

/// `q` or `e` in a binding path.
fn destination_kind(segment: &str) -> ApiResult<DestinationKind> {
    match segment {
        "q" => Ok(DestinationKind::Queue),
        "e" => Ok(DestinationKind::Exchange),
        other => Err(ApiError::NotFound(format!(
            "a binding's destination is 'q' (queue) or 'e' (exchange), not '{other}'"
        ))),
    }
}

/// Checks that both ends exist (404 otherwise).
fn check_ends(
    state: &AppState,
    user: &Credentials,
    vhost: &str,
    source: &str,
    kind: DestinationKind,
    destination: &str,
) -> ApiResult<()> {
    exchanges::find(state, user, vhost, source)?;
    match kind {
        DestinationKind::Queue => queues::find(state, user, vhost, destination).map(|_| ()),
        DestinationKind::Exchange => exchanges::find(state, user, vhost, destination).map(|_| ()),
    }
}

fn between(
    state: &AppState,
    vhost: &str,
    source: &str,
    kind: DestinationKind,
    destination: &str,
) -> Vec<BindingInfo> {
    let source = exchange_from_path(source);
    state
        .hub
        .read()
        .broker()
        .binding_infos(Some(vhost))
        .into_iter()
        .filter(|binding| {
            binding.source == source
                && binding.destination_kind == kind
                && binding.destination == destination
        })
        .collect()
}

pub async fn list_between(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = destination_kind(&kind)?;
    check_ends(&state, &user, &vhost, &source, kind, &destination)?;
    Ok(Json(Value::Array(
        between(&state, &vhost, &source, kind, &destination)
            .iter()
            .map(binding_json)
            .collect(),
    )))
}

#[derive(Debug, Deserialize)]
pub struct NewBinding {
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Value,
}

/// `POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`: 201 with
/// the new binding's path in `Location`.
pub async fn create(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, source, kind, destination)): Path<(String, String, String, String)>,
    JsonBody(binding): JsonBody<NewBinding>,
) -> ApiResult<(StatusCode, HeaderMap)> {
    let kind = destination_kind(&kind)?;
    check_ends(&state, &user, &vhost, &source, kind, &destination)?;
    let source_name = exchange_from_path(&source);
    if source_name.is_empty() {
        return Err(ApiError::Forbidden(
            "operation not permitted on the default exchange".to_owned(),
        ));
    }
    let arguments = crate::json::json_to_table(&binding.arguments, "arguments")?;
    let mut session = session::open(&state, &user, &vhost)?;
    let bind = match kind {
        DestinationKind::Queue => AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: destination.as_str().into(),
            exchange: source_name.into(),
            routing_key: binding.routing_key.as_str().into(),
            nowait: false,
            arguments: arguments.clone(),
        })),
        DestinationKind::Exchange => {
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: destination.as_str().into(),
                source: source_name.into(),
                routing_key: binding.routing_key.as_str().into(),
                nowait: false,
                arguments: arguments.clone(),
            }))
        }
    };
    session::call(&mut session, bind).await?;
    let key = properties_key(&BindingInfo {
        vhost: vhost.clone(),
        source: source_name.to_owned(),
        destination: destination.clone(),
        destination_kind: kind,
        routing_key: binding.routing_key,
        arguments,
    });
    let location = format!(
        "/api/bindings/{}/e/{}/{}/{}/{}",
        encode(&vhost),
        encode(&source),
        if kind == DestinationKind::Queue {
            "q"
        } else {
            "e"
        },
        encode(&destination),
        encode(&key)
    );
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, value);
    }
    Ok((StatusCode::CREATED, headers))
}

fn find_binding(
    state: &AppState,
    user: &Credentials,
    vhost: &str,
    source: &str,
    kind: DestinationKind,
    destination: &str,
    key: &str,
) -> ApiResult<BindingInfo> {
    check_ends(state, user, vhost, source, kind, destination)?;
    between(state, vhost, source, kind, destination)
        .into_iter()
        .find(|binding| properties_key(binding) == key)
        .ok_or_else(|| ApiError::NotFound(format!("no binding with properties key '{key}'")))
}

pub async fn show(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, source, kind, destination, key)): Path<(String, String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    let kind = destination_kind(&kind)?;
    let binding = find_binding(&state, &user, &vhost, &source, kind, &destination, &key)?;
    Ok(Json(binding_json(&binding)))
}

pub async fn delete(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, source, kind, destination, key)): Path<(String, String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let kind = destination_kind(&kind)?;
    let binding = find_binding(&state, &user, &vhost, &source, kind, &destination, &key)?;
    if binding.source.is_empty() {
        return Err(ApiError::Forbidden(
            "the default exchange's bindings cannot be removed".to_owned(),
        ));
    }
    let mut session = session::open(&state, &user, &vhost)?;
    let unbind = match kind {
        DestinationKind::Queue => AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
            queue: binding.destination.as_str().into(),
            exchange: binding.source.as_str().into(),
            routing_key: binding.routing_key.as_str().into(),
            arguments: binding.arguments.clone(),
        })),
        DestinationKind::Exchange => {
            AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: binding.destination.as_str().into(),
                source: binding.source.as_str().into(),
                routing_key: binding.routing_key.as_str().into(),
                nowait: false,
                arguments: binding.arguments.clone(),
            }))
        }
    };
    session::call(&mut session, unbind).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Percent-encodes a path segment (every byte outside RFC 3986's
/// unreserved set).
pub fn encode(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
