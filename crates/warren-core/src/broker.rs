//! The broker's state machine: vhosts, exchanges, queues, connections'
//! channels, consumers and unacknowledged deliveries.
//!
//! Every operation takes `&mut self` and an [`Outbox`] into which it puts the
//! deliveries and notifications it causes for any connection. It never
//! blocks and never touches a socket: the server holds the broker behind one
//! lock, calls an operation, and hands the outbox's effects to the
//! connections' writers before releasing the lock, which keeps each
//! connection's frames in the order the broker decided them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::{MessageLog, RecordKind, Sequence, StoreError, Ticket, TopologyChange};

use crate::arguments::{Overflow, QueueArguments, QueueShape, message_expiration_ms};
use crate::bindings::Bindings;
use crate::codec::encode_message_head;
use crate::dead_letter::{DeadLetter, DeathReason};
use crate::delivery::{SettleRound, Settled, Settling};
use crate::discard::{Discard, forget_copy};
use crate::durable::{
    DurableDestination, Store, binding_entry, exchange_entry, exchange_removal, queue_entry,
};
use crate::error::{BrokerError, BrokerResult, ErrorCode};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, validate_headers_binding};
use crate::queue::{MessageMeta, Queue, ReadAhead, Stored};
use crate::reply_to::ReplyConsumer;
use crate::stats::MessageCounts;
use crate::{ConnectionId, Message, QueueId};

/// The default for `Limits::flow_ready_max`: far under what a queue holds
/// in memory (`RESIDENT_MESSAGES_MAX`), so a queue whose consumers keep up
/// delivers from memory, and a message waits behind about a millisecond of
/// its consumers' work.
pub const FLOW_READY_MAX_DEFAULT: usize = 100;

/// Bounds on what one channel may hold; each exists so that one peer cannot
/// grow the broker's memory without limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Consumers one channel may hold.
    pub consumers_per_channel_max: usize,
    /// Unacknowledged deliveries one channel may hold, whatever its prefetch:
    /// a consumer with prefetch 0 stops receiving at this many.
    pub unacked_per_channel_max: usize,
    /// Deliveries handed to a connection's writer but not yet written to its
    /// socket. A consumer that does not read its socket stops receiving here
    /// instead of making the broker buffer its whole queue.
    pub deliveries_unwritten_per_channel_max: u32,
    /// Ready messages in a queue with consumers past which publishers to it
    /// are held back until it is down to half (see `flow.rs`); 0 turns flow
    /// control off.
    pub flow_ready_max: usize,
    /// Queues one vhost may hold, so that one tenant cannot exhaust the
    /// broker's memory with declarations; RabbitMQ's `max-queues` vhost
    /// limit, on by default here.
    pub queues_per_vhost_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            consumers_per_channel_max: 1_000,
            unacked_per_channel_max: 100_000,
            deliveries_unwritten_per_channel_max: 2_048,
            flow_ready_max: FLOW_READY_MAX_DEFAULT,
            queues_per_vhost_max: 100_000,
        }
    }
}

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub connection: ConnectionId,
    pub channel: u16,
    pub consumer_tag: ShortString,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// The channel's count of deliveries not yet on the wire, which the
    /// connection's writer lowers once it has written this one.
    pub unwritten: Arc<UnwrittenDeliveries>,
}

/// Deliveries handed to a connection's writer and not yet written to its
/// socket, for one channel. The broker raises the count as it delivers and
/// stops at `Limits::deliveries_unwritten_per_channel_max`; the writer
/// lowers it without the broker's lock, and takes the lock only when the
/// broker stopped at the limit and must be told to go on.
#[derive(Debug, Default)]
pub struct UnwrittenDeliveries {
    count: AtomicU32,
    /// Set by the broker when it stopped delivering at the limit.
    stopped: AtomicBool,
}

impl UnwrittenDeliveries {
    /// Whether another delivery fits under `limit`. Called under the
    /// broker's lock. When it does not, the broker marks itself stopped
    /// and looks again, so that a writer lowering the count at the same
    /// moment either sees the mark (and resumes the channel) or is seen.
    pub(crate) fn has_room(&self, limit: u32) -> bool {
        if self.count.load(Ordering::SeqCst) < limit {
            return true;
        }
        self.stopped.store(true, Ordering::SeqCst);
        self.count.load(Ordering::SeqCst) < limit
    }

