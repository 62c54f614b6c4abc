//! Rebuilding the broker from what the store recovered: the durable
//! topology's entries, then each durable queue's messages.

use std::collections::HashMap;

use parking_lot::Mutex;

use std::sync::Arc;

use warren_store::{Location, MessageLog, RecoveredMessage, Recovery, SpillArea, TopologyJournal};

use super::Broker;
use super::effect::Outbox;
use crate::QueueId;
use crate::durable::codec::decode_stored_message;
use crate::durable::entry::{self, DurableDestination, TopologyEntry, binding_entry};
use crate::durable::{RecoveryError, RecoverySummary, Store};
use crate::policy::{PolicySpec, VhostPolicies};
use crate::queue::arguments::{QueueArguments, QueueShape};
use crate::queue::{MessageMeta, Queue};
use crate::topology::VHost;
use crate::topology::bindings::Bindings;
use crate::topology::exchange::{Binding, Destination, Exchange, ExchangeKind};

impl Broker {
    /// Rebuilds durable exchanges, queues, bindings and messages from disk,
    /// then keeps the store for everything that follows. `entries` are what
    /// `TopologyJournal::open` loaded; `recovery` is what `MessageLog::open`
    /// gathered. The server streams messages instead (`restore_topology`,
    /// `MessageLog::open_with` into `restore_message`, `attach_log`).
    pub fn attach_store(
        &mut self,
        log: MessageLog,
        mut recovery: Recovery,
        topology: TopologyJournal,
        entries: Vec<Vec<u8>>,
        spill: Option<Arc<SpillArea>>,
    ) -> Result<RecoverySummary, RecoveryError> {
        let mut summary = self.restore_topology(&entries, spill)?;
        let now_ms = self.now_ms();
        for (queue_id, messages) in std::mem::take(&mut recovery.queues) {
            for message in messages {
                let location = message.location;
                let payload = if self.restore_needs_payload(queue_id) {
                    log.read(location).ok()
                } else {
                    None
                };
                let kept = self.restore_message(
                    queue_id,
                    message,
                    payload.as_deref().unwrap_or(&[]),
                    now_ms,
                );
                if kept {
                    summary.messages += 1;
                } else {
                    // The queue was deleted before the restart.
                    log.release(location);
                }
            }
        }
        self.attach_log(log, &recovery, topology, &mut summary);
        Ok(summary)
    }

    /// Recreates the durable exchanges, queues and bindings of `entries`;
    /// queues spill their long backlogs into `spill`.
    pub fn restore_topology(
        &mut self,
        entries: &[Vec<u8>],
        spill: Option<Arc<SpillArea>>,
    ) -> Result<RecoverySummary, RecoveryError> {
        let mut summary = RecoverySummary::default();
        self.spill = spill;
        for entry in entries {
            self.apply_topology_entry(entry, &mut summary)
                .ok_or_else(|| {
                    RecoveryError::Topology(format!(
                        "entry of {} bytes does not decode",
                        entry.len()
                    ))
                })?;
        }
        // No queue holds a message yet: applying policies only sets what
        // the queues run on.
        let mut out = Outbox::default();
        self.apply_all_policies(&mut out);
        Ok(summary)
    }

    /// Whether a recovered message of this queue must be read to be placed
    /// (its priority, or its size for a byte limit).
    fn restore_needs_payload(&self, queue: u64) -> bool {
        self.queues
            .get(&QueueId(queue))
            .is_some_and(|queue| queue.lock().recovery_reads_messages())
    }

    /// Puts a recovered message back in its queue; `payload` is the stored
    /// message, read only by queues whose order or limits depend on it.
    /// False when the queue no longer exists.
    pub fn restore_message(
        &mut self,
        queue: u64,
        message: RecoveredMessage,
        payload: &[u8],
        now_ms: u64,
    ) -> bool {
        let Some(queue) = self.queue_mut(QueueId(queue)) else {
            // A deleted queue's messages stay in the log until compaction
            // or their segment's deletion drops them: a queue declared
            // later must not get its id, or it would inherit them at the
            // next start.
            self.next_queue_id = self.next_queue_id.max(queue);
            return false;
        };
        let known = if queue.recovery_reads_messages() {
            recovered_meta(queue, payload, message.location, now_ms)
        } else {
            None
        };
        queue.push_recovered(message.sequence, message.location, message.delivered, known);
        true
    }

    /// Keeps the store for everything that follows recovery, and starts
    /// the clocks of queues with a TTL or an expiry.
    pub fn attach_log(
        &mut self,
        log: MessageLog,
        recovery: &Recovery,
        topology: TopologyJournal,
        summary: &mut RecoverySummary,
    ) {
        summary.segments_read = recovery.segments_read;
        summary.bytes_read = recovery.bytes_read;
        summary.torn_records_dropped = recovery.torn_records_dropped;
        summary.corrupt_records_skipped = recovery.corrupt_records_skipped;
        summary.clean_shutdown = recovery.clean_shutdown;
        self.store = Some(Store { log, topology });
        let now_ms = self.now_ms();
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
    }

    /// Every entry the durable topology has now, sorted: what the journal
    /// holds once it has synced.
    pub fn durable_topology(&self) -> Vec<Vec<u8>> {
        let mut entries = encode_topology(&self.vhosts, &self.queues, &self.policies);
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
                        policy: Default::default(),
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
            TopologyEntry::Policy {
                vhost,
                name,
                operator,
                value,
            } => {
                self.add_vhost(vhost.as_str());
                let spec = PolicySpec::from_entry(vhost.as_str(), name.as_str(), operator, &value)?;
                self.restore_policy(spec);
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
    policies: &HashMap<String, VhostPolicies>,
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
    for vhost in policies.values() {
        entries.extend(vhost.all().map(|policy| Vec::from(policy.durable_entry())));
    }
    entries
}

/// Reads a recovered message to learn its priority, expiry and size, for a
/// queue whose order or limits depend on them. An unreadable message is
/// placed by what the record alone says; its read fails again, and is
/// reported, when it reaches the head.
/// What a recovered message's stored bytes say of its place in `queue`;
/// None if they do not decode (the queue then estimates from the record).
fn recovered_meta(
    queue: &Queue,
    payload: &[u8],
    location: Location,
    now_ms: u64,
) -> Option<(MessageMeta, u32)> {
    let Ok((message, arrived_ms)) = decode_stored_message(&bytes::Bytes::copy_from_slice(payload))
    else {
        tracing::warn!(queue = %queue.describe(), segment = location.segment,
            offset = location.offset, "a recovered message does not decode");
        return None;
    };
    let meta = queue.meta_for(&message, arrived_ms.unwrap_or(now_ms));
    Some((meta, message.body.len() as u32))
}
