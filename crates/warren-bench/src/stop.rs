//! A one-way stop signal shared by the tasks of a run.
//!
//! Producers check it once per message, so the check is a relaxed atomic load
//! rather than a lock; tasks that sleep (rate limiting, waiting for
//! deliveries) also await it so they wake at once instead of at their next
//! timeout.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// Set once, never cleared; every waiter wakes.
#[derive(Debug, Default)]
pub struct Stop {
    stopped: AtomicBool,
    wakeup: Notify,
}

impl Stop {
    /// Asks every task watching this signal to stop. Idempotent.
    pub fn trigger(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wakeup.notify_waiters();
    }

    /// Whether [`Stop::trigger`] has been called.
    pub fn is_triggered(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once the signal is triggered (at once if it already was).
    pub async fn triggered(&self) {
        loop {
            let notified = self.wakeup.notified();
            tokio::pin!(notified);
            // Register before checking the flag, so a trigger between the
            // check and the await cannot be missed.
            notified.as_mut().enable();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn wakes_a_waiter_and_later_ones() {
        let stop = Arc::new(Stop::default());
        let waiter = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move { stop.triggered().await }
        });
        assert!(!stop.is_triggered());
        stop.trigger();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woke")
            .expect("waiter ran");
        // A waiter that arrives after the trigger returns at once.
        tokio::time::timeout(Duration::from_secs(5), stop.triggered())
            .await
            .expect("late waiter returns");
    }
}
