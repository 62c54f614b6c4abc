//! Errors the broker reports to a peer. Each is a variant that says what
//! was refused and why, with the values involved; `code` gives the AMQP
//! reply code RabbitMQ uses for the same refusal, and `Display` its
//! explanation as RabbitMQ words it, which clients show and some match.

use std::fmt;

/// AMQP 0-9-1 reply codes for errors. Codes below 500 close the channel;
/// 500 and above close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    AccessRefused = 403,
    NotFound = 404,
    ResourceLocked = 405,
    PreconditionFailed = 406,
    ConnectionForced = 320,
    FrameError = 501,
    SyntaxError = 502,
    CommandInvalid = 503,
    ChannelError = 504,
    UnexpectedFrame = 505,
    ResourceError = 506,
    NotAllowed = 530,
    NotImplemented = 540,
    InternalError = 541,
}

impl ErrorCode {
    pub fn reply_code(self) -> u16 {
        self as u16
    }

    /// The code for an AMQP reply code, if it is one of these.
    pub fn from_reply_code(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            AccessRefused,
            NotFound,
            ResourceLocked,
            PreconditionFailed,
            ConnectionForced,
            FrameError,
            SyntaxError,
            CommandInvalid,
            ChannelError,
            UnexpectedFrame,
            ResourceError,
            NotAllowed,
            NotImplemented,
            InternalError,
        ]
        .into_iter()
        .find(|known| known.reply_code() == code)
    }

    /// The upper-case name RabbitMQ puts at the start of its reply text.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::AccessRefused => "ACCESS_REFUSED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::ResourceLocked => "RESOURCE_LOCKED",
            ErrorCode::PreconditionFailed => "PRECONDITION_FAILED",
            ErrorCode::ConnectionForced => "CONNECTION_FORCED",
            ErrorCode::FrameError => "FRAME_ERROR",
            ErrorCode::SyntaxError => "SYNTAX_ERROR",
            ErrorCode::CommandInvalid => "COMMAND_INVALID",
            ErrorCode::ChannelError => "CHANNEL_ERROR",
            ErrorCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ErrorCode::ResourceError => "RESOURCE_ERROR",
            ErrorCode::NotAllowed => "NOT_ALLOWED",
            ErrorCode::NotImplemented => "NOT_IMPLEMENTED",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// Whether this error closes the whole connection rather than one channel.
    pub fn is_connection_error(self) -> bool {
        self.reply_code() >= 500 || self == ErrorCode::ConnectionForced
    }
}

/// Something a refusal names: a queue or an exchange, in its vhost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Queue { name: String, vhost: String },
    Exchange { name: String, vhost: String },
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Queue { name, vhost } => write!(f, "queue '{name}' in vhost '{vhost}'"),
            Resource::Exchange { name, vhost } => {
                write!(f, "exchange '{name}' in vhost '{vhost}'")
            }
        }
    }
}

/// What an `x-`argument or a property was refused for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentOf {
    Queue { name: String, vhost: String },
    Exchange { name: String, vhost: String },
    Consume,
}

impl fmt::Display for ArgumentOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgumentOf::Queue { name, vhost } => write!(f, "queue '{name}' in vhost '{vhost}'"),
            ArgumentOf::Exchange { name, vhost } => {
                write!(f, "exchange '{name}' in vhost '{vhost}'")
            }
            ArgumentOf::Consume => f.write_str("basic.consume"),
        }
    }
}

/// How a redeclaration differs from what exists: the first difference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "inequivalent arg '{what}' for {resource}: received '{received}' but current is '{current}'"
)]
pub struct Inequivalence {
    pub what: String,
    pub resource: Resource,
    pub received: String,
    pub current: String,
}

