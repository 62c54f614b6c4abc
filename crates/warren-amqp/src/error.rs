//! What the server tells a peer when it refuses something: an AMQP reply
//! code and its text. The broker's refusals (`warren_core::BrokerError`)
//! become one at this edge; the server's own (a frame out of place, a
//! method it does not implement, a login refused) are made here.

use std::fmt;

use warren_core::{BrokerError, ErrorCode, reply_text};

/// A refusal as it goes on the wire, in `channel.close` or
/// `connection.close`, or back to a direct session's caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: ErrorCode,
    /// The explanation, without the code's name in front.
    pub text: String,
}

pub type AmqpResult<T> = Result<T, AmqpError>;

impl AmqpError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    /// The reply text as RabbitMQ formats it: "CODE_NAME - explanation".
    pub fn reply_text(&self) -> String {
        reply_text(self.code, &self.text)
    }

    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessRefused, text)
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, text)
    }
    pub fn precondition_failed(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::PreconditionFailed, text)
    }
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotAllowed, text)
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::CommandInvalid, text)
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotImplemented, text)
    }
}

impl From<BrokerError> for AmqpError {
    fn from(error: BrokerError) -> Self {
        Self::new(error.code(), error.to_string())
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.reply_code(), self.reply_text())
    }
}

impl std::error::Error for AmqpError {}

#[cfg(test)]
mod tests {
    use warren_core::Resource;

    use super::*;

    #[test]
    fn a_broker_refusal_keeps_its_code_and_rabbitmqs_words() {
        let error = AmqpError::from(BrokerError::NotFound(Resource::Queue {
            name: "jobs".into(),
            vhost: "/".into(),
        }));
        assert_eq!(error.code, ErrorCode::NotFound);
        assert_eq!(
            error.reply_text(),
            "NOT_FOUND - no queue 'jobs' in vhost '/'"
        );
        assert_eq!(
            error.to_string(),
            "404 NOT_FOUND - no queue 'jobs' in vhost '/'"
        );
    }
}
