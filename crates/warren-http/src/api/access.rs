//! Users, vhosts and permissions, RabbitMQ's shapes: `/api/users`,
//! `/api/permissions`, `PUT`/`DELETE /api/vhosts/{name}`. Administrators
//! only; every change is persisted before the answer.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use warren_access::{
    AccessError, HashingAlgorithm, PasswordChange, PasswordHash, PermissionEntry, Permissions,
    Tags, User,
};
use warren_amqp::AdminError;

use crate::api::declared;
use crate::auth::Credentials;
use crate::body::JsonBody;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

pub fn user_json(user: &User) -> Value {
    let tags: Vec<&str> = user.tags.iter().collect();
    json!({
        "name": user.name,
        "password_hash": user.password_hash.as_ref().map_or("", |hash| hash.as_str()),
        "hashing_algorithm": user
            .password_hash
            .as_ref()
            .map_or(HashingAlgorithm::Argon2id, PasswordHash::algorithm)
            .name(),
        "tags": tags,
        "limits": {},
    })
}

pub fn permission_json(entry: &PermissionEntry) -> Value {
    json!({
        "user": entry.user,
        "vhost": entry.vhost,
        "configure": entry.permissions.configure.as_str(),
        "write": entry.permissions.write.as_str(),
        "read": entry.permissions.read.as_str(),
    })
}

pub fn admin_error(error: AdminError) -> ApiError {
    match error {
        AdminError::Access(AccessError::UserNotFound(name)) => {
            ApiError::NotFound(format!("no user '{name}'"))
        }
        AdminError::Access(AccessError::VhostNotFound(name)) => {
            ApiError::NotFound(format!("no vhost '{name}'"))
        }
        AdminError::Access(
            error @ (AccessError::BadName { .. }
            | AccessError::ReservedUserName(_)
            | AccessError::Pattern(_)
            | AccessError::Password(_)
            | AccessError::Tags(_)),
        ) => ApiError::BadRequest(error.to_string()),
        AdminError::Access(error @ AccessError::TooMany { .. }) => {
            ApiError::Conflict(error.to_string())
        }
        other => ApiError::Internal(other.to_string()),
    }
}

pub async fn users(State(state): State<AppState>, user: Credentials) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let users = state.access().users();
    Ok(Json(Value::Array(users.iter().map(user_json).collect())))
}

pub async fn show_user(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let found = state
        .access()
        .user(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no user '{name}'")))?;
    Ok(Json(user_json(&found)))
}

/// Tags as RabbitMQ takes them: a comma-separated string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum TagsField {
    Text(String),
    List(Vec<String>),
}

/// Other fields (rabbitmqadmin sends `name`) are ignored, as RabbitMQ
/// ignores them.
#[derive(Debug, Deserialize)]
pub struct PutUser {
    password: Option<String>,
    /// A hash of `hashing_algorithm`; "" makes a user without a password.
    password_hash: Option<String>,
    hashing_algorithm: Option<String>,
    tags: Option<TagsField>,
}

/// A user's password as RabbitMQ's API and definitions give it: the
/// password itself (hashed here with Argon2id), or a hash with its
/// `hashing_algorithm` (Warren's `argon2id`, or RabbitMQ's
/// `rabbit_password_hashing_sha256`, `_sha512` or `_md5`; without one, a
/// PHC string is Argon2id and anything else RabbitMQ's default, SHA-256);
/// an empty hash is a user without a password. None when neither is given.
pub async fn password_change(
    password: Option<String>,
    password_hash: Option<String>,
    hashing_algorithm: Option<String>,
) -> ApiResult<Option<PasswordChange>> {
    let algorithm = match hashing_algorithm.as_deref() {
        Some(name) => Some(HashingAlgorithm::from_name(name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "hashing_algorithm '{name}' is not supported: give argon2id, \
                 rabbit_password_hashing_sha256, rabbit_password_hashing_sha512 or \
                 rabbit_password_hashing_md5"
            ))
        })?),
        None => None,
    };
    Ok(Some(match (password, password_hash) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give password or password_hash, not both".to_owned(),
            ));
        }
        (Some(_), None)
            if algorithm.is_some_and(|algorithm| algorithm != HashingAlgorithm::Argon2id) =>
        {
            // RabbitMQ would hash it with that digest; Warren hashes every
            // password it is given with Argon2id, and says so rather than
            // store a weaker hash than asked for or a different one.
            return Err(ApiError::BadRequest(
                "a password given in clear is hashed with argon2id; give it without \
                 hashing_algorithm, or give RabbitMQ's password_hash"
                    .to_owned(),
            ));
        }
        (Some(password), None) => {
            // Argon2 takes tens of milliseconds: off the executor.
            let hash = tokio::task::spawn_blocking(move || PasswordHash::generate(&password))
                .await
                .map_err(|_| ApiError::Internal("hashing the password failed".to_owned()))?
                .map_err(|error| ApiError::BadRequest(error.to_string()))?;
            PasswordChange::Set(hash)
        }
        (None, Some(hash)) if hash.is_empty() => PasswordChange::Clear,
        (None, Some(hash)) => {
            let algorithm = algorithm.unwrap_or(if hash.starts_with("$argon2id$") {
                HashingAlgorithm::Argon2id
            } else {
                HashingAlgorithm::RabbitSha256
            });
            PasswordChange::Set(
                PasswordHash::with_algorithm(&hash, algorithm)
                    .map_err(|error| ApiError::BadRequest(error.to_string()))?,
            )
        }
        (None, None) => return Ok(None),
    }))
}

