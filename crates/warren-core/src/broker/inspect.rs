//! Read-only views of the broker's state for the management API and the
//! metrics exporter: plain values copied out under the caller's lock, so
//! that serialising them happens after the lock is released.

use amq_protocol::types::FieldTable;

use std::sync::atomic::Ordering;

use super::Broker;
use crate::queue::Queue;
use crate::queue::ages::DeliveryCounts;
use crate::queue::arguments::AppliedPolicy;
use crate::session::channel::ChannelMode;
use crate::stats::{ExchangeCounts, LifecycleCounts, MessageCounts};
use crate::topology::exchange::{Destination, ExchangePolicy};
use crate::{ConnectionId, QueueId};
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub name: String,
    pub vhost: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    pub quorum: bool,
    pub arguments: FieldTable,
    /// The policies that apply, and their merged definition.
    pub policy: AppliedPolicy,
    pub ready: usize,
    pub ready_bytes: u64,
    /// Ready messages whose body is in memory; the rest wait on disk.
    pub ready_in_memory: usize,
    pub unacked: usize,
    pub consumers: usize,
    pub counts: MessageCounts,
    /// When the message at the head arrived (ms since the epoch), if known.
    pub head_arrived_ms: Option<u64>,
    /// When the oldest delivery still unacknowledged was made, to the
    /// second.
    pub oldest_unacked_ms: Option<u64>,
    pub delivery_counts: DeliveryCounts,
}

#[derive(Debug, Clone)]
pub struct ExchangeInfo {
    pub name: String,
    pub vhost: String,
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    pub policy: ExchangePolicy,
    pub counts: ExchangeCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Queue,
    Exchange,
}

#[derive(Debug, Clone)]
pub struct BindingInfo {
    pub vhost: String,
    /// "" for the default exchange's implicit binding to every queue.
    pub source: String,
    pub destination: String,
    pub destination_kind: DestinationKind,
    pub routing_key: String,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub vhost: String,
    pub queue: String,
    pub connection: ConnectionId,
    pub channel: u16,
    pub tag: String,
    pub ack_required: bool,
    pub exclusive: bool,
    pub prefetch_count: u16,
    pub priority: i32,
    /// False for the waiting consumers of a single-active-consumer queue.
    pub active: bool,
}

#[derive(Debug, Clone)]
pub struct ChannelInfo {
    pub connection: ConnectionId,
    pub number: u16,
    pub vhost: String,
    pub prefetch_count: u16,
    pub global_prefetch_count: u16,
    pub consumers: usize,
    pub unacked: usize,
    pub mode: ChannelMode,
}

/// Counts over the whole broker.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub connections: usize,
    pub channels: usize,
    pub exchanges: usize,
    pub queues: usize,
    pub consumers: usize,
    pub ready: u64,
    pub unacked: u64,
    /// Since the broker started, deleted queues included.
    pub counts: MessageCounts,
    pub lifecycle: LifecycleCounts,
}