    pub(crate) fn add_one(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer has written `count` of them; true when the broker had
    /// stopped at the limit and must now be asked to deliver again.
    pub fn written(&self, count: u32) -> bool {
        self.count.fetch_sub(count, Ordering::SeqCst);
        self.stopped.swap(false, Ordering::SeqCst)
    }
}

/// Something the broker decided that a connection, or the store's worker,
/// must carry out.
#[derive(Debug)]
pub enum Effect {
    Deliver(Delivery),
    /// The broker cancelled a consumer because its queue went away
    /// (`basic.cancel` sent by the server).
    CancelConsumer {
        connection: ConnectionId,
        channel: u16,
        consumer_tag: ShortString,
    },
    /// The broker closes a channel (a consumer timeout): the connection
    /// sends `channel.close` with this error and releases the channel.
    CloseChannel {
        connection: ConnectionId,
        channel: u16,
        error: BrokerError,
    },
    /// Read these paged-out messages back off the lock and hand them to
    /// `Broker::install_read_ahead` (only once `enable_store_worker` is on).
    ReadAhead(ReadAhead),
    /// Run this discard off the lock (only once `enable_store_worker` is
    /// on).
    Discard(Discard),
}

#[derive(Debug, Default)]
pub struct Outbox {
    pub effects: Vec<Effect>,
}

impl Outbox {
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}

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

pub(crate) struct VHost {
    pub(crate) name: String,
    pub(crate) exchanges: HashMap<ShortString, Exchange>,
    pub(crate) queues: HashMap<ShortString, QueueId>,
}

pub(crate) struct Unacked {
    pub(crate) queue: QueueId,
    pub(crate) sequence: Sequence,
    pub(crate) message: Arc<Message>,
    pub(crate) stored: Stored,
    pub(crate) meta: MessageMeta,
    /// None for a message taken with `basic.get`.
    pub(crate) consumer_tag: Option<ShortString>,
    /// When the queue's `x-consumer-timeout` runs out for this delivery.
    pub(crate) ack_deadline_ms: Option<u64>,
}

#[derive(Default)]
pub(crate) struct ChannelState {
    pub(crate) next_delivery_tag: u64,
    pub(crate) unacked: BTreeMap<u64, Unacked>,
    /// `basic.qos` with global=false: applies to consumers started afterwards.
    pub(crate) consumer_prefetch: u16,
    /// `basic.qos` with global=true: shared by all consumers on the channel.
    pub(crate) global_prefetch: u16,
    pub(crate) consumers: HashMap<ShortString, QueueId>,
    pub(crate) unwritten: Arc<UnwrittenDeliveries>,
    /// The channel's direct reply-to consumer, if it has one.
    pub(crate) reply_consumer: Option<ReplyConsumer>,
    /// The earliest ack deadline among the unacked deliveries (it may
    /// belong to a delivery acked since; the timer then looks again).
    pub(crate) ack_deadline_ms: Option<u64>,
    /// Set once a consumer timeout asked the connection to close the
    /// channel: it gets no more deliveries meanwhile.
    pub(crate) closing: bool,
    /// The channel's publishing mode, for the management API.
    pub(crate) mode: ChannelMode,
}

/// Channels' earliest acknowledgement deadlines, earliest first. An entry
/// may be stale (its delivery acked, its channel closed): the timer then
/// looks at the channel once and moves on.
pub(crate) type AckDeadlines = BTreeSet<(u64, ConnectionId, u16)>;

/// How a channel's publishes are settled (`confirm.select`, `tx.select`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChannelMode {
    #[default]
    Plain,
    Confirm,
    Transactional,
}

impl ChannelState {
    pub(crate) fn accepts(&self, no_ack: bool, limits: &Limits) -> bool {
        if self.closing
            || !self
                .unwritten
                .has_room(limits.deliveries_unwritten_per_channel_max)
        {
            return false;
        }
        no_ack
            || (self.unacked.len() < limits.unacked_per_channel_max
                && (self.global_prefetch == 0
                    || self.unacked.len() < self.global_prefetch as usize))
    }

    /// Notes a delivery's acknowledgement deadline, if it has one; a
    /// deadline earlier than the channel's goes into the broker's
    /// `deadlines`, which the timer takes due entries from.
    pub(crate) fn track_ack_deadline(
        &mut self,
        deadline_ms: Option<u64>,
        deadlines: &mut AckDeadlines,
        connection: ConnectionId,
        channel: u16,
    ) {
        let Some(at) = deadline_ms else {
            return;
        };
        if self.ack_deadline_ms.is_none_or(|current| at < current) {
            self.ack_deadline_ms = Some(at);
            deadlines.insert((at, connection, channel));
        }
    }

    pub(crate) fn take_delivery_tag(&mut self) -> u64 {
        self.next_delivery_tag += 1;
        self.next_delivery_tag
    }
}

pub(crate) struct ConnectionState {
    pub(crate) vhost: String,
    pub(crate) channels: HashMap<u16, ChannelState>,
    pub(crate) exclusive_queues: Vec<QueueId>,
    /// Whether the client understands a server-sent `basic.cancel`.
    pub(crate) cancel_notify: bool,
}

pub struct Broker {
    pub(crate) vhosts: HashMap<String, VHost>,
    pub(crate) queues: HashMap<QueueId, Queue>,
    pub(crate) connections: HashMap<ConnectionId, ConnectionState>,
    pub(crate) next_queue_id: u64,
    /// The message log and topology file; None for a broker that keeps
    /// everything in memory (tests of the state machine).
    pub(crate) store: Option<Store>,
    /// Whether the caller runs the store's slow work off the lock
    /// (`Effect::ReadAhead`, `Effect::Discard`).
    pub(crate) store_worker: bool,
    pub(crate) name_state: u64,
    pub(crate) limits: Limits,
    /// The time as the caller last gave it, ms since the UNIX epoch; never
    /// goes backwards.
    pub(crate) now_ms: u64,
    /// Queues that want the timer at a given time (message expiry,
    /// `x-expires`), earliest first.
    pub(crate) timers: BTreeSet<(u64, QueueId)>,
    /// Channels with a delivery under `x-consumer-timeout`, by deadline.
    pub(crate) ack_deadlines: AckDeadlines,
    /// Messages on their way to a dead-letter exchange; the delivery loop
    /// routes them (see `deliver_all`).
    pub(crate) dead_letters: Vec<DeadLetter>,
    /// Messages published by clients, and the counts of deleted queues:
    /// with the live queues' counts, the broker-wide totals.
    pub(crate) counts: MessageCounts,
    /// Deliveries of large settles still to be settled, oldest first (see
    /// `continue_settling`).
    pub(crate) pending_settles: VecDeque<SettleRound>,
    /// Durable entries the current operation added and removed, handed to
    /// the topology journal when it ends (`sync_topology`).
    pub(crate) topology_changes: Vec<TopologyChange>,
    /// The journal ticket that makes the last recorded changes durable,
    /// until the caller takes it to hold its reply for it.
    pub(crate) topology_ticket: Option<Ticket>,
}

