//! A queue: its waiting messages, its consumers, and the rules for
//! redeclaring it.

use std::collections::VecDeque;
use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use warren_store::{
    Backlog, Location, MessageLog, RecordKind, Sequence, SpillArea, SpillingBacklog,
};

pub mod ages;
pub mod arguments;
pub(crate) mod dead_letter;
pub(crate) mod discard;
pub(crate) mod flow;
mod priority;
mod spilled;

use ages::{DeliveryCounts, UnackedAges};
use arguments::{AppliedPolicy, PolicyArguments, QueueArguments, QueueType, message_expiration_ms};
use dead_letter::DeadLetter;
use flow::FlowGauge;
use priority::PriorityBacklog;

use crate::durable::codec::{decode_stored_message, encode_message_head};
use crate::durable::entry;
use crate::error::{BrokerError, BrokerResult, Inequivalence, Resource};
use crate::stats::MessageCounts;
use crate::{ConnectionId, Message, QueueId};

/// Messages a queue keeps in memory; past this many, or past
/// [`RESIDENT_BYTES_MAX`], newly arriving messages wait on disk and are read
/// back when they reach the head. 2,048 covers any sane prefetch window, so
/// a consumer that keeps up never waits for a disk read.
pub const RESIDENT_MESSAGES_MAX: usize = 2_048;
/// Message body bytes a queue keeps in memory (see above).
pub const RESIDENT_BYTES_MAX: usize = 8 * 1024 * 1024;

/// How far ahead of its consumers a queue has paged-out messages read back,
/// off the broker's locks (see `Queue::read_ahead`): the messages at most
/// this close to the head.
pub const READ_AHEAD_MESSAGES: usize = 256;
/// Body bytes one read-ahead brings back at most; never more than takes
/// the queue's memory past `RESIDENT_BYTES_MAX`.
pub const READ_AHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// Messages taken between two looks for paged-out messages near the head:
/// a look walks up to `READ_AHEAD_MESSAGES` entries, so it is made once per
/// quarter window, which keeps three quarters of a window read ahead.
const READ_AHEAD_LOOK_EVERY: u32 = (READ_AHEAD_MESSAGES / 4) as u32;

/// Messages one look expires from a queue's head, at most: each is taken
/// off the queue (read back from the log if it was paged out) and
/// dead-lettered, so a look holds the queue, and the timer's tick the
/// broker, for about a millisecond on the reference machine (2 cores). A
/// queue with more due is looked at again at the timer's next tick.
pub const EXPIRY_ROUND_MAX: usize = 512;

/// Paged-out messages to read back before the consumers reach them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAhead {
    pub queue: QueueId,
    pub reads: Vec<(Sequence, Location)>,
}

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

/// When a waiting message expires: never, at a time, or not known yet (a
/// message recovered from the log and not read: the stored arrival time
/// gives its expiry once it is loaded).
///
/// One word rather than an enum with a payload, which would take two: every
/// message in a backlog carries one, so this is 8 MB of a million-message
/// backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry(u64);

impl Expiry {
    pub const NEVER: Expiry = Expiry(u64::MAX);
    pub const UNKNOWN: Expiry = Expiry(u64::MAX - 1);
    /// The latest time that can be a deadline; later ones are never reached.
    const LATEST_MS: u64 = u64::MAX - 2;

    /// Expires at this time, milliseconds since the UNIX epoch.
    pub fn at(ms: u64) -> Expiry {
        if ms > Self::LATEST_MS {
            Self::NEVER
        } else {
            Expiry(ms)
        }
    }

    /// The time it expires at, when that is known and it expires at all.
    pub fn deadline(self) -> Option<u64> {
        (self.0 <= Self::LATEST_MS).then_some(self.0)
    }

    pub fn is_unknown(self) -> bool {
        self == Self::UNKNOWN
    }

    pub fn is_due(self, now_ms: u64) -> bool {
        self.deadline().is_some_and(|at| at <= now_ms)
    }

    /// The word itself, for an encoding that keeps all three meanings.
    pub(crate) fn word(self) -> u64 {
        self.0
    }

    pub(crate) fn from_word(word: u64) -> Expiry {
        Expiry(word)
    }
}