pub async fn put_user(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<PutUser>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let password = password_change(body.password, body.password_hash, body.hashing_algorithm)
        .await?
        .unwrap_or(PasswordChange::Keep);
    let tags = match body.tags {
        // Absent: an existing user keeps theirs.
        None => Ok(state
            .access()
            .user(&name)
            .map(|existing| existing.tags)
            .unwrap_or_default()),
        Some(TagsField::Text(text)) => Tags::parse_list(&text),
        Some(TagsField::List(list)) => Tags::new(&list),
    }
    .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    let created = state
        .admin
        .put_user(&name, password, tags)
        .map_err(admin_error)?;
    Ok(declared(!created))
}

pub async fn delete_user(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    state.admin.delete_user(&name).map_err(admin_error)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put_vhost(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let created = state.admin.add_vhost(&name).map_err(admin_error)?;
    Ok(declared(!created))
}

pub async fn delete_vhost(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    state.admin.delete_vhost(&name).map_err(admin_error)?;
    Ok(StatusCode::NO_CONTENT)
}

fn permissions_where(
    state: &AppState,
    user: &Credentials,
    keep: impl Fn(&PermissionEntry) -> bool,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let entries = state.access().permissions();
    Ok(Json(Value::Array(
        entries
            .iter()
            .filter(|entry| keep(entry))
            .map(permission_json)
            .collect(),
    )))
}

/// `GET /api/permissions`.
pub async fn permissions(
    State(state): State<AppState>,
    user: Credentials,
) -> ApiResult<Json<Value>> {
    permissions_where(&state, &user, |_| true)
}

/// `GET /api/users/{user}/permissions`.
pub async fn user_permissions(
    State(state): State<AppState>,
    user: Credentials,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    if state.access().user(&name).is_none() {
        user.require_administrator()?;
        return Err(ApiError::NotFound(format!("no user '{name}'")));
    }
    permissions_where(&state, &user, |entry| entry.user == name)
}

/// `GET /api/vhosts/{vhost}/permissions`.
pub async fn vhost_permissions(
    State(state): State<AppState>,
    user: Credentials,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    if !state.access().vhost_exists(&vhost) {
        user.require_administrator()?;
        return Err(ApiError::NotFound(format!("no vhost '{vhost}'")));
    }
    permissions_where(&state, &user, |entry| entry.vhost == vhost)
}

pub async fn show_permission(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    user.require_administrator()?;
    let permissions = state
        .access()
        .permissions_of(&name, &vhost)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no permissions for user '{name}' in vhost '{vhost}'"
            ))
        })?;
    Ok(Json(permission_json(&PermissionEntry {
        user: name,
        vhost,
        permissions,
    })))
}

/// Other fields (rabbitmqadmin sends `vhost` and `user`) are ignored.
#[derive(Debug, Deserialize)]
pub struct PutPermissions {
    configure: String,
    write: String,
    read: String,
}

pub async fn put_permission(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
    JsonBody(body): JsonBody<PutPermissions>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    let existed = state.access().permissions_of(&name, &vhost).is_some();
    let permissions = Permissions::new(&body.configure, &body.write, &body.read)
        .map_err(|error| ApiError::BadRequest(error.to_string()))?;
    state
        .admin
        .set_permissions(&name, &vhost, permissions)
        .map_err(admin_error)?;
    Ok(declared(existed))
}

pub async fn delete_permission(
    State(state): State<AppState>,
    user: Credentials,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    user.require_administrator()?;
    if state.access().permissions_of(&name, &vhost).is_none() {
        return Err(ApiError::NotFound(format!(
            "no permissions for user '{name}' in vhost '{vhost}'"
        )));
    }
    state
        .admin
        .clear_permissions(&name, &vhost)
        .map_err(admin_error)?;
    Ok(StatusCode::NO_CONTENT)
}
