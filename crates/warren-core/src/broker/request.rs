//! The arguments and results of the broker's operations, as plain values.

use std::sync::Arc;

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::{StoreError, Ticket};

use crate::{Message, QueueId};

/// What publishing a message did.
#[derive(Debug, Default)]
pub struct Published {
    /// Queues the message reached (0: unroutable).
    pub routed: usize,
    /// Set when the message was appended to the log: it is durable once the
    /// log's durable ticket reaches this.
    pub ticket: Option<Ticket>,
    /// Set when the log refused the message (it is poisoned); the publisher
    /// must be nacked.
    pub store_error: Option<StoreError>,
    /// Set when a full queue with `x-overflow` = `reject-publish(-dlx)`
    /// refused the message; the publisher must be nacked.
    pub rejected: bool,
    /// A queue it reached whose consumers are falling behind: the
    /// publisher should pause while `Broker::flow_holds` says so.
    pub flow: Option<QueueId>,
}

/// What `queue.declare` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDeclared {
    pub name: ShortString,
    pub message_count: u32,
    pub consumer_count: u32,
}

#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    pub name: ShortString,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Default)]
pub struct ExchangeDeclare {
    pub name: ShortString,
    pub kind: ShortString,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Default)]
pub struct Consume {
    pub queue: ShortString,
    pub consumer_tag: ShortString,
    pub no_ack: bool,
    pub exclusive: bool,
    pub arguments: FieldTable,
}

/// A message taken with `basic.get`.
#[derive(Debug, Clone)]
pub struct GetOk {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// Messages left in the queue.
    pub message_count: u32,
}
