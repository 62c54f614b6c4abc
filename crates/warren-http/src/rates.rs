//! Message rates, sampled by the broker: every second the sampler copies
//! the message counters; a rate is the change over the last few seconds,
//! as RabbitMQ's management plugin computes its `*_details.rate`.
//!
//! A sample reads the queues a few at a time, each look at the broker
//! short and the runtime's other tasks run between them, so that sampling
//! ten thousand queues does not hold up the broker's clients for the time
//! it takes to read them all. The broker-wide rates of what queues count
//! (deliveries, acks, ...) are the sum of the queues' own: a queue deleted
//! inside the window leaves the sum, one created inside it counts from its
//! first sample.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use warren_amqp::SharedHub;
use warren_core::{ExchangeCounts, MessageCounts};

pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// The span a rate is averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Queues read in one look at the broker while sampling: a few hundred
/// microseconds of work on this project's 2-core reference machine.
pub const SAMPLE_QUEUES_PER_LOOK: usize = 1024;

/// Messages per second for each counter of [`MessageCounts`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MessageRates {
    pub published: f64,
    pub delivered: f64,
    pub got: f64,
    pub acked: f64,
    pub redelivered: f64,
    pub unroutable: f64,
    /// Broker-wide only: publisher confirms sent.
    pub confirmed: f64,
}

struct Sample {
    at: Instant,
    /// Broker-wide published and unroutable counts (the rest are zero).
    published: MessageCounts,
    confirmed: u64,
    queues: HashMap<(String, String), MessageCounts>,
    exchanges: HashMap<(String, String), ExchangeCounts>,
}

#[derive(Default)]
pub struct Rates {
    /// The samples of the last `RATE_WINDOW`, oldest first.
    samples: Mutex<VecDeque<Sample>>,
}

impl Rates {
    /// Samples the counters every second until the task is dropped.
    pub async fn run(self: std::sync::Arc<Self>, hub: SharedHub) {
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            interval.tick().await;
            let ids = hub.read().broker().queue_ids();
            let mut queues = HashMap::with_capacity(ids.len());
            for look in ids.chunks(SAMPLE_QUEUES_PER_LOOK) {
                let counts = hub.read().broker().queue_message_counts_of(look);
                queues.extend(
                    counts
                        .into_iter()
                        .map(|(vhost, name, counts)| ((vhost, name), counts)),
                );
                tokio::task::yield_now().await;
            }
            let (published, exchanges) = {
                let hub = hub.read();
                (
                    hub.broker().publish_counts(),
                    hub.broker().exchange_counts(),
                )
            };
            self.record(Sample {
                at: Instant::now(),
                published,
                confirmed: hub.confirmed(),
                queues,
                exchanges: exchanges
                    .into_iter()
                    .map(|(vhost, name, counts)| ((vhost, name), counts))
                    .collect(),
            });
        }
    }

    fn record(&self, sample: Sample) {
        let mut samples = self.samples.lock();
        samples.push_back(sample);
        while samples.len() > 2
            && samples[samples.len() - 1].at.duration_since(samples[0].at) > RATE_WINDOW
        {
            samples.pop_front();
        }
    }

    pub fn broker(&self) -> MessageRates {
        let samples = self.samples.lock();
        let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
            return MessageRates::default();
        };
        let seconds = last.at.duration_since(first.at).as_secs_f64();
        if seconds <= 0.0 {
            return MessageRates::default();
        }
        let mut rates = MessageRates::default();
        for key in last.queues.keys() {
            let queue = rates_between(&samples, |sample| sample.queues.get(key).copied());
            rates.delivered += queue.delivered;
            rates.got += queue.got;
            rates.acked += queue.acked;
            rates.redelivered += queue.redelivered;
        }
        let published = rates_between(&samples, |sample| Some(sample.published));
        rates.published = published.published;
        rates.unroutable = published.unroutable;
        rates.confirmed = last.confirmed.saturating_sub(first.confirmed) as f64 / seconds;
        rates
    }

    pub fn queue(&self, vhost: &str, name: &str) -> MessageRates {
        let key = (vhost.to_owned(), name.to_owned());
        rates_between(&self.samples.lock(), |sample| {
            sample.queues.get(&key).copied()
        })
    }

    /// (publish_in, publish_out) per second.
    pub fn exchange(&self, vhost: &str, name: &str) -> (f64, f64) {
        let key = (vhost.to_owned(), name.to_owned());
        let samples = self.samples.lock();
        let start = samples
            .iter()
            .find_map(|sample| sample.exchanges.get(&key).map(|c| (sample.at, *c)));
        let end = samples
            .back()
            .and_then(|sample| sample.exchanges.get(&key).map(|c| (sample.at, *c)));
        match (start, end) {
            (Some((from, start)), Some((to, end))) if to > from => {
                let seconds = to.duration_since(from).as_secs_f64();
                (
                    end.published_in.saturating_sub(start.published_in) as f64 / seconds,
                    end.published_out.saturating_sub(start.published_out) as f64 / seconds,
                )
            }
            _ => (0.0, 0.0),
        }
    }
}

