//! `/api/definitions`: the broker's users, vhosts, permissions, policies,
//! queues, exchanges and bindings in RabbitMQ's definitions format, for
//! export (`GET`) and import (`POST`), whole or for one vhost. A file
//! RabbitMQ 3.x or 4.x exported imports here, and this export imports into
//! RabbitMQ.
//!
//! Import follows RabbitMQ's: users, permissions and policies are created
//! or replaced; queues and exchanges that exist are left as they are;
//! a binding whose source or destination is missing is skipped; the first
//! invalid item stops the import with 400, after what came before it was
//! applied (RabbitMQ's import is not atomic either). Queues, exchanges and
//! bindings are declared through direct sessions as the broker's own
//! identity, since the administrator importing need not have permissions
//! in the vhosts the file creates.

use std::collections::HashMap;

use amq_protocol::protocol::{AMQPClass, exchange, queue};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use warren_access::{HashingAlgorithm, PasswordChange, Tags};
use warren_amqp::{DirectLogin, DirectSession};
use warren_core::policy::PolicyKind;
use warren_core::{BindingInfo, DestinationKind};

use crate::api::access::{TagsField, admin_error, password_change, permission_json, user_json};
use crate::api::parameters::{VHOST_LIMITS_COMPONENT, parameters_json, set_limits};
use crate::api::policies::{PolicyBody, policy_error, policy_json};
use crate::auth::Credentials;
use crate::body::Body;
use crate::error::{ApiError, ApiResult};
use crate::json::{json_to_table, table_to_json};
use crate::lenient;
use crate::session::refusal;
use crate::state::AppState;

/// The version a definitions file says it came from: RabbitMQ's import
/// reads only its presence, and tools show it.
const DEFINITIONS_VERSION: &str = "3.13.7";

/// `GET /api/definitions`.
pub async fn export_all(
    State(state): State<AppState>,
    user: Credentials,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    Ok(Json(export(&state, None)))
}

/// `GET /api/definitions/{vhost}`.
pub async fn export_vhost(
    State(state): State<AppState>,
    user: Credentials,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    if !state.access().vhost_exists(&vhost) {
        return Err(ApiError::NotFound("vhost_not_found".to_owned()));
    }
    Ok(Json(export(&state, Some(&vhost))))
}

