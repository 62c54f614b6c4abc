//! Errors the broker reports to a peer, each with the AMQP reply code that
//! RabbitMQ uses for the same situation.

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

/// An operating error: the peer asked for something the broker refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerError {
    pub code: ErrorCode,
    pub text: String,
}

impl BrokerError {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    /// The reply text as RabbitMQ formats it: "CODE_NAME - explanation".
    pub fn reply_text(&self) -> String {
        let mut text = format!("{} - {}", self.code.name(), self.text);
        // A short string holds at most 255 bytes; cut on a char boundary.
        if text.len() > 255 {
            let mut end = 255;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessRefused, text)
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, text)
    }
    pub fn resource_locked(text: impl Into<String>) -> Self {
        Self::new(ErrorCode::ResourceLocked, text)
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

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code.reply_code(), self.reply_text())
    }
}

impl std::error::Error for BrokerError {}

pub type BrokerResult<T> = Result<T, BrokerError>;
