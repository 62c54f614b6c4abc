//! Every way an HTTP request can fail, each with its status and a JSON body
//! `{"error": KIND, "reason": TEXT}` shaped like RabbitMQ's management API.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use warren_core::BrokerError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// A 400 with RabbitMQ's own name for the error in place of
    /// `bad_request` (`page_out_of_range`, ...), which clients match on.
    #[error("{reason}")]
    BadRequestOf { error: &'static str, reason: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{reason}")]
    TooManyRequests {
        reason: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::BadRequestOf { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::BadRequestOf { error, .. } => error,
            ApiError::Unauthorized(_) => "not_authorised",
            ApiError::Forbidden(_) => "access_refused",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "resource_locked",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The HTTP form of an AMQP refusal, by its reply code.
    pub fn from_amqp(code: u16, text: &str) -> ApiError {
        let reason = text.to_owned();
        match code {
            403 => ApiError::Forbidden(reason),
            404 => ApiError::NotFound(reason),
            405 => ApiError::Conflict(reason),
            406 | 502 | 503 | 530 | 540 => ApiError::BadRequest(reason),
            320 => ApiError::Unavailable(reason),
            _ => ApiError::Internal(reason),
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        ApiError::from_amqp(error.code().reply_code(), &error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "HTTP request failed");
        }
        let reason = self.to_string();
        let body = Json(json!({"error": self.kind(), "reason": reason}));
        let mut response = (status, body).into_response();
        response.extensions_mut().insert(ErrorReason(reason));
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"Warren\""),
                );
            }
            ApiError::TooManyRequests { retry_after, .. } => {
                let seconds = retry_after.as_secs().max(1).to_string();
                if let Ok(value) = HeaderValue::from_str(&seconds) {
                    headers.insert(header::RETRY_AFTER, value);
                }
            }
            _ => {}
        }
        response
    }
}

/// An error response's message, kept with the response so that a protocol
/// with another error shape can rewrite the body.
#[derive(Clone)]
struct ErrorReason(String);

/// Rewrites an error response's body to KServe v2's `{"error": MESSAGE}`;
/// other responses pass unchanged.
pub async fn kserve_error_body(response: Response) -> Response {
    let Some(ErrorReason(reason)) = response.extensions().get::<ErrorReason>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&json!({"error": reason})).expect("JSON serialises");
    Response::from_parts(parts, axum::body::Body::from(body))
}
