//! The management API, shaped like RabbitMQ's: one module per resource.

pub mod access;
pub mod bindings;
pub mod connections;
pub mod consume;
pub mod definitions;
pub mod exchanges;
pub mod health;
pub mod listing;
pub mod messages;
pub mod models;
pub mod nodes;
pub mod overview;
pub mod parameters;
pub mod policies;
pub mod queues;

use serde_json::{Value, json};
use warren_core::MessageCounts;

use crate::auth::Credentials;
use crate::error::ApiError;
use crate::rates::MessageRates;
use crate::state::AppState;

/// RabbitMQ's `message_stats` object: counts and their rates.
pub fn message_stats(counts: &MessageCounts, rates: &MessageRates) -> Value {
    let with_rate = |count: u64, rate: f64| (json!(count), json!({ "rate": rate }));
    let (publish, publish_details) = with_rate(counts.published, rates.published);
    let (deliver, deliver_details) = with_rate(counts.delivered, rates.delivered);
    let (get, get_details) = with_rate(counts.got, rates.got);
    let (deliver_get, deliver_get_details) =
        with_rate(counts.delivered + counts.got, rates.delivered + rates.got);
    let (ack, ack_details) = with_rate(counts.acked, rates.acked);
    let (redeliver, redeliver_details) = with_rate(counts.redelivered, rates.redelivered);
    json!({
        "publish": publish, "publish_details": publish_details,
        "deliver": deliver, "deliver_details": deliver_details,
        "get": get, "get_details": get_details,
        "deliver_get": deliver_get, "deliver_get_details": deliver_get_details,
        "ack": ack, "ack_details": ack_details,
        "redeliver": redeliver, "redeliver_details": redeliver_details,
    })
}

/// 404 unless the vhost exists; 401 unless the user may see it.
pub fn require_vhost(state: &AppState, user: &Credentials, vhost: &str) -> Result<(), ApiError> {
    if !state.access().vhost_exists(vhost) {
        return Err(ApiError::NotFound(format!("no vhost '{vhost}'")));
    }
    if !user.sees_vhost(state, vhost) {
        return Err(ApiError::Unauthorized(format!(
            "access to vhost '{vhost}' refused for user '{}'",
            user.user
        )));
    }
    Ok(())
}

/// The default exchange is `amq.default` in paths and "" to AMQP.
pub fn exchange_from_path(name: &str) -> &str {
    if name == "amq.default" { "" } else { name }
}

/// RabbitMQ's answer to a PUT that declares: 201 when it created the
/// object, 204 when an equivalent one was there.
pub fn declared(existed: bool) -> axum::http::StatusCode {
    if existed {
        axum::http::StatusCode::NO_CONTENT
    } else {
        axum::http::StatusCode::CREATED
    }
}

/// A boolean query flag such as `if-empty=true`.
pub fn flag(value: Option<&String>) -> Result<bool, ApiError> {
    match value.map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "expected true or false, got '{other}'"
        ))),
    }
}
