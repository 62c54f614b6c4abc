//! A queue from many senders to one task, for what a connection's tasks are
//! handed: frames for the writer, notices for the reader.
//!
//! A connection that sits idle must cost little memory, and most of a
//! broker's connections may be idle. A `VecDeque` allocates nothing until
//! the first item and the receiver takes everything queued in one lock, so
//! an idle connection holds no preallocated blocks and a busy one pays one
//! lock per batch rather than per item.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A receiver's batch buffer keeps at most this many slots once drained, so
/// that a burst does not pin its high-water mark for the connection's life.
const RETAINED_SLOTS_MAX: usize = 256;

pub struct Mailbox<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    ready: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    /// Set when the receiver has gone: later items are dropped at once.
    closed: bool,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> std::fmt::Debug for Mailbox<T> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.inner.state.lock();
        formatter
            .debug_struct("Mailbox")
            .field("queued", &state.items.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Mailbox<T> {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    items: VecDeque::new(),
                    closed: false,
                }),
                ready: Notify::new(),
            }),
        }
    }

    /// Queues an item; false (and the item dropped) when the receiver has
    /// gone.
    pub fn push(&self, item: T) -> bool {
        let was_empty = {
            let mut state = self.inner.state.lock();
            if state.closed {
                return false;
            }
            state.items.push_back(item);
            state.items.len() == 1
        };
        // The receiver wakes for a non-empty mailbox and then takes all of
        // it, so only the first item of a batch needs to wake it. Notify
        // keeps the permit if the receiver is not waiting yet.
        if was_empty {
            self.inner.ready.notify_one();
        }
        true
    }

    /// Moves everything queued into `batch`, which must be empty.
    pub fn take_all(&self, batch: &mut VecDeque<T>) {
        debug_assert!(batch.is_empty());
        if batch.capacity() > RETAINED_SLOTS_MAX {
            batch.shrink_to(RETAINED_SLOTS_MAX);
        }
        std::mem::swap(&mut self.inner.state.lock().items, batch);
    }

    /// Waits until an item may have been queued since the last `take_all`.
    pub async fn ready(&self) {
        self.inner.ready.notified().await;
    }

    /// Marks the receiver gone and drops what is queued.
    pub fn close(&self) {
        let dropped = {
            let mut state = self.inner.state.lock();
            state.closed = true;
            std::mem::take(&mut state.items)
        };
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn items_arrive_in_order_in_one_batch() {
        let mailbox = Mailbox::new();
        for item in 0..5 {
            assert!(mailbox.push(item));
        }
        mailbox.ready().await;
        let mut batch = VecDeque::new();
        mailbox.take_all(&mut batch);
        assert_eq!(batch.drain(..).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        mailbox.take_all(&mut batch);
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn a_push_before_the_receiver_waits_still_wakes_it() {
        let mailbox = Mailbox::new();
        let mut batch = VecDeque::new();
        mailbox.take_all(&mut batch);
        assert!(batch.is_empty());
        mailbox.push("late");
        tokio::time::timeout(std::time::Duration::from_secs(5), mailbox.ready())
            .await
            .expect("the permit stored by the push wakes the receiver");
        mailbox.take_all(&mut batch);
        assert_eq!(batch.pop_front(), Some("late"));
    }

    #[test]
    fn a_closed_mailbox_refuses_items() {
        let mailbox = Mailbox::new();
        mailbox.push(1);
        mailbox.close();
        assert!(!mailbox.push(2));
        let mut batch = VecDeque::new();
        mailbox.take_all(&mut batch);
        assert!(batch.is_empty());
    }

    #[test]
    fn an_idle_mailbox_allocates_no_slots() {
        let mailbox: Mailbox<u64> = Mailbox::new();
        assert_eq!(mailbox.inner.state.lock().items.capacity(), 0);
    }

    #[test]
    fn a_drained_batch_buffer_gives_back_a_burst() {
        let mailbox = Mailbox::new();
        for item in 0..(RETAINED_SLOTS_MAX * 4) {
            mailbox.push(item);
        }
        let mut batch = VecDeque::new();
        mailbox.take_all(&mut batch);
        batch.clear();
        mailbox.take_all(&mut batch);
        assert!(mailbox.inner.state.lock().items.capacity() <= RETAINED_SLOTS_MAX);
    }
}
