//! HTTP basic auth against the broker's users, with the same rules as an
//! AMQP login (Argon2id hashes, `guest` only from a loopback address), and
//! the user tags that decide what the management API shows and allows, as
//! in RabbitMQ's management plugin:
//!
//! * no management tag: refused everywhere under `/api` (401);
//! * `management`, `policymaker`: only the vhosts they have permissions in,
//!   and only their own connections;
//! * `monitoring`: every vhost and connection, read only where permissions
//!   say so;
//! * `administrator`: all of that, plus users, vhosts and permissions.
//!
//! What a user may change in a vhost is not decided here: every change
//! goes through a direct session as that user (`session.rs`), where the
//! permission checks of `warren-amqp` apply.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use warren_access::{LoginError, Tags};

use crate::error::ApiError;
use crate::state::AppState;

/// A user who proved their password; the HTTP side acts for them.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub tags: Tags,
    /// Where the request came from.
    pub peer: SocketAddr,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish()
    }
}

impl Credentials {
    /// Users, vhosts and permissions are the administrator's.
    pub fn require_administrator(&self) -> Result<(), ApiError> {
        if self.tags.is_administrator() {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("Not administrator user".to_owned()))
        }
    }

    /// Whether this user sees the vhost's queues, exchanges, bindings and
    /// connections.
    pub fn sees_vhost(&self, state: &AppState, vhost: &str) -> bool {
        self.tags.can_monitor() || state.access().permissions_of(&self.user, vhost).is_some()
    }

    /// Whether this user sees a connection: monitoring users see all,
    /// others only their own.
    pub fn sees_connection_of(&self, user: &str) -> bool {
        self.tags.can_monitor() || self.user == user
    }
}

impl FromRequestParts<AppState> for Credentials {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |reason: &str| ApiError::Unauthorized(reason.to_owned());
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("credentials required: HTTP basic authentication"))?;
        let encoded = value
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Basic "))
            .ok_or_else(|| unauthorized("only HTTP basic authentication is supported"))?;
        let decoded = STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| unauthorized("malformed basic authentication header"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| unauthorized("malformed basic authentication header"))?;
        let peer_address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| *address)
            .ok_or_else(|| ApiError::Internal("the peer address is unknown".to_owned()))?;
        let peer = peer_address.ip().to_canonical();
        let login = {
            let access = std::sync::Arc::clone(state.access());
            let (user, password) = (user.to_owned(), password.to_owned());
            // Argon2 is slow the first time a password is seen: off the
            // executor, like an AMQP login.
            tokio::task::spawn_blocking(move || access.login_with_password(&user, &password, peer))
                .await
                .map_err(|_| ApiError::Internal("the login check failed".to_owned()))?
        };
        let found = match login {
            Ok(found) => found,
            Err(LoginError::LoopbackOnly { user }) => {
                tracing::warn!(%user, %peer, "HTTP login refused: loopback-only user");
                return Err(unauthorized(&format!(
                    "user '{user}' can only log in via localhost"
                )));
            }
            Err(error) => {
                tracing::warn!(%user, %peer, %error, "HTTP login refused");
                return Err(unauthorized("login failed"));
            }
        };
        let under_api = parts.uri.path().starts_with("/api/");
        if under_api && !found.tags.can_manage() {
            tracing::warn!(%user, %peer, "HTTP request refused: not a management user");
            return Err(unauthorized("Not management user"));
        }
        Ok(Credentials {
            user: found.name,
            tags: found.tags,
            peer: peer_address,
        })
    }
}