/// The rates of the counts `counts` picks from each sample, from the first
/// sample that has them to the last.
fn rates_between(
    samples: &VecDeque<Sample>,
    counts: impl Fn(&Sample) -> Option<MessageCounts>,
) -> MessageRates {
    let Some(last) = samples.back() else {
        return MessageRates::default();
    };
    // A queue created inside the window starts from its first sample.
    let Some((from, start)) = samples
        .iter()
        .find_map(|sample| counts(sample).map(|found| (sample.at, found)))
    else {
        return MessageRates::default();
    };
    let seconds = last.at.duration_since(from).as_secs_f64();
    let (Some(end), true) = (counts(last), seconds > 0.0) else {
        return MessageRates::default();
    };
    let per_second = |from: u64, to: u64| to.saturating_sub(from) as f64 / seconds;
    MessageRates {
        published: per_second(start.published, end.published),
        delivered: per_second(start.delivered, end.delivered),
        got: per_second(start.got, end.got),
        acked: per_second(start.acked, end.acked),
        redelivered: per_second(start.redelivered, end.redelivered),
        unroutable: per_second(start.unroutable, end.unroutable),
        confirmed: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, published: u64) -> Sample {
        let counts = MessageCounts {
            published,
            ..MessageCounts::default()
        };
        Sample {
            at,
            published: counts,
            confirmed: published,
            queues: HashMap::from([(("/".to_owned(), "q".to_owned()), counts)]),
            exchanges: HashMap::new(),
        }
    }

    #[test]
    fn a_rate_is_the_change_over_the_window() {
        let rates = Rates::default();
        let start = Instant::now();
        assert_eq!(rates.broker().published, 0.0);
        for second in 0..10u64 {
            rates.record(sample(start + Duration::from_secs(second), second * 100));
        }
        assert!((rates.broker().published - 100.0).abs() < 1e-9);
        assert!((rates.broker().confirmed - 100.0).abs() < 1e-9);
        assert!((rates.queue("/", "q").published - 100.0).abs() < 1e-9);
        assert_eq!(rates.queue("/", "other").published, 0.0);
        // Old samples are dropped: the window holds about RATE_WINDOW.
        assert!(rates.samples.lock().len() <= RATE_WINDOW.as_secs() as usize + 2);
    }

    /// Broker-wide delivery rates are the sum of the queues' own, each
    /// over the span it was sampled in: a queue declared inside the window
    /// counts from its first sample, one deleted inside it no longer counts.
    #[test]
    fn broker_rates_sum_the_queues_that_are_left() {
        let rates = Rates::default();
        let start = Instant::now();
        let delivered = |count: u64| MessageCounts {
            delivered: count,
            ..MessageCounts::default()
        };
        let key = |name: &str| ("/".to_owned(), name.to_owned());
        for second in 0..5u64 {
            let mut queues = HashMap::from([(key("steady"), delivered(second * 10))]);
            // Declared at second 2 with 1,000 deliveries already counted:
            // only what it delivered since counts.
            if second >= 2 {
                queues.insert(key("late"), delivered(1_000 + (second - 2) * 30));
            }
            // Deleted after second 2.
            if second <= 2 {
                queues.insert(key("gone"), delivered(second * 500));
            }
            rates.record(Sample {
                at: start + Duration::from_secs(second),
                published: MessageCounts::default(),
                confirmed: 0,
                queues,
                exchanges: HashMap::new(),
            });
        }
        assert!((rates.queue("/", "late").delivered - 30.0).abs() < 1e-9);
        assert_eq!(rates.queue("/", "gone").delivered, 0.0);
        assert!((rates.broker().delivered - 40.0).abs() < 1e-9);
    }
}
