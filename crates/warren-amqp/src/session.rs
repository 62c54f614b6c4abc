//! A session: what one client connection does with its channels, apart
//! from how its frames travel. An AMQP connection drives one from its
//! socket (`connection.rs`); the HTTP side drives one in process
//! (`direct.rs`). Channel methods are in `channel.rs`.
//!
//! Either way the same code checks permissions, applies the broker's
//! operations, holds a `*-ok` until its change is durable and sends
//! publisher confirms after the log's fsync.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, tx};
use tokio::sync::watch;
use warren_access::Grant;
use warren_core::{ConnectionId, ErrorCode, FlowGauge};
use warren_proto::{Frame, FrameError};
use warren_store::Ticket;

use crate::channel::Channel;
use crate::config::AmqpConfig;
use crate::error::AmqpError;
use crate::hub::SharedHub;
use crate::storage::StorageSignals;
use crate::writer::OutboundQueue;

/// The longest a publisher is held back at one time by a queue whose
/// consumers are behind (see `warren_core::flow`). Flow control slows
/// publishers; it must not stall one whose queue's consumers have stopped
/// acking, so after this the connection reads another batch and looks again.
pub(crate) const FLOW_PAUSE_MAX: Duration = Duration::from_millis(100);

/// A publisher with confirms is held back through its confirms rather than
/// its socket: the broker goes on reading, and confirms go out only as there
/// is room in the queue. Its window then fills with messages already
/// delivered, not with messages waiting unread in a socket, so a message's
/// time from publish to delivery stays short.
#[derive(Debug, Clone)]
pub(crate) struct FlowHold {
    /// The queue's gauge, read without the broker's locks.
    pub(crate) gauge: Arc<FlowGauge>,
    /// The hold ends here whatever the queue (see `FLOW_PAUSE_MAX`).
    pub(crate) until: tokio::time::Instant,
}

/// How often a held-back publisher looks at its queue's gauge again.
pub(crate) const FLOW_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Why the frame loop stopped.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The socket closed or failed; nobody to tell.
    Gone,
    /// The client closed the connection with `connection.close`.
    ClosedByClient,
    /// A connection error: send `connection.close` with this code.
    Connection {
        error: AmqpError,
        class_id: u16,
        method_id: u16,
    },
}

impl Fault {
    pub(crate) fn connection(error: AmqpError) -> Self {
        Fault::Connection {
            error,
            class_id: 0,
            method_id: 0,
        }
    }
}

impl From<FrameError> for Fault {
    /// A frame that cannot be decoded safely (too large, malformed, tables
    /// nested too deep) closes the connection with 501.
    fn from(error: FrameError) -> Self {
        Fault::connection(AmqpError::new(ErrorCode::FrameError, error.to_string()))
    }
}

/// Replies that wait for a topology journal ticket.
pub(crate) struct HeldReplies {
    pub(crate) ticket: Ticket,
    pub(crate) replies: Vec<(u16, AMQPClass)>,
}

pub(crate) struct Session {
    pub(crate) id: ConnectionId,
    pub(crate) config: Arc<AmqpConfig>,
    pub(crate) hub: SharedHub,
    /// Where this session's replies and deliveries go, in order.
    pub(crate) out: OutboundQueue,
    pub(crate) signals: StorageSignals,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) channel_max: u16,
    pub(crate) channels: HashMap<u16, Channel>,
    pub(crate) user: String,
    /// The user's permissions in this session's vhost, set by
    /// `connection.open`; every channel method is checked against it.
    pub(crate) grant: Option<Grant>,
    /// Set once the session has published: only publishers are blocked by
    /// the disk alarm, so consumers keep draining.
    pub(crate) has_published: bool,
    /// A queue this session published to without confirms whose consumers
    /// are behind: the connection reads no more until they have caught up.
    pub(crate) paused_by: Option<Arc<FlowGauge>>,
    /// The same for publishes with confirms: their confirms go out only as
    /// the queue's consumers catch up (see `FlowHold`).
    pub(crate) confirms_held: Option<FlowHold>,
    /// A `tx.commit` whose messages must reach the disk before `commit-ok`.
    pub(crate) commit_waiting: Option<(u16, Ticket)>,
    /// Replies held until a durable topology change is on disk (see
    /// `Session::hold_replies`). A lock only so that `reply` can take
    /// `&self` while the hub is locked; nothing else touches it.
    pub(crate) held_replies: parking_lot::Mutex<Option<HeldReplies>>,
}

