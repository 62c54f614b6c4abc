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

    /// The broker cancelled a consumer the run still needed (its queue was
    /// deleted, or the broker closed the subscription).
    #[error("{role}: the broker cancelled the consumer")]
    Cancelled { role: String },

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

    /// The broker URL does not parse as an AMQP URI.
    #[error("invalid broker URL {url}: {reason}")]
    Url { url: String, reason: String },

    /// This process may not open as many files as the idle connections need,
    /// and an unprivileged process cannot raise its hard limit.
    #[error(
        "--idle-connections {connections} needs about {needed} open files, but this \
         process's hard limit (ulimit -Hn) is {hard}; raise it (as root: `ulimit -Hn \
         {needed}` before starting warren-bench, or LimitNOFILE= in a systemd unit)"
    )]
    OpenFilesHardLimit {
        connections: u32,
        needed: u64,
        hard: u64,
    },

    /// getrlimit/setrlimit on RLIMIT_NOFILE failed.
    #[error("cannot {operation} this process's open-file limit (RLIMIT_NOFILE)")]
    OpenFilesLimit {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// Idle mode could not open every connection it was asked for; nothing
    /// was measured. The source is the first connection's failure.
    #[error("{}", idle_open_message(*opened, *requested, *open_files_max))]
    IdleOpen {
        opened: u32,
        requested: u32,
        open_files_max: u64,
        #[source]
        source: Box<BenchError>,
    },

    /// A producer or consumer task panicked; that is a bug in this tool.
    #[error("{role} task panicked")]
    TaskPanicked {
        role: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// What [`BenchError::IdleOpen`] says: with none open, the broker is most
/// likely not there (or refuses the login); part way, some limit was reached.
fn idle_open_message(opened: u32, requested: u32, open_files_max: u64) -> String {
    if opened == 0 {
        return format!(
            "could not open any of the {requested} idle connections, so nothing was \
             measured; is the broker up at that URL, and are the credentials right?"
        );
    }
    format!(
        "opened only {opened} of {requested} idle connections before one failed, so \
         nothing was measured. Likely limits: the broker's connection limit (Warren: \
         [amqp] connections_max, default 10000), the broker's open-file limit (see its \
         log), this process's open-file limit (now {open_files_max}), the client's \
         ephemeral ports (/proc/sys/net/ipv4/ip_local_port_range), or threads (lapin \
         runs one I/O thread per connection: ulimit -u, kernel.threads-max)"
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn idle_open(opened: u32) -> BenchError {
        BenchError::IdleOpen {
            opened,
            requested: 20,
            open_files_max: 1024,
            source: Box::new(BenchError::Timeout {
                role: "idle 3".into(),
                operation: "connect",
                limit_s: 30,
            }),
        }
    }

    #[test]
    fn idle_open_failure_says_how_far_it_got_and_why() {
        let text = idle_open(7).with_causes();
        assert!(
            text.starts_with("opened only 7 of 20 idle connections"),
            "{text}"
        );
        assert!(text.contains("connections_max"), "{text}");
        assert!(text.contains("now 1024"), "{text}");
        assert!(
            text.ends_with(": idle 3: connect did not finish within 30 s"),
            "{text}"
        );
        let none = idle_open(0).to_string();
        assert!(none.starts_with("could not open any of the 20"), "{none}");
    }
}