const BUILTIN_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

impl Broker {
    /// `seed` makes server-generated names unpredictable across runs.
    pub fn new(vhost_names: &[String], limits: Limits, seed: u64) -> Self {
        let mut broker = Self {
            vhosts: HashMap::new(),
            queues: HashMap::new(),
            connections: HashMap::new(),
            next_queue_id: 0,
            store: None,
            store_worker: false,
            name_state: seed | 1,
            limits,
            now_ms: 0,
            timers: BTreeSet::new(),
            ack_deadlines: AckDeadlines::new(),
            dead_letters: Vec::new(),
            counts: MessageCounts::default(),
            pending_settles: VecDeque::new(),
            topology_changes: Vec::new(),
            topology_ticket: None,
        };
        broker.add_vhost("/");
        for name in vhost_names {
            broker.add_vhost(name);
        }
        broker
    }

    pub fn add_vhost(&mut self, name: &str) {
        self.vhosts.entry(name.to_owned()).or_insert_with(|| {
            let exchanges = BUILTIN_EXCHANGES
                .iter()
                .map(|(name, kind)| {
                    let exchange = Exchange {
                        name: (*name).into(),
                        kind: *kind,
                        durable: true,
                        auto_delete: false,
                        internal: false,
                        arguments: FieldTable::default(),
                        bindings: Bindings::new(*kind),
                        counts: Default::default(),
                    };
                    ((*name).into(), exchange)
                })
                .collect();
            VHost {
                name: name.to_owned(),
                exchanges,
                queues: HashMap::new(),
            }
        });
    }

