//! What survives a restart: durable exchanges, queues and bindings (the
//! topology journal) and persistent messages in durable queues (the message
//! log), and how the broker is rebuilt from them.
//!
//! An operation that adds or removes something durable notes the entry it
//! added or removed as it makes the change (`Broker::topology_changes`);
//! when the operation ends, `sync_topology` hands those entries to the
//! journal and keeps the ticket that makes them durable, which the caller
//! takes (`take_topology_ticket`) to hold its `*-ok` until the journal has
//! synced. An operation that changes nothing durable writes nothing.

use std::collections::HashMap;

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::{
    MessageLog, Recovery, Sequence, StoreError, Ticket, TopologyChange, TopologyJournal,
    TopologyWaiter,
};

use crate::arguments::{QueueArguments, QueueShape};
use crate::bindings::Bindings;
use crate::broker::{VHost, remove_exchange};
use crate::codec::{Reader, put_short, put_table};
use crate::error::{BrokerError, BrokerResult, ErrorCode};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::queue::{MessageMeta, Queue, load};
use crate::{
    Broker, ConnectionId, ExchangeDeclare, Message, Outbox, QueueDeclare, QueueDeclared, QueueId,
};

/// The broker's handle on disk.
pub struct Store {
    pub log: MessageLog,
    topology: TopologyJournal,
}

/// What recovery rebuilt, for the log line that reports it.
#[derive(Debug, Default, Clone)]
pub struct RecoverySummary {
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
    pub messages: usize,
    pub segments_read: usize,
    pub bytes_read: u64,
    pub torn_records_dropped: usize,
    pub corrupt_records_skipped: usize,
    pub clean_shutdown: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the topology file is malformed: {0}")]
    Topology(String),
}

const ENTRY_EXCHANGE: u8 = 1;
const ENTRY_QUEUE: u8 = 2;
const ENTRY_BINDING: u8 = 3;
const DESTINATION_QUEUE: u8 = 0;
const DESTINATION_EXCHANGE: u8 = 1;

/// Every operation that can change the durable topology (an auto-delete
/// queue losing its last consumer included) hands its changes to the
/// journal before it returns; the caller holds the `*-ok` reply until the
/// ticket it takes with `take_topology_ticket` is durable, so a reply is
/// only sent for a change that survives a crash.
impl Broker {
    pub fn declare_exchange(
        &mut self,
        connection: ConnectionId,
        declare: ExchangeDeclare,
    ) -> BrokerResult<()> {
        self.declare_exchange_unsaved(connection, declare)?;
        self.sync_topology()
    }

    pub fn delete_exchange(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> BrokerResult<()> {
        self.delete_exchange_unsaved(connection, name, if_unused)?;
        self.sync_topology()
    }

    /// `exchange.bind` (bind = true) and `exchange.unbind`.
    pub fn bind_exchange(
        &mut self,
        connection: ConnectionId,
        destination: &str,
        source: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        self.bind_exchange_unsaved(
            connection,
            destination,
            source,
            routing_key,
            arguments,
            bind,
        )?;
        self.sync_topology()
    }

    pub fn declare_queue(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
    ) -> BrokerResult<QueueDeclared> {
        let declared = self.declare_queue_unsaved(connection, declare, false)?;
        self.sync_topology()?;
        Ok(declared)
    }

    /// Declares a queue under a name from `generate_queue_name`.
    pub fn declare_server_named_queue(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
    ) -> BrokerResult<QueueDeclared> {
        let declared = self.declare_queue_unsaved(connection, declare, true)?;
        self.sync_topology()?;
        Ok(declared)
    }

    /// Deletes a vhost with its queues, their messages and its exchanges.
    /// Connections still open in it get 320 on their next operation; the
    /// caller closes them.
    pub fn delete_vhost(&mut self, name: &str, out: &mut Outbox) -> BrokerResult<()> {
        let Some(vhost) = self.vhosts.get(name) else {
            return Ok(());
        };
        let queues: Vec<QueueId> = vhost.queues.values().copied().collect();
        for id in queues {
            self.delete_queue_by_id(id, out);
        }
        if let Some(mut vhost) = self.vhosts.remove(name) {
            let names: Vec<ShortString> = vhost.exchanges.keys().cloned().collect();
            for name in names {
                remove_exchange(&mut vhost, name.as_str(), &mut self.topology_changes);
            }
        }
        self.sync_topology()
    }

    /// `queue.bind` (bind = true) and `queue.unbind`.
    pub fn bind_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        self.bind_queue_unsaved(connection, queue, exchange, routing_key, arguments, bind)?;
        self.sync_topology()
    }

