//! The HTTP side's way into the broker: everything that changes it
//! (declares, deletes, bindings, publishes, gets, consumers) goes through a
//! direct session opened as the requesting user, in process, as RabbitMQ's
//! management plugin uses direct connections. The broker's rules, error
//! codes and permission checks then apply to HTTP exactly as to AMQP
//! clients: the session runs the same code an AMQP channel does.

use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use bytes::Bytes;
use warren_amqp::{AmqpError, Confirmation, DirectLogin, DirectSession, OpenError};

use crate::auth::Credentials;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// How long a client is told to wait before retrying a publish a full
/// queue refused.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A session with one channel as `user` in `vhost`, closed (and what it
/// holds released) when dropped, on every path out of a handler.
pub fn open(state: &AppState, user: &Credentials, vhost: &str) -> ApiResult<DirectSession> {
    let name = format!("HTTP API ({})", user.user);
    state
        .direct
        .open(DirectLogin {
            user: &user.user,
            vhost,
            peer: user.peer,
            local: state.node.http_address,
            name: &name,
        })
        .map_err(|error| match error {
            OpenError::VhostNotFound(_) => ApiError::NotFound(format!("no vhost '{vhost}'")),
            OpenError::Refused(reason) => ApiError::Unauthorized(reason),
        })
}

/// The HTTP form of the broker's refusal: 404 stays 404, 403 stays 403,
/// 406 is a 400 and 405 a 409 (see `ApiError::from_amqp`).
pub fn refusal(error: AmqpError) -> ApiError {
    ApiError::from_amqp(error.code.reply_code(), &error.reply_text())
}

/// Sends a method and waits for its reply.
pub async fn call(session: &mut DirectSession, method: AMQPClass) -> ApiResult<()> {
    session.call(method).await.map_err(refusal).map(drop)
}

/// Publishes with a publisher confirm and `mandatory`, and says whether a
/// queue took the message. A nack (a full queue with
/// `x-overflow = reject-publish`) is a 429.
pub async fn publish_confirmed(
    session: &mut DirectSession,
    exchange: &str,
    routing_key: &str,
    body: Bytes,
    properties: BasicProperties,
) -> ApiResult<bool> {
    let publish = basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: true,
        immediate: false,
    };
    let sequence = session
        .publish(publish, properties, body)
        .await
        .map_err(refusal)?;
    match session.confirmation(sequence).await.map_err(refusal)? {
        Confirmation::Ack { returned } => Ok(!returned),
        Confirmation::Nack => Err(ApiError::TooManyRequests {
            reason: "the queue is full and refuses new messages (x-overflow = reject-publish)"
                .to_owned(),
            retry_after: QUEUE_FULL_RETRY_AFTER,
        }),
    }
}