/// What a queue knows about a message besides its bytes; it travels with
/// the message through delivery and requeue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageMeta {
    /// The priority level it waits at (0 outside priority queues).
    pub priority: u8,
    /// A requeued message keeps its original expiry, as in RabbitMQ.
    pub expires: Expiry,
    /// How many times it came back unacknowledged (quorum queues count
    /// these against `x-delivery-limit`).
    pub returns: u32,
    /// When it entered the queue, ms since the epoch (0: not known yet).
    pub arrived_ms: u64,
}

impl MessageMeta {
    pub const RECOVERED: MessageMeta = MessageMeta {
        priority: 0,
        expires: Expiry::UNKNOWN,
        returns: 0,
        arrived_ms: 0,
    };
}

/// A message waiting in a queue.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// None while the message is paged out to the log.
    pub message: Option<Arc<Message>>,
    pub stored: Stored,
    /// Set once the message has been delivered and came back unacknowledged.
    pub redelivered: bool,
    pub meta: MessageMeta,
    /// Body size, counted against `x-max-length-bytes`.
    pub body_bytes: u32,
}

/// A message taken from the head of a queue.
#[derive(Debug)]
pub struct Dequeued {
    pub sequence: Sequence,
    pub message: Arc<Message>,
    pub stored: Stored,
    pub redelivered: bool,
    pub meta: MessageMeta,
}

/// Deliveries per second over the last complete window, measured from the
/// queue's delivery counter as publishes look at it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DrainRate {
    window_start_ms: u64,
    delivered_at_start: u64,
    per_s: u64,
}

impl DrainRate {
    /// Long enough to span many deliveries and acks, short enough to follow
    /// a consumer that stops.
    const WINDOW_MS: u64 = 20;

    /// The rate, after closing the window if it is over.
    pub fn update(&mut self, delivered: u64, now_ms: u64) -> u64 {
        let elapsed_ms = now_ms.saturating_sub(self.window_start_ms);
        if elapsed_ms >= Self::WINDOW_MS {
            // A window that ran far past its end (nobody published) says
            // nothing about now: its deliveries are spread over a long gap.
            self.per_s = if elapsed_ms <= 2 * Self::WINDOW_MS {
                (delivered - self.delivered_at_start) * 1000 / elapsed_ms
            } else {
                0
            };
            self.window_start_ms = now_ms;
            self.delivered_at_start = delivered;
        }
        self.per_s
    }
}