    /// Deletes a queue; returns the number of messages it held.
    pub fn delete_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        let count = self.delete_queue_unsaved(connection, queue, if_unused, if_empty, out)?;
        self.sync_topology()?;
        Ok(count)
    }

    /// Releases everything the connection held: its channels' unacked
    /// messages go back to their queues and its exclusive queues are deleted.
    pub fn close_connection(&mut self, connection: ConnectionId, out: &mut Outbox) {
        self.close_connection_unsaved(connection, out);
        let _ = self.sync_topology();
    }

    /// Cancels the channel's consumers and requeues its unacked messages, in
    /// delivery order, each to its original position.
    pub fn close_channel(&mut self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        self.close_channel_unsaved(connection, channel, out);
        let _ = self.sync_topology();
    }

    /// `basic.cancel`; returns whether the consumer existed.
    pub fn cancel(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consumer_tag: &str,
        out: &mut Outbox,
    ) -> bool {
        let existed = self.cancel_unsaved(connection, channel, consumer_tag, out);
        let _ = self.sync_topology();
        existed
    }

    /// Rebuilds durable exchanges, queues, bindings and messages from disk,
    /// then keeps the store for everything that follows.
    /// `entries` are what `TopologyJournal::open` loaded.
    pub fn attach_store(
        &mut self,
        log: MessageLog,
        recovery: Recovery,
        topology: TopologyJournal,
        entries: Vec<Vec<u8>>,
    ) -> Result<RecoverySummary, RecoveryError> {
        let mut summary = RecoverySummary {
            segments_read: recovery.segments_read,
            bytes_read: recovery.bytes_read,
            torn_records_dropped: recovery.torn_records_dropped,
            corrupt_records_skipped: recovery.corrupt_records_skipped,
            clean_shutdown: recovery.clean_shutdown,
            ..RecoverySummary::default()
        };
        for entry in &entries {
            self.apply_topology_entry(entry, &mut summary)
                .ok_or_else(|| {
                    RecoveryError::Topology(format!(
                        "entry of {} bytes does not decode",
                        entry.len()
                    ))
                })?;
        }
        for (queue_id, messages) in recovery.queues {
            match self.queues.get_mut(&QueueId(queue_id)) {
                Some(queue) => {
                    summary.messages += messages.len();
                    queue.reserve(messages.len());
                    let read_each = queue.recovery_reads_messages();
                    for message in messages {
                        let known = if read_each {
                            recovered_meta(queue, &log, message.location, self.now_ms)
                        } else {
                            None
                        };
                        queue.push_recovered(
                            message.sequence,
                            message.location,
                            message.delivered,
                            known,
                        );
                    }
                }
                None => {
                    // The queue was deleted before the restart.
                    for message in messages {
                        log.release(message.location);
                    }
                }
            }
        }
        self.store = Some(Store { log, topology });
        // Queues with a TTL or an expiry start their clocks now.
        let timed: Vec<QueueId> = self
            .queues
            .values()
            .filter(|queue| queue.args.message_ttl_ms.is_some() || queue.args.expires_ms.is_some())
            .map(|queue| queue.id)
            .collect();
        for id in timed {
            self.schedule(id, self.now_ms);
        }
        Ok(summary)
    }

    /// Writes everything pending and marks the shutdown clean.
    pub fn close_store(&mut self) -> Result<(), StoreError> {
        match self.store.take() {
            Some(store) => {
                store.topology.close();
                store.log.close()
            }
            None => Ok(()),
        }
    }

    /// Drops the store the way a crash would: nothing pending is written
    /// and no clean-shutdown marker is left. Only tests have a use for this.
    pub fn abandon_store(&mut self) {
        if let Some(store) = self.store.take() {
            store.topology.abandon();
            store.log.abandon();
        }
    }

    pub fn message_log(&self) -> Option<&MessageLog> {
        self.store.as_ref().map(|store| &store.log)
    }

    /// From now on the caller runs the store's slow work on a thread of
    /// its own, off the lock: it reads paged-out messages back ahead of
    /// the consumers (`Effect::ReadAhead`, answered with
    /// `install_read_ahead`) and runs the discards of purged and deleted
    /// queues (`Effect::Discard`).
    pub fn enable_store_worker(&mut self) {
        self.store_worker = true;
    }

    /// Puts the messages a read-ahead brought back in place, each as
    /// `(sequence, message, arrival time)`; a queue gone meanwhile, or a
    /// message taken meanwhile, is passed over.
    pub fn install_read_ahead(
        &mut self,
        queue: QueueId,
        loaded: Vec<(Sequence, Message, Option<u64>)>,
    ) {
        let Some(queue) = self.queues.get_mut(&queue) else {
            return;
        };
        for (sequence, message, arrived_ms) in loaded {
            queue.install(sequence, message, arrived_ms);
        }
        queue.read_ahead_done();
    }

    /// Hands the durable changes the operation made to the journal; the
    /// ticket that makes them durable waits in `topology_ticket` for the
    /// caller. Nothing is written when nothing durable changed.
    pub(crate) fn sync_topology(&mut self) -> Result<(), BrokerError> {
        if self.topology_changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.topology_changes);
        let Some(store) = &self.store else {
            return Ok(());
        };
        let ticket = store.topology.record(changes).map_err(|error| {
            tracing::error!(%error, "could not save the durable topology");
            BrokerError::new(
                ErrorCode::InternalError,
                format!("could not save the durable topology: {error}"),
            )
        })?;
        self.topology_ticket = Some(ticket);
        Ok(())
    }

    /// The journal ticket the last operation's durable changes wait for, if
    /// it made any: its reply goes out once the journal reports it.
    pub fn take_topology_ticket(&mut self) -> Option<Ticket> {
        self.topology_ticket.take()
    }

    /// Blocks until the last operation's durable changes are on disk: what
    /// the server does, without blocking, before it replies. For tests and
    /// tools that drive the broker directly.
    pub fn wait_for_topology(&mut self) -> Result<(), StoreError> {
        match (self.topology_ticket.take(), &self.store) {
            (Some(ticket), Some(store)) => store.topology.wait_durable(ticket),
            _ => Ok(()),
        }
    }

    /// The last operation's ticket with a handle to wait for it outside
    /// the broker's lock; None when it changed nothing durable.
    pub fn take_topology_wait(&mut self) -> Option<(TopologyWaiter, Ticket)> {
        let ticket = self.topology_ticket.take()?;
        Some((self.store.as_ref()?.topology.waiter(), ticket))
    }

    /// Every entry the durable topology has now, sorted: what the journal
    /// holds once it has synced.
    pub fn durable_topology(&self) -> Vec<Vec<u8>> {
        let mut entries = encode_topology(&self.vhosts, &self.queues);
        entries.sort();
        entries
    }

    fn apply_topology_entry(&mut self, entry: &[u8], summary: &mut RecoverySummary) -> Option<()> {
        let mut reader = Reader::new(entry);
        match reader.u8()? {
            ENTRY_EXCHANGE => {
                let vhost = reader.short()?;
                let name = reader.short()?;
                let kind = ExchangeKind::parse(reader.short()?.as_str())?;
                let flags = reader.u8()?;
                let arguments = reader.table()?;
                self.add_vhost(vhost.as_str());
                let vhost = self.vhosts.get_mut(vhost.as_str())?;
                vhost.exchanges.insert(
                    name.clone(),
                    Exchange {
                        name,
                        kind,
                        durable: true,
                        auto_delete: flags & 1 != 0,
                        internal: flags & 2 != 0,
                        arguments,
                        bindings: Bindings::new(kind),
                        counts: Default::default(),
                    },
                );
                summary.exchanges += 1;
            }
            ENTRY_QUEUE => {
                let vhost = reader.short()?;
                let name = reader.short()?;
                let id = QueueId(reader.u64()?);
                let flags = reader.u8()?;
                let arguments = reader.table()?;
                self.add_vhost(vhost.as_str());
                self.next_queue_id = self.next_queue_id.max(id.0);
                let auto_delete = flags & 1 != 0;
                // The arguments were validated when the queue was declared;
                // should a later version read them differently, the queue
                // still comes back, with the defaults.
                let args = QueueArguments::parse(
                    &arguments,
                    &QueueShape {
                        name: name.as_str(),
                        vhost: vhost.as_str(),
                        durable: true,
                        exclusive: false,
                        auto_delete,
                    },
                )
                .unwrap_or_else(|error| {
                    tracing::warn!(queue = %name, error = %error.text,
                        "recovered queue arguments are invalid; using defaults");
                    QueueArguments::default()
                });
                let queue = Queue::new(
                    id,
                    name.clone(),
                    vhost.to_string(),
                    true,
                    None,
                    auto_delete,
                    arguments,
                    args,
                    self.now_ms,
                );
                self.queues.insert(id, queue);
                self.vhosts.get_mut(vhost.as_str())?.queues.insert(name, id);
                summary.queues += 1;
            }
            ENTRY_BINDING => {
                let vhost_name = reader.short()?;
                let source = reader.short()?;
                let destination_kind = reader.u8()?;
                let destination_name = reader.short()?;
                let routing_key = reader.short()?;
                let arguments = reader.table()?;
                let destination = match destination_kind {
                    DESTINATION_QUEUE => self
                        .vhosts
                        .get(vhost_name.as_str())
                        .and_then(|vhost| vhost.queues.get(destination_name.as_str()))
                        .map(|id| Destination::Queue(*id)),
                    DESTINATION_EXCHANGE => Some(Destination::Exchange(destination_name)),
                    _ => return None,
                };
                let source_exchange = self
                    .vhosts
                    .get_mut(vhost_name.as_str())
                    .and_then(|vhost| vhost.exchanges.get_mut(source.as_str()));
                let (Some(destination), Some(source_exchange)) = (destination, source_exchange)
                else {
                    // Whatever removed an end removed the binding too; a
                    // binding left behind is dropped rather than refusing
                    // to start.
                    tracing::warn!(vhost = %vhost_name, exchange = %source,
                        "dropping a recovered binding whose source or destination is gone");
                    return Some(());
                };
                source_exchange.bindings.insert(Binding {
                    destination,
                    routing_key,
                    arguments,
                    persisted: Some(entry.into()),
                });
                summary.bindings += 1;
            }
            _ => return None,
        }
        Some(())
    }
}

