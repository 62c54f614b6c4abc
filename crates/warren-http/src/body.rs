//! Request bodies: JSON parsed by hand so that every failure is one of our
//! JSON errors, not the framework's plain-text rejection.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// The raw body, within the configured size limit.
pub struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.body_max_bytes;
        match axum::body::to_bytes(request.into_body(), limit).await {
            Ok(bytes) => Ok(Body(bytes)),
            Err(_) => Err(ApiError::PayloadTooLarge(format!(
                "the request body is larger than {limit} bytes (or could not be read)"
            ))),
        }
    }
}

/// A JSON body; an empty body reads as `{}` so that every field may be
/// left out, as RabbitMQ allows for `PUT /api/queues/...`.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let Body(bytes) = Body::from_request(request, state).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|error| ApiError::BadRequest(format!("malformed JSON body: {error}")))
    }
}
