//! `/api/exchanges`: listing, declaring and deleting exchanges.

use std::collections::HashMap;

use amq_protocol::protocol::{AMQPClass, exchange};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_core::ExchangeInfo;

use crate::api::{declared, exchange_from_path, flag, require_vhost};
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::json::{json_to_table, table_to_json};
use crate::lenient;
use crate::session;
use crate::state::AppState;

fn exchange_json(state: &AppState, exchange: &ExchangeInfo) -> Value {
    let (rate_in, rate_out) = state.rates.exchange(&exchange.vhost, &exchange.name);
    let mut body = json!({
        "name": exchange.name,
        "vhost": exchange.vhost,
        "type": exchange.kind,
        "durable": exchange.durable,
        "auto_delete": exchange.auto_delete,
        "internal": exchange.internal,
        "arguments": table_to_json(&exchange.arguments),
        "message_stats": {
            "publish_in": exchange.counts.published_in,
            "publish_in_details": {"rate": rate_in},
            "publish_out": exchange.counts.published_out,
            "publish_out_details": {"rate": rate_out},
        },
    });
    // RabbitMQ shows the key only on an exchange a policy applies to.
    if let Some(policy) = &exchange.policy.policy {
        body["policy"] = json!(policy);
    }
    if let Some(policy) = &exchange.policy.operator_policy {
        body["operator_policy"] = json!(policy);
    }
    body
}

/// `GET /api/exchanges` and `/api/exchanges/{vhost}`.
pub async fn list(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    if let Some(vhost) = &vhost {
        require_vhost(&state, &user, vhost)?;
    }
    let items = state.hub.read().broker().exchange_infos(vhost.as_deref());
    Ok(Json(Value::Array(
        items
            .iter()
            .filter(|item| user.sees_vhost(&state, &item.vhost))
            .map(|item| exchange_json(&state, item))
            .collect(),
    )))
}

/// The exchange named in a path (`amq.default` is ""), or 404.
pub fn find(
    state: &AppState,
    user: &Credentials,
    vhost: &str,
    name: &str,
) -> ApiResult<ExchangeInfo> {
    require_vhost(state, user, vhost)?;
    let name = exchange_from_path(name);
    state
        .hub
        .read()
        .broker()
        .exchange_infos(Some(vhost))
        .into_iter()
        .find(|exchange| exchange.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no exchange '{name}' in vhost '{vhost}'")))
}

pub async fn show(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(exchange_json(
        &state,
        &find(&state, &user, &vhost, &name)?,
    )))
}

#[derive(Debug, Deserialize)]
pub struct ExchangeSettings {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default = "durable_by_default", deserialize_with = "lenient::boolean")]
    durable: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    auto_delete: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    internal: bool,
    #[serde(default)]
    arguments: Value,
}

fn durable_by_default() -> bool {
    true
}

/// `PUT /api/exchanges/{vhost}/{name}`: 201 when created, 204 when an
/// equivalent exchange existed.
pub async fn declare(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(settings): JsonBody<ExchangeSettings>,
) -> ApiResult<StatusCode> {
    require_vhost(&state, &user, &vhost)?;
    let kind = settings
        .kind
        .ok_or_else(|| ApiError::BadRequest("the exchange's \"type\" is required".to_owned()))?;
    if !matches!(kind.as_str(), "direct" | "fanout" | "topic" | "headers") {
        return Err(ApiError::BadRequest(format!(
            "unknown exchange type '{kind}' (direct, fanout, topic or headers)"
        )));
    }
    if name == "amq.default" || name.is_empty() {
        return Err(ApiError::Forbidden(
            "operation not permitted on the default exchange".to_owned(),
        ));
    }
    let arguments = json_to_table(&settings.arguments, "arguments")?;
    let existed = find(&state, &user, &vhost, &name).is_ok();
    let mut session = session::open(&state, &user, &vhost)?;
    let declare = exchange::Declare {
        exchange: name.as_str().into(),
        kind: kind.as_str().into(),
        durable: settings.durable,
        auto_delete: settings.auto_delete,
        internal: settings.internal,
        arguments,
        ..exchange::Declare::default()
    };
    session::call(
        &mut session,
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)),
    )
    .await?;
    Ok(declared(existed))
}

pub async fn delete(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    let if_unused = flag(query.get("if-unused"))?;
    let exchange = find(&state, &user, &vhost, &name)?;
    if exchange.name.is_empty() || exchange.name.starts_with("amq.") {
        return Err(ApiError::Forbidden(format!(
            "cannot delete the built-in exchange '{}'",
            if exchange.name.is_empty() {
                "amq.default"
            } else {
                &exchange.name
            }
        )));
    }
    let mut session = session::open(&state, &user, &vhost)?;
    let delete = exchange::Delete {
        exchange: exchange.name.as_str().into(),
        if_unused,
        nowait: false,
    };
    session::call(
        &mut session,
        AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