/// Where a durable binding leads, by name, as its entry records it.
pub(crate) enum DurableDestination<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

/// The entry of an exchange that survives a restart; None for a transient
/// exchange and for the built-in ones, which every vhost has anyway.
pub(crate) fn exchange_entry(vhost: &str, exchange: &Exchange) -> Option<Vec<u8>> {
    let name = exchange.name.as_str();
    let builtin = name.is_empty() || name.starts_with("amq.");
    if !exchange.durable || builtin {
        return None;
    }
    let mut entry = vec![ENTRY_EXCHANGE];
    put_short(&mut entry, vhost);
    put_short(&mut entry, name);
    put_short(&mut entry, exchange.kind.name());
    entry.push(exchange.auto_delete as u8 | (exchange.internal as u8) << 1);
    put_table(&mut entry, &exchange.arguments);
    Some(entry)
}

/// What removing an exchange removes from the durable topology: its own
/// entry and those of its bindings.
pub(crate) fn exchange_removal(vhost: &str, exchange: &Exchange) -> Vec<TopologyChange> {
    exchange_entry(vhost, exchange)
        .into_iter()
        .chain(
            exchange
                .bindings
                .iter()
                .filter_map(|binding| binding.persisted.as_deref().map(<[u8]>::to_vec)),
        )
        .map(TopologyChange::Removed)
        .collect()
}

