//! How a worker picks its next batch from the requests it holds (its
//! prefetch): the highest AMQP `priority` first and, within a priority, in
//! the order they arrived; never past the batch's size or its token budget
//! (so that one long text does not make a batch of short ones pad to its
//! length); and never a request whose expiration has passed, which is
//! dead-lettered instead of costing an inference.

/// A request held by the worker, with what scheduling needs to know.
#[derive(Debug)]
pub struct Held<T> {
    pub item: T,
    pub priority: u8,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    /// What it costs a batch: its tokens for a text model, else 1.
    pub cost: usize,
    sequence: u64,
}

/// The requests a worker holds and has not run yet.
#[derive(Debug)]
pub struct HeldRequests<T> {
    held: Vec<Held<T>>,
    next_sequence: u64,
}

impl<T> Default for HeldRequests<T> {
    fn default() -> Self {
        Self {
            held: Vec::new(),
            next_sequence: 0,
        }
    }
}

impl<T> HeldRequests<T> {
    pub fn push(&mut self, item: T, priority: u8, expires_at_ms: Option<u64>, cost: usize) {
        self.held.push(Held {
            item,
            priority,
            expires_at_ms,
            cost,
            sequence: self.next_sequence,
        });
        self.next_sequence += 1;
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Held<T>> {
        self.held.iter()
    }

    /// Removes and returns the requests expired at `now_ms`, oldest first.
    pub fn take_expired(&mut self, now_ms: u64) -> Vec<T> {
        let (expired, kept): (Vec<Held<T>>, Vec<Held<T>>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|held| held.expires_at_ms.is_some_and(|at| at <= now_ms));
        self.held = kept;
        expired.into_iter().map(|held| held.item).collect()
    }

    /// Removes and returns the next batch: in priority order (arrival
    /// order within a priority), at most `size_max` requests, and no more
    /// than `cost_max` in all unless the first alone is over it (a request
    /// is never left behind for being large). The batch stops at the first
    /// request that does not fit, so a large request is not overtaken for
    /// ever by smaller ones behind it.
    pub fn take_batch(&mut self, size_max: usize, cost_max: Option<usize>) -> Vec<T> {
        self.held
            .sort_by_key(|held| (std::cmp::Reverse(held.priority), held.sequence));
        let mut taken = 0;
        let mut cost = 0;
        for held in &self.held {
            let fits = cost_max.is_none_or(|max| cost + held.cost <= max);
            if taken == size_max || (taken > 0 && !fits) {
                break;
            }
            taken += 1;
            cost += held.cost;
        }
        let rest = self.held.split_off(taken);
        let batch = std::mem::replace(&mut self.held, rest);
        batch.into_iter().map(|held| held.item).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(requests: &[(&'static str, u8, usize)]) -> HeldRequests<&'static str> {
        let mut held = HeldRequests::default();
        for (name, priority, cost) in requests {
            held.push(*name, *priority, None, *cost);
        }
        held
    }

    #[test]
    fn higher_priorities_go_first_and_arrival_order_holds_within_one() {
        let mut held = held(&[
            ("l1", 0, 1),
            ("l2", 0, 1),
            ("h1", 9, 1),
            ("m1", 5, 1),
            ("h2", 9, 1),
        ]);
        assert_eq!(held.take_batch(3, None), ["h1", "h2", "m1"]);
        held.push("h3", 9, None, 1);
        assert_eq!(held.take_batch(3, None), ["h3", "l1", "l2"]);
        assert!(held.is_empty());
    }

    #[test]
    fn a_batch_stays_within_its_token_budget_and_a_large_request_still_runs() {
        let mut held = held(&[("a", 0, 100), ("b", 0, 200), ("long", 0, 900), ("c", 0, 10)]);
        assert_eq!(held.take_batch(8, Some(512)), ["a", "b"]);
        // Over the budget alone: it runs alone rather than never.
        assert_eq!(held.take_batch(8, Some(512)), ["long"]);
        assert_eq!(held.take_batch(8, Some(512)), ["c"]);
    }

    #[test]
    fn expired_requests_are_taken_out_before_a_batch_forms() {
        let mut held = HeldRequests::default();
        held.push("past", 9, Some(1_000), 1);
        held.push("never", 0, None, 1);
        held.push("later", 0, Some(5_000), 1);
        held.push("now", 0, Some(2_000), 1);
        assert_eq!(held.take_expired(2_000), ["past", "now"]);
        assert_eq!(held.take_batch(8, None), ["never", "later"]);
    }
}
