//! A queue: its waiting messages, its consumers, and the rules for
//! redeclaring it.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use warren_store::{Backlog, Location, MemoryBacklog, MessageLog, RecordKind, Sequence};

use crate::codec::{decode_message, encode_message};
use crate::error::{BrokerError, BrokerResult};
use crate::{ConnectionId, Message, QueueId};

/// Messages a queue keeps in memory; past this many, or past
/// [`RESIDENT_BYTES_MAX`], newly arriving messages wait on disk and are read
/// back when they reach the head. 2,048 covers any sane prefetch window, so
/// a consumer that keeps up never waits for a disk read.
pub const RESIDENT_MESSAGES_MAX: usize = 2_048;
/// Message body bytes a queue keeps in memory (see above).
pub const RESIDENT_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Where a message's bytes live besides memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Only in memory: a transient message, or a broker without a store.
    Nowhere,
    /// A `Publish` record: survives a restart until removed.
    Published(Location),
    /// A `Paged` record: written only to free memory; gone after a restart.
    Paged(Location),
}

impl Stored {
    pub fn location(self) -> Option<Location> {
        match self {
            Stored::Nowhere => None,
            Stored::Published(location) | Stored::Paged(location) => Some(location),
        }
    }
}

/// A message waiting in a queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// None while the message is paged out to the log.
    pub message: Option<Arc<Message>>,
    pub stored: Stored,
    /// Set once the message has been delivered and came back unacknowledged.
    pub redelivered: bool,
}

/// A message taken from the head of a queue.
#[derive(Debug)]
pub struct Dequeued {
    pub sequence: Sequence,
    pub message: Arc<Message>,
    pub stored: Stored,
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
    pub id: QueueId,
    pub name: ShortString,
    pub vhost: String,
    pub durable: bool,
    /// The connection that owns an exclusive queue.
    pub exclusive_owner: Option<ConnectionId>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    backlog: Box<dyn Backlog<QueuedMessage>>,
    next_sequence: Sequence,
    resident_messages: usize,
    resident_bytes: usize,
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
        id: QueueId,
        name: ShortString,
        vhost: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Self {
        Self {
            id,
            name,
            vhost,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            backlog: Box::new(MemoryBacklog::default()),
            next_sequence: 0,
            resident_messages: 0,
            resident_bytes: 0,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
        }
    }

    pub fn describe(&self) -> String {
        format!("queue '{}' in vhost '{}'", self.name, self.vhost)
    }

    /// Whether persistent messages in this queue are written to the log.
    /// Exclusive queues die with their connection, so never survive a
    /// restart, durable or not.
    pub fn persists_messages(&self) -> bool {
        self.durable && self.exclusive_owner.is_none()
    }

    pub fn allocate_sequence(&mut self) -> Sequence {
        self.next_sequence += 1;
        self.next_sequence
    }

    /// Appends a message. Past the resident limits its body is dropped from
    /// memory: a persistent message is already in the log, a transient one
    /// is written there as a `Paged` record first.
    pub fn enqueue(
        &mut self,
        sequence: Sequence,
        message: Arc<Message>,
        mut stored: Stored,
        log: Option<&MessageLog>,
    ) {
        let over_limits = self.resident_messages >= RESIDENT_MESSAGES_MAX
            || self.resident_bytes >= RESIDENT_BYTES_MAX;
        if over_limits
            && stored == Stored::Nowhere
            && let Some(log) = log
        {
            match log.append_message(
                RecordKind::Paged,
                self.id.0,
                sequence,
                &encode_message(&message),
            ) {
                Ok((location, _)) => stored = Stored::Paged(location),
                Err(error) => log_paging_failure(&error),
            }
        }
        let keep_in_memory = !over_limits || stored == Stored::Nowhere;
        if keep_in_memory {
            self.resident_messages += 1;
            self.resident_bytes += message.body.len();
        }
        self.backlog.push_back(
            sequence,
            QueuedMessage {
                message: keep_in_memory.then_some(message),
                stored,
                redelivered: false,
            },
        );
    }

    pub fn reserve(&mut self, additional: usize) {
        self.backlog.reserve(additional);
    }

    /// A message recovered from the log: only its location is kept; the
    /// body is read when the message reaches the head.
    pub fn push_recovered(&mut self, sequence: Sequence, location: Location, delivered: bool) {
        self.next_sequence = self.next_sequence.max(sequence);
        self.backlog.push_back(
            sequence,
            QueuedMessage {
                message: None,
                stored: Stored::Published(location),
                redelivered: delivered,
            },
        );
    }

    /// A message that was delivered and came back unacknowledged.
    pub fn requeue(&mut self, sequence: Sequence, message: Arc<Message>, stored: Stored) {
        self.resident_messages += 1;
        self.resident_bytes += message.body.len();
        self.backlog.requeue(
            sequence,
            QueuedMessage {
                message: Some(message),
                stored,
                redelivered: true,
            },
        );
    }

    /// Takes the head message, reading its body from the log if it was
    /// paged out. A body that cannot be read is logged and skipped: the
    /// message is lost, which a checksum failure on disk leaves no way to
    /// avoid.
    pub fn dequeue(&mut self, log: Option<&MessageLog>) -> Option<Dequeued> {
        loop {
            let (sequence, queued) = self.backlog.pop_front()?;
            let message = match queued.message {
                Some(message) => {
                    self.resident_messages -= 1;
                    self.resident_bytes -= message.body.len();
                    message
                }
                None => match load(log, queued.stored) {
                    Ok(message) => Arc::new(message),
                    Err(reason) => {
                        log_unreadable(&self.describe(), sequence, &reason);
                        if let (Some(log), Some(location)) = (log, queued.stored.location()) {
                            log.release(location);
                        }
                        continue;
                    }
                },
            };
            return Some(Dequeued {
                sequence,
                message,
                stored: queued.stored,
                redelivered: queued.redelivered,
            });
        }
    }

    /// Removes every waiting message; returns what each was stored as.
    pub fn drain(&mut self) -> Vec<(Sequence, Stored)> {
        self.resident_messages = 0;
        self.resident_bytes = 0;
        let mut drained = Vec::with_capacity(self.backlog.len());
        while let Some((sequence, queued)) = self.backlog.pop_front() {
            drained.push((sequence, queued.stored));
        }
        drained
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

fn load(log: Option<&MessageLog>, stored: Stored) -> Result<Message, String> {
    let (Some(log), Some(location)) = (log, stored.location()) else {
        return Err("the message was paged out but no log is attached".to_owned());
    };
    let payload = log.read(location).map_err(|error| error.to_string())?;
    decode_message(&payload).map_err(|error| error.to_string())
}

fn log_unreadable(queue: &str, sequence: Sequence, reason: &str) {
    tracing::error!(
        queue,
        sequence,
        reason,
        "dropping a message whose stored copy cannot be read"
    );
}

fn log_paging_failure(error: &warren_store::StoreError) {
    tracing::warn!(%error, "could not page a message out; keeping it in memory");
}
