//! The broker's side of flow control: which queue should hold a publisher
//! back, and what a held-back publisher watches.

use std::sync::Arc;

use super::Broker;
use crate::queue::flow::{FLOW_DRAIN_RATE_MIN, FlowGauge};
use crate::{ConnectionId, QueueId};

impl Broker {
    /// The queue among `targets` that should hold back the publisher, if any:
    /// one with consumers and more ready messages than `flow_ready_max`.
    /// The rate its consumers drain it at is measured here, as publishes
    /// arrive: flow control matters only while publishes do.
    pub(crate) fn queue_over_flow_limit(&self, targets: &[QueueId]) -> Option<QueueId> {
        let limit = self.limits.flow_ready_max;
        if limit == 0 {
            return None;
        }
        let now_ms = self.now_ms();
        targets.iter().copied().find(|id| {
            self.queue(*id).is_some_and(|mut queue| {
                let delivered = queue.counts.delivered;
                let drain_per_s = queue.drain.update(delivered, now_ms);
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
            state.channels.values().any(|channel| {
                let channel = channel.lock();
                !channel.consumers.is_empty() || !channel.unacked.is_empty()
            })
        })
    }

    /// Whether a publisher held back by `queue` should go on waiting: the
    /// queue still has consumers and has not come down to half the limit
    /// (the gap keeps a publisher from stopping and starting on every
    /// message).
    pub fn flow_holds(&self, queue: QueueId) -> bool {
        self.queue(queue)
            .is_some_and(|queue| queue.flow_gauge.holds(self.limits.flow_ready_max))
    }

    /// How many more messages a queue holding back a publisher has room
    /// for before it reaches the limit; None once it holds nothing back (no
    /// consumers any more, or deleted).
    pub fn flow_room(&self, queue: QueueId) -> Option<usize> {
        self.queue(queue)
            .and_then(|queue| queue.flow_gauge.room(self.limits.flow_ready_max))
    }

    /// The gauge a publisher held back by `queue` watches instead of asking
    /// the broker (see `FlowGauge`).
    pub fn flow_gauge(&self, queue: QueueId) -> Option<Arc<FlowGauge>> {
        self.queue(queue).map(|queue| Arc::clone(&queue.flow_gauge))
    }
}
