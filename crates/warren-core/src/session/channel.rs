//! A channel as the broker sees it: its unacknowledged deliveries, its
//! consumers and prefetch, its direct reply-to consumer, and the count of
//! deliveries its connection has not written yet.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use amq_protocol::types::ShortString;
use warren_store::Sequence;

use crate::limits::Limits;
use crate::queue::{MessageMeta, Stored};
use crate::{ConnectionId, Message, QueueId};

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub connection: ConnectionId,
    pub channel: u16,
    pub consumer_tag: ShortString,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// The channel's count of deliveries not yet on the wire, which the
    /// connection's writer lowers once it has written this one.
    pub unwritten: Arc<UnwrittenDeliveries>,
}

/// Where a channel's deliveries go as they are made: its connection's
/// writer queue. A delivery is handed over while its channel's lock is
/// held, so that two queues delivering to one channel at once cannot put
/// its delivery tags on the wire out of order (a client acking "up to
/// tag n" must have seen every tag below n).
pub trait DeliverySink: Send + Sync {
    fn deliver(&self, delivery: Delivery);
}

/// Deliveries handed to a connection's writer and not yet written to its
/// socket, for one channel. The broker raises the count as it delivers and
/// stops at `Limits::deliveries_unwritten_per_channel_max`; the writer
/// lowers it without going to the broker, and goes only when the broker
/// stopped at the limit and must be told to go on.
#[derive(Debug, Default)]
pub struct UnwrittenDeliveries {
    count: AtomicU32,
    /// Set by the broker when it stopped delivering at the limit.
    stopped: AtomicBool,
}

impl UnwrittenDeliveries {
    /// Whether another delivery fits under `limit`. Called under the
    /// channel's lock. When it does not, the broker marks itself stopped
    /// and looks again, so that a writer lowering the count at the same
    /// moment either sees the mark (and resumes the channel) or is seen.
    pub(crate) fn has_room(&self, limit: u32) -> bool {
        if self.count.load(Ordering::SeqCst) < limit {
            return true;
        }
        self.stopped.store(true, Ordering::SeqCst);
        self.count.load(Ordering::SeqCst) < limit
    }

    pub(crate) fn add_one(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// The writer has written `count` of them; true when the broker had
    /// stopped at the limit and must now be asked to deliver again.
    pub fn written(&self, count: u32) -> bool {
        self.count.fetch_sub(count, Ordering::SeqCst);
        self.stopped.swap(false, Ordering::SeqCst)
    }
}

pub(crate) struct Unacked {
    pub(crate) queue: QueueId,
    pub(crate) sequence: Sequence,
    pub(crate) message: Arc<Message>,
    pub(crate) stored: Stored,
    pub(crate) meta: MessageMeta,
    /// None for a message taken with `basic.get`.
    pub(crate) consumer_tag: Option<ShortString>,
    /// When the queue's `x-consumer-timeout` runs out for this delivery.
    pub(crate) ack_deadline_ms: Option<u64>,
    /// The second it was delivered, as its queue's `UnackedAges` noted it.
    pub(crate) delivered_second: u64,
}

#[derive(Default)]
pub(crate) struct Channel {
    pub(crate) next_delivery_tag: u64,
    pub(crate) unacked: BTreeMap<u64, Unacked>,
    /// `basic.qos` with global=false: applies to consumers started afterwards.
    pub(crate) consumer_prefetch: u16,
    /// `basic.qos` with global=true: shared by all consumers on the channel.
    pub(crate) global_prefetch: u16,
    pub(crate) consumers: HashMap<ShortString, QueueId>,
    pub(crate) unwritten: Arc<UnwrittenDeliveries>,
    /// The channel's direct reply-to consumer, if it has one.
    pub(crate) reply_consumer: Option<ReplyConsumer>,
    /// The earliest ack deadline among the unacked deliveries (it may
    /// belong to a delivery acked since; the timer then looks again).
    pub(crate) ack_deadline_ms: Option<u64>,
    /// Set once a consumer timeout asked the connection to close the
    /// channel: it gets no more deliveries meanwhile.
    pub(crate) closing: bool,
    /// The channel's publishing mode, for the management API.
    pub(crate) mode: ChannelMode,
    /// Where deliveries go; None: into the operation's outbox.
    pub(crate) sink: Option<Arc<dyn DeliverySink>>,
}

/// Channels' earliest acknowledgement deadlines, earliest first. An entry
/// may be stale (its delivery acked, its channel closed): the timer then
/// looks at the channel once and moves on.
pub(crate) type AckDeadlines = BTreeSet<(u64, ConnectionId, u16)>;

/// How a channel's publishes are settled (`confirm.select`, `tx.select`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ChannelMode {
    #[default]
    Plain,
    Confirm,
    Transactional,
}

impl Channel {
    pub(crate) fn accepts(&self, no_ack: bool, limits: &Limits) -> bool {
        if self.closing
            || !self
                .unwritten
                .has_room(limits.deliveries_unwritten_per_channel_max)
        {
            return false;
        }
        no_ack
            || (self.unacked.len() < limits.unacked_per_channel_max
                && (self.global_prefetch == 0
                    || self.unacked.len() < self.global_prefetch as usize))
    }

    /// Notes a delivery's acknowledgement deadline, if it has one; a
    /// deadline earlier than the channel's goes into the broker's
    /// `deadlines`, which the timer takes due entries from.
    pub(crate) fn track_ack_deadline(
        &mut self,
        deadline_ms: Option<u64>,
        deadlines: &mut AckDeadlines,
        connection: ConnectionId,
        channel: u16,
    ) {
        let Some(at) = deadline_ms else {
            return;
        };
        if self.ack_deadline_ms.is_none_or(|current| at < current) {
            self.ack_deadline_ms = Some(at);
            deadlines.insert((at, connection, channel));
        }
    }

    /// Hands a delivery to the channel's sink; gives it back for the
    /// caller's outbox when the channel has none.
    pub(crate) fn hand_over(&self, delivery: Delivery) -> Option<Delivery> {
        match &self.sink {
            Some(sink) => {
                sink.deliver(delivery);
                None
            }
            None => Some(delivery),
        }
    }

    pub(crate) fn take_delivery_tag(&mut self) -> u64 {
        self.next_delivery_tag += 1;
        self.next_delivery_tag
    }
}

/// A channel's reply consumer.
#[derive(Debug, Clone)]
pub(crate) struct ReplyConsumer {
    pub tag: ShortString,
    /// `amq.rabbitmq.reply-to.<connection>.<channel>.<nonce>`; the nonce
    /// keeps a reply meant for an earlier consumer on the same channel
    /// number from reaching a later one.
    pub address: ShortString,
}