    pub fn vhost_exists(&self, name: &str) -> bool {
        self.vhosts.contains_key(name)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- connections and channels -------------------------------------

    pub fn open_connection(&mut self, connection: ConnectionId, vhost: &str, cancel_notify: bool) {
        debug_assert!(self.vhost_exists(vhost));
        self.connections.insert(
            connection,
            ConnectionState {
                vhost: vhost.to_owned(),
                channels: HashMap::new(),
                exclusive_queues: Vec::new(),
                cancel_notify,
            },
        );
    }

    /// Releases everything the connection held: its channels' unacked
    /// messages go back to their queues and its exclusive queues are deleted.
    pub(crate) fn close_connection_unsaved(&mut self, connection: ConnectionId, out: &mut Outbox) {
        let channels: Vec<u16> = match self.connections.get(&connection) {
            Some(state) => state.channels.keys().copied().collect(),
            None => return,
        };
        for channel in channels {
            self.close_channel_unsaved(connection, channel, out);
        }
        if let Some(state) = self.connections.remove(&connection) {
            for queue in state.exclusive_queues {
                self.delete_queue_by_id(queue, out);
            }
        }
    }

    pub fn open_channel(&mut self, connection: ConnectionId, channel: u16) {
        if let Some(state) = self.connections.get_mut(&connection) {
            state.channels.insert(channel, ChannelState::default());
        }
    }

    /// Cancels the channel's consumers and requeues its unacked messages, in
    /// delivery order, each to its original position.
    pub(crate) fn close_channel_unsaved(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        out: &mut Outbox,
    ) {
        let Some(state) = self
            .connections
            .get_mut(&connection)
            .and_then(|state| state.channels.remove(&channel))
        else {
            return;
        };
        let mut touched = Vec::new();
        for (tag, queue) in state.consumers {
            self.detach_consumer(queue, connection, channel, tag.as_str(), out);
            touched.push(queue);
        }
        self.settle_deliveries(
            connection,
            channel,
            Settling::Many(state.unacked),
            Settled::Requeue,
            out,
        );
        self.deliver_all(&touched, out);
    }

    /// Notes `confirm.select` or `tx.select`, which the management API shows.
    pub fn set_channel_mode(&mut self, connection: ConnectionId, channel: u16, mode: ChannelMode) {
        if let Some(state) = self.channel_mut(connection, channel) {
            state.mode = mode;
        }
    }

    /// `basic.qos` (prefetch_size has been checked by the caller).
    pub fn set_prefetch(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        prefetch_count: u16,
        global: bool,
        out: &mut Outbox,
    ) {
        if let Some(state) = self.channel_mut(connection, channel) {
            if global {
                state.global_prefetch = prefetch_count;
            } else {
                state.consumer_prefetch = prefetch_count;
            }
        }
        self.deliver_to_channel(connection, channel, out);
    }

    /// The writer has put `count` deliveries of this channel on the wire
    /// (what a writer does through `UnwrittenDeliveries::written` and
    /// `resume_deliveries`, in one call).
    pub fn deliveries_written(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        count: u32,
        out: &mut Outbox,
    ) {
        let Some(state) = self.channel_mut(connection, channel) else {
            return;
        };
        if state.unwritten.written(count) {
            self.resume_deliveries(connection, channel, out);
        }
    }

    /// Delivers to a channel the broker had stopped delivering to because
    /// its writer was behind.
    pub fn resume_deliveries(&mut self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        self.deliver_to_channel(connection, channel, out);
    }

    // ----- exchanges -----------------------------------------------------

    pub(crate) fn declare_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        declare: ExchangeDeclare,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        let name = declare.name.as_str();
        if name.is_empty() {
            return Err(BrokerError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if declare.passive {
            return match vhost.exchanges.get(name) {
                Some(_) => Ok(()),
                None => Err(BrokerError::not_found(format!(
                    "no exchange '{name}' in vhost '{vhost_name}'"
                ))),
            };
        }
        // RabbitMQ 3.x closed the connection with 503 here; the current
        // RabbitMQ closes only the channel, with 406.
        let Some(kind) = ExchangeKind::parse(declare.kind.as_str()) else {
            return Err(BrokerError::precondition_failed(format!(
                "invalid exchange type '{}'",
                declare.kind
            )));
        };
        if let Some(alternate) = declare.arguments.inner().get("alternate-exchange")
            && crate::arguments::as_text(alternate).is_none()
        {
            return Err(BrokerError::precondition_failed(format!(
                "invalid arg 'alternate-exchange' for exchange '{name}' in vhost \
                 '{vhost_name}': expected the name of an exchange as a string"
            )));
        }
        if let Some(existing) = vhost.exchanges.get(name) {
            let inequivalent = |what: &str, received: &str, current: &str| {
                BrokerError::precondition_failed(format!(
                    "inequivalent arg '{what}' for exchange '{name}' in vhost '{vhost_name}': \
                     received '{received}' but current is '{current}'"
                ))
            };
            if existing.kind != kind {
                return Err(inequivalent("type", kind.name(), existing.kind.name()));
            }
            for (what, received, current) in [
                ("durable", declare.durable, existing.durable),
                ("auto_delete", declare.auto_delete, existing.auto_delete),
                ("internal", declare.internal, existing.internal),
            ] {
                if received != current {
                    return Err(inequivalent(
                        what,
                        &received.to_string(),
                        &current.to_string(),
                    ));
                }
            }
            let alternate = "alternate-exchange";
            let received =
                crate::queue::describe_argument(declare.arguments.inner().get(alternate));
            let current =
                crate::queue::describe_argument(existing.arguments.inner().get(alternate));
            if received != current {
                return Err(inequivalent(alternate, &received, &current));
            }
            return Ok(());
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!(
                "exchange name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let exchange = Exchange {
            name: declare.name,
            kind,
            durable: declare.durable,
            auto_delete: declare.auto_delete,
            internal: declare.internal,
            arguments: declare.arguments,
            bindings: Bindings::new(kind),
            counts: Default::default(),
        };
        if let Some(entry) = exchange_entry(&vhost_name, &exchange) {
            self.topology_changes.push(TopologyChange::Added(entry));
        }
        vhost.exchanges.insert(exchange.name.clone(), exchange);
        Ok(())
    }

    pub(crate) fn delete_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        if name.is_empty() || name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!(
                "operation not permitted on {}",
                if name.is_empty() {
                    "the default exchange".to_owned()
                } else {
                    format!("exchange '{name}'")
                }
            )));
        }
        let Some(exchange) = vhost.exchanges.get(name) else {
            // Deleting what does not exist succeeds, as in RabbitMQ.
            return Ok(());
        };
        if if_unused && !exchange.bindings.is_empty() {
            return Err(BrokerError::precondition_failed(format!(
                "exchange '{name}' in vhost '{vhost_name}' in use"
            )));
        }
        remove_exchange(vhost, name, &mut self.topology_changes);
        Ok(())
    }

    /// `exchange.bind` (bind = true) and `exchange.unbind`. Unbinding
    /// succeeds when either exchange is gone, as in RabbitMQ: the binding
    /// went with it (an auto-delete exchange, typically, that just went).
    pub(crate) fn bind_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        destination: &str,
        source: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        if source.is_empty() || destination.is_empty() {
            return Err(BrokerError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        for name in [destination, source] {
            if !vhost.exchanges.contains_key(name) {
                if !bind {
                    return Ok(());
                }
                return Err(BrokerError::not_found(format!(
                    "no exchange '{name}' in vhost '{vhost_name}'"
                )));
            }
        }
        let persisted = (vhost.exchanges[source].durable && vhost.exchanges[destination].durable)
            .then(|| {
                binding_entry(
                    &vhost_name,
                    source,
                    DurableDestination::Exchange(destination),
                    routing_key.as_str(),
                    &arguments,
                )
            });
        let binding = Binding {
            destination: Destination::Exchange(destination.into()),
            routing_key,
            arguments,
            persisted,
        };
        if bind {
            if vhost.exchanges[source].kind == ExchangeKind::Headers {
                validate_headers_binding(&binding.arguments)?;
            }
            add_binding(vhost, source, binding, &mut self.topology_changes);
        } else {
            remove_binding(vhost, source, &binding, &mut self.topology_changes);
        }
        Ok(())
    }

    // ----- queues --------------------------------------------------------

    /// `server_named`: the name came from `generate_queue_name`, so its
    /// `amq.gen-` prefix is the broker's own and not a reserved name.
    pub(crate) fn declare_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
        server_named: bool,
    ) -> BrokerResult<QueueDeclared> {
        let vhost_name = self.vhost_of(connection)?;
        let mut name = declare.name.clone();
        if declare.passive
            && let Some(declared) = self.declare_reply_to_passive(name.as_str())
        {
            return declared;
        }
        if let Some(id) = self.vhosts[&vhost_name].queues.get(name.as_str()).copied() {
            let now_ms = self.now_ms;
            let queue = self.queues.get_mut(&id).expect("named queues exist");
            queue.check_access(connection)?;
            queue.last_used_ms = now_ms;
            if !declare.passive {
                queue.check_equivalent(
                    declare.durable,
                    declare.exclusive,
                    declare.auto_delete,
                    &declare.arguments,
                )?;
            }
            return Ok(QueueDeclared {
                name,
                message_count: queue.ready_count() as u32,
                consumer_count: queue.consumers.len() as u32,
            });
        }
        if declare.passive {
            return Err(BrokerError::not_found(format!(
                "no queue '{name}' in vhost '{vhost_name}'"
            )));
        }
        if name.as_str().is_empty() {
            name = self.generate_queue_name();
        } else if name.as_str().starts_with("amq.") && !server_named {
            return Err(BrokerError::access_refused(format!(
                "queue name '{name}' contains reserved prefix 'amq.*'"
            )));
        }
        let queues_max = self.limits.queues_per_vhost_max;
        if self.vhosts[&vhost_name].queues.len() >= queues_max {
            return Err(BrokerError::precondition_failed(format!(
                "cannot declare queue '{name}': queue limit in virtual host '{vhost_name}' \
                 is reached ({queues_max})"
            )));
        }
        let args = QueueArguments::parse(
            &declare.arguments,
            &QueueShape {
                name: name.as_str(),
                vhost: &vhost_name,
                durable: declare.durable,
                exclusive: declare.exclusive,
                auto_delete: declare.auto_delete,
            },
        )?;
        self.next_queue_id += 1;
        let id = QueueId(self.next_queue_id);
        let owner = declare.exclusive.then_some(connection);
        let expires_ms = args.expires_ms;
        let queue = Queue::new(
            id,
            name.clone(),
            vhost_name.clone(),
            declare.durable,
            owner,
            declare.auto_delete,
            declare.arguments,
            args,
            self.now_ms,
        );
        if let Some(entry) = queue_entry(&queue) {
            self.topology_changes
                .push(TopologyChange::Added(entry.into()));
        }
        self.queues.insert(id, queue);
        if let Some(expires_ms) = expires_ms {
            self.schedule(id, self.now_ms.saturating_add(expires_ms));
        }
        self.vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists")
            .queues
            .insert(name.clone(), id);
        if let Some(owner) = owner
            && let Some(state) = self.connections.get_mut(&owner)
        {
            state.exclusive_queues.push(id);
        }
        Ok(QueueDeclared {
            name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    /// `queue.bind` (bind = true) and `queue.unbind`. Unbinding succeeds
    /// when the queue or the exchange is gone, as in RabbitMQ: clients
    /// unbind an auto-delete reply queue after cancelling its consumer,
    /// which deleted it and its bindings.
    pub(crate) fn bind_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        if exchange.is_empty() {
            return Err(BrokerError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let id = match self.queue_for(connection, queue) {
            Ok(id) => id,
            Err(error) if !bind && error.code == ErrorCode::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        let Some(source) = vhost.exchanges.get(exchange) else {
            if !bind {
                return Ok(());
            }
            return Err(BrokerError::not_found(format!(
                "no exchange '{exchange}' in vhost '{vhost_name}'"
            )));
        };
        let target = &self.queues[&id];
        let persisted = (source.durable && target.persists_messages()).then(|| {
            binding_entry(
                &vhost_name,
                exchange,
                DurableDestination::Queue(target.name.as_str()),
                routing_key.as_str(),
                &arguments,
            )
        });
        let binding = Binding {
            destination: Destination::Queue(id),
            routing_key,
            arguments,
            persisted,
        };
        if bind {
            if source.kind == ExchangeKind::Headers {
                validate_headers_binding(&binding.arguments)?;
            }
            add_binding(vhost, exchange, binding, &mut self.topology_changes);
        } else {
            remove_binding(vhost, exchange, &binding, &mut self.topology_changes);
        }
        Ok(())
    }

    /// Removes the queue's waiting messages; returns how many there were.
    pub fn purge_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        if crate::reply_to::is_reply_to_name(queue) {
            return Err(BrokerError::not_found(format!("no queue '{queue}'")));
        }
        let id = self.queue_for(connection, queue)?;
        let queue = self
            .queues
            .get_mut(&id)
            .expect("queue_for returns live queues");
        let count = queue.ready_count() as u32;
        let discard = Discard::new(id, true, queue.take_backlog());
        self.dispose(discard, out);
        Ok(count)
    }

    /// Deletes a queue; returns the number of messages it held.
    pub(crate) fn delete_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        let id = match self.queue_for(connection, queue) {
            Ok(id) => id,
            // Deleting what does not exist succeeds, as in RabbitMQ.
            Err(error) if error.code == ErrorCode::NotFound => return Ok(0),
            Err(error) => return Err(error),
        };
        let queue = &self.queues[&id];
        if if_unused && !queue.consumers.is_empty() {
            return Err(BrokerError::precondition_failed(format!(
                "{} in use",
                queue.describe()
            )));
        }
        if if_empty && queue.ready_count() > 0 {
            return Err(BrokerError::precondition_failed(format!(
                "{} not empty",
                queue.describe()
            )));
        }
        Ok(self.delete_queue_by_id(id, out))
    }

    /// Runs a discard: on the store's worker when there is one, since its
    /// cost grows with the queue, or here.
    fn dispose(&self, discard: Discard, out: &mut Outbox) {
        if discard.is_empty() {
            return;
        }
        match &self.store {
            Some(_) if self.store_worker => out.effects.push(Effect::Discard(discard)),
            Some(store) => discard.run_in_place(&store.log),
            None => {}
        }
    }

    pub(crate) fn delete_queue_by_id(&mut self, id: QueueId, out: &mut Outbox) -> u32 {
        let Some(mut queue) = self.queues.remove(&id) else {
            return 0;
        };
        queue.flow_gauge.mark_deleted();
        if let Some(entry) = queue_entry(&queue) {
            self.topology_changes
                .push(TopologyChange::Removed(entry.into()));
        }
        if let Some(at) = queue.scheduled_ms {
            self.timers.remove(&(at, id));
        }
        let message_count = queue.ready_count() as u32;
        self.counts += MessageCounts {
            published: 0,
            unroutable: 0,
            ..queue.counts
        };
        // The topology no longer names the queue, so recovery ignores its
        // records; the log only needs to stop counting them.
        let discard = Discard::new(id, false, queue.take_backlog());
        self.dispose(discard, out);
        if let Some(vhost) = self.vhosts.get_mut(&queue.vhost) {
            vhost.queues.remove(queue.name.as_str());
            let destination = Destination::Queue(id);
            let sources: Vec<ShortString> = vhost
                .exchanges
                .values()
                .filter(|exchange| exchange.bindings.leads_to(&destination))
                .map(|exchange| exchange.name.clone())
                .collect();
            for source in sources {
                remove_bindings_to(
                    vhost,
                    source.as_str(),
                    &destination,
                    &mut self.topology_changes,
                );
            }
        }
        if let Some(owner) = queue.exclusive_owner
            && let Some(state) = self.connections.get_mut(&owner)
        {
            state.exclusive_queues.retain(|queue| *queue != id);
        }
        for consumer in queue.consumers {
            let Some(connection) = self.connections.get_mut(&consumer.connection) else {
                continue;
            };
            if let Some(channel) = connection.channels.get_mut(&consumer.channel) {
                channel.consumers.remove(&consumer.tag);
            }
            if connection.cancel_notify {
                out.effects.push(Effect::CancelConsumer {
                    connection: consumer.connection,
                    channel: consumer.channel,
                    consumer_tag: consumer.tag,
                });
            }
        }
        message_count
    }

    // ----- publishing ----------------------------------------------------

    /// Routes a message and enqueues it on every queue it reaches. A
    /// persistent message bound for a durable queue is appended to the log;
    /// the outcome carries the ticket to wait for before confirming it.
    pub fn publish(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        message: Arc<Message>,
        out: &mut Outbox,
    ) -> BrokerResult<Published> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = &self.vhosts[&vhost_name];
        let exchange_name = message.exchange.clone();
        let exchange_name = exchange_name.as_str();
        let Some(exchange) = vhost.exchanges.get(exchange_name) else {
            return Err(BrokerError::not_found(format!(
                "no exchange '{exchange_name}' in vhost '{vhost_name}'"
            )));
        };
        if exchange.internal {
            return Err(BrokerError::access_refused(format!(
                "cannot publish to internal exchange '{exchange_name}' in vhost '{vhost_name}'"
            )));
        }
        message_expiration_ms(message.properties.expiration().as_ref())?;
        self.counts.published += 1;
        let message = self.address_replies(connection, channel, message)?;
        if exchange_name.is_empty()
            && crate::reply_to::is_reply_to_name(message.routing_key.as_str())
        {
            let routed = self.deliver_reply(message, out);
            return Ok(Published {
                routed,
                ..Published::default()
            });
        }
        let vhost = &self.vhosts[&vhost_name];
        let exchange = &vhost.exchanges[exchange_name];
        let targets = route(vhost, exchange, &message);
        exchange.count_publish(!targets.is_empty());
        self.counts.unroutable += targets.is_empty() as u64;
        let mut outcome = Published {
            routed: targets.len(),
            ..Published::default()
        };
        self.enqueue_routed(&targets, message, &mut outcome);
        self.deliver_all(&targets, out);
        outcome.flow = self
            .queue_over_flow_limit(&targets)
            .filter(|_| !self.connection_consumes(connection));
        // A message with a TTL of 0 that found no consumer expires now.
        if self.expire_due_heads(&targets) {
            self.deliver_all(&[], out);
        }
        Ok(outcome)
    }

    /// Puts a routed message on each of its queues, applying their length
    /// limits; dead letters it causes are left for `deliver_all`.
    pub(crate) fn enqueue_routed(
        &mut self,
        targets: &[QueueId],
        message: Arc<Message>,
        outcome: &mut Published,
    ) {
        let log = self.store.as_ref().map(|store| &store.log);
        let now_ms = self.now_ms;
        let mut head: Option<Vec<u8>> = None;
        let mut expiries = Vec::new();
        let mut dead_letters = Vec::new();
        for id in targets {
            let Some(queue) = self.queues.get_mut(id) else {
                continue;
            };
            if queue.args.overflow != Overflow::DropHead && queue.would_overflow(message.body.len())
            {
                outcome.rejected = true;
                if queue.args.overflow == Overflow::RejectPublishDlx {
                    dead_letters.push(DeadLetter {
                        queue: *id,
                        sequence: 0,
                        message: Arc::clone(&message),
                        stored: Stored::Nowhere,
                        reason: DeathReason::Maxlen,
                    });
                }
                continue;
            }
            let sequence = queue.allocate_sequence();
            let mut stored = Stored::Nowhere;
            if queue.persists(&message)
                && let Some(log) = log
            {
                let head = head.get_or_insert_with(|| encode_message_head(&message, now_ms));
                match log.append_message_with_tail(
                    RecordKind::Publish,
                    id.0,
                    sequence,
                    head,
                    &message.body,
                ) {
                    Ok((location, ticket)) => {
                        stored = Stored::Published(location);
                        outcome.ticket = Some(ticket);
                    }
                    Err(error) => outcome.store_error = Some(error),
                }
            }
            let meta = queue.meta_for(&message, now_ms);
            queue.counts.published += 1;
            queue.enqueue(sequence, Arc::clone(&message), stored, meta, log);
            while queue.over_length() {
                let Some(dropped) = queue.pop_loaded(log, now_ms) else {
                    break;
                };
                dead_letters.push(DeadLetter {
                    queue: *id,
                    sequence: dropped.sequence,
                    message: dropped.message,
                    stored: dropped.stored,
                    reason: DeathReason::Maxlen,
                });
            }
            if let Some(at) = meta.expires.deadline() {
                expiries.push((*id, at));
            }
        }
        self.dead_letters.append(&mut dead_letters);
        for (id, at) in expiries {
            self.schedule(id, at);
        }
    }

    // ----- helpers -------------------------------------------------------

    /// The vhost a connection opened, which an operator may have deleted
    /// since: the connection is then being closed, and every operation it
    /// still sends is refused with 320 instead of touching the vhost.
    pub(crate) fn vhost_of(&self, connection: ConnectionId) -> BrokerResult<String> {
        let vhost = self
            .connections
            .get(&connection)
            .map(|state| state.vhost.clone())
            .ok_or_else(|| BrokerError::new(ErrorCode::InternalError, "connection is not open"))?;
        if !self.vhosts.contains_key(&vhost) {
            return Err(BrokerError::new(
                ErrorCode::ConnectionForced,
                format!("vhost '{vhost}' is deleted"),
            ));
        }
        Ok(vhost)
    }

    pub(crate) fn channel_mut(
        &mut self,
        connection: ConnectionId,
        channel: u16,
    ) -> Option<&mut ChannelState> {
        self.connections
            .get_mut(&connection)
            .and_then(|state| state.channels.get_mut(&channel))
    }

    /// Finds a queue by name for a connection, refusing another connection's
    /// exclusive queue.
    pub(crate) fn queue_for(&self, connection: ConnectionId, name: &str) -> BrokerResult<QueueId> {
        let vhost_name = self.vhost_of(connection)?;
        let id = self.vhosts[&vhost_name]
            .queues
            .get(name)
            .copied()
            .ok_or_else(|| {
                BrokerError::not_found(format!("no queue '{name}' in vhost '{vhost_name}'"))
            })?;
        self.queues[&id].check_access(connection)?;
        Ok(id)
    }

    /// A fresh name for a queue declared with an empty name, handed out
    /// before the declaration so that permissions can be checked against
    /// the name the queue will have, as RabbitMQ does.
    pub fn generate_queue_name(&mut self) -> ShortString {
        self.generate_name("amq.gen-").into()
    }

    /// A name like RabbitMQ's server-generated ones: a prefix and 22
    /// URL-safe characters.
    pub(crate) fn generate_name(&mut self, prefix: &str) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut name = String::with_capacity(prefix.len() + 22);
        name.push_str(prefix);
        for _ in 0..22 {
            // xorshift64: unpredictable enough for names, which only need to
            // be unique; uniqueness is checked against existing queues below.
            self.name_state ^= self.name_state << 13;
            self.name_state ^= self.name_state >> 7;
            self.name_state ^= self.name_state << 17;
            name.push(ALPHABET[(self.name_state % 64) as usize] as char);
        }
        if self
            .vhosts
            .values()
            .any(|vhost| vhost.queues.contains_key(name.as_str()))
        {
            return self.generate_name(prefix);
        }
        name
    }

    // ----- introspection -------------------------------------------------

    pub fn queue_counts(&self, vhost: &str, queue: &str) -> Option<(usize, usize)> {
        let id = self.vhosts.get(vhost)?.queues.get(queue)?;
        let queue = &self.queues[id];
        Some((queue.ready_count(), queue.consumers.len()))
    }

    pub fn unacked_count(&self, connection: ConnectionId, channel: u16) -> usize {
        self.connections
            .get(&connection)
            .and_then(|state| state.channels.get(&channel))
            .map_or(0, |state| state.unacked.len())
    }
}

