//! Message rates, sampled by the broker: every second the sampler copies
//! the message counters; a rate is the change over the last few seconds,
//! as RabbitMQ's management plugin computes its `*_details.rate`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use warren_amqp::SharedHub;
use warren_core::{ExchangeCounts, MessageCounts};

pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// The span a rate is averaged over.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

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
    broker: MessageCounts,
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
            let (broker, queues, exchanges) = {
                let hub = hub.read();
                (
                    hub.broker().totals().counts,
                    hub.broker().queue_message_counts(),
                    hub.broker().exchange_counts(),
                )
            };
            self.record(Sample {
                at: Instant::now(),
                broker,
                confirmed: hub.confirmed(),
                queues: queues
                    .into_iter()
                    .map(|(vhost, name, counts)| ((vhost, name), counts))
                    .collect(),
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
        let mut rates = self.rate_of(|sample| Some(sample.broker));
        let samples = self.samples.lock();
        if let (Some(first), Some(last)) = (samples.front(), samples.back()) {
            let seconds = last.at.duration_since(first.at).as_secs_f64();
            if seconds > 0.0 {
                rates.confirmed = last.confirmed.saturating_sub(first.confirmed) as f64 / seconds;
            }
        }
        rates
    }

    pub fn queue(&self, vhost: &str, name: &str) -> MessageRates {
        let key = (vhost.to_owned(), name.to_owned());
        self.rate_of(|sample| sample.queues.get(&key).copied())
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

    fn rate_of(&self, counts: impl Fn(&Sample) -> Option<MessageCounts>) -> MessageRates {
        let samples = self.samples.lock();
        let (Some(first), Some(last)) = (samples.front(), samples.back()) else {
            return MessageRates::default();
        };
        let seconds = last.at.duration_since(first.at).as_secs_f64();
        // A queue created inside the window starts from its first sample.
        let Some(start) = samples.iter().find_map(&counts) else {
            return MessageRates::default();
        };
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
            broker: counts,
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
}