/// The entry of a queue whose messages survive a restart; None otherwise.
pub(crate) fn queue_entry(queue: &Queue) -> Option<Box<[u8]>> {
    if !queue.persists_messages() {
        return None;
    }
    let mut entry = vec![ENTRY_QUEUE];
    put_short(&mut entry, &queue.vhost);
    put_short(&mut entry, queue.name.as_str());
    entry.extend_from_slice(&queue.id.0.to_le_bytes());
    entry.push(queue.auto_delete as u8);
    put_table(&mut entry, &queue.arguments);
    Some(entry.into())
}

/// The entry of a binding between two durable ends.
pub(crate) fn binding_entry(
    vhost: &str,
    source: &str,
    destination: DurableDestination<'_>,
    routing_key: &str,
    arguments: &FieldTable,
) -> Box<[u8]> {
    let (kind, name) = match destination {
        DurableDestination::Queue(name) => (DESTINATION_QUEUE, name),
        DurableDestination::Exchange(name) => (DESTINATION_EXCHANGE, name),
    };
    let mut entry = vec![ENTRY_BINDING];
    put_short(&mut entry, vhost);
    put_short(&mut entry, source);
    entry.push(kind);
    put_short(&mut entry, name);
    put_short(&mut entry, routing_key);
    put_table(&mut entry, arguments);
    entry.into()
}

