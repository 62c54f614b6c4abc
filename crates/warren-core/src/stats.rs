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
    /// Of `delivered`, those to consumers in automatic acknowledgement
    /// mode (the rest were delivered for manual acknowledgement).
    pub delivered_no_ack: u64,
    /// Of `got`, those taken in automatic acknowledgement mode.
    pub got_no_ack: u64,
    /// `basic.get`s that found the queue empty.
    pub got_empty: u64,
}

impl AddAssign for MessageCounts {
    fn add_assign(&mut self, other: Self) {
        self.published += other.published;
        self.delivered += other.delivered;
        self.got += other.got;
        self.acked += other.acked;
        self.redelivered += other.redelivered;
        self.unroutable += other.unroutable;
        self.delivered_no_ack += other.delivered_no_ack;
        self.got_no_ack += other.got_no_ack;
        self.got_empty += other.got_empty;
    }
}

/// How many connections, channels and queues came and went since the
/// broker started (RabbitMQ's `*_opened_total`, `*_closed_total`,
/// `queues_declared_total`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifecycleCounts {
    pub connections_opened: u64,
    pub connections_closed: u64,
    pub channels_opened: u64,
    pub channels_closed: u64,
    /// Successful `queue.declare`s, passive ones and those of queues
    /// that existed included.
    pub queues_declared: u64,
    pub queues_created: u64,
    pub queues_deleted: u64,
}

/// What an exchange passed on, counted since the broker started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeCounts {
    /// Messages published to the exchange.
    pub published_in: u64,
    /// Of those, the messages it routed to at least one queue.
    pub published_out: u64,
}
