//! A queue: its waiting messages, its consumers, and the rules for
//! redeclaring it.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use warren_store::{Backlog, MemoryBacklog, Sequence};

use crate::error::{BrokerError, BrokerResult};
use crate::{ConnectionId, Message};

/// A message waiting in a queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    pub message: Arc<Message>,
    /// Set once the message has been delivered and came back unacknowledged.
    pub redelivered: bool,
}

/// A consumer as its queue sees it.
#[derive(Debug)]
pub struct QueueConsumer {
    pub connection: ConnectionId,
    pub channel: u16,
    pub tag: ShortString,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (0: unlimited), fixed when the consumer starts.
    pub prefetch_count: u16,
    /// Deliveries to this consumer not yet acked.
    pub unacked: u32,
}

impl QueueConsumer {
    pub fn has_credit(&self) -> bool {
        self.no_ack || self.prefetch_count == 0 || self.unacked < self.prefetch_count as u32
    }
}

pub struct Queue {
    pub name: ShortString,
    pub vhost: String,
    pub durable: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive_owner: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub backlog: Box<dyn Backlog<QueuedMessage>>,
    next_sequence: Sequence,
    pub consumers: Vec<QueueConsumer>,
    /// Where the next round-robin search for a consumer starts.
    pub next_consumer: usize,
    /// An auto-delete queue is deleted when its last consumer goes, but only
    /// once it has had one.
    pub had_consumer: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.name)
            .field("vhost", &self.vhost)
            .field("ready", &self.backlog.len())
            .field("consumers", &self.consumers.len())
            .finish()
    }
}

/// The queue arguments RabbitMQ compares when a queue is redeclared; other
/// arguments are stored but a difference in them is not an error.
const EQUIVALENCE_CHECKED_ARGUMENTS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-consumer-timeout",
];

impl Queue {
    pub fn new(
        name: ShortString,
        vhost: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Self {
        Self {
            name,
            vhost,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            backlog: Box::new(MemoryBacklog::default()),
            next_sequence: 0,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
        }
    }

    pub fn describe(&self) -> String {
        format!("queue '{}' in vhost '{}'", self.name, self.vhost)
    }

    pub fn enqueue(&mut self, message: Arc<Message>) {
        self.next_sequence += 1;
        self.backlog.push_back(
            self.next_sequence,
            QueuedMessage {
                message,
                redelivered: false,
            },
        );
    }

    pub fn requeue(&mut self, sequence: Sequence, message: Arc<Message>) {
        self.backlog.requeue(
            sequence,
            QueuedMessage {
                message,
                redelivered: true,
            },
        );
    }

    pub fn ready_count(&self) -> usize {
        self.backlog.len()
    }

    /// Refuses use of an exclusive queue from any connection but its owner.
    pub fn check_access(&self, connection: ConnectionId) -> BrokerResult<()> {
        match self.exclusive_owner {
            Some(owner) if owner != connection => Err(self.locked()),
            _ => Ok(()),
        }
    }

    fn locked(&self) -> BrokerError {
        BrokerError::resource_locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared \
             on another connection or the exclusive property value does not match that of \
             the original declaration.",
            self.describe()
        ))
    }

    /// Checks a redeclaration against what the queue is, the way RabbitMQ
    /// does: the first difference is reported as 406 PRECONDITION_FAILED.
    pub fn check_equivalent(
        &self,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: &FieldTable,
    ) -> BrokerResult<()> {
        let inequivalent = |what: &str, received: String, current: String| {
            BrokerError::precondition_failed(format!(
                "inequivalent arg '{what}' for {}: received '{received}' but current is '{current}'",
                self.describe()
            ))
        };
        if durable != self.durable {
            return Err(inequivalent(
                "durable",
                durable.to_string(),
                self.durable.to_string(),
            ));
        }
        if exclusive != self.exclusive_owner.is_some() {
            // RabbitMQ reports an exclusive mismatch as a lock, not as an
            // inequivalent argument.
            return Err(self.locked());
        }
        if auto_delete != self.auto_delete {
            return Err(inequivalent(
                "auto_delete",
                auto_delete.to_string(),
                self.auto_delete.to_string(),
            ));
        }
        for key in EQUIVALENCE_CHECKED_ARGUMENTS {
            let received = arguments.inner().get(*key);
            let current = self.arguments.inner().get(*key);
            if !argument_equivalent(received, current) {
                return Err(inequivalent(
                    key,
                    describe_argument(received),
                    describe_argument(current),
                ));
            }
        }
        Ok(())
    }
}

fn argument_equivalent(left: Option<&AMQPValue>, right: Option<&AMQPValue>) -> bool {
    match (left, right) {
        (None, None) => true,
        (Some(left), Some(right)) => {
            match (
                crate::exchange::as_integer(left),
                crate::exchange::as_integer(right),
            ) {
                (Some(left), Some(right)) => left == right,
                _ => describe_argument(Some(left)) == describe_argument(Some(right)),
            }
        }
        _ => false,
    }
}

pub(crate) fn describe_argument(value: Option<&AMQPValue>) -> String {
    match value {
        None => "none".to_owned(),
        Some(AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(text)) => text.to_string(),
        Some(AMQPValue::Boolean(flag)) => flag.to_string(),
        Some(other) => match crate::exchange::as_integer(other) {
            Some(number) => number.to_string(),
            None => format!("{other:?}"),
        },
    }
}