/// An operating error: the peer asked for something the broker refuses.
/// A broken invariant is not one of these; it is a bug, and asserts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    #[error("no {0}")]
    NotFound(Resource),
    /// A direct reply-to name where a queue is needed, or a reply address
    /// whose channel is gone (it names no vhost).
    #[error("no queue '{0}'")]
    ReplyToName(String),
    /// `basic.consume` on a reply address rather than on the pseudo-queue.
    #[error("no queue '{queue}'; consume from '{pseudo_queue}' itself")]
    ConsumeFromReplyAddress {
        queue: String,
        pseudo_queue: &'static str,
    },
    #[error("operation not permitted on the default exchange")]
    DefaultExchange,
    /// Deleting a built-in `amq.*` exchange.
    #[error("operation not permitted on exchange '{0}'")]
    BuiltinExchange(String),
    #[error("{kind} name '{name}' contains reserved prefix 'amq.*'")]
    ReservedName { kind: &'static str, name: String },
    #[error("cannot publish to internal {0}")]
    InternalExchange(Resource),
    /// Another connection's exclusive consumer holds the queue.
    #[error("{0} in exclusive use")]
    ExclusiveConsumer(Resource),
    /// Another connection's exclusive queue.
    #[error(
        "cannot obtain exclusive access to locked {0}. It could be originally declared on \
         another connection or the exclusive property value does not match that of the \
         original declaration."
    )]
    Locked(Resource),
    /// A redeclaration that differs from what exists (boxed: it is the
    /// largest refusal, and every result has room for one).
    #[error("{0}")]
    Inequivalent(Box<Inequivalence>),
    #[error("invalid arg '{key}' for {of}: {reason}")]
    InvalidArgument {
        key: String,
        of: ArgumentOf,
        reason: String,
    },
    #[error("invalid property '{flag}' for quorum queue '{name}' in vhost '{vhost}'")]
    QuorumProperty {
        flag: &'static str,
        name: String,
        vhost: String,
    },
    #[error(
        "invalid expiration '{text}': expected milliseconds as a non-negative integer of at most {max_ms}"
    )]
    InvalidExpiration { text: String, max_ms: u64 },
    #[error("invalid exchange type '{0}'")]
    InvalidExchangeType(String),
    #[error("invalid x-match field type {found}; expected a string")]
    InvalidMatchType { found: String },
    #[error("invalid x-match field value '{0}'; expected all, any, all-with-x or any-with-x")]
    InvalidMatchValue(String),
    /// `if-unused` on an exchange with bindings or a queue with consumers.
    #[error("{0} in use")]
    InUse(Resource),
    /// `if-empty` on a queue with messages.
    #[error("{0} not empty")]
    NotEmpty(Resource),
    #[error(
        "cannot declare queue '{name}': queue limit in virtual host '{vhost}' is reached ({max})"
    )]
    QueueLimit {
        name: String,
        vhost: String,
        max: usize,
    },
    #[error("channel {channel} already has {max} consumers, the most a channel may hold")]
    ConsumerLimit { channel: u16, max: usize },
    #[error("attempt to reuse consumer tag '{0}'")]
    ConsumerTagInUse(String),
    #[error("unknown delivery tag {0}")]
    UnknownDeliveryTag(u64),
    #[error("reply consumer cannot acknowledge")]
    ReplyConsumerAcks,
    #[error("reply consumer already set")]
    ReplyConsumerExists,
    #[error("fast reply consumer does not exist")]
    NoReplyConsumer,
    /// `x-consumer-timeout` ran out for a delivery: the channel is closed.
    #[error(
        "delivery acknowledgement on channel {channel} timed out. Timeout value used: \
         {timeout_ms} ms. This timeout value can be configured, see consumers doc guide to \
         learn more"
    )]
    ConsumerTimeout { channel: u16, timeout_ms: u64 },
    /// An operator deleted the vhost the connection works in.
    #[error("vhost '{0}' is deleted")]
    VhostDeleted(String),
    /// An operation for a connection the broker does not know.
    #[error("connection is not open")]
    ConnectionNotOpen,
    /// A policy's pattern or definition was refused.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The topology journal refused a change; the store is failing.
    #[error("could not save the durable topology: {0}")]
    TopologyNotSaved(String),
}