/// `POST /api/definitions`: 204 once everything is applied.
pub async fn import_all(
    State(state): State<AppState>,
    user: Credentials,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    import(&state, &parse(&body)?, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/definitions/{vhost}`: every item goes into that vhost;
/// users and vhosts in the file are ignored.
pub async fn import_vhost(
    State(state): State<AppState>,
    user: Credentials,
    Path(vhost): Path<String>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    if !state.access().vhost_exists(&vhost) {
        return Err(ApiError::NotFound("vhost_not_found".to_owned()));
    }
    import(&state, &parse(&body)?, Some(&vhost)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Imports a whole definitions file, as `POST /api/definitions` does.
pub async fn load(state: &AppState, definitions: &[u8]) -> ApiResult<()> {
    import(state, &parse(definitions)?, None).await
}

fn parse(body: &[u8]) -> ApiResult<Definitions> {
    let value: Value = serde_json::from_slice(body).map_err(|_| failed_to_parse())?;
    if !value.is_object() {
        return Err(failed_to_parse());
    }
    serde_json::from_value(value)
        .map_err(|error| ApiError::BadRequest(format!("definitions: {error}")))
}

fn failed_to_parse() -> ApiError {
    ApiError::BadRequest("failed_to_parse_json".to_owned())
}

// ------------------------------------------------------------------ export

fn export(state: &AppState, vhost: Option<&str>) -> Value {
    let (policies, queues, exchanges, bindings) = {
        let hub = state.hub.read();
        let broker = hub.broker();
        (
            broker.policies(PolicyKind::Policy, vhost),
            broker.queue_infos(vhost),
            broker.exchange_infos(vhost),
            broker.binding_infos(vhost),
        )
    };
    // Per vhost, RabbitMQ leaves the vhost out of queues, exchanges and
    // bindings (the import puts them into the vhost it is given).
    let scoped = |mut item: Value, object_vhost: &str| {
        if vhost.is_none() {
            item["vhost"] = json!(object_vhost);
        }
        item
    };
    let queues: Vec<Value> = queues
        .iter()
        .filter(|queue| !queue.exclusive)
        .map(|queue| {
            scoped(
                json!({
                    "name": queue.name,
                    "durable": queue.durable,
                    "auto_delete": queue.auto_delete,
                    "arguments": table_to_json(&queue.arguments),
                }),
                &queue.vhost,
            )
        })
        .collect();
    let exchanges: Vec<Value> = exchanges
        .iter()
        .filter(|exchange| !exchange.name.is_empty() && !exchange.name.starts_with("amq."))
        .map(|exchange| {
            scoped(
                json!({
                    "name": exchange.name,
                    "type": exchange.kind,
                    "durable": exchange.durable,
                    "auto_delete": exchange.auto_delete,
                    "internal": exchange.internal,
                    "arguments": table_to_json(&exchange.arguments),
                }),
                &exchange.vhost,
            )
        })
        .collect();
    let bindings: Vec<Value> = bindings
        .iter()
        .filter(|binding| !binding.source.is_empty())
        .map(|binding| scoped(binding_json(binding), &binding.vhost))
        .collect();
    // Operator policies and vhost limits travel as runtime parameters.
    let parameters = parameters_json(state, vhost);
    let policies: Vec<Value> = policies.iter().map(|policy| policy_json(policy)).collect();
    let mut definitions = Map::new();
    definitions.insert("rabbit_version".into(), json!(DEFINITIONS_VERSION));
    if vhost.is_none() {
        let access = state.access();
        definitions.insert("rabbitmq_version".into(), json!(DEFINITIONS_VERSION));
        definitions.insert("product_name".into(), json!("Warren"));
        definitions.insert("product_version".into(), json!(env!("CARGO_PKG_VERSION")));
        let users = access.users().iter().map(user_definition).collect();
        definitions.insert("users".into(), Value::Array(users));
        definitions.insert(
            "vhosts".into(),
            Value::Array(
                access
                    .vhosts()
                    .iter()
                    .map(|name| json!({"name": name, "limits": [], "metadata": {}}))
                    .collect(),
            ),
        );
        definitions.insert(
            "permissions".into(),
            Value::Array(access.permissions().iter().map(permission_json).collect()),
        );
        definitions.insert("topic_permissions".into(), json!([]));
    }
    definitions.insert("parameters".into(), Value::Array(parameters));
    if vhost.is_none() {
        definitions.insert(
            "global_parameters".into(),
            json!([{"name": "cluster_name", "value": state.node.cluster_name()}]),
        );
    }
    definitions.insert("policies".into(), Value::Array(policies));
    definitions.insert("queues".into(), Value::Array(queues));
    definitions.insert("exchanges".into(), Value::Array(exchanges));
    definitions.insert("bindings".into(), Value::Array(bindings));
    Value::Object(definitions)
}

/// A user as definitions carry it: the API's form with the hash in base64
/// (`PasswordHash::to_base64`), which RabbitMQ's import requires.
fn user_definition(user: &warren_access::User) -> Value {
    let mut item = user_json(user);
    if let Some(hash) = &user.password_hash {
        item["password_hash"] = json!(hash.to_base64());
    }
    item
}

fn binding_json(binding: &BindingInfo) -> Value {
    json!({
        "source": binding.source,
        "destination": binding.destination,
        "destination_type": match binding.destination_kind {
            DestinationKind::Queue => "queue",
            DestinationKind::Exchange => "exchange",
        },
        "routing_key": binding.routing_key,
        "arguments": table_to_json(&binding.arguments),
    })
}

// ------------------------------------------------------------------ import

/// A definitions file. Keys RabbitMQ writes that Warren has no use for
/// (topic permissions, vhost limits, feature flags) are read and ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Definitions {
    /// The RabbitMQ version that wrote the file: before 3.6 a hash without
    /// `hashing_algorithm` is MD5.
    rabbit_version: Option<String>,
    users: Vec<UserDefinition>,
    vhosts: Vec<VhostDefinition>,
    permissions: Vec<PermissionDefinition>,
    parameters: Vec<ParameterDefinition>,
    global_parameters: Vec<GlobalParameter>,
    policies: Vec<PolicyDefinition>,
    queues: Vec<QueueDefinition>,
    exchanges: Vec<ExchangeDefinition>,
    bindings: Vec<BindingDefinition>,
}

#[derive(Debug, Deserialize)]
struct UserDefinition {
    name: String,
    password: Option<String>,
    password_hash: Option<String>,
    hashing_algorithm: Option<String>,
    tags: Option<TagsField>,
}

#[derive(Debug, Deserialize)]
struct VhostDefinition {
    name: String,
}

#[derive(Debug, Deserialize)]
struct PermissionDefinition {
    user: String,
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

#[derive(Debug, Deserialize)]
struct ParameterDefinition {
    vhost: Option<String>,
    component: String,
    name: String,
    value: Value,
}

#[derive(Debug, Deserialize)]
struct GlobalParameter {
    name: String,
    value: Value,
}

#[derive(Debug, Deserialize)]
struct PolicyDefinition {
    vhost: Option<String>,
    name: String,
    #[serde(flatten)]
    body: PolicyBody,
}

#[derive(Debug, Deserialize)]
struct QueueDefinition {
    name: String,
    vhost: Option<String>,
    #[serde(default = "yes", deserialize_with = "lenient::boolean")]
    durable: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    auto_delete: bool,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct ExchangeDefinition {
    name: String,
    vhost: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes", deserialize_with = "lenient::boolean")]
    durable: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    auto_delete: bool,
    #[serde(default, deserialize_with = "lenient::boolean")]
    internal: bool,
    #[serde(default)]
    arguments: Value,
}

#[derive(Debug, Deserialize)]
struct BindingDefinition {
    source: String,
    vhost: Option<String>,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: Value,
}

fn yes() -> bool {
    true
}

/// The vhost an item goes into: the one imported into, or its own ("/"
/// when it names none).
fn target_vhost<'a>(into: Option<&'a str>, own: &'a Option<String>) -> &'a str {
    into.unwrap_or_else(|| own.as_deref().unwrap_or("/"))
}

async fn import(state: &AppState, definitions: &Definitions, into: Option<&str>) -> ApiResult<()> {
    if into.is_none() {
        for user in &definitions.users {
            let Some(tags) = &user.tags else {
                return Err(ApiError::BadRequest("tags_not_present".to_owned()));
            };
            // A user without a password or hash cannot log in with one.
            let algorithm = user
                .hashing_algorithm
                .clone()
                .or_else(|| legacy_hashing(definitions.rabbit_version.as_deref()));
            let password =
                password_change(user.password.clone(), user.password_hash.clone(), algorithm)
                    .await?
                    .unwrap_or(PasswordChange::Clear);
            let tags = match tags {
                TagsField::Text(text) => Tags::parse_list(text),
                TagsField::List(list) => Tags::new(list),
            }
            .map_err(|error| ApiError::BadRequest(error.to_string()))?;
            state
                .admin
                .put_user(&user.name, password, tags)
                .map_err(admin_error)?;
        }
        for vhost in &definitions.vhosts {
            state.admin.add_vhost(&vhost.name).map_err(admin_error)?;
        }
        for entry in &definitions.permissions {
            let permissions =
                warren_access::Permissions::new(&entry.configure, &entry.write, &entry.read)
                    .map_err(|error| ApiError::BadRequest(error.to_string()))?;
            state
                .admin
                .set_permissions(&entry.user, &entry.vhost, permissions)
                .map_err(admin_error)?;
        }
        for parameter in &definitions.global_parameters {
            if parameter.name == "cluster_name"
                && let Some(name) = parameter.value.as_str()
            {
                state
                    .node
                    .set_cluster_name(name)
                    .map_err(|error| ApiError::Internal(error.to_string()))?;
            }
        }
    }
    for parameter in &definitions.parameters {
        // Operator policies and vhost limits travel as runtime parameters;
        // the others (federation upstreams, shovels) belong to plugins
        // Warren does not have.
        if parameter.component == VHOST_LIMITS_COMPONENT {
            set_limits(
                state,
                target_vhost(into, &parameter.vhost),
                &parameter.value,
            )?;
            continue;
        }
        if parameter.component != PolicyKind::OperatorPolicy.component() {
            continue;
        }
        let body: PolicyBody = serde_json::from_value(parameter.value.clone())
            .map_err(|error| ApiError::BadRequest(format!("operator policy: {error}")))?;
        let vhost = target_vhost(into, &parameter.vhost);
        set_policy(
            state,
            body,
            PolicyKind::OperatorPolicy,
            vhost,
            &parameter.name,
        )
        .await?;
    }
    for policy in &definitions.policies {
        let body = PolicyBody {
            pattern: policy.body.pattern.clone(),
            definition: policy.body.definition.clone(),
            apply_to: policy.body.apply_to.clone(),
            priority: policy.body.priority.clone(),
        };
        let vhost = target_vhost(into, &policy.vhost);
        set_policy(state, body, PolicyKind::Policy, vhost, &policy.name).await?;
    }
    let mut sessions = Sessions::new(state);
    for queue in &definitions.queues {
        let vhost = target_vhost(into, &queue.vhost);
        if state.hub.read().broker().queue_exists(vhost, &queue.name) {
            continue;
        }
        let session = sessions.get(vhost)?;
        let declare = queue::Declare {
            queue: queue.name.as_str().into(),
            passive: false,
            durable: queue.durable,
            exclusive: false,
            auto_delete: queue.auto_delete,
            nowait: false,
            arguments: json_to_table(&queue.arguments, "arguments")?,
        };
        declare_in(
            session,
            AMQPClass::Queue(queue::AMQPMethod::Declare(declare)),
        )
        .await?;
    }
    for exchange in &definitions.exchanges {
        let vhost = target_vhost(into, &exchange.vhost);
        if state
            .hub
            .read()
            .broker()
            .exchange_exists(vhost, &exchange.name)
        {
            continue;
        }
        let session = sessions.get(vhost)?;
        let declare = exchange::Declare {
            exchange: exchange.name.as_str().into(),
            kind: exchange.kind.as_str().into(),
            passive: false,
            durable: exchange.durable,
            auto_delete: exchange.auto_delete,
            internal: exchange.internal,
            nowait: false,
            arguments: json_to_table(&exchange.arguments, "arguments")?,
        };
        declare_in(
            session,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)),
        )
        .await?;
    }
    for binding in &definitions.bindings {
        let vhost = target_vhost(into, &binding.vhost);
        // The default exchange's bindings are implicit; RabbitMQ skips them.
        if binding.source.is_empty() {
            continue;
        }
        let to_queue = match binding.destination_type.as_str() {
            "queue" => true,
            "exchange" => false,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "binding: unknown destination_type '{other}'"
                )));
            }
        };
        let both_exist = {
            let hub = state.hub.read();
            let broker = hub.broker();
            let destination = if to_queue {
                broker.queue_exists(vhost, &binding.destination)
            } else {
                broker.exchange_exists(vhost, &binding.destination)
            };
            destination && broker.exchange_exists(vhost, &binding.source)
        };
        if !both_exist {
            continue;
        }
        let session = sessions.get(vhost)?;
        let arguments = json_to_table(&binding.arguments, "arguments")?;
        let method = if to_queue {
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: binding.destination.as_str().into(),
                exchange: binding.source.as_str().into(),
                routing_key: binding.routing_key.as_str().into(),
                nowait: false,
                arguments,
            }))
        } else {
            AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: binding.destination.as_str().into(),
                source: binding.source.as_str().into(),
                routing_key: binding.routing_key.as_str().into(),
                nowait: false,
                arguments,
            }))
        };
        declare_in(session, method).await?;
    }
    Ok(())
}

/// The hashing RabbitMQ assumes for a file without `hashing_algorithm`:
/// MD5 before 3.6, SHA-256 from 3.6 (the caller's default).
fn legacy_hashing(rabbit_version: Option<&str>) -> Option<String> {
    let version = rabbit_version?;
    let before_3_6 = ["3.0.", "3.1.", "3.2.", "3.3.", "3.4.", "3.5."]
        .iter()
        .any(|prefix| version.starts_with(prefix));
    before_3_6.then(|| HashingAlgorithm::RabbitMd5.name().to_owned())
}

async fn set_policy(
    state: &AppState,
    body: PolicyBody,
    kind: PolicyKind,
    vhost: &str,
    name: &str,
) -> ApiResult<()> {
    let spec = body.into_spec(kind, vhost, name)?;
    let admin = state.admin.clone();
    tokio::task::spawn_blocking(move || admin.set_policy(spec))
        .await
        .map_err(|error| ApiError::Internal(error.to_string()))?
        .map_err(policy_error)?;
    Ok(())
}

/// One direct session per vhost the import touches, as the broker's own
/// identity.
struct Sessions<'a> {
    state: &'a AppState,
    open: HashMap<String, DirectSession>,
}

impl<'a> Sessions<'a> {
    fn new(state: &'a AppState) -> Self {
        Self {
            state,
            open: HashMap::new(),
        }
    }

    fn get(&mut self, vhost: &str) -> ApiResult<&mut DirectSession> {
        if !self.open.contains_key(vhost) {
            if !self.state.access().vhost_exists(vhost) {
                return Err(ApiError::BadRequest(format!(
                    "no_such_vhost: '{vhost}' (import the vhost first)"
                )));
            }
            let session = self
                .state
                .direct
                .open(DirectLogin {
                    user: warren_access::INTERNAL_USER,
                    vhost,
                    peer: self.state.node.http_address,
                    local: self.state.node.http_address,
                    name: "definitions import",
                })
                .map_err(|error| ApiError::Internal(format!("opening '{vhost}': {error}")))?;
            self.open.insert(vhost.to_owned(), session);
        }
        Ok(self.open.get_mut(vhost).expect("opened above"))
    }
}

async fn declare_in(session: &mut DirectSession, method: AMQPClass) -> ApiResult<()> {
    session.call(method).await.map_err(refusal).map(drop)
}
