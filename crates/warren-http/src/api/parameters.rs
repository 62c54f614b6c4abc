//! `/api/vhost-limits` and `/api/parameters`, in RabbitMQ's shapes.
//!
//! Vhost limits (`max-connections`, `max-queues`) are Warren's to enforce.
//! Runtime parameters are how RabbitMQ's plugins (federation, shovels)
//! keep their settings; Warren has none of those plugins, so the listing
//! shows what RabbitMQ also lists there (operator policies and vhost
//! limits) and setting another component is refused as RabbitMQ refuses
//! one whose plugin is not enabled.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_access::{AccessError, VhostLimits};
use warren_amqp::AdminError;
use warren_core::policy::PolicyKind;

use crate::api::access::admin_error;
use crate::api::require_vhost;
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::json::table_to_json;
use crate::state::AppState;

/// RabbitMQ's runtime-parameter component and name for a vhost's limits.
pub const VHOST_LIMITS_COMPONENT: &str = "vhost-limits";
pub const VHOST_LIMITS_NAME: &str = "limits";

fn limits_value(limits: &VhostLimits) -> Value {
    Value::Object(
        limits
            .by_name()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), json!(value)))
            .collect(),
    )
}

/// The vhosts with limits, as `GET /api/vhost-limits` lists them.
fn vhost_limits_json(state: &AppState, user: &Credentials, vhost: Option<&str>) -> Vec<Value> {
    state
        .access()
        .all_vhost_limits()
        .iter()
        .filter(|(name, _)| vhost.is_none_or(|vhost| vhost == name.as_str()))
        .filter(|(name, _)| user.sees_vhost(state, name))
        .map(|(name, limits)| json!({"vhost": name, "value": limits_value(limits)}))
        .collect()
}

/// `GET /api/vhost-limits` and `/api/vhost-limits/{vhost}`.
pub async fn vhost_limits(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    if let Some(vhost) = &vhost {
        require_vhost(&state, &user, vhost)?;
    }
    Ok(Json(Value::Array(vhost_limits_json(
        &state,
        &user,
        vhost.as_deref(),
    ))))
}

#[derive(Debug, Deserialize)]
pub struct LimitBody {
    value: Value,
}

/// A limit's value: an integer, negative for none.
fn limit_value(name: &str, value: &Value) -> ApiResult<i64> {
    value.as_i64().ok_or_else(|| {
        ApiError::BadRequest(format!(
            "Validation failed\n\n{name} must be an integer, got {value}\n"
        ))
    })
}

fn limit_error(error: AdminError) -> ApiError {
    match error {
        AdminError::Access(AccessError::Limit(error)) => {
            ApiError::BadRequest(format!("Validation failed\n\n{error}\n"))
        }
        AdminError::Access(AccessError::VhostNotFound(_)) => {
            ApiError::NotFound("vhost_not_found".to_owned())
        }
        other => admin_error(other),
    }
}

/// `PUT /api/vhost-limits/{vhost}/{name}` with `{"value": N}`: 204, as
/// RabbitMQ answers even a new limit.
pub async fn put_vhost_limit(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<LimitBody>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let value = limit_value(&name, &body.value)?;
    state
        .admin
        .set_vhost_limit(&vhost, &name, value)
        .map_err(limit_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/vhost-limits/{vhost}/{name}`: 204, also when there was
/// no such limit, as in RabbitMQ.
pub async fn delete_vhost_limit(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    state
        .admin
        .set_vhost_limit(&vhost, &name, -1)
        .map_err(limit_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// The runtime parameters RabbitMQ would list: operator policies and
/// vhost limits.
pub fn parameters_json(state: &AppState, vhost: Option<&str>) -> Vec<Value> {
    let operator_policies = state
        .hub
        .read()
        .broker()
        .policies(PolicyKind::OperatorPolicy, vhost);
    let mut listed: Vec<Value> = operator_policies
        .iter()
        .map(|policy| {
            json!({
                "vhost": policy.vhost,
                "component": PolicyKind::OperatorPolicy.component(),
                "name": policy.name,
                "value": {
                    "pattern": policy.pattern,
                    "definition": table_to_json(&policy.definition),
                    "priority": policy.priority,
                    "apply-to": policy.apply_to.as_str(),
                },
            })
        })
        .collect();
    listed.extend(
        state
            .access()
            .all_vhost_limits()
            .iter()
            .filter(|(name, _)| vhost.is_none_or(|vhost| vhost == name.as_str()))
            .map(|(name, limits)| {
                json!({
                    "vhost": name,
                    "component": VHOST_LIMITS_COMPONENT,
                    "name": VHOST_LIMITS_NAME,
                    "value": limits_value(limits),
                })
            }),
    );
    listed
}

/// `GET /api/parameters[/{component}[/{vhost}]]`.
pub async fn parameters(
    State(state): State<AppState>,
    user: Credentials,
    path: Option<Path<Vec<String>>>,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let parts = path.map(|Path(parts)| parts).unwrap_or_default();
    let (component, vhost) = (parts.first(), parts.get(1));
    Ok(Json(Value::Array(
        parameters_json(&state, vhost.map(String::as_str))
            .into_iter()
            .filter(|item| component.is_none_or(|component| item["component"] == **component))
            .collect(),
    )))
}

/// `PUT /api/parameters/{component}/{vhost}/{name}`: `vhost-limits` sets
/// the vhost's limits; other components belong to plugins Warren does not
/// have, refused with RabbitMQ's words for a component it does not know.
pub async fn put_parameter(
    State(state): State<AppState>,
    user: Credentials,
    // A vhost's limits are one parameter, whatever it is called.
    Path((component, vhost, _name)): Path<(String, String, String)>,
    JsonBody(body): JsonBody<LimitBody>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    if component != VHOST_LIMITS_COMPONENT {
        return Err(ApiError::BadRequest(format!(
            "Validation failed\n\ncomponent {component} not found\n"
        )));
    }
    set_limits(&state, &vhost, &body.value)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/parameters/{component}/{vhost}/{name}`.
pub async fn delete_parameter(
    State(state): State<AppState>,
    user: Credentials,
    Path((component, vhost, _name)): Path<(String, String, String)>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    if component != VHOST_LIMITS_COMPONENT {
        return Err(ApiError::NotFound(format!(
            "no parameter of component '{component}'"
        )));
    }
    for name in VhostLimits::NAMES {
        state
            .admin
            .set_vhost_limit(&vhost, name, -1)
            .map_err(limit_error)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Applies a `vhost-limits` value (`{"max-connections": N, ...}`), as a
/// definitions file or the parameters API gives it: the limits it names
/// are set, the others lifted.
pub fn set_limits(state: &AppState, vhost: &str, value: &Value) -> ApiResult<()> {
    let Some(object) = value.as_object() else {
        return Err(ApiError::BadRequest(format!(
            "Validation failed\n\nvhost limits must be an object, got {value}\n"
        )));
    };
    for (name, value) in object {
        let value = limit_value(name, value)?;
        state
            .admin
            .set_vhost_limit(vhost, name, value)
            .map_err(limit_error)?;
    }
    for name in VhostLimits::NAMES {
        if !object.contains_key(name) {
            state
                .admin
                .set_vhost_limit(vhost, name, -1)
                .map_err(limit_error)?;
        }
    }
    Ok(())
}