/// Every queue a message reaches from `exchange`, following exchange-to-
/// exchange bindings once each, without duplicates. An exchange whose own
/// bindings match nothing passes the message to its `alternate-exchange`,
/// as RabbitMQ does.
pub(crate) fn route(vhost: &VHost, exchange: &Exchange, message: &Message) -> Vec<QueueId> {
    let routing_key = message.routing_key.as_str();
    let mut queues = DistinctQueues::default();
    if exchange.name.as_str().is_empty() {
        if let Some(id) = vhost.queues.get(routing_key) {
            queues.add(*id);
        }
        return queues.list;
    }
    let headers = message.properties.headers().as_ref();
    let mut visited: Vec<&str> = vec![exchange.name.as_str()];
    let mut pending: Vec<&Exchange> = vec![exchange];
    fn follow<'a>(
        vhost: &'a VHost,
        name: &str,
        visited: &mut Vec<&'a str>,
        pending: &mut Vec<&'a Exchange>,
    ) {
        if !visited.contains(&name)
            && let Some(next) = vhost.exchanges.get(name)
        {
            visited.push(next.name.as_str());
            pending.push(next);
        }
    }
    while let Some(exchange) = pending.pop() {
        let mut matched_any = false;
        exchange
            .bindings
            .route(routing_key, headers, |destination| {
                matched_any = true;
                match destination {
                    Destination::Queue(id) => queues.add(*id),
                    Destination::Exchange(name) => {
                        follow(vhost, name.as_str(), &mut visited, &mut pending)
                    }
                }
            });
        if !matched_any && let Some(alternate) = exchange.alternate_exchange() {
            follow(vhost, alternate, &mut visited, &mut pending);
        }
    }
    queues.list
}

