//! Small helpers around lapin shared by setup, producers and consumers:
//! connecting, bounding every broker round trip in time, starting a future at
//! once, closing cleanly, and keeping passwords out of reports.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::error::BenchError;

/// Limit on one setup round trip (connect, declare, bind, consume). A broker
/// that takes longer than this to answer a declare is hung, not slow, and the
/// run must end by itself rather than wait forever.
pub const SETUP_TIMEOUT_S: u64 = 30;

/// Limit on closing a connection at the end. Closing only waits for the
/// broker's close-ok; a broker that does not send it is reported, not waited on.
pub const CLOSE_TIMEOUT_S: u64 = 5;

/// Runs a lapin operation with a time limit, naming it in any error.
pub async fn within<T>(
    role: &str,
    operation: &'static str,
    limit_s: u64,
    operation_future: impl Future<Output = lapin::Result<T>>,
) -> Result<T, BenchError> {
    match tokio::time::timeout(Duration::from_secs(limit_s), operation_future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(BenchError::amqp(role, operation, source)),
        Err(_elapsed) => Err(BenchError::Timeout {
            role: role.to_owned(),
            operation,
            limit_s,
        }),
    }
}

/// Opens a connection named after its role, so it can be told apart in the
/// broker's connection list and logs.
pub async fn connect(url: &str, role: &str) -> Result<Connection, BenchError> {
    within(
        role,
        "connect",
        SETUP_TIMEOUT_S,
        Connection::connect(url, properties(role)),
    )
    .await
}

/// [`connect`] with an already parsed (and possibly adjusted) URI.
pub async fn connect_uri(uri: &AMQPUri, role: &str) -> Result<Connection, BenchError> {
    within(
        role,
        "connect",
        SETUP_TIMEOUT_S,
        Connection::connect_uri(uri.clone(), properties(role)),
    )
    .await
}

/// Client properties: the connection name "warren-bench ROLE".
fn properties(role: &str) -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name(format!("warren-bench {role}").into())
}

/// Closes a connection with reply code 200, within [`CLOSE_TIMEOUT_S`].
pub async fn close(connection: &Connection, role: &str) -> Result<(), BenchError> {
    if !connection.status().connected() {
        // Already closed by the broker or by an error; nothing to hand shake.
        return Ok(());
    }
    within(
        role,
        "connection.close",
        CLOSE_TIMEOUT_S,
        connection.close(200, "warren-bench done".into()),
    )
    .await
}

/// Polls `future` once right now, returning its output if it is already done
/// or the pinned future to finish later.
///
/// lapin assigns a publish its delivery tag and queues its frames on the first
/// poll. Doing that first poll here, in program order, keeps the sequence
/// numbers in the bodies, the frames on the wire and the confirm tags in the
/// same order, whatever order a `FuturesUnordered` would have polled them in;
/// for acks with `multiple` that order is required, not just tidy.
pub fn start_now<F: Future>(future: F) -> Result<F::Output, Pin<Box<F>>> {
    let mut future = Box::pin(future);
    // The no-op waker is fine: whoever holds the returned future polls it
    // again with a real waker before waiting on it.
    let mut context = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => Err(future),
    }
}

/// The URL with its password replaced by `***`, for printing and reports.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The userinfo ends at the last '@' before the path.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password_only() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://bob:p%40ss@broker:5671/vh"),
            "amqps://bob:***@broker:5671/vh"
        );
    }

    #[test]
    fn leaves_urls_without_a_password_alone() {
        for url in [
            "amqp://127.0.0.1:5672/%2f",
            "amqp://guest@127.0.0.1/%2f",
            "amqp://host/vhost@odd",
            "not a url",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn start_now_returns_ready_output_or_the_pending_future() {
        assert_eq!(start_now(async { 7 }).ok(), Some(7));
        let pending = start_now(std::future::pending::<()>());
        assert!(pending.is_err());
    }
}
