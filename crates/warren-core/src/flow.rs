//! Consumer-paced flow control: a publisher feeding a queue whose consumers
//! are falling behind is slowed down, as RabbitMQ's credit flow slows a
//! publisher whose queue process cannot keep up.
//!
//! Without it, publishers that outrun a queue's consumers grow its backlog
//! until messages are paged to disk, and every delivery then waits for a
//! read: consumers get slower the further they fall behind, and a message's
//! time in the queue grows without bound.
//!
//! Holding a publisher back pays only when the consumers will make room
//! soon. A queue with no consumers, or with consumers slower than
//! `FLOW_DRAIN_RATE_MIN` (a worker taking seconds per task), is left alone:
//! buffering a burst for them is what queues are for.

/// Deliveries per second below which a queue's consumers are too slow for
/// holding its publishers back to help.
pub const FLOW_DRAIN_RATE_MIN: u64 = 1_000;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::broker::Broker;
use crate::{ConnectionId, QueueId};

/// A queue's ready count and consumer count, kept current by the broker as
/// they change, so that a publisher the queue holds back can watch it
/// without taking the broker's lock.
#[derive(Debug, Default)]
pub struct FlowGauge {
    ready: AtomicUsize,
    consumers: AtomicUsize,
    /// The queue is gone: it holds nobody back any more.
    deleted: AtomicBool,
}

impl FlowGauge {
    pub(crate) fn set_ready(&self, ready: usize) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(crate) fn set_consumers(&self, consumers: usize) {
        self.consumers.store(consumers, Ordering::Relaxed);
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Relaxed);
    }

    fn has_consumers(&self) -> bool {
        !self.deleted.load(Ordering::Relaxed) && self.consumers.load(Ordering::Relaxed) > 0
    }

    /// Whether a publisher held back by this queue should go on waiting,
    /// under a limit of `ready_max`: the queue still has consumers and has
    /// not come down to half the limit (the gap keeps a publisher from
    /// stopping and starting on every message).
    pub fn holds(&self, ready_max: usize) -> bool {
        ready_max != 0 && self.has_consumers() && self.ready.load(Ordering::Relaxed) > ready_max / 2
    }

    /// How many more messages the queue has room for before it reaches
    /// `ready_max`; None once it holds nothing back (no consumers any more,
    /// or deleted).
    pub fn room(&self, ready_max: usize) -> Option<usize> {
        (ready_max != 0 && self.has_consumers())
            .then(|| ready_max.saturating_sub(self.ready.load(Ordering::Relaxed)))
    }
}

impl Broker {
    /// The queue among `targets` that should hold back the publisher, if any:
    /// one with consumers and more ready messages than `flow_ready_max`.
    /// The rate its consumers drain it at is measured here, as publishes
    /// arrive: flow control matters only while publishes do.
    pub(crate) fn queue_over_flow_limit(&mut self, targets: &[QueueId]) -> Option<QueueId> {
        let limit = self.limits.flow_ready_max;
        if limit == 0 {
            return None;
        }
        let now_ms = self.now_ms;
        targets.iter().copied().find(|id| {
            self.queues.get_mut(id).is_some_and(|queue| {
                let drain_per_s = queue.drain.update(queue.counts.delivered, now_ms);
                !queue.consumers.is_empty()
                    && queue.ready_count() > limit
                    && drain_per_s >= FLOW_DRAIN_RATE_MIN
            })
        })
    }

    /// Whether a connection drains queues itself: holding back its reads
    /// would also hold back its acks, and with them the queues that held it
    /// back.
    pub(crate) fn connection_consumes(&self, connection: ConnectionId) -> bool {
        self.connections.get(&connection).is_some_and(|state| {
            state
                .channels
                .values()
                .any(|channel| !channel.consumers.is_empty() || !channel.unacked.is_empty())
        })
    }

    /// Whether a publisher held back by `queue` should go on waiting: the
    /// queue still has consumers and has not come down to half the limit
    /// (the gap keeps a publisher from stopping and starting on every
    /// message).
    pub fn flow_holds(&self, queue: QueueId) -> bool {
        self.queues
            .get(&queue)
            .is_some_and(|queue| queue.flow_gauge.holds(self.limits.flow_ready_max))
    }

    /// How many more messages a queue holding back a publisher has room
    /// for before it reaches the limit; None once it holds nothing back (no
    /// consumers any more, or deleted).
    pub fn flow_room(&self, queue: QueueId) -> Option<usize> {
        self.queues
            .get(&queue)
            .and_then(|queue| queue.flow_gauge.room(self.limits.flow_ready_max))
    }

    /// The gauge a publisher held back by `queue` watches instead of asking
    /// the broker (see `FlowGauge`).
    pub fn flow_gauge(&self, queue: QueueId) -> Option<Arc<FlowGauge>> {
        self.queues
            .get(&queue)
            .map(|queue| Arc::clone(&queue.flow_gauge))
    }
}