/// Every durable entry, computed from scratch: what the journal's changes
/// must add up to.
fn encode_topology(
    vhosts: &HashMap<String, VHost>,
    queues: &HashMap<QueueId, Queue>,
) -> Vec<Vec<u8>> {
    let mut entries = Vec::new();
    for (vhost_name, vhost) in vhosts {
        for exchange in vhost.exchanges.values() {
            entries.extend(exchange_entry(vhost_name, exchange));
            for binding in exchange.bindings.iter() {
                let destination = match &binding.destination {
                    Destination::Queue(id) => match queues.get(id) {
                        Some(queue) if queue.persists_messages() => {
                            DurableDestination::Queue(queue.name.as_str())
                        }
                        _ => continue,
                    },
                    Destination::Exchange(name) => match vhost.exchanges.get(name.as_str()) {
                        Some(target) if target.durable => {
                            DurableDestination::Exchange(name.as_str())
                        }
                        _ => continue,
                    },
                };
                if exchange.durable {
                    entries.push(
                        binding_entry(
                            vhost_name,
                            exchange.name.as_str(),
                            destination,
                            binding.routing_key.as_str(),
                            &binding.arguments,
                        )
                        .into(),
                    );
                }
            }
        }
        for id in vhost.queues.values() {
            entries.extend(queue_entry(&queues[id]).map(Vec::from));
        }
    }
    entries
}

/// Reads a recovered message to learn its priority, expiry and size, for a
/// queue whose order or limits depend on them. An unreadable message is
/// placed by what the record alone says; its read fails again, and is
/// reported, when it reaches the head.
fn recovered_meta(
    queue: &Queue,
    log: &MessageLog,
    location: warren_store::Location,
    now_ms: u64,
) -> Option<(MessageMeta, u32)> {
    let (message, arrived_ms) = load(Some(log), crate::queue::Stored::Published(location)).ok()?;
    let meta = queue.meta_for(&message, arrived_ms.unwrap_or(now_ms));
    Some((meta, message.body.len() as u32))
}