impl Broker {
    pub fn vhost_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vhosts.keys().cloned().collect();
        names.sort();
        names
    }

    /// Queues sorted by vhost and name; `vhost` narrows to one.
    pub fn queue_infos(&self, vhost: Option<&str>) -> Vec<QueueInfo> {
        let mut infos: Vec<QueueInfo> = self
            .queues
            .values()
            .map(|queue| queue.lock())
            .filter(|queue| vhost.is_none_or(|vhost| queue.vhost == vhost))
            .map(|queue| queue_info(&queue))
            .collect();
        infos.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        infos
    }

    /// Every queue's message counts, cheaper than `queue_infos`.
    pub fn queue_message_counts(&self) -> Vec<(String, String, MessageCounts)> {
        self.queue_message_counts_of(&self.queue_ids())
    }

    /// Every queue's id, for a sampler that reads the queues a few at a
    /// time (`queue_message_counts_of`), so that no single look holds the
    /// broker for long however many queues there are.
    pub fn queue_ids(&self) -> Vec<QueueId> {
        self.queues.keys().copied().collect()
    }

    /// The message counts of those of `ids` that still exist.
    pub fn queue_message_counts_of(&self, ids: &[QueueId]) -> Vec<(String, String, MessageCounts)> {
        ids.iter()
            .filter_map(|id| {
                let queue = self.queue(*id)?;
                Some((queue.vhost.clone(), queue.name.to_string(), queue.counts))
            })
            .collect()
    }

    /// The broker-wide counts no queue keeps: messages published, and
    /// those of them no queue took.
    pub fn publish_counts(&self) -> MessageCounts {
        MessageCounts {
            published: self.published.load(Ordering::Relaxed),
            unroutable: self.unroutable.load(Ordering::Relaxed),
            ..MessageCounts::default()
        }
    }

    /// Every exchange's counts, for the rate sampler.
    pub fn exchange_counts(&self) -> Vec<(String, String, ExchangeCounts)> {
        self.vhosts
            .iter()
            .flat_map(|(vhost, state)| {
                state.exchanges.values().map(|exchange| {
                    (
                        vhost.clone(),
                        exchange.name.to_string(),
                        exchange.counts.get(),
                    )
                })
            })
            .collect()
    }

    pub fn queue_info(&self, vhost: &str, name: &str) -> Option<QueueInfo> {
        let id = self.vhosts.get(vhost)?.queues.get(name)?;
        self.queue(*id).map(|queue| queue_info(&queue))
    }

    /// Exchanges sorted by vhost and name; `vhost` narrows to one.
    pub fn exchange_exists(&self, vhost: &str, name: &str) -> bool {
        self.vhosts
            .get(vhost)
            .is_some_and(|state| state.exchanges.contains_key(name))
    }

    pub fn queue_exists(&self, vhost: &str, name: &str) -> bool {
        self.vhosts
            .get(vhost)
            .is_some_and(|state| state.queues.contains_key(name))
    }

    pub fn exchange_infos(&self, vhost: Option<&str>) -> Vec<ExchangeInfo> {
        let mut infos = Vec::new();
        for (vhost_name, state) in &self.vhosts {
            if vhost.is_some_and(|vhost| vhost != vhost_name) {
                continue;
            }
            infos.extend(state.exchanges.values().map(|exchange| ExchangeInfo {
                name: exchange.name.to_string(),
                vhost: vhost_name.clone(),
                kind: exchange.kind.name(),
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                internal: exchange.internal,
                arguments: exchange.arguments.clone(),
                policy: exchange.policy.clone(),
                counts: exchange.counts.get(),
            }));
        }
        infos.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        infos
    }

    /// Every binding of a vhost (or all vhosts), the default exchange's
    /// implicit one to each queue first, as RabbitMQ lists them.
    pub fn binding_infos(&self, vhost: Option<&str>) -> Vec<BindingInfo> {
        let mut vhost_names: Vec<&String> = self
            .vhosts
            .keys()
            .filter(|name| vhost.is_none_or(|vhost| vhost == name.as_str()))
            .collect();
        vhost_names.sort();
        let mut infos = Vec::new();
        for vhost_name in vhost_names {
            let state = &self.vhosts[vhost_name];
            let mut queue_names: Vec<&str> =
                state.queues.keys().map(|name| name.as_str()).collect();
            queue_names.sort();
            infos.extend(queue_names.into_iter().map(|queue| BindingInfo {
                vhost: vhost_name.clone(),
                source: String::new(),
                destination: queue.to_owned(),
                destination_kind: DestinationKind::Queue,
                routing_key: queue.to_owned(),
                arguments: FieldTable::default(),
            }));
            let mut exchanges: Vec<_> = state.exchanges.values().collect();
            exchanges.sort_by(|a, b| a.name.cmp(&b.name));
            for exchange in exchanges {
                for binding in exchange.bindings.iter() {
                    let (destination, destination_kind) = match &binding.destination {
                        Destination::Queue(id) => match self.queue(*id) {
                            Some(queue) => (queue.name.to_string(), DestinationKind::Queue),
                            None => continue,
                        },
                        Destination::Exchange(name) => {
                            (name.to_string(), DestinationKind::Exchange)
                        }
                    };
                    infos.push(BindingInfo {
                        vhost: vhost_name.clone(),
                        source: exchange.name.to_string(),
                        destination,
                        destination_kind,
                        routing_key: binding.routing_key.to_string(),
                        arguments: binding.arguments.clone(),
                    });
                }
            }
        }
        infos
    }

    /// Consumers of every queue (of one vhost), by queue.
    pub fn consumer_infos(&self, vhost: Option<&str>) -> Vec<ConsumerInfo> {
        let mut infos = Vec::new();
        for queue in self.queue_ids_sorted(vhost) {
            infos.extend(self.queue_consumer_infos(queue));
        }
        infos
    }

    /// The consumers of one queue, in the order the queue serves them.
    pub fn consumers_of(&self, vhost: &str, name: &str) -> Vec<ConsumerInfo> {
        match self
            .vhosts
            .get(vhost)
            .and_then(|state| state.queues.get(name))
        {
            Some(id) => self.queue_consumer_infos(*id),
            None => Vec::new(),
        }
    }

    fn queue_consumer_infos(&self, id: QueueId) -> Vec<ConsumerInfo> {
        let Some(queue) = self.queue(id) else {
            return Vec::new();
        };
        queue
            .consumers
            .iter()
            .enumerate()
            .map(|(index, consumer)| ConsumerInfo {
                vhost: queue.vhost.clone(),
                queue: queue.name.to_string(),
                connection: consumer.connection,
                channel: consumer.channel,
                tag: consumer.tag.to_string(),
                ack_required: !consumer.no_ack,
                exclusive: consumer.exclusive,
                prefetch_count: consumer.prefetch_count,
                priority: consumer.priority,
                active: !queue.args.single_active_consumer || index == 0,
            })
            .collect()
    }

    fn queue_ids_sorted(&self, vhost: Option<&str>) -> Vec<QueueId> {
        let mut queues: Vec<(String, String, QueueId)> = self
            .queues
            .values()
            .map(|queue| queue.lock())
            .filter(|queue| vhost.is_none_or(|vhost| queue.vhost == vhost))
            .map(|queue| (queue.vhost.clone(), queue.name.to_string(), queue.id))
            .collect();
        queues.sort();
        queues.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Channels of every connection, by connection and number.
    pub fn channel_infos(&self) -> Vec<ChannelInfo> {
        let mut infos: Vec<ChannelInfo> = self
            .connections
            .iter()
            .flat_map(|(connection, state)| {
                state.channels.iter().map(|(number, channel)| {
                    let channel = channel.lock();
                    ChannelInfo {
                        connection: *connection,
                        number: *number,
                        vhost: state.vhost.clone(),
                        prefetch_count: channel.consumer_prefetch,
                        global_prefetch_count: channel.global_prefetch,
                        consumers: channel.consumers.len(),
                        unacked: channel.unacked.len(),
                        mode: channel.mode,
                    }
                })
            })
            .collect();
        infos.sort_by_key(|info| (info.connection, info.number));
        infos
    }

    pub fn channel_count(&self, connection: ConnectionId) -> usize {
        self.connections
            .get(&connection)
            .map_or(0, |state| state.channels.len())
    }

    pub fn totals(&self) -> Totals {
        let mut totals = Totals {
            connections: self.connections.len(),
            channels: self
                .connections
                .values()
                .map(|state| state.channels.len())
                .sum(),
            exchanges: self
                .vhosts
                .values()
                .map(|vhost| vhost.exchanges.len())
                .sum(),
            queues: self.queues.len(),
            counts: MessageCounts {
                published: self.published.load(Ordering::Relaxed),
                unroutable: self.unroutable.load(Ordering::Relaxed),
                ..self.retired
            },
            lifecycle: self.lifecycle,
            ..Totals::default()
        };
        for queue in self.queues.values() {
            let queue = queue.lock();
            totals.consumers += queue.consumers.len();
            totals.ready += queue.ready_count() as u64;
            totals.unacked += queue.unacked as u64;
            totals.counts += MessageCounts {
                published: 0,
                unroutable: 0,
                ..queue.counts
            };
        }
        totals
    }
}

fn queue_info(queue: &Queue) -> QueueInfo {
    QueueInfo {
        name: queue.name.to_string(),
        vhost: queue.vhost.clone(),
        durable: queue.durable,
        auto_delete: queue.auto_delete,
        exclusive: queue.exclusive_owner.is_some(),
        quorum: queue.is_quorum(),
        arguments: queue.arguments.clone(),
        policy: queue.policy.clone(),
        ready: queue.ready_count(),
        ready_bytes: queue.ready_bytes(),
        ready_in_memory: queue.resident_count(),
        unacked: queue.unacked,
        consumers: queue.consumers.len(),
        counts: queue.counts,
        head_arrived_ms: queue.head_arrived_ms(),
        oldest_unacked_ms: queue.unacked_ages.oldest_ms(),
        delivery_counts: queue.delivery_counts,
    }
}