/// Queues a message reaches, each once, in the order first reached: a
/// list while it is short (most messages reach one queue, and a list
/// allocates nothing more), with a set beside it once it is long, so that a
/// fan-out to thousands of queues is not quadratic.
#[derive(Default)]
struct DistinctQueues {
    list: Vec<QueueId>,
    set: Option<HashSet<QueueId>>,
}

impl DistinctQueues {
    const LIST_SCAN_MAX: usize = 16;

    fn add(&mut self, id: QueueId) {
        let new = match &mut self.set {
            Some(set) => set.insert(id),
            None if self.list.len() < Self::LIST_SCAN_MAX => !self.list.contains(&id),
            None => {
                let mut set: HashSet<QueueId> = self.list.iter().copied().collect();
                let new = set.insert(id);
                self.set = Some(set);
                new
            }
        };
        if new {
            self.list.push(id);
        }
    }
}

fn add_binding(
    vhost: &mut VHost,
    source: &str,
    binding: Binding,
    changes: &mut Vec<TopologyChange>,
) {
    let exchange = vhost
        .exchanges
        .get_mut(source)
        .expect("caller checked the source");
    let entry = binding.persisted.clone();
    if exchange.bindings.insert(binding)
        && let Some(entry) = entry
    {
        changes.push(TopologyChange::Added(entry.into()));
    }
}

