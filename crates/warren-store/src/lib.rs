//! Where a queue keeps the messages that wait for a consumer.
//!
//! A queue in `warren-core` sees its waiting messages only through the
//! [`Backlog`] trait: push at the tail, take from the head, put a requeued
//! message back where it was. [`MemoryBacklog`] keeps everything in memory;
//! the durable segment log implements the same trait, so the queue logic does
//! not change when messages move to disk.
//!
//! This crate knows nothing of AMQP: a message is any `M`, identified by the
//! sequence number its queue gave it on arrival, and the log stores opaque
//! payloads.
//!
//! * [`log::MessageLog`]: the append-only segment log with group commit and
//!   recovery;
//! * [`topology::TopologyFile`]: durable exchanges, queues and bindings;
//! * [`fs::FileSystem`]: the file operations both use, with a real and a
//!   simulated (crashing, failing) implementation.

pub mod fs;
pub mod log;
pub mod record;
pub mod topology;

pub use fs::{FileSystem, OsFileSystem, SimulatedFileSystem};
pub use log::{
    COMMIT_DURATION_BOUNDS_US, CommitTimesSnapshot, DurableListener, Location, LogConfig,
    MessageLog, RecoveredMessage, Recovery, StoreError, Ticket,
};
pub use record::RecordKind;
pub use topology::TopologyFile;

use std::collections::VecDeque;

/// A queue's position counter: a message's sequence number is assigned when
/// it enters the queue and never changes, so a requeued message can go back to
/// the place it left.
pub type Sequence = u64;

/// The ordered messages of one queue that are ready for delivery.
pub trait Backlog<M>: Send {
    /// Appends a message that has just arrived. `sequence` is greater than
    /// that of every message this backlog has seen.
    fn push_back(&mut self, sequence: Sequence, message: M);

    /// Takes the oldest message.
    fn pop_front(&mut self) -> Option<(Sequence, M)>;

    /// Looks at the oldest message without taking it.
    fn front(&self) -> Option<(Sequence, &M)>;

    /// Puts back a message that was taken earlier, at the position its
    /// sequence number gives it among the messages still waiting.
    fn requeue(&mut self, sequence: Sequence, message: M);

    /// Number of messages waiting.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every waiting message and returns them, oldest first.
    fn drain(&mut self) -> Vec<M>;

    /// Makes room for `additional` messages about to be pushed, so a large
    /// recovered backlog is allocated once rather than by doubling.
    fn reserve(&mut self, _additional: usize) {}
}

/// A backlog held entirely in memory, ordered by sequence number.
#[derive(Debug)]
pub struct MemoryBacklog<M> {
    entries: VecDeque<(Sequence, M)>,
}

impl<M> Default for MemoryBacklog<M> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
        }
    }
}

impl<M: Send> Backlog<M> for MemoryBacklog<M> {
    fn push_back(&mut self, sequence: Sequence, message: M) {
        debug_assert!(self.entries.back().is_none_or(|(last, _)| *last < sequence));
        self.entries.push_back((sequence, message));
    }

    fn pop_front(&mut self) -> Option<(Sequence, M)> {
        self.entries.pop_front()
    }

    fn front(&self) -> Option<(Sequence, &M)> {
        self.entries
            .front()
            .map(|(sequence, message)| (*sequence, message))
    }

    fn requeue(&mut self, sequence: Sequence, message: M) {
        // Requeued messages usually belong at or near the head, so search
        // from the front rather than bisecting the whole deque.
        let position = self
            .entries
            .iter()
            .position(|(waiting, _)| *waiting > sequence)
            .unwrap_or(self.entries.len());
        self.entries.insert(position, (sequence, message));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn drain(&mut self) -> Vec<M> {
        self.entries.drain(..).map(|(_, message)| message).collect()
    }

    fn reserve(&mut self, additional: usize) {
        self.entries.reserve_exact(additional);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeued_messages_return_to_their_original_position() {
        let mut backlog = MemoryBacklog::default();
        for sequence in 1..=5 {
            backlog.push_back(sequence, sequence * 10);
        }
        let first = backlog.pop_front().unwrap();
        let second = backlog.pop_front().unwrap();
        let third = backlog.pop_front().unwrap();
        backlog.requeue(third.0, third.1);
        backlog.requeue(first.0, first.1);
        backlog.requeue(second.0, second.1);
        assert_eq!(backlog.drain(), vec![10, 20, 30, 40, 50]);
    }

    #[test]
    fn front_does_not_take() {
        let mut backlog = MemoryBacklog::default();
        backlog.push_back(7, "a");
        assert_eq!(backlog.front(), Some((7, &"a")));
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog.pop_front(), Some((7, "a")));
        assert!(backlog.is_empty());
    }
}
