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
//! * [`spill::SpillingBacklog`]: a backlog that keeps its head in memory
//!   and the index entries behind it in spill files;
//! * [`topology::TopologyJournal`]: durable exchanges, queues and bindings,
//!   as a snapshot and a journal of changes;
//! * [`fs::FileSystem`]: the file operations both use, with a real and a
//!   simulated (crashing, failing) implementation.

pub mod compact;
pub mod fs;
pub mod log;
pub mod record;
mod replay;
pub mod spill;
pub mod topology;

pub use compact::CompactionReport;
pub use fs::{FileSystem, OsFileSystem, SimulatedFileSystem};
pub use log::{
    COMMIT_DURATION_BOUNDS_US, CommitTimesSnapshot, DurableListener, FreeSpace, Location,
    LogConfig, LogHandle, MessageLog, RecoveredMessage, Recovery, StoreError, Ticket,
};
pub use record::RecordKind;
pub use replay::RecoveredSink;
pub use spill::{SpillArea, SpillEntry, SpillingBacklog};
pub use topology::{TopologyChange, TopologyJournal, TopologyWaiter};

use std::collections::{BTreeMap, VecDeque};

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

    /// Whether a message pushed now would wait in memory. When it would
    /// not, the caller stores its body first (see `spill`): messages
    /// behind a spilled tail keep only their index entry, and that on disk.
    fn holds_in_memory(&self, _next: &M) -> bool {
        true
    }

    /// Visits up to `count` waiting messages in the order they will be
    /// taken; `visit` may change a message but not its place.
    fn visit_head_mut(&mut self, count: usize, visit: &mut dyn FnMut(Sequence, &mut M));

    /// The waiting message with this sequence number.
    fn get_mut(&mut self, sequence: Sequence) -> Option<&mut M>;
}

/// A backlog held entirely in memory, ordered by sequence number.
///
/// Messages that came back (requeued, or put back after a look at the head)
/// are kept apart from those that never left: a message can only be taken
/// from the head, and every later arrival gets a higher sequence number, so a
/// returning message is always older than every message that never left.
/// Putting one back is then an insertion among the returned ones only,
/// O(log k), however long the queue is; a channel that closes with 100,000
/// unacknowledged deliveries costs 100,000 such insertions, not a shift of
/// the whole queue for each.
#[derive(Debug)]
pub struct MemoryBacklog<M> {
    /// Messages that were taken and came back, by sequence number.
    returned: BTreeMap<Sequence, M>,
    /// Messages that never left, in arrival (and sequence) order.
    arrived: VecDeque<(Sequence, M)>,
}

impl<M> Default for MemoryBacklog<M> {
    fn default() -> Self {
        Self {
            returned: BTreeMap::new(),
            arrived: VecDeque::new(),
        }
    }
}

impl<M> MemoryBacklog<M> {
    /// Messages that never left, as opposed to those that came back.
    pub fn arrived_len(&self) -> usize {
        self.arrived.len()
    }

    /// Takes every waiting message, oldest first.
    pub fn drain(&mut self) -> Vec<M> {
        let mut drained = Vec::with_capacity(self.returned.len() + self.arrived.len());
        drained.extend(std::mem::take(&mut self.returned).into_values());
        drained.extend(self.arrived.drain(..).map(|(_, message)| message));
        drained
    }
}

impl<M: Send> Backlog<M> for MemoryBacklog<M> {
    fn push_back(&mut self, sequence: Sequence, message: M) {
        debug_assert!(self.arrived.back().is_none_or(|(last, _)| *last < sequence));
        debug_assert!(
            self.returned
                .last_key_value()
                .is_none_or(|(last, _)| *last < sequence)
        );
        self.arrived.push_back((sequence, message));
    }

    fn pop_front(&mut self) -> Option<(Sequence, M)> {
        self.returned
            .pop_first()
            .or_else(|| self.arrived.pop_front())
    }

    fn front(&self) -> Option<(Sequence, &M)> {
        match self.returned.first_key_value() {
            Some((sequence, message)) => Some((*sequence, message)),
            None => self
                .arrived
                .front()
                .map(|(sequence, message)| (*sequence, message)),
        }
    }