fn remove_binding(
    vhost: &mut VHost,
    source: &str,
    binding: &Binding,
    changes: &mut Vec<TopologyChange>,
) {
    let Some(exchange) = vhost.exchanges.get_mut(source) else {
        return;
    };
    let removed = exchange.bindings.remove(binding);
    forget_bindings(vhost, source, removed, changes);
}

fn remove_bindings_to(
    vhost: &mut VHost,
    source: &str,
    destination: &Destination,
    changes: &mut Vec<TopologyChange>,
) {
    let Some(exchange) = vhost.exchanges.get_mut(source) else {
        return;
    };
    let removed = exchange.bindings.remove_to(destination);
    forget_bindings(vhost, source, removed, changes);
}

/// Notes the removal of the source's bindings that were durable; an
/// auto-delete source that lost its last binding goes with them.
fn forget_bindings(
    vhost: &mut VHost,
    source: &str,
    removed: impl IntoIterator<Item = Binding>,
    changes: &mut Vec<TopologyChange>,
) {
    let mut any = false;
    for binding in removed {
        any = true;
        if let Some(entry) = binding.persisted {
            changes.push(TopologyChange::Removed(entry.into()));
        }
    }
    if any {
        delete_if_auto(vhost, source, changes);
    }
}

/// An auto-delete exchange goes when its last binding does.
fn delete_if_auto(vhost: &mut VHost, name: &str, changes: &mut Vec<TopologyChange>) {
    if vhost
        .exchanges
        .get(name)
        .is_some_and(|exchange| exchange.auto_delete && exchange.bindings.is_empty())
    {
        remove_exchange(vhost, name, changes);
    }
}