impl Session {
    pub(crate) fn new(
        id: ConnectionId,
        config: Arc<AmqpConfig>,
        hub: SharedHub,
        out: OutboundQueue,
        signals: StorageSignals,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            id,
            channel_max: config.channel_max,
            config,
            hub,
            out,
            signals,
            shutdown,
            channels: HashMap::new(),
            user: String::new(),
            grant: None,
            has_published: false,
            paused_by: None,
            confirms_held: None,
            commit_waiting: None,
            held_replies: parking_lot::Mutex::new(None),
        }
    }

    pub(crate) async fn wait_for_durable_progress(&mut self) -> Result<(), Fault> {
        tokio::select! {
            changed = self.signals.durable.changed() => {
                if changed.is_err() {
                    return Err(Fault::Gone);
                }
                self.process_confirms();
                Ok(())
            }
            _ = self.shutdown.changed() => Err(shutdown_fault()),
        }
    }

    /// Sends `tx.commit-ok` once the transaction's messages are durable (or
    /// closes the channel with 541 if they cannot become durable).
    /// Sends the held replies once the topology journal has synced their
    /// ticket; a journal that failed closes the connection with 541, as the
    /// change cannot be made durable.
    pub(crate) async fn release_held_replies(&mut self, held: HeldReplies) -> Result<(), Fault> {
        loop {
            let progress = *self.signals.topology.borrow();
            if progress.ticket >= held.ticket {
                for (channel, method) in held.replies {
                    self.out.method(channel, method);
                }
                return Ok(());
            }
            if progress.poisoned {
                return Err(Fault::connection(AmqpError::new(
                    ErrorCode::InternalError,
                    "the topology store failed; the change could not be made durable",
                )));
            }
            tokio::select! {
                changed = self.signals.topology.changed() => {
                    if changed.is_err() {
                        return Err(Fault::Gone);
                    }
                }
                _ = self.shutdown.changed() => return Err(shutdown_fault()),
            }
        }
    }

    pub(crate) async fn finish_commit(
        &mut self,
        channel: u16,
        ticket: Ticket,
    ) -> Result<(), Fault> {
        loop {
            let progress = *self.signals.durable.borrow();
            if progress.ticket >= ticket {
                self.out.method(
                    channel,
                    AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                );
                return Ok(());
            }
            if progress.poisoned {
                return Err(Fault::Connection {
                    error: AmqpError::new(
                        ErrorCode::InternalError,
                        "the message store failed; the transaction could not be made durable",
                    ),
                    class_id: 90,
                    method_id: 20,
                });
            }
            self.wait_for_durable_progress().await?;
        }
    }
}

pub(crate) fn shutdown_fault() -> Fault {
    Fault::connection(AmqpError::new(
        ErrorCode::ConnectionForced,
        "broker shutdown",
    ))
}

/// "queue.declare" and the like, for error messages.
pub(crate) fn method_name(method: &AMQPClass) -> String {
    let debug = format!("{method:?}");
    // Debug prints e.g. `Queue(Declare(Declare { .. }))`.
    let mut parts = debug
        .split(|c: char| !c.is_alphanumeric())
        .filter(|part| !part.is_empty());
    let class = parts.next().unwrap_or("?").to_lowercase();
    let name = parts.next().unwrap_or("?");
    let mut method_name = String::new();
    for (index, c) in name.chars().enumerate() {
        if c.is_uppercase() && index > 0 {
            method_name.push('-');
        }
        method_name.push(c.to_ascii_lowercase());
    }
    format!("{class}.{method_name}")
}

pub(crate) fn describe_frame(frame: &Frame) -> String {
    match frame {
        Frame::Method(_, method) => format!("method {}", method_name(method)),
        Frame::BasicQos { .. } => "method basic.qos".to_owned(),
        Frame::Header { .. } => "content header frame".to_owned(),
        Frame::Body(..) => "content body frame".to_owned(),
        Frame::Heartbeat(_) => "heartbeat frame".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::queue;

    #[test]
    fn method_names_read_like_the_spec() {
        let method = AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk::default()));
        assert_eq!(method_name(&method), "queue.declare-ok");
    }
}