    fn requeue(&mut self, sequence: Sequence, message: M) {
        match self.arrived.front() {
            // A sequence number this backlog never handed out: place it by
            // binary search rather than break the order.
            Some((oldest, _)) if *oldest < sequence => {
                let position = self
                    .arrived
                    .partition_point(|(waiting, _)| *waiting <= sequence);
                self.arrived.insert(position, (sequence, message));
            }
            _ => {
                self.returned.insert(sequence, message);
            }
        }
    }

    fn len(&self) -> usize {
        self.returned.len() + self.arrived.len()
    }

    fn visit_head_mut(&mut self, count: usize, visit: &mut dyn FnMut(Sequence, &mut M)) {
        let returned = self
            .returned
            .iter_mut()
            .map(|(sequence, message)| (*sequence, message));
        let arrived = self
            .arrived
            .iter_mut()
            .map(|(sequence, message)| (*sequence, message));
        for (sequence, message) in returned.chain(arrived).take(count) {
            visit(sequence, message);
        }
    }

    fn get_mut(&mut self, sequence: Sequence) -> Option<&mut M> {
        if self.returned.contains_key(&sequence) {
            return self.returned.get_mut(&sequence);
        }
        let position = self
            .arrived
            .partition_point(|(waiting, _)| *waiting < sequence);
        match self.arrived.get_mut(position) {
            Some((found, message)) if *found == sequence => Some(message),
            _ => None,
        }
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
    fn requeued_and_arrived_messages_keep_one_order() {
        let mut backlog = MemoryBacklog::default();
        for sequence in 1..=4 {
            backlog.push_back(sequence, sequence);
        }
        let first = backlog.pop_front().unwrap();
        let second = backlog.pop_front().unwrap();
        backlog.requeue(second.0, second.1);
        backlog.push_back(5, 5);
        assert_eq!(backlog.front(), Some((2, &2)));
        backlog.requeue(first.0, first.1);
        assert_eq!(backlog.len(), 5);
        assert_eq!(backlog.front(), Some((1, &1)));
        // An out-of-order sequence number still lands in its place.
        backlog.requeue(4, 40);
        assert_eq!(backlog.drain(), vec![1, 2, 3, 4, 40, 5]);
    }

    /// Requeueing is a search among the returned messages, not a shift of
    /// the whole queue: putting back 200,000 deliveries in delivery order in
    /// front of 1,000,000 waiting messages would move 10^11 entries if each
    /// insertion shifted the queue, and takes milliseconds here. The bound is
    /// generous so that a busy machine does not fail it; a quadratic
    /// requeue misses it by minutes.
    #[test]
    fn requeueing_many_deliveries_does_not_shift_the_queue() {
        let mut backlog = MemoryBacklog::default();
        for sequence in 1..=1_200_000u64 {
            backlog.push_back(sequence, ());
        }
        let taken: Vec<_> = (0..200_000).map(|_| backlog.pop_front().unwrap()).collect();
        let started = std::time::Instant::now();
        for (sequence, message) in taken {
            backlog.requeue(sequence, message);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "requeueing 200,000 messages took {:?}",
            started.elapsed()
        );
        assert_eq!(backlog.len(), 1_200_000);
        assert_eq!(backlog.pop_front().map(|(sequence, _)| sequence), Some(1));
    }

    #[test]
    fn the_head_is_visited_in_taking_order_and_found_by_sequence() {
        let mut backlog = MemoryBacklog::default();
        for sequence in 1..=5 {
            backlog.push_back(sequence, sequence * 10);
        }
        let (first, _) = backlog.pop_front().unwrap();
        let (second, _) = backlog.pop_front().unwrap();
        backlog.requeue(second, 20);
        backlog.requeue(first, 10);
        let mut seen = Vec::new();
        backlog.visit_head_mut(4, &mut |sequence, message| {
            *message += 1;
            seen.push(sequence);
        });
        assert_eq!(seen, [1, 2, 3, 4]);
        assert_eq!(backlog.get_mut(2).copied(), Some(21));
        assert_eq!(backlog.get_mut(4).copied(), Some(41));
        assert_eq!(backlog.get_mut(5).copied(), Some(50));
        assert_eq!(backlog.get_mut(6), None);
        let taken: Vec<u64> = std::iter::from_fn(|| backlog.pop_front().map(|(_, m)| m)).collect();
        assert_eq!(taken, [11, 21, 31, 41, 50]);
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
