//! HTTP basic auth against the broker's users, with the same rules as an
//! AMQP login (`guest` only from a loopback address).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use warren_amqp::auth::{AuthError, check_password};

use crate::error::ApiError;
use crate::state::AppState;

/// A user who proved their password; the HTTP side acts for them.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish()
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
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip())
            .ok_or_else(|| ApiError::Internal("the peer address is unknown".to_owned()))?;
        match check_password(&state.amqp.users, "PLAIN", user, password, peer) {
            Ok(_) => Ok(Credentials {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            Err(AuthError::LoopbackOnly(user)) => {
                tracing::warn!(%user, %peer, "HTTP login refused: loopback-only user");
                Err(unauthorized(&format!(
                    "user '{user}' can only log in via localhost"
                )))
            }
            Err(error) => {
                tracing::warn!(%user, %peer, %error, "HTTP login refused");
                Err(unauthorized("login failed"))
            }
        }
    }
}
