//! Fixed-rate publishing schedule: when each message is due.
//!
//! The schedule is absolute (message `k` is due at `start + k / rate`) rather
//! than "sleep 1/rate after each send", so timer granularity and slow sends do
//! not accumulate into a lower rate than asked for: a producer that falls
//! behind sends what is overdue in a burst and is back on schedule. This also
//! keeps latency honest under load (no coordinated omission on the send side).

use std::time::Duration;

/// When each of one producer's messages is due, relative to its start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Messages per second for this producer; always finite and positive.
    rate_per_s: f64,
}

impl Schedule {
    /// The share of `total_per_s` for one of `producers` producers, or `None`
    /// for an unlimited rate (`total_per_s == 0`) or no producers.
    pub fn for_producer(total_per_s: u64, producers: usize) -> Option<Self> {
        if total_per_s == 0 || producers == 0 {
            return None;
        }
        Some(Self {
            rate_per_s: total_per_s as f64 / producers as f64,
        })
    }

    /// Offset from the producer's start at which message `sequence` is due.
    pub fn due_after(&self, sequence: u64) -> Duration {
        // f64 keeps 53 bits of mantissa: exact for any sequence a run reaches.
        Duration::from_secs_f64(sequence as f64 / self.rate_per_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_means_unlimited() {
        assert_eq!(Schedule::for_producer(0, 4), None);
        assert_eq!(Schedule::for_producer(1000, 0), None);
    }

    #[test]
    fn total_rate_is_split_evenly_across_producers() {
        let schedule = Schedule::for_producer(1000, 4).expect("limited");
        // 250 msg/s each: message 250 is due one second in.
        assert_eq!(schedule.due_after(0), Duration::ZERO);
        assert_eq!(schedule.due_after(1), Duration::from_millis(4));
        assert_eq!(schedule.due_after(250), Duration::from_secs(1));
    }

    #[test]
    fn uneven_split_keeps_the_total() {
        let schedule = Schedule::for_producer(1000, 3).expect("limited");
        // Each producer's message 1000 is due three seconds in.
        let due = schedule.due_after(1000);
        assert!((due.as_secs_f64() - 3.0).abs() < 1e-9, "{due:?}");
    }

    #[test]
    fn high_rates_keep_sub_microsecond_spacing() {
        let schedule = Schedule::for_producer(2_000_000, 1).expect("limited");
        assert_eq!(schedule.due_after(1), Duration::from_nanos(500));
        assert_eq!(schedule.due_after(2_000_000), Duration::from_secs(1));
    }
}
