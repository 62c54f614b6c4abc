//! What operators ask of a queue beyond its counts (rabbitmq-server#6813):
//! how long its oldest unacknowledged delivery has been out, and how many
//! times the messages it let go had been delivered. Both are kept as the
//! queue works, so reading them costs the same however long the queue is.

use std::collections::BTreeMap;

/// The queue's unacknowledged deliveries by the second they were made:
/// the first key is the oldest still out. A delivery notes its second
/// (`record`) and gives it back when settled (`release`); the map holds
/// one entry per second that still has a delivery out, so it stays small
/// while consumers keep up and never grows past the queue's unacked count.
#[derive(Debug, Default, Clone)]
pub struct UnackedAges {
    by_second: BTreeMap<u64, u32>,
}

impl UnackedAges {
    /// A delivery made at `now_ms`; returns the second to give back.
    pub fn record(&mut self, now_ms: u64) -> u64 {
        let second = now_ms / 1000;
        *self.by_second.entry(second).or_default() += 1;
        second
    }

    /// A delivery recorded at `second` was settled.
    pub fn release(&mut self, second: u64) {
        if let Some(count) = self.by_second.get_mut(&second) {
            *count -= 1;
            if *count == 0 {
                self.by_second.remove(&second);
            }
        }
    }

    /// When the oldest delivery still out was made, ms since the epoch, to
    /// the second.
    pub fn oldest_ms(&self) -> Option<u64> {
        self.by_second
            .first_key_value()
            .map(|(second, _)| second * 1000)
    }
}

/// The upper bounds of the delivery count histogram: how many times a
/// message was delivered before it was acknowledged, rejected or
/// dead-lettered for its delivery limit.
pub const DELIVERY_COUNT_BUCKETS: [u32; 5] = [1, 2, 3, 5, 10];

/// Messages settled, by how many times each had been delivered: one count
/// per bucket of `DELIVERY_COUNT_BUCKETS` (not cumulative), the last for
/// more; and the deliveries they took in all.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub buckets: [u64; DELIVERY_COUNT_BUCKETS.len() + 1],
    pub deliveries: u64,
}

impl DeliveryCounts {
    /// A message that had been delivered `deliveries` times left the queue.
    pub fn observe(&mut self, deliveries: u32) {
        let bucket = DELIVERY_COUNT_BUCKETS
            .iter()
            .position(|bound| deliveries <= *bound)
            .unwrap_or(DELIVERY_COUNT_BUCKETS.len());
        self.buckets[bucket] += 1;
        self.deliveries += u64::from(deliveries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unacked_delivery_is_the_first_still_out() {
        let mut ages = UnackedAges::default();
        assert_eq!(ages.oldest_ms(), None);
        let first = ages.record(10_500);
        let second = ages.record(10_900);
        let third = ages.record(12_100);
        assert_eq!(ages.oldest_ms(), Some(10_000));
        ages.release(first);
        assert_eq!(ages.oldest_ms(), Some(10_000), "one of that second is out");
        ages.release(second);
        assert_eq!(ages.oldest_ms(), Some(12_000));
        ages.release(third);
        assert_eq!(ages.oldest_ms(), None);
        assert!(ages.by_second.is_empty());
    }

    #[test]
    fn delivery_counts_fall_in_their_buckets() {
        let mut counts = DeliveryCounts::default();
        for deliveries in [1, 1, 2, 4, 10, 11, 50] {
            counts.observe(deliveries);
        }
        assert_eq!(counts.buckets, [2, 1, 0, 1, 1, 2]);
        assert_eq!(counts.deliveries, 79);
    }
}
