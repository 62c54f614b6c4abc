//! Rebuilding the broker from what the store recovered: the durable
//! topology's entries, then each durable queue's messages.

use std::collections::HashMap;

use parking_lot::Mutex;

use warren_store::{MessageLog, Recovery, TopologyJournal};

use super::Broker;
use crate::QueueId;
use crate::durable::entry::{self, DurableDestination, TopologyEntry, binding_entry};
use crate::durable::{RecoveryError, RecoverySummary, Store};
use crate::queue::arguments::{QueueArguments, QueueShape};
use crate::queue::{MessageMeta, Queue, load};
use crate::topology::VHost;
use crate::topology::bindings::Bindings;
use crate::topology::exchange::{Binding, Destination, Exchange, ExchangeKind};

impl Broker {
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
        self.spill = Some(log.spill_area());
        for entry in &entries {
            self.apply_topology_entry(entry, &mut summary)
                .ok_or_else(|| {
                    RecoveryError::Topology(format!(
                        "entry of {} bytes does not decode",
                        entry.len()
                    ))
                })?;
        }
        let now_ms = self.now_ms();
        for (queue_id, messages) in recovery.queues {
            match self.queue_mut(QueueId(queue_id)) {
                Some(queue) => {
                    summary.messages += messages.len();
                    queue.reserve(messages.len());
                    let read_each = queue.recovery_reads_messages();
                    for message in messages {
                        let known = if read_each {
                            recovered_meta(queue, &log, message.location, now_ms)
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
            .values_mut()
            .map(Mutex::get_mut)
            .filter(|queue| queue.args.message_ttl_ms.is_some() || queue.args.expires_ms.is_some())
            .map(|queue| queue.id)
            .collect();
        for id in timed {
            self.schedule(id, now_ms);
        }
        Ok(summary)
    }

    /// Every entry the durable topology has now, sorted: what the journal
    /// holds once it has synced.
    pub fn durable_topology(&self) -> Vec<Vec<u8>> {
        let mut entries = encode_topology(&self.vhosts, &self.queues);
        entries.sort();
        entries
    }

    fn apply_topology_entry(&mut self, bytes: &[u8], summary: &mut RecoverySummary) -> Option<()> {
        match entry::decode(bytes)? {
            TopologyEntry::Exchange {
                vhost,
                name,
                kind,
                auto_delete,
                internal,
                arguments,
            } => {
                let kind = ExchangeKind::parse(kind.as_str())?;
                self.add_vhost(vhost.as_str());
                let vhost = self.vhosts.get_mut(vhost.as_str())?;
                vhost.exchanges.insert(
                    name.clone(),
                    Exchange {
                        name,
                        kind,
                        durable: true,
                        auto_delete,
                        internal,
                        arguments,
                        bindings: Bindings::new(kind),
                        counts: Default::default(),
                    },
                );
                summary.exchanges += 1;
            }
            TopologyEntry::Queue {
                vhost,
                name,
                id,
                auto_delete,
                arguments,
            } => {
                let id = QueueId(id);
                self.add_vhost(vhost.as_str());
                self.next_queue_id = self.next_queue_id.max(id.0);
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
                    tracing::warn!(queue = %name, %error,
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
                    self.now_ms(),
                )
                .spill_to(self.spill.clone());
                self.queues.insert(id, Mutex::new(queue));
                self.vhosts.get_mut(vhost.as_str())?.queues.insert(name, id);
                summary.queues += 1;
            }
            TopologyEntry::Binding {
                vhost: vhost_name,
                source,
                to_exchange,
                destination: destination_name,
                routing_key,
                arguments,
            } => {
                let destination = if to_exchange {
                    Some(Destination::Exchange(destination_name))
                } else {
                    self.vhosts
                        .get(vhost_name.as_str())
                        .and_then(|vhost| vhost.queues.get(destination_name.as_str()))
                        .map(|id| Destination::Queue(*id))
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
                    persisted: Some(bytes.into()),
                });
                summary.bindings += 1;
            }
        }
        Some(())
    }
}

/// Every durable entry, computed from scratch: what the journal's changes
/// must add up to.
fn encode_topology(
    vhosts: &HashMap<String, VHost>,
    queues: &HashMap<QueueId, Mutex<Queue>>,
) -> Vec<Vec<u8>> {
    let mut entries = Vec::new();
    for (vhost_name, vhost) in vhosts {
        for exchange in vhost.exchanges.values() {
            entries.extend(exchange.durable_entry(vhost_name));
            for binding in exchange.bindings.iter() {
                let queue_name;
                let destination = match &binding.destination {
                    Destination::Queue(id) => match queues.get(id).map(Mutex::lock) {
                        Some(queue) if queue.persists_messages() => {
                            queue_name = queue.name.to_string();
                            DurableDestination::Queue(&queue_name)
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
            entries.extend(queues[id].lock().durable_entry().map(Vec::from));
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
