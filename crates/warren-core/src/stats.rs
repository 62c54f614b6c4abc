//! Message counters: what the management API turns into totals and rates.
//!
//! Each queue counts what happened to its messages; the broker adds the
//! counts of deleted queues to a retired total, so that broker-wide totals
//! never go backwards when a queue goes away.

use std::ops::AddAssign;

/// Messages counted since the broker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageCounts {
    /// Messages that entered the queue (broker-wide: messages published by
    /// clients, whether routed or not).
    pub published: u64,
    /// Messages handed to consumers, redeliveries included.
    pub delivered: u64,
    /// Messages taken with `basic.get`.
    pub got: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries (consumed or got) of messages delivered before.
    pub redelivered: u64,
    /// Broker-wide only: published messages no queue received.
    pub unroutable: u64,
}

impl AddAssign for MessageCounts {
    fn add_assign(&mut self, other: Self) {
        self.published += other.published;
        self.delivered += other.delivered;
        self.got += other.got;
        self.acked += other.acked;
        self.redelivered += other.redelivered;
        self.unroutable += other.unroutable;
    }
}

/// What an exchange passed on, counted since the broker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeCounts {
    /// Messages published to the exchange.
    pub published_in: u64,
    /// Of those, the messages it routed to at least one queue.
    pub published_out: u64,
}
