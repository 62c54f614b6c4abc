//! How long a model's backlog will take to clear: the signal an autoscaler
//! (KEDA, a Kubernetes HPA on external metrics) scales workers on, and
//! what a refused HTTP client is told to wait (`Retry-After`).
//!
//! The service rate is measured, not modelled: the requests the model's
//! workers acknowledged per second over the rate window (5 s), which under
//! a backlog is what the workers can do. A model with a backlog and no
//! acknowledgement in the window has no estimate: nothing is draining it.

use std::time::Duration;

use warren_core::QueueInfo;

use crate::models::ModelStatus;
use crate::state::AppState;

/// What a 429 says when nothing measured tells better: one rate window,
/// after which there is a measurement.
pub const RETRY_AFTER_UNKNOWN: Duration = Duration::from_secs(5);
/// The longest `Retry-After` given, however long the backlog.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// A model's queue as an autoscaler sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Requests in the queue, waiting or being worked on.
    pub messages: usize,
    /// Workers consuming the queue.
    pub consumers: usize,
    /// Requests answered per second over the rate window.
    pub service_rate: f64,
    /// Expected seconds until the queue is empty at that rate: 0 with
    /// nothing queued, None when requests wait and nothing drains them.
    pub drain_seconds: Option<f64>,
}

impl Backlog {
    pub fn new(messages: usize, consumers: usize, service_rate: f64) -> Self {
        let drain_seconds = if messages == 0 {
            Some(0.0)
        } else if service_rate > 0.0 {
            Some(messages as f64 / service_rate)
        } else {
            None
        };
        Self {
            messages,
            consumers,
            service_rate,
            drain_seconds,
        }
    }

    /// How long a refused client should wait before trying again: until
    /// the backlog has drained, at least a second, at most
    /// [`RETRY_AFTER_MAX`].
    pub fn retry_after(&self) -> Duration {
        match self.drain_seconds {
            None => RETRY_AFTER_UNKNOWN,
            Some(seconds) => Duration::from_secs(seconds.ceil() as u64)
                .clamp(Duration::from_secs(1), RETRY_AFTER_MAX),
        }
    }
}

/// The backlog of a model's queue (in the default vhost, where models'
/// queues live); empty while the queue does not exist.
pub fn of_model(state: &AppState, model: &ModelStatus) -> Backlog {
    let queue = state.hub.read().broker().queue_info("/", &model.queue);
    queue.map_or(Backlog::new(0, 0, 0.0), |queue| of_queue(state, &queue))
}

/// The backlog of a queue, as the broker and the rate sampler see it now.
pub fn of_queue(state: &AppState, queue: &QueueInfo) -> Backlog {
    let service_rate = state.rates.queue(&queue.vhost, &queue.name).acked;
    Backlog::new(queue.ready + queue.unacked, queue.consumers, service_rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_time_is_the_backlog_over_the_rate() {
        let backlog = Backlog::new(300, 2, 40.0);
        assert_eq!(backlog.drain_seconds, Some(7.5));
        assert_eq!(backlog.retry_after(), Duration::from_secs(8));
    }

    #[test]
    fn an_empty_queue_drains_at_once_and_a_stalled_one_never() {
        assert_eq!(Backlog::new(0, 0, 0.0).drain_seconds, Some(0.0));
        assert_eq!(
            Backlog::new(0, 1, 0.0).retry_after(),
            Duration::from_secs(1)
        );
        let stalled = Backlog::new(10, 0, 0.0);
        assert_eq!(stalled.drain_seconds, None);
        assert_eq!(stalled.retry_after(), RETRY_AFTER_UNKNOWN);
    }

    #[test]
    fn retry_after_is_bounded() {
        assert_eq!(
            Backlog::new(1, 1, 1e6).retry_after(),
            Duration::from_secs(1)
        );
        assert_eq!(
            Backlog::new(1_000_000, 1, 1.0).retry_after(),
            RETRY_AFTER_MAX
        );
    }
}