/// Removes an exchange with its own bindings and every binding that points
/// at it.
pub(crate) fn remove_exchange(vhost: &mut VHost, name: &str, changes: &mut Vec<TopologyChange>) {
    let Some(exchange) = vhost.exchanges.remove(name) else {
        return;
    };
    changes.extend(exchange_removal(&vhost.name, &exchange));
    let destination = Destination::Exchange(name.into());
    let sources: Vec<ShortString> = vhost
        .exchanges
        .values()
        .filter(|exchange| exchange.bindings.leads_to(&destination))
        .map(|exchange| exchange.name.clone())
        .collect();
    for source in sources {
        remove_bindings_to(vhost, source.as_str(), &destination, changes);
    }
}

/// A message has left `queue` for good: its `Publish` record gets a
/// `Remove` (or, when `queue_exists` is false because the queue was deleted,
/// the log just stops counting it); a `Paged` record is simply released.
pub(crate) fn forget_stored(
    store: Option<&Store>,
    queue_exists: bool,
    queue: QueueId,
    sequence: Sequence,
    stored: Stored,
) {
    if let Some(store) = store {
        forget_copy(&store.log, queue_exists, queue, sequence, stored);
    }
}

pub(crate) fn message_log(store: Option<&Store>) -> Option<&MessageLog> {
    store.map(|store| &store.log)
}
