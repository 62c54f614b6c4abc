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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A queue's ready count and consumer count, kept current by the broker as
/// they change, so that a publisher the queue holds back can watch it
/// without taking the broker's locks.
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