/// A consumer as its queue sees it.
#[derive(Debug)]
pub struct QueueConsumer {
    pub connection: ConnectionId,
    pub channel: u16,
    pub tag: ShortString,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority`: consumers with a higher priority and room are served
    /// first.
    pub priority: i32,
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
    /// The validated form of `arguments`.
    pub declared: QueueArguments,
    /// The policies that apply to it (`set_policy`).
    pub policy: AppliedPolicy,
    /// What it runs on: `declared` under `policy`.
    pub args: QueueArguments,
    backlog: Box<dyn Backlog<QueuedMessage>>,
    /// Where the backlog keeps what does not fit its head in memory; None
    /// in a broker without a store, which keeps everything in memory.
    spill: Option<Arc<SpillArea>>,
    next_sequence: Sequence,
    resident_messages: usize,
    resident_bytes: usize,
    /// Body bytes of every waiting message, resident or not.
    ready_bytes: u64,
    /// When the queue was last used (consumed from, read with `basic.get`,
    /// redeclared): `x-expires` counts from here.
    pub last_used_ms: u64,
    /// The deadline the broker's timer holds for this queue, if any.
    pub scheduled_ms: Option<u64>,
    pub consumers: Vec<QueueConsumer>,
    /// Where the next round-robin search for a consumer starts.
    pub next_consumer: usize,
    /// An auto-delete queue is deleted when its last consumer goes, but only
    /// once it has had one.
    pub had_consumer: bool,
    /// Deliveries of this queue's messages not yet settled, on any channel.
    pub unacked: usize,
    /// When they were made, by the second: the oldest still out.
    pub unacked_ages: UnackedAges,
    /// How many times the messages it let go had been delivered.
    pub delivery_counts: DeliveryCounts,
    pub counts: MessageCounts,
    /// How fast consumers have been taking its messages, for flow control.
    pub drain: DrainRate,
    /// Its ready and consumer counts for held-back publishers, which read
    /// them without the broker's locks.
    pub flow_gauge: Arc<FlowGauge>,
    /// A read-ahead for this queue is out; no second one is asked for
    /// until it is back.
    reading_ahead: bool,
    /// Messages taken since the last look for paged-out messages.
    taken_since_look: u32,
    /// Messages this queue gave up on, in the order they died, waiting to
    /// be routed to its dead-letter exchange (see
    /// `Broker::route_dead_letters`).
    pub(crate) dead_letters: VecDeque<DeadLetter>,
    /// An operation is routing `dead_letters`; others leave theirs to it,
    /// so that they reach the dead-letter exchange in order.
    pub(crate) routing_dead_letters: bool,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: QueueId,
        name: ShortString,
        vhost: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
        declared: QueueArguments,
        now_ms: u64,
    ) -> Self {
        let args = declared.with_policy(&PolicyArguments::default());
        Self {
            id,
            name,
            vhost,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            backlog: empty_backlog(&args, None),
            declared,
            policy: AppliedPolicy::default(),
            args,
            spill: None,
            next_sequence: 0,
            resident_messages: 0,
            resident_bytes: 0,
            ready_bytes: 0,
            last_used_ms: now_ms,
            scheduled_ms: None,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            unacked: 0,
            unacked_ages: UnackedAges::default(),
            delivery_counts: DeliveryCounts::default(),
            counts: MessageCounts::default(),
            drain: DrainRate::default(),
            flow_gauge: Arc::default(),
            reading_ahead: false,
            taken_since_look: 0,
            dead_letters: VecDeque::new(),
            routing_dead_letters: false,
        }
    }

    /// Lets the queue keep in memory only the head of a long backlog and
    /// the index entries of the rest in `area` (see `warren_store::spill`).
    /// Called before the first message arrives.
    pub fn spill_to(mut self, area: Option<Arc<SpillArea>>) -> Self {
        debug_assert!(self.backlog.is_empty());
        self.backlog = empty_backlog(&self.args, area.as_ref());
        self.spill = area;
        self
    }

    /// The paged-out messages near the head to read back before the
    /// consumers reach them, when none are being read already: the reads
    /// happen on another thread, without the broker's locks, and `install`
    /// puts their messages in place. A consumer that outruns it still finds
    /// its message: the head is read where it stands (`pop_loaded`).
    pub fn read_ahead(&mut self) -> Option<ReadAhead> {
        // Only for consumers that are taking messages, and never past what
        // the queue keeps in memory anyway: a body larger than that waits
        // on disk until a consumer takes it.
        if self.reading_ahead
            || self.consumers.is_empty()
            || self.resident_messages >= self.backlog.len()
        {
            return None;
        }
        if self.taken_since_look < READ_AHEAD_LOOK_EVERY && self.head_is_resident() {
            return None;
        }
        self.taken_since_look = 0;
        let mut messages_left = RESIDENT_MESSAGES_MAX.saturating_sub(self.resident_messages);
        let mut bytes_left =
            READ_AHEAD_BYTES.min(RESIDENT_BYTES_MAX.saturating_sub(self.resident_bytes) as u64);
        let mut reads = Vec::new();
        let mut full = false;
        self.backlog
            .visit_head_mut(READ_AHEAD_MESSAGES, &mut |sequence, queued| {
                if full || queued.message.is_some() {
                    return;
                }
                let Some(location) = queued.stored.location() else {
                    return;
                };
                let bytes = queued.body_bytes as u64;
                if messages_left == 0 || bytes > bytes_left {
                    // The rest waits for the next look, in order.
                    full = true;
                    return;
                }
                messages_left -= 1;
                bytes_left -= bytes;
                reads.push((sequence, location));
            });
        if reads.is_empty() {
            return None;
        }
        self.reading_ahead = true;
        Some(ReadAhead {
            queue: self.id,
            reads,
        })
    }

    fn head_is_resident(&self) -> bool {
        self.backlog
            .front()
            .is_none_or(|(_, queued)| queued.message.is_some())
    }

    /// Puts a message read ahead in place, if it is still waiting and still
    /// paged out.
    pub fn install(&mut self, sequence: Sequence, message: Message, arrived_ms: Option<u64>) {
        let expires =
            arrived_ms.map(|arrived_ms| (self.expiry_of(&message, arrived_ms), arrived_ms));
        let Some(queued) = self.backlog.get_mut(sequence) else {
            return;
        };
        if queued.message.is_some() {
            return;
        }
        if queued.meta.expires.is_unknown() {
            // A message stored before arrival times were kept is left to
            // `pop_loaded`, which counts its arrival from when it is taken.
            let Some((expires, arrived_ms)) = expires else {
                return;
            };
            queued.meta.expires = expires;
            queued.meta.arrived_ms = arrived_ms;
        }
        self.resident_messages += 1;
        self.resident_bytes += message.body.len();
        queued.message = Some(Arc::new(message));
    }

    /// The read-ahead asked for is back (or failed): the next may go out.
    pub fn read_ahead_done(&mut self) {
        self.reading_ahead = false;
    }

    /// Tells the flow gauge the ready count, after every change to it.
    fn gauge_ready(&self) {
        self.flow_gauge.set_ready(self.backlog.len());
    }

    /// Tells the flow gauge the consumer count, after every change to it.
    pub(crate) fn gauge_consumers(&self) {
        self.flow_gauge.set_consumers(self.consumers.len());
    }

    pub fn describe(&self) -> String {
        self.resource().to_string()
    }

    /// The queue as a refusal names it.
    pub(crate) fn resource(&self) -> Resource {
        Resource::Queue {
            name: self.name.to_string(),
            vhost: self.vhost.clone(),
        }
    }

    /// Whether persistent messages in this queue are written to the log.
    /// Exclusive queues die with their connection, so never survive a
    /// restart, durable or not.
    pub fn persists_messages(&self) -> bool {
        self.durable && self.exclusive_owner.is_none()
    }

    /// Its entry in the durable topology: only a queue whose messages
    /// survive a restart has one.
    pub(crate) fn durable_entry(&self) -> Option<Box<[u8]>> {
        self.persists_messages().then(|| {
            entry::queue_entry(
                &self.vhost,
                self.name.as_str(),
                self.id.0,
                self.auto_delete,
                &self.arguments,
            )
        })
    }

    /// Whether a message is written to the log here: a persistent one in a
    /// queue that persists messages, and every message in a quorum queue.
    pub fn persists(&self, message: &Message) -> bool {
        self.persists_messages()
            && (message.is_persistent() || self.args.queue_type == QueueType::Quorum)
    }

    /// What the queue records about a message arriving now.
    pub fn meta_for(&self, message: &Message, arrived_ms: u64) -> MessageMeta {
        let priority = match self.args.max_priority {
            Some(max) => message.properties.priority().unwrap_or(0).min(max),
            None => 0,
        };
        MessageMeta {
            priority,
            expires: self.expiry_of(message, arrived_ms),
            returns: 0,
            arrived_ms,
        }
    }

    /// When a message that arrived at `arrived_ms` expires here: the lower
    /// of the queue's `x-message-ttl` and the message's `expiration`.
    fn expiry_of(&self, message: &Message, arrived_ms: u64) -> Expiry {
        // An invalid expiration was refused at publish; a stored one that
        // does not parse is ignored rather than losing the message.
        let message_ttl = message_expiration_ms(message.properties.expiration().as_ref())
            .ok()
            .flatten();
        let ttl = match (self.args.message_ttl_ms, message_ttl) {
            (Some(queue), Some(message)) => Some(queue.min(message)),
            (queue, message) => queue.or(message),
        };
        ttl.map_or(Expiry::NEVER, |ttl| {
            Expiry::at(arrived_ms.saturating_add(ttl))
        })
    }

    pub fn is_quorum(&self) -> bool {
        self.args.queue_type == QueueType::Quorum
    }

    /// Whether the queue holds more than `x-max-length` or
    /// `x-max-length-bytes` allow.
    pub fn over_length(&self) -> bool {
        self.args
            .max_length
            .is_some_and(|max| self.backlog.len() as u64 > max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes > max)
    }

    /// Whether one more message of `body_bytes` would exceed a length limit.
    /// Runs the queue under other policies from now on. Messages already
    /// waiting keep the expiry they were given on arrival, as in RabbitMQ;
    /// the caller trims the queue to a lowered length limit and restarts
    /// its expiry countdown when `expires` changed (true).
    pub fn set_policy(&mut self, policy: AppliedPolicy, now_ms: u64) -> bool {
        let args = self.declared.with_policy(&policy.arguments);
        let expiry_changed = args.expires_ms != self.args.expires_ms;
        if expiry_changed {
            self.last_used_ms = now_ms;
        }
        self.args = args;
        self.policy = policy;
        expiry_changed
    }

    pub fn would_overflow(&self, body_bytes: usize) -> bool {
        self.args
            .max_length
            .is_some_and(|max| self.backlog.len() as u64 >= max)
            || self
                .args
                .max_length_bytes
                .is_some_and(|max| self.ready_bytes + body_bytes as u64 > max)
    }

    pub fn allocate_sequence(&mut self) -> Sequence {
        self.next_sequence += 1;
        self.next_sequence
    }

    /// Appends a message. Past the resident limits, behind a spilled tail
    /// or under memory pressure, its body is dropped from memory: a
    /// persistent message is already in the log, a transient one is written
    /// there as a `Paged` record first.
    pub fn enqueue(
        &mut self,
        sequence: Sequence,
        message: Arc<Message>,
        mut stored: Stored,
        meta: MessageMeta,
        log: Option<&MessageLog>,
        memory_pressure: bool,
    ) {
        let body_bytes = message.body.len();
        let mut queued = QueuedMessage {
            body_bytes: body_bytes as u32,
            message: Some(message),
            stored,
            redelivered: false,
            meta,
        };
        // Behind a spilled tail a message keeps only its index entry, and
        // that on disk. A message whose body alone passes the byte limit
        // waits on disk from the start: a large body costs disk, not
        // memory, while it waits.
        let over_limits = memory_pressure
            || !self.backlog.holds_in_memory(&queued)
            || self.resident_messages >= RESIDENT_MESSAGES_MAX
            || self.resident_bytes + body_bytes > RESIDENT_BYTES_MAX;
        if over_limits
            && stored == Stored::Nowhere
            && let Some(log) = log
            && let Some(message) = &queued.message
        {
            match log.append_message_with_tail(
                RecordKind::Paged,
                self.id.0,
                sequence,
                &encode_message_head(message, meta.arrived_ms),
                &message.body,
            ) {
                Ok((location, _)) => stored = Stored::Paged(location),
                Err(error) => log_paging_failure(&error),
            }
            queued.stored = stored;
        }
        let keep_in_memory = !over_limits || stored == Stored::Nowhere;
        if keep_in_memory {
            self.resident_messages += 1;
            self.resident_bytes += body_bytes;
        } else {
            queued.message = None;
        }
        self.ready_bytes += body_bytes as u64;
        self.backlog.push_back(sequence, queued);
        self.gauge_ready();
    }

    /// A message recovered from the log: only its location is kept; the
    /// body is read when the message reaches the head. A queue whose order
    /// or limits depend on the message (priority, byte limit) is told what
    /// they are by the caller, which read it.
    pub fn push_recovered(
        &mut self,
        sequence: Sequence,
        location: Location,
        delivered: bool,
        known: Option<(MessageMeta, u32)>,
    ) {
        self.next_sequence = self.next_sequence.max(sequence);
        // Without the message at hand, its size is estimated from the record.
        let (meta, body_bytes) = known.unwrap_or((MessageMeta::RECOVERED, location.length));
        self.ready_bytes += body_bytes as u64;
        self.backlog.push_back(
            sequence,
            QueuedMessage {
                message: None,
                stored: Stored::Published(location),
                redelivered: delivered,
                meta,
                body_bytes,
            },
        );
        self.gauge_ready();
    }

    /// Whether recovery must read each message to place it (priority
    /// queues) or to count its bytes (byte-limited queues).
    pub fn recovery_reads_messages(&self) -> bool {
        self.args.max_priority.is_some() || self.args.max_length_bytes.is_some()
    }

    /// A message that was delivered and came back unacknowledged.
    pub fn requeue(
        &mut self,
        sequence: Sequence,
        message: Arc<Message>,
        stored: Stored,
        meta: MessageMeta,
    ) {
        self.resident_messages += 1;
        self.resident_bytes += message.body.len();
        self.ready_bytes += message.body.len() as u64;
        self.backlog.requeue(
            sequence,
            QueuedMessage {
                body_bytes: message.body.len() as u32,
                message: Some(message),
                stored,
                redelivered: true,
                meta,
            },
        );
        self.gauge_ready();
    }

    /// Takes the head message, reading its body from the log if it was
    /// paged out. Expired messages met on the way are put in `expired`. A
    /// body that cannot be read is logged and skipped: the message is lost,
    /// which a checksum failure on disk leaves no way to avoid.
    pub fn dequeue(
        &mut self,
        log: Option<&MessageLog>,
        now_ms: u64,
        expired: &mut Vec<Dequeued>,
    ) -> Option<Dequeued> {
        loop {
            let taken = self.pop_loaded(log, now_ms)?;
            // A message with a TTL of 0 is still delivered to a consumer
            // waiting the moment it arrives, as RabbitMQ does.
            let fresh = taken.meta.expires == Expiry::at(now_ms) && taken.meta.arrived_ms == now_ms;
            if taken.meta.expires.is_due(now_ms) && !fresh {
                expired.push(taken);
                continue;
            }
            return Some(taken);
        }
    }

    /// Moves expired messages from the head into `expired`; returns when
    /// the head message expires next, if it ever does.
    pub fn expire_head(
        &mut self,
        log: Option<&MessageLog>,
        now_ms: u64,
        expired: &mut Vec<Dequeued>,
    ) -> Option<u64> {
        let mut expired_now = 0;
        let head = loop {
            if expired_now == EXPIRY_ROUND_MAX {
                // The rest is due now: the timer's next tick goes on.
                return Some(now_ms);
            }
            let taken = self.pop_loaded(log, now_ms)?;
            if !taken.meta.expires.is_due(now_ms) {
                break taken;
            }
            expired.push(taken);
            expired_now += 1;
        };
        let next = head.meta.expires.deadline();
        self.put_back(head);
        next
    }

    /// Whether the head's expiry is known without reading the log.
    /// When the message at the head arrived, ms since the epoch; None for
    /// an empty queue, and for a head recovered from the log whose arrival
    /// has not been read yet. In a FIFO queue it is the oldest waiting.
    pub fn head_arrived_ms(&self) -> Option<u64> {
        self.backlog
            .front()
            .map(|(_, queued)| queued.meta.arrived_ms)
            .filter(|arrived| *arrived > 0)
    }

    pub fn head_expiry(&self) -> Option<Expiry> {
        self.backlog.front().map(|(_, queued)| queued.meta.expires)
    }

    /// Returns a message taken by `pop_loaded` to the head, unchanged.
    fn put_back(&mut self, taken: Dequeued) {
        self.resident_messages += 1;
        self.resident_bytes += taken.message.body.len();
        self.ready_bytes += taken.message.body.len() as u64;
        self.backlog.requeue(
            taken.sequence,
            QueuedMessage {
                body_bytes: taken.message.body.len() as u32,
                message: Some(taken.message),
                stored: taken.stored,
                redelivered: taken.redelivered,
                meta: taken.meta,
            },
        );
        self.gauge_ready();
    }

    /// Takes the head message with its body in memory, whatever its expiry.
    pub fn pop_loaded(&mut self, log: Option<&MessageLog>, now_ms: u64) -> Option<Dequeued> {
        loop {
            let (sequence, queued) = self.backlog.pop_front()?;
            self.gauge_ready();
            self.taken_since_look = self.taken_since_look.saturating_add(1);
            self.ready_bytes -= queued.body_bytes as u64;
            let mut meta = queued.meta;
            let message = match queued.message {
                Some(message) => {
                    self.resident_messages -= 1;
                    self.resident_bytes -= message.body.len();
                    message
                }
                None => match load(log, queued.stored) {
                    Ok((message, arrived_ms)) => {
                        // A message stored before arrival times were kept
                        // counts as arriving now.
                        let arrived_ms = arrived_ms.unwrap_or(now_ms);
                        if meta.expires.is_unknown() {
                            meta.expires = self.expiry_of(&message, arrived_ms);
                            meta.arrived_ms = arrived_ms;
                        }
                        Arc::new(message)
                    }
                    Err(reason) => {
                        log_unreadable(&self.describe(), sequence, &reason);
                        match (log, queued.stored) {
                            (Some(log), Stored::Paged(location)) => log.release_paged(location),
                            (Some(log), Stored::Published(location)) => log.release(location),
                            _ => {}
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
                meta,
            });
        }
    }

    /// Empties the queue at once and hands back its backlog, whose stored
    /// copies the caller forgets (see `Discard`): O(1), however long the
    /// queue was.
    pub fn take_backlog(&mut self) -> Box<dyn Backlog<QueuedMessage>> {
        let empty = empty_backlog(&self.args, self.spill.as_ref());
        self.resident_messages = 0;
        self.resident_bytes = 0;
        self.ready_bytes = 0;
        let taken = std::mem::replace(&mut self.backlog, empty);
        self.gauge_ready();
        taken
    }

    /// Body bytes of the waiting messages.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Waiting messages whose body is in memory.
    pub fn resident_count(&self) -> usize {
        self.resident_messages
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
        BrokerError::Locked(self.resource())
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
            BrokerError::Inequivalent(Box::new(Inequivalence {
                what: what.to_owned(),
                resource: self.resource(),
                received,
                current,
            }))
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
            let received = with_default_type(key, arguments.inner().get(*key));
            let current = with_default_type(key, self.arguments.inner().get(*key));
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

/// A queue's backlog as its arguments shape it: one per priority level
/// for a priority queue.
fn empty_backlog(
    args: &QueueArguments,
    spill: Option<&Arc<SpillArea>>,
) -> Box<dyn Backlog<QueuedMessage>> {
    match args.max_priority {
        Some(max) => Box::new(PriorityBacklog::new(max, spill)),
        None => Box::new(SpillingBacklog::new(spill.cloned())),
    }
}

/// A queue declared without `x-queue-type` is a classic queue, so the
/// argument's absence and `classic` are the same declaration.
fn with_default_type<'a>(key: &str, value: Option<&'a AMQPValue>) -> Option<&'a AMQPValue> {
    static CLASSIC: std::sync::LazyLock<AMQPValue> =
        std::sync::LazyLock::new(|| AMQPValue::LongString("classic".into()));
    match value {
        None if key == "x-queue-type" => Some(&CLASSIC),
        other => other,
    }
}

fn argument_equivalent(left: Option<&AMQPValue>, right: Option<&AMQPValue>) -> bool {
    match (left, right) {
        (None, None) => true,
        (Some(left), Some(right)) => {
            match (
                crate::field::as_integer(left),
                crate::field::as_integer(right),
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
        Some(other) => match crate::field::as_integer(other) {
            Some(number) => number.to_string(),
            None => format!("{other:?}"),
        },
    }
}

/// Reads a stored message and the time it arrived (ms since the epoch).
pub(crate) fn load(
    log: Option<&MessageLog>,
    stored: Stored,
) -> Result<(Message, Option<u64>), String> {
    let (Some(log), Some(location)) = (log, stored.location()) else {
        return Err("the message was paged out but no log is attached".to_owned());
    };
    let payload = log.read(location).map_err(|error| error.to_string())?;
    decode_stored_message(&payload).map_err(|error| error.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every waiting message costs one backlog entry, paged out or not:
    /// at 72 bytes a million-message backlog keeps about 69 MiB in memory.
    #[test]
    fn a_backlog_entry_stays_small() {
        assert!(std::mem::size_of::<(Sequence, QueuedMessage)>() <= 72);
    }

    #[test]
    fn expiries_keep_their_meaning_in_one_word() {
        assert_eq!(Expiry::at(5).deadline(), Some(5));
        assert!(Expiry::at(5).is_due(5));
        assert!(!Expiry::at(5).is_due(4));
        assert_eq!(Expiry::NEVER.deadline(), None);
        assert!(!Expiry::NEVER.is_due(u64::MAX));
        assert!(Expiry::UNKNOWN.is_unknown());
        assert!(!Expiry::UNKNOWN.is_due(u64::MAX));
        assert_eq!(Expiry::at(u64::MAX), Expiry::NEVER);
    }
}
