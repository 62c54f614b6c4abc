//! Fair turns for connection tasks on tokio's worker threads.
//!
//! A connection whose socket never makes it wait (a consumer that reads as
//! fast as the broker delivers, a publisher that keeps its socket full)
//! would keep its worker thread until tokio's budget of 128 I/O calls runs
//! out, which is a whole backlog of small messages; the other connections
//! on that thread wait meanwhile. Yielding after every batch fixes that but
//! costs a reschedule per batch, which a busy connection feels. A turn
//! yields only once the task has had the thread for `TURN_MAX`.

use std::time::{Duration, Instant};

/// How long a connection task keeps its thread before it lets the others
/// run: short next to the latency a client notices, long next to the cost
/// of a reschedule.
pub const TURN_MAX: Duration = Duration::from_micros(500);

pub(crate) struct Turn {
    started: Instant,
}

impl Turn {
    pub(crate) fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    /// Whether this task has had its thread for a whole turn.
    pub(crate) fn is_over(&self) -> bool {
        self.started.elapsed() >= TURN_MAX
    }

    /// Yields to the other tasks on this thread if this one has had it for
    /// a whole turn.
    pub(crate) async fn end_if_long(&mut self) {
        if self.is_over() {
            tokio::task::yield_now().await;
            self.started = Instant::now();
        }
    }
}
