//! Forgetting what a purge or a queue deletion took out of a queue.
//!
//! A queue holding millions of messages is emptied at once: its backlog is
//! swapped for an empty one and handed over whole as a [`Discard`]. Telling
//! the log that each message is gone costs time in proportion to the
//! backlog, so the server runs the discard on its store thread, off the
//! broker's locks; a broker without one runs it in place.

use std::fmt;

use warren_store::{Backlog, Location, LogHandle, MessageLog, StoreError};

use crate::QueueId;
use crate::queue::{QueuedMessage, Stored};

/// The messages a purge or a deletion took out, whose stored copies the log
/// must still forget.
pub struct Discard {
    queue: QueueId,
    /// False once the queue itself is deleted: recovery then ignores its
    /// records, and the log only needs to stop counting them.
    queue_exists: bool,
    backlog: Box<dyn Backlog<QueuedMessage>>,
}

impl fmt::Debug for Discard {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Discard")
            .field("queue", &self.queue)
            .field("queue_exists", &self.queue_exists)
            .field("messages", &self.backlog.len())
            .finish()
    }
}

impl Discard {
    pub(crate) fn new(
        queue: QueueId,
        queue_exists: bool,
        backlog: Box<dyn Backlog<QueuedMessage>>,
    ) -> Self {
        Self {
            queue,
            queue_exists,
            backlog,
        }
    }

    /// Messages still to forget.
    pub fn len(&self) -> usize {
        self.backlog.len()
    }

    pub fn is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Tells the log, through another thread's handle, that every message
    /// is gone.
    pub fn run(self, log: &LogHandle) {
        self.forget_all(log);
    }

    /// The same, through the log itself.
    pub(crate) fn run_in_place(self, log: &MessageLog) {
        self.forget_all(log);
    }

    fn forget_all(mut self, log: &dyn StoredCopies) {
        while let Some((_, queued)) = self.backlog.pop_front() {
            forget_copy(log, self.queue_exists, self.queue, queued.stored);
        }
    }
}

/// What forgetting a message's stored copy needs of the log, from its owner
/// or from another thread.
pub(crate) trait StoredCopies {
    fn release(&self, location: Location);
    fn release_paged(&self, location: Location);
    fn settle(&self, queue: u64, location: Location) -> Result<(), StoreError>;
}

impl StoredCopies for MessageLog {
    fn release(&self, location: Location) {
        MessageLog::release(self, location);
    }

    fn release_paged(&self, location: Location) {
        MessageLog::release_paged(self, location);
    }

    fn settle(&self, queue: u64, location: Location) -> Result<(), StoreError> {
        MessageLog::settle(self, queue, location)
    }
}

impl StoredCopies for LogHandle {
    fn release(&self, location: Location) {
        LogHandle::release(self, location);
    }

    fn release_paged(&self, location: Location) {
        LogHandle::release_paged(self, location);
    }

    fn settle(&self, queue: u64, location: Location) -> Result<(), StoreError> {
        LogHandle::settle(self, queue, location)
    }
}

/// Forgets one message's stored copy: a paged transient copy is released;
/// a published one is settled while its queue exists (so that recovery
/// does not bring it back) and is released otherwise.
pub(crate) fn forget_copy(
    log: &dyn StoredCopies,
    queue_exists: bool,
    queue: QueueId,
    stored: Stored,
) {
    match stored {
        Stored::Nowhere => {}
        Stored::Paged(location) => log.release_paged(location),
        Stored::Published(location) if queue_exists => {
            // A poisoned log refuses the record; the message may then come
            // back after a restart, which at-least-once delivery allows.
            let _ = log.settle(queue.0, location);
        }
        Stored::Published(location) => log.release(location),
    }
}
