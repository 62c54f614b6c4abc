//! Errors a benchmark run can meet, as types: the binary's `main` turns them
//! into a message and an exit status.

use std::path::PathBuf;

/// Everything that can go wrong in a run short of a bug.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The broker refused or dropped an AMQP operation.
    #[error("{role}: {operation} failed")]
    Amqp {
        /// Which connection: "setup", "producer 3", "consumer 0".
        role: String,
        /// The AMQP operation, e.g. "queue.declare".
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },

    /// An operation did not finish within its limit: the broker hung.
    #[error("{role}: {operation} did not finish within {limit_s} s")]
    Timeout {
        role: String,
        operation: &'static str,
        limit_s: u64,
    },

    /// The broker's status file could not be read: wrong PID, or it exited.
    #[error("cannot read broker memory from {path}")]
    RssRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The status file has no `VmRSS` line: a kernel thread or a zombie.
    #[error("{path} has no VmRSS line; is the PID a live user process?")]
    RssMissing { path: PathBuf },

    /// The JSON report could not be written.
    #[error("cannot write the JSON report to {path}")]
    JsonWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The JSON report could not be encoded.
    #[error("cannot encode the JSON report")]
    JsonEncode(#[from] serde_json::Error),

    /// A producer or consumer task panicked; that is a bug in this tool.
    #[error("{role} task panicked")]
    TaskPanicked {
        role: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl BenchError {
    /// Wraps a lapin error with the connection role and operation it hit.
    pub fn amqp(role: &str, operation: &'static str, source: lapin::Error) -> Self {
        Self::Amqp {
            role: role.to_owned(),
            operation,
            source,
        }
    }

    /// This error and its causes on one line, for the report: the report
    /// lists errors rather than returning them, so nothing else prints the
    /// cause.
    pub fn with_causes(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            let cause_text = error.to_string();
            // lapin's I/O errors repeat their cause in their own message.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            cause = error.source();
        }
        text
    }
}
