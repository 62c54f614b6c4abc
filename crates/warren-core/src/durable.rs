//! What survives a restart: durable exchanges, queues and bindings (the
//! topology file) and persistent messages in durable queues (the message
//! log), and how the broker is rebuilt from them.

use std::collections::HashMap;

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::{MessageLog, Recovery, StoreError, TopologyFile};

use crate::arguments::{QueueArguments, QueueShape};
use crate::broker::VHost;
use crate::codec::{Reader, put_short, put_table};
use crate::error::{BrokerError, BrokerResult, ErrorCode};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind};
use crate::queue::{MessageMeta, Queue, load};
use crate::{Broker, ConnectionId, ExchangeDeclare, Outbox, QueueDeclare, QueueDeclared, QueueId};

/// The broker's handle on disk.
pub struct Store {
    pub log: MessageLog,
    topology: TopologyFile,
    /// The entries last written to the topology file, to skip rewriting it
    /// when an operation changed nothing durable.
    saved_topology: Vec<Vec<u8>>,
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
/// queue losing its last consumer included) saves it before it returns, so
/// a `*-ok` reply is only sent for a change that survives a crash.
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
        self.vhosts.remove(name);
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
    pub fn attach_store(
        &mut self,
        log: MessageLog,
        topology: TopologyFile,
        recovery: Recovery,
    ) -> Result<RecoverySummary, RecoveryError> {
        let entries = topology.load()?;
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
        self.store = Some(Store {
            log,
            topology,
            saved_topology: entries,
        });
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
            Some(store) => store.log.close(),
            None => Ok(()),
        }
    }

    /// Drops the store the way a crash would: nothing pending is written
    /// and no clean-shutdown marker is left. Only tests have a use for this.
    pub fn abandon_store(&mut self) {
        if let Some(store) = self.store.take() {
            store.log.abandon();
        }
    }

    pub fn message_log(&self) -> Option<&MessageLog> {
        self.store.as_ref().map(|store| &store.log)
    }

    /// Rewrites the topology file if the durable topology changed.
    pub(crate) fn sync_topology(&mut self) -> Result<(), BrokerError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let entries = encode_topology(&self.vhosts, &self.queues);
        if entries == store.saved_topology {
            return Ok(());
        }
        store.topology.save(&entries).map_err(|error| {
            tracing::error!(%error, "could not save the durable topology");
            BrokerError::new(
                ErrorCode::InternalError,
                format!("could not save the durable topology: {error}"),
            )
        })?;
        if let Some(store) = &mut self.store {
            store.saved_topology = entries;
        }
        Ok(())
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
                        bindings: Vec::new(),
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
                let vhost = self.vhosts.get_mut(vhost_name.as_str())?;
                let destination = match destination_kind {
                    DESTINATION_QUEUE => {
                        Destination::Queue(*vhost.queues.get(destination_name.as_str())?)
                    }
                    DESTINATION_EXCHANGE => Destination::Exchange(destination_name),
                    _ => return None,
                };
                vhost
                    .exchanges
                    .get_mut(source.as_str())?
                    .bindings
                    .push(Binding {
                        destination,
                        routing_key,
                        arguments,
                    });
                summary.bindings += 1;
            }
            _ => return None,
        }
        Some(())
    }
}

/// Durable exchanges first, then durable queues, then bindings whose ends
/// are both durable, so that recovery can apply entries in order.
fn encode_topology(
    vhosts: &HashMap<String, VHost>,
    queues: &HashMap<QueueId, Queue>,
) -> Vec<Vec<u8>> {
    let mut vhost_names: Vec<&String> = vhosts.keys().collect();
    vhost_names.sort();
    let mut exchanges = Vec::new();
    let mut queue_entries = Vec::new();
    let mut bindings = Vec::new();
    for vhost_name in vhost_names {
        let vhost = &vhosts[vhost_name];
        let mut exchange_names: Vec<&ShortString> = vhost.exchanges.keys().collect();
        exchange_names.sort();
        for name in exchange_names {
            let exchange = &vhost.exchanges[name];
            let builtin = name.as_str().is_empty() || name.as_str().starts_with("amq.");
            if exchange.durable && !builtin {
                let mut entry = vec![ENTRY_EXCHANGE];
                put_short(&mut entry, vhost_name);
                put_short(&mut entry, name.as_str());
                put_short(&mut entry, exchange.kind.name());
                entry.push(exchange.auto_delete as u8 | (exchange.internal as u8) << 1);
                put_table(&mut entry, &exchange.arguments);
                exchanges.push(entry);
            }
            for binding in &exchange.bindings {
                let (kind, destination) = match &binding.destination {
                    Destination::Queue(id) => match queues.get(id) {
                        Some(queue) if queue.persists_messages() => {
                            (DESTINATION_QUEUE, queue.name.as_str())
                        }
                        _ => continue,
                    },
                    Destination::Exchange(name) => match vhost.exchanges.get(name.as_str()) {
                        Some(target) if target.durable => (DESTINATION_EXCHANGE, name.as_str()),
                        _ => continue,
                    },
                };
                if !exchange.durable {
                    continue;
                }
                let mut entry = vec![ENTRY_BINDING];
                put_short(&mut entry, vhost_name);
                put_short(&mut entry, name.as_str());
                entry.push(kind);
                put_short(&mut entry, destination);
                put_short(&mut entry, binding.routing_key.as_str());
                put_table(&mut entry, &binding.arguments);
                bindings.push(entry);
            }
        }
        let mut queue_names: Vec<(&ShortString, &QueueId)> = vhost.queues.iter().collect();
        queue_names.sort();
        for (name, id) in queue_names {
            let queue = &queues[id];
            if !queue.persists_messages() {
                continue;
            }
            let mut entry = vec![ENTRY_QUEUE];
            put_short(&mut entry, vhost_name);
            put_short(&mut entry, name.as_str());
            entry.extend_from_slice(&id.0.to_le_bytes());
            entry.push(queue.auto_delete as u8);
            put_table(&mut entry, &queue.arguments);
            queue_entries.push(entry);
        }
    }
    exchanges.extend(queue_entries);
    exchanges.extend(bindings);
    exchanges
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
