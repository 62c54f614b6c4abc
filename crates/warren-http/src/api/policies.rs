//! `/api/policies` and `/api/operator-policies`, in RabbitMQ's shapes:
//! listing, showing, setting (201 when new, 204 when replaced) and
//! clearing policies. Policymakers and administrators manage policies in
//! the vhosts they may use; operator policies are the administrator's.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_amqp::AdminError;
use warren_core::BrokerError;
use warren_core::policy::{ApplyTo, Policy, PolicyError, PolicyKind, PolicySpec};

use crate::api::{declared, require_vhost};
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::json::{json_to_table, table_to_json};
use crate::state::AppState;

pub fn policy_json(policy: &Policy) -> Value {
    json!({
        "vhost": policy.vhost,
        "name": policy.name,
        "pattern": policy.pattern,
        "apply-to": policy.apply_to.as_str(),
        "definition": table_to_json(&policy.definition),
        "priority": policy.priority,
    })
}

/// Who may read and change policies of `kind` in `vhost`.
fn require_policy_rights(
    state: &AppState,
    user: &Credentials,
    kind: PolicyKind,
    vhost: Option<&str>,
) -> ApiResult<()> {
    let allowed = match kind {
        PolicyKind::Policy => user.tags.can_make_policies(),
        PolicyKind::OperatorPolicy => user.tags.is_administrator(),
    };
    if !allowed {
        return Err(ApiError::Unauthorized(
            "Not policymaker or administrator user".to_owned(),
        ));
    }
    if let Some(vhost) = vhost {
        if !state.access().vhost_exists(vhost) {
            return Err(ApiError::NotFound("vhost_not_found".to_owned()));
        }
        require_vhost(state, user, vhost)?;
    }
    Ok(())
}

fn list_of(
    state: &AppState,
    user: &Credentials,
    kind: PolicyKind,
    vhost: Option<&str>,
) -> ApiResult<Json<Value>> {
    require_policy_rights(state, user, kind, vhost)?;
    let policies = state.hub.read().broker().policies(kind, vhost);
    Ok(Json(Value::Array(
        policies
            .iter()
            .filter(|policy| user.sees_vhost(state, &policy.vhost))
            .map(|policy| policy_json(policy))
            .collect(),
    )))
}

fn show_of(
    state: &AppState,
    user: &Credentials,
    kind: PolicyKind,
    vhost: &str,
    name: &str,
) -> ApiResult<Json<Value>> {
    require_policy_rights(state, user, kind, Some(vhost))?;
    let policy = state.hub.read().broker().policy(kind, vhost, name);
    policy
        .map(|policy| Json(policy_json(&policy)))
        .ok_or_else(|| ApiError::NotFound(format!("no policy '{name}' in vhost '{vhost}'")))
}

/// A policy as RabbitMQ's API and definitions give it. `pattern` and
/// `definition` are required; rabbitmqadmin also sends `name` and
/// `vhost`, which the path decides.
#[derive(Debug, Deserialize)]
pub struct PolicyBody {
    pub pattern: Option<Value>,
    pub definition: Option<Value>,
    #[serde(rename = "apply-to")]
    pub apply_to: Option<String>,
    pub priority: Option<Value>,
}

impl PolicyBody {
    /// The policy this body describes, or RabbitMQ's refusal.
    pub fn into_spec(self, kind: PolicyKind, vhost: &str, name: &str) -> ApiResult<PolicySpec> {
        let missing = |key: &str| ApiError::BadRequest(format!("[{{key_missing,{key}}}]"));
        let pattern = match self.pattern.ok_or_else(|| missing("pattern"))? {
            Value::String(pattern) => pattern,
            other => {
                return Err(validation(format!(
                    "pattern should be a string, actually was {other}"
                )));
            }
        };
        let definition = self.definition.ok_or_else(|| missing("definition"))?;
        if !definition.is_object() {
            return Err(validation(format!(
                "definition must be a dictionary: {definition}"
            )));
        }
        let priority = match self.priority {
            None | Some(Value::Null) => 0,
            Some(Value::Number(number)) if number.as_i64().is_some() => {
                number.as_i64().unwrap_or_default()
            }
            Some(other) => {
                return Err(validation(format!(
                    "priority should be a number, actually was {other}"
                )));
            }
        };
        let apply_to = match self.apply_to.as_deref() {
            None => ApplyTo::All,
            Some(text) => ApplyTo::parse(text).map_err(|error| validation(error.to_string()))?,
        };
        Ok(PolicySpec {
            kind,
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            pattern,
            apply_to,
            priority,
            definition: json_to_table(&definition, "definition")?,
        })
    }
}

/// RabbitMQ's wording for a refused policy.
fn validation(reason: String) -> ApiError {
    ApiError::BadRequest(format!("Validation failed\n\n{reason}\n"))
}

/// A refused policy change as the API answers it.
pub fn policy_error(error: AdminError) -> ApiError {
    match error {
        AdminError::Policy(BrokerError::Policy(PolicyError::NoVhost(_))) => {
            ApiError::NotFound("vhost_not_found".to_owned())
        }
        AdminError::Policy(BrokerError::Policy(error)) => validation(error.to_string()),
        other => ApiError::Internal(other.to_string()),
    }
}

async fn set_of(
    state: AppState,
    user: Credentials,
    kind: PolicyKind,
    vhost: String,
    name: String,
    body: PolicyBody,
) -> ApiResult<StatusCode> {
    require_policy_rights(&state, &user, kind, Some(&vhost))?;
    let spec = body.into_spec(kind, &vhost, &name)?;
    let admin = state.admin.clone();
    let created = tokio::task::spawn_blocking(move || admin.set_policy(spec))
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))?
        .map_err(policy_error)?;
    Ok(declared(!created))
}

async fn clear_of(
    state: AppState,
    user: Credentials,
    kind: PolicyKind,
    vhost: String,
    name: String,
) -> ApiResult<StatusCode> {
    require_policy_rights(&state, &user, kind, Some(&vhost))?;
    let admin = state.admin.clone();
    let (in_vhost, called) = (vhost.clone(), name.clone());
    let found = tokio::task::spawn_blocking(move || admin.clear_policy(kind, &in_vhost, &called))
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))?
        .map_err(policy_error)?;
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!(
            "no policy '{name}' in vhost '{vhost}'"
        )))
    }
}

pub async fn list(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    list_of(&state, &user, PolicyKind::Policy, vhost.as_deref())
}

pub async fn show(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    show_of(&state, &user, PolicyKind::Policy, &vhost, &name)
}

pub async fn put(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<PolicyBody>,
) -> ApiResult<StatusCode> {
    set_of(state, user, PolicyKind::Policy, vhost, name, body).await
}

pub async fn delete(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    clear_of(state, user, PolicyKind::Policy, vhost, name).await
}

pub async fn list_operator(
    State(state): State<AppState>,
    user: Credentials,
    vhost: Option<Path<String>>,
) -> ApiResult<Json<Value>> {
    let vhost = vhost.map(|Path(vhost)| vhost);
    list_of(&state, &user, PolicyKind::OperatorPolicy, vhost.as_deref())
}

pub async fn show_operator(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    show_of(&state, &user, PolicyKind::OperatorPolicy, &vhost, &name)
}

pub async fn put_operator(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<PolicyBody>,
) -> ApiResult<StatusCode> {
    set_of(state, user, PolicyKind::OperatorPolicy, vhost, name, body).await
}

pub async fn delete_operator(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    clear_of(state, user, PolicyKind::OperatorPolicy, vhost, name).await
}