impl BrokerError {
    /// The AMQP reply code RabbitMQ refuses the same thing with.
    pub fn code(&self) -> ErrorCode {
        use BrokerError::*;
        match self {
            NotFound(_) | ReplyToName(_) | ConsumeFromReplyAddress { .. } => ErrorCode::NotFound,
            DefaultExchange
            | BuiltinExchange(_)
            | ReservedName { .. }
            | InternalExchange(_)
            | ExclusiveConsumer(_) => ErrorCode::AccessRefused,
            Locked(_) => ErrorCode::ResourceLocked,
            Inequivalent(_)
            | InvalidArgument { .. }
            | QuorumProperty { .. }
            | InvalidExpiration { .. }
            | InvalidExchangeType(_)
            | InvalidMatchType { .. }
            | InvalidMatchValue(_)
            | InUse(_)
            | NotEmpty(_)
            | QueueLimit { .. }
            | ConsumerLimit { .. }
            | UnknownDeliveryTag(_)
            | ReplyConsumerAcks
            | ReplyConsumerExists
            | NoReplyConsumer
            | ConsumerTimeout { .. }
            | Policy(_) => ErrorCode::PreconditionFailed,
            ConsumerTagInUse(_) => ErrorCode::NotAllowed,
            VhostDeleted(_) => ErrorCode::ConnectionForced,
            ConnectionNotOpen | TopologyNotSaved(_) => ErrorCode::InternalError,
        }
    }

    /// The reply text as RabbitMQ formats it: "CODE_NAME - explanation",
    /// cut to the 255 bytes a short string holds.
    pub fn reply_text(&self) -> String {
        reply_text(self.code(), &self.to_string())
    }
}

/// "CODE_NAME - explanation", cut on a char boundary to the 255 bytes a
/// short string holds.
pub fn reply_text(code: ErrorCode, explanation: &str) -> String {
    let mut text = format!("{} - {explanation}", code.name());
    if text.len() > 255 {
        let mut end = 255;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub type BrokerResult<T> = Result<T, BrokerError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Resource {
        Resource::Queue {
            name: "jobs".into(),
            vhost: "/".into(),
        }
    }

    #[test]
    fn refusals_read_as_rabbitmq_words_them() {
        let cases = [
            (
                BrokerError::Locked(queue()),
                ErrorCode::ResourceLocked,
                "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'jobs' in \
                 vhost '/'. It could be originally declared on another connection or the \
                 exclusive property value does not match that of the original declaration.",
            ),
            (
                BrokerError::Inequivalent(Box::new(Inequivalence {
                    what: "durable".into(),
                    resource: queue(),
                    received: "false".into(),
                    current: "true".into(),
                })),
                ErrorCode::PreconditionFailed,
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'jobs' in vhost \
                 '/': received 'false' but current is 'true'",
            ),
            (
                BrokerError::NotFound(Resource::Exchange {
                    name: "logs".into(),
                    vhost: "v".into(),
                }),
                ErrorCode::NotFound,
                "NOT_FOUND - no exchange 'logs' in vhost 'v'",
            ),
            (
                BrokerError::InvalidArgument {
                    key: "x-priority".into(),
                    of: ArgumentOf::Consume,
                    reason: "expected an integer, got a string".into(),
                },
                ErrorCode::PreconditionFailed,
                "PRECONDITION_FAILED - invalid arg 'x-priority' for basic.consume: expected an \
                 integer, got a string",
            ),
            (
                BrokerError::ConsumerTagInUse("ctag".into()),
                ErrorCode::NotAllowed,
                "NOT_ALLOWED - attempt to reuse consumer tag 'ctag'",
            ),
            (
                BrokerError::VhostDeleted("v".into()),
                ErrorCode::ConnectionForced,
                "CONNECTION_FORCED - vhost 'v' is deleted",
            ),
        ];
        for (error, code, text) in cases {
            assert_eq!(error.code(), code, "{error}");
            assert_eq!(error.reply_text(), text);
        }
    }

    #[test]
    fn a_reply_text_is_cut_to_a_short_string_on_a_char_boundary() {
        let error = BrokerError::ConsumerTagInUse("é".repeat(200));
        let text = error.reply_text();
        assert!(text.len() <= 255, "{}", text.len());
        assert!(text.len() >= 254, "cut no further than the boundary needs");
        assert!(text.starts_with("NOT_ALLOWED - attempt to reuse consumer tag 'é"));
    }
}
