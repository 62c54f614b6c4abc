//! Consumers and acknowledgements: `basic.consume`, `basic.get`, acks,
//! nacks, requeue, and the round-robin delivery of a queue's messages to
//! consumers that have room under their prefetch.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amq_protocol::types::{AMQPValue, ShortString};
use parking_lot::Mutex;
use warren_store::MessageLog;

use super::Broker;
use super::effect::{Delivery, Effect, Outbox};
use super::request::{Consume, GetOk};

use super::dead_letter::dead_letter;
use super::forget_stored;
use crate::durable::{Store, message_log};
use crate::error::{BrokerError, BrokerResult};
use crate::limits::Limits;
use crate::queue::arguments::consumer_priority;
use crate::queue::dead_letter::{DeadLetter, DeathReason};
use crate::queue::{Dequeued, Queue, QueueConsumer, Stored};
use crate::session::ConnectionState;
use crate::session::channel::{AckDeadlines, Unacked};
use crate::{ConnectionId, Message, QueueId};

impl Broker {
    pub fn consume(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consume: Consume,
        out: &mut Outbox,
    ) -> BrokerResult<ShortString> {
        if super::reply_to::is_reply_to_name(consume.queue.as_str()) {
            return self.consume_replies(connection, channel, consume);
        }
        let id = self.queue_for(connection, consume.queue.as_str())?;
        let priority = consumer_priority(&consume.arguments)?;
        let tag = if consume.consumer_tag.as_str().is_empty() {
            ShortString::from(self.generate_name("amq.ctag-"))
        } else {
            consume.consumer_tag
        };
        let consumers_max = self.limits.consumers_per_channel_max;
        let state = self
            .channel_mut(connection, channel)
            .expect("consume on an open channel");
        if state.consumers.contains_key(&tag)
            || state
                .reply_consumer
                .as_ref()
                .is_some_and(|reply| reply.tag == tag)
        {
            return Err(BrokerError::ConsumerTagInUse(tag.to_string()));
        }
        if state.consumers.len() >= consumers_max {
            return Err(BrokerError::ConsumerLimit {
                channel,
                max: consumers_max,
            });
        }
        let prefetch_count = state.consumer_prefetch;
        let queue = self.queue_mut(id).expect("queue_for returns live queues");
        // An exclusive consumer on a single-active-consumer queue would
        // defeat its hand-over; RabbitMQ refuses it the same way.
        if consume.exclusive && (!queue.consumers.is_empty() || queue.args.single_active_consumer)
            || queue.consumers.iter().any(|consumer| consumer.exclusive)
        {
            return Err(BrokerError::ExclusiveConsumer(queue.resource()));
        }
        queue.consumers.push(QueueConsumer {
            connection,
            channel,
            tag: tag.clone(),
            no_ack: consume.no_ack,
            exclusive: consume.exclusive,
            priority,
            prefetch_count,
            unacked: 0,
        });
        queue.gauge_consumers();
        queue.had_consumer = true;
        self.channel_mut(connection, channel)
            .expect("checked above")
            .consumers
            .insert(tag.clone(), id);
        self.deliver_all(&[id], out);
        Ok(tag)
    }

    /// `basic.cancel`; returns whether the consumer existed.
    pub(crate) fn cancel_unsaved(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consumer_tag: &str,
        out: &mut Outbox,
    ) -> bool {
        let Some(state) = self.channel_mut(connection, channel) else {
            return false;
        };
        if state
            .reply_consumer
            .as_ref()
            .is_some_and(|reply| reply.tag.as_str() == consumer_tag)
        {
            state.reply_consumer = None;
            return true;
        }
        let Some(queue) = state.consumers.remove(consumer_tag) else {
            return false;
        };
        self.detach_consumer(queue, connection, channel, consumer_tag, out);
        true
    }

    /// Removes a consumer from its queue, deleting an auto-delete queue that
    /// has lost its last consumer.
    pub(crate) fn detach_consumer(
        &mut self,
        id: QueueId,
        connection: ConnectionId,
        channel: u16,
        consumer_tag: &str,
        out: &mut Outbox,
    ) {
        let now_ms = self.now_ms();
        let Some(queue) = self.queue_mut(id) else {
            return;
        };
        let Some(index) = queue.consumers.iter().position(|consumer| {
            consumer.connection == connection
                && consumer.channel == channel
                && consumer.tag.as_str() == consumer_tag
        }) else {
            return;
        };
        queue.consumers.remove(index);
        queue.gauge_consumers();
        if queue.args.single_active_consumer && index == 0 && !queue.consumers.is_empty() {
            promote_single_active_consumer(queue);
            // The new active consumer takes over at once, even while its
            // predecessor's deliveries are still unacked.
            self.deliver_all(&[id], out);
            return;
        }
        if queue.auto_delete && queue.had_consumer && queue.consumers.is_empty() {
            self.delete_queue_by_id(id, out);
            return;
        }
        if queue.consumers.is_empty()
            && let Some(expires_ms) = queue.args.expires_ms
        {
            queue.last_used_ms = now_ms;
            self.schedule(id, now_ms.saturating_add(expires_ms));
        }
    }

    pub fn get(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        queue: &str,
        no_ack: bool,
        out: &mut Outbox,
    ) -> BrokerResult<Option<GetOk>> {
        let id = self.queue_for(connection, queue)?;
        let now_ms = self.now_ms();
        let queue = self
            .queues
            .get_mut(&id)
            .map(Mutex::get_mut)
            .expect("queue_for returns live queues");
        queue.last_used_ms = now_ms;
        let log = message_log(self.store.as_ref());
        let mut expired = Vec::new();
        let taken = queue.dequeue(log, now_ms, &mut expired);
        let message_count = queue.ready_count() as u32;
        let ack_deadline_ms = queue
            .args
            .consumer_timeout_ms
            .map(|timeout| now_ms.saturating_add(timeout));
        let message = taken
            .as_ref()
            .map(|taken| message_for_delivery(queue, taken));
        if taken.is_none() {
            queue.counts.got_empty += 1;
        }
        if let Some(taken) = &taken {
            queue.counts.got += 1;
            queue.counts.got_no_ack += no_ack as u64;
            queue.counts.redelivered += taken.redelivered as u64;
            if no_ack {
                forget_stored(self.store.as_ref(), true, id, taken.stored);
                queue.delivery_counts.observe(taken.meta.returns + 1);
            } else {
                queue.unacked += 1;
            }
        }
        let delivered_second = match (&taken, no_ack) {
            (Some(_), false) => queue.unacked_ages.record(now_ms),
            _ => 0,
        };
        expired_messages(queue, expired, out);
        self.deliver_all(&[], out);
        let (Some(taken), Some(message)) = (taken, message) else {
            return Ok(None);
        };
        let state = self
            .connections
            .get_mut(&connection)
            .and_then(|state| state.channels.get_mut(&channel))
            .map(Mutex::get_mut)
            .expect("get on an open channel");
        let delivery_tag = state.take_delivery_tag();
        if !no_ack {
            state.track_ack_deadline(
                ack_deadline_ms,
                self.ack_deadlines.get_mut(),
                connection,
                channel,
            );
            state.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: id,
                    sequence: taken.sequence,
                    message: taken.message,
                    stored: taken.stored,
                    meta: taken.meta,
                    consumer_tag: None,
                    ack_deadline_ms,
                    delivered_second,
                },
            );
        }
        Ok(Some(GetOk {
            delivery_tag,
            redelivered: taken.redelivered,
            message,
            message_count,
        }))
    }

    // ----- acknowledgements ----------------------------------------------

    pub fn ack(
        &self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        out: &mut Outbox,
    ) -> BrokerResult<()> {
        let settled = self.settle(connection, channel, delivery_tag, multiple)?;
        self.settle_deliveries(connection, channel, settled, Settled::Acked, out);
        Ok(())
    }

    /// `basic.nack` and `basic.reject`: requeued messages go back to their
    /// original position, marked redelivered; others are discarded.
    pub fn reject(
        &self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
        out: &mut Outbox,
    ) -> BrokerResult<()> {
        let settled = self.settle(connection, channel, delivery_tag, multiple)?;
        let how = if requeue {
            Settled::Requeue
        } else {
            Settled::Rejected
        };
        self.settle_deliveries(connection, channel, settled, how, out);
        Ok(())
    }

    /// `basic.recover`: every unacked message on the channel is requeued.
    pub fn recover(&self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        let settled = match self.channel(connection, channel) {
            Some(mut state) => Settling::Many(std::mem::take(&mut state.unacked)),
            None => return,
        };
        self.settle_deliveries(connection, channel, settled, Settled::Requeue, out);
    }

    /// Settles deliveries taken off a channel: the first
    /// `SETTLE_ROUND_MAX` now, the rest in later rounds of that size
    /// (`continue_rounds`), so that a channel closing with 100,000
    /// unacknowledged deliveries, or one ack of 100,000, does not hold
    /// the broker from everyone else while it is undone. A delivery
    /// waiting for its round is neither ready nor unacked on its channel;
    /// its queue still counts it as unacked.
    pub(crate) fn settle_deliveries(
        &self,
        connection: ConnectionId,
        channel: u16,
        deliveries: Settling,
        how: Settled,
        out: &mut Outbox,
    ) {
        let mut round = SettleRound {
            connection,
            channel,
            deliveries,
            how,
        };
        self.settle_round(&mut round, out);
        if !round.deliveries.is_empty() {
            self.pending_settles.lock().push_back(round);
            self.rounds_hint.store(true, Ordering::SeqCst);
        }
    }

    /// Runs the next round of the work that operations left because it
    /// was too large for one round: the next round of a large
    /// settle (first, as it frees room under prefetch limits), else the
    /// next round of deliveries to queues whose consumers still have room.
    /// Returns whether work still waits; the server calls it again, with
    /// other operations running alongside, until it does not.
    /// Only one caller at a time (the server's timer task) may run it.
    pub fn continue_rounds(&self, out: &mut Outbox) -> bool {
        let settle = self.pending_settles.lock().pop_front();
        if let Some(mut round) = settle {
            self.settle_round(&mut round, out);
            if !round.deliveries.is_empty() {
                self.pending_settles.lock().push_front(round);
                self.rounds_hint.store(true, Ordering::SeqCst);
            }
        } else {
            let queues = self.pending_deliveries.lock().take();
            if !queues.is_empty() {
                self.deliver_all(&queues, out);
            }
        }
        self.has_rounds()
    }

    /// Whether operations left rounds for `continue_rounds`. Every
    /// operation's caller asks; the hint answers most of them without
    /// taking the shared locks. Of callers racing with a change, at least
    /// one sees it.
    pub fn has_rounds(&self) -> bool {
        if !self.rounds_hint.load(Ordering::SeqCst) {
            return false;
        }
        self.rounds_hint.store(false, Ordering::SeqCst);
        let pending =
            !self.pending_settles.lock().is_empty() || !self.pending_deliveries.lock().is_empty();
        if pending {
            self.rounds_hint.store(true, Ordering::SeqCst);
        }
        pending
    }

    fn defer_delivery(&self, queue: QueueId) {
        self.pending_deliveries.lock().add(queue);
        self.rounds_hint.store(true, Ordering::SeqCst);
    }

    fn settle_round(&self, round: &mut SettleRound, out: &mut Outbox) {
        let mut touched = Vec::new();
        for _ in 0..SETTLE_ROUND_MAX {
            let Some(unacked) = round.deliveries.next() else {
                break;
            };
            touched.push(unacked.queue);
            self.settle_one(round.connection, round.channel, unacked, round.how, out);
        }
        self.after_settle(round.connection, round.channel, &touched, out);
    }

    /// Puts one settled delivery back in its queue, or lets it go: acked,
    /// or rejected and dead-lettered where the queue has a dead-letter
    /// exchange. A quorum queue counts each return and dead-letters a
    /// message returned more often than its delivery limit.
    fn settle_one(
        &self,
        connection: ConnectionId,
        channel: u16,
        unacked: Unacked,
        how: Settled,
        out: &mut Outbox,
    ) {
        let Some(mut queue) = self.queue(unacked.queue) else {
            forget_stored(self.store.as_ref(), false, unacked.queue, unacked.stored);
            return;
        };
        if let Some(tag) = &unacked.consumer_tag
            && let Some(consumer) = queue.consumers.iter_mut().find(|consumer| {
                consumer.connection == connection
                    && consumer.channel == channel
                    && consumer.tag == *tag
            })
        {
            consumer.unacked = consumer.unacked.saturating_sub(1);
        }
        queue.unacked = queue.unacked.saturating_sub(1);
        queue.unacked_ages.release(unacked.delivered_second);
        if how == Settled::Acked {
            queue.counts.acked += 1;
        }
        if how != Settled::Requeue {
            queue.delivery_counts.observe(unacked.meta.returns + 1);
        }
        let letter = |reason| DeadLetter {
            queue: unacked.queue,
            message: Arc::clone(&unacked.message),
            stored: unacked.stored,
            reason,
        };
        match how {
            Settled::Acked => {
                forget_stored(self.store.as_ref(), true, unacked.queue, unacked.stored)
            }
            Settled::Rejected => dead_letter(&mut queue, letter(DeathReason::Rejected), out),
            Settled::Requeue => {
                let mut meta = unacked.meta;
                // Counted for every queue (the histogram of delivery counts);
                // only quorum queues show it and limit it.
                meta.returns = meta.returns.saturating_add(1);
                if queue.is_quorum() {
                    if queue
                        .args
                        .delivery_limit
                        .is_some_and(|limit| meta.returns as u64 > limit)
                    {
                        queue.delivery_counts.observe(meta.returns);
                        dead_letter(&mut queue, letter(DeathReason::DeliveryLimit), out);
                        return;
                    }
                }
                if let Some(store) = &self.store {
                    mark_returned(&store.log, unacked.queue, unacked.stored);
                }
                queue.requeue(unacked.sequence, unacked.message, unacked.stored, meta);
                if let Some(at) = meta.expires.deadline() {
                    self.schedule_locked(&mut queue, at);
                }
            }
        }
    }

    /// Takes the deliveries an ack, nack or reject names off the channel.
    fn settle(
        &self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
    ) -> BrokerResult<Settling> {
        let mut state = self
            .channel(connection, channel)
            .expect("settle on an open channel");
        let unknown = || BrokerError::UnknownDeliveryTag(delivery_tag);
        if multiple {
            if delivery_tag != 0 && !state.unacked.contains_key(&delivery_tag) {
                return Err(unknown());
            }
            let keep = if delivery_tag == 0 {
                BTreeMap::new()
            } else {
                state.unacked.split_off(&(delivery_tag + 1))
            };
            Ok(Settling::Many(std::mem::replace(&mut state.unacked, keep)))
        } else {
            let unacked = state.unacked.remove(&delivery_tag).ok_or_else(unknown)?;
            Ok(Settling::One(Some(unacked)))
        }
    }

    fn after_settle(
        &self,
        connection: ConnectionId,
        channel: u16,
        touched: &[QueueId],
        out: &mut Outbox,
    ) {
        self.deliver_all(touched, out);
        // A global prefetch frees room for every consumer on the channel.
        let global_prefetch = self
            .channel(connection, channel)
            .is_some_and(|state| state.global_prefetch != 0);
        if global_prefetch {
            self.deliver_to_channel(connection, channel, out);
        }
    }

    // ----- delivery ------------------------------------------------------

    /// Delivers what the given queues hold to their consumers, then routes
    /// the dead letters that this (or the operation before it) produced,
    /// and delivers from the queues they reach, until none are left. Cycle
    /// detection in dead-lettering ends every chain.
    pub(crate) fn deliver_all(&self, queues: &[QueueId], out: &mut Outbox) {
        let mut budget = DELIVERY_ROUND_MAX;
        let mut round = distinct(queues);
        let now_ms = self.now_ms();
        loop {
            for id in &round {
                if budget == 0 {
                    self.defer_delivery(*id);
                    continue;
                }
                let Some(mut queue) = self.queue(*id) else {
                    continue;
                };
                let (expired, cut) = deliver(
                    *id,
                    &mut queue,
                    &self.connections,
                    &self.ack_deadlines,
                    &self.limits,
                    self.store.as_ref(),
                    now_ms,
                    &mut budget,
                    out,
                );
                if self.store_worker
                    && let Some(read_ahead) = queue.read_ahead()
                {
                    out.effects.push(Effect::ReadAhead(read_ahead));
                }
                expired_messages(&mut queue, expired, out);
                drop(queue);
                if cut {
                    self.defer_delivery(*id);
                }
            }
            if out.dead_letter_sources.is_empty() {
                return;
            }
            round = distinct(&self.route_dead_letters(out));
        }
    }

    pub(crate) fn deliver_to_channel(
        &self,
        connection: ConnectionId,
        channel: u16,
        out: &mut Outbox,
    ) {
        let queues: Vec<QueueId> = match self.channel(connection, channel) {
            Some(state) => state.consumers.values().copied().collect(),
            None => return,
        };
        self.deliver_all(&queues, out);
    }
}

/// Messages that expired in `queue`, on their way out.
pub(crate) fn expired_messages(queue: &mut Queue, expired: Vec<Dequeued>, out: &mut Outbox) {
    for taken in expired {
        let dead = DeadLetter {
            queue: queue.id,
            message: taken.message,
            stored: taken.stored,
            reason: DeathReason::Expired,
        };
        dead_letter(queue, dead, out);
    }
}

/// The queues named, each once, in the order first named: a settle of
/// 100,000 deliveries names their queue 100,000 times.
fn distinct(queues: &[QueueId]) -> Vec<QueueId> {
    // Most calls name one or two queues (a publish, an ack): a scan of the
    // few kept so far costs less than building a set.
    const SCAN_MAX: usize = 16;
    if queues.len() <= SCAN_MAX {
        let mut kept = Vec::with_capacity(queues.len());
        for id in queues {
            if !kept.contains(id) {
                kept.push(*id);
            }
        }
        return kept;
    }
    let mut seen = HashSet::with_capacity(queues.len().min(1024));
    queues
        .iter()
        .copied()
        .filter(|id| seen.insert(*id))
        .collect()
}

/// Deliveries settled at once, at most: at about half a microsecond each
/// on the reference machine (2 cores), a round holds the broker for about
/// a millisecond.
pub const SETTLE_ROUND_MAX: usize = 2_048;

/// Deliveries made in one round, at most: each takes a message off its
/// queue, records it as unacked and hands it to a writer, a few
/// microseconds on the reference machine (2 cores) with the other
/// connections busy, so a round holds the broker for under a millisecond.
/// A consumer catching up on a backlog gets the rest in further rounds
/// (`continue_rounds`), alongside other operations.
pub const DELIVERY_ROUND_MAX: usize = 256;

/// Queues whose delivery a round cut short, each once, in the order cut.
#[derive(Debug, Default)]
pub(crate) struct PendingDeliveries {
    order: Vec<QueueId>,
    queued: HashSet<QueueId>,
}

impl PendingDeliveries {
    fn add(&mut self, queue: QueueId) {
        if self.queued.insert(queue) {
            self.order.push(queue);
        }
    }

    fn take(&mut self) -> Vec<QueueId> {
        self.queued.clear();
        std::mem::take(&mut self.order)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Deliveries taken off a channel and not settled yet.
pub(crate) struct SettleRound {
    connection: ConnectionId,
    channel: u16,
    deliveries: Settling,
    how: Settled,
}

/// Deliveries being settled: one (most acks), or a channel's map of them,
/// taken whole and settled in delivery order.
pub(crate) enum Settling {
    One(Option<Unacked>),
    Many(BTreeMap<u64, Unacked>),
}

impl Settling {
    fn next(&mut self) -> Option<Unacked> {
        match self {
            Settling::One(unacked) => unacked.take(),
            Settling::Many(deliveries) => deliveries.pop_first().map(|(_, unacked)| unacked),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Settling::One(unacked) => unacked.is_none(),
            Settling::Many(deliveries) => deliveries.is_empty(),
        }
    }
}

/// How settled deliveries leave their channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acknowledged: gone for good.
    Acked,
    /// Rejected or nacked without requeue: dead-lettered if the queue has a
    /// dead-letter exchange, else gone.
    Rejected,
    /// Back to the queue, at its original position.
    Requeue,
}

/// Hands a queue's waiting messages to its consumers while any consumer has
/// room: the highest-priority consumers with room first, round-robin among
/// equals; only the first consumer of a single-active-consumer queue.
/// Each delivery spends one of `budget`. Returns the expired messages
/// found at the head on the way, and whether the budget ran out first.
#[allow(clippy::too_many_arguments)]
fn deliver(
    queue_id: QueueId,
    queue: &mut Queue,
    connections: &HashMap<ConnectionId, ConnectionState>,
    ack_deadlines: &Mutex<AckDeadlines>,
    limits: &Limits,
    store: Option<&Store>,
    now_ms: u64,
    budget: &mut usize,
    out: &mut Outbox,
) -> (Vec<Dequeued>, bool) {
    let log = message_log(store);
    let mut expired = Vec::new();
    let ack_deadline_ms = queue
        .args
        .consumer_timeout_ms
        .map(|timeout| now_ms.saturating_add(timeout));
    // Consumers do not come or go while this runs: that takes the
    // broker exclusively.
    let count = if queue.args.single_active_consumer {
        queue.consumers.len().min(1)
    } else {
        queue.consumers.len()
    };
    let top_priority = queue.consumers[..count]
        .iter()
        .map(|consumer| consumer.priority)
        .max()
        .unwrap_or(0);
    let channel_of = |consumer: &QueueConsumer| {
        connections
            .get(&consumer.connection)
            .and_then(|state| state.channels.get(&consumer.channel))
    };
    // Consumers found full on a second look: another queue filled their
    // channel between the choice and the delivery.
    let mut lost_races = 0;
    while queue.ready_count() > 0 {
        if *budget == 0 {
            return (expired, true);
        }
        let mut chosen: Option<usize> = None;
        // The channel of a chosen consumer of the top priority, kept
        // locked from the look to the delivery (the usual case).
        let mut held = None;
        for offset in 0..count {
            let index = (queue.next_consumer + offset) % count;
            let consumer = &queue.consumers[index];
            if chosen.is_some_and(|best| queue.consumers[best].priority >= consumer.priority) {
                continue;
            }
            if !consumer.has_credit() {
                continue;
            }
            let Some(state) = channel_of(consumer).map(Mutex::lock) else {
                continue;
            };
            if state.accepts(consumer.no_ack, limits) {
                chosen = Some(index);
                // Nobody can outrank a ready consumer of the top priority.
                if consumer.priority == top_priority {
                    held = Some(state);
                    break;
                }
            }
        }
        let Some(index) = chosen else {
            break;
        };
        let consumer = &queue.consumers[index];
        let mut state = match held {
            Some(state) => state,
            None => {
                // Chosen without its lock held: another queue may have
                // filled its channel since the look.
                let state = channel_of(consumer)
                    .expect("chosen consumer's channel is open")
                    .lock();
                if !state.accepts(consumer.no_ack, limits) {
                    drop(state);
                    lost_races += 1;
                    if lost_races > count {
                        break;
                    }
                    continue;
                }
                state
            }
        };
        queue.next_consumer = (index + 1) % count;
        let Some(taken) = queue.dequeue(log, now_ms, &mut expired) else {
            break;
        };
        *budget -= 1;
        let message = message_for_delivery(queue, &taken);
        queue.counts.delivered += 1;
        queue.counts.delivered_no_ack += queue.consumers[index].no_ack as u64;
        queue.counts.redelivered += taken.redelivered as u64;
        let delivered_second = if queue.consumers[index].no_ack {
            queue.delivery_counts.observe(taken.meta.returns + 1);
            0
        } else {
            queue.unacked += 1;
            queue.unacked_ages.record(now_ms)
        };
        let consumer = &mut queue.consumers[index];
        let delivery_tag = state.take_delivery_tag();
        if consumer.no_ack {
            forget_stored(store, true, queue_id, taken.stored);
        } else {
            consumer.unacked += 1;
            state.track_ack_deadline(
                ack_deadline_ms,
                &mut ack_deadlines.lock(),
                consumer.connection,
                consumer.channel,
            );
            state.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue_id,
                    sequence: taken.sequence,
                    message: taken.message,
                    stored: taken.stored,
                    meta: taken.meta,
                    consumer_tag: Some(consumer.tag.clone()),
                    ack_deadline_ms,
                    delivered_second,
                },
            );
        }
        state.unwritten.add_one();
        let delivery = Delivery {
            connection: consumer.connection,
            channel: consumer.channel,
            consumer_tag: consumer.tag.clone(),
            delivery_tag,
            redelivered: taken.redelivered,
            message,
            unwritten: Arc::clone(&state.unwritten),
        };
        if let Some(delivery) = state.hand_over(delivery) {
            out.effects.push(Effect::Deliver(delivery));
        }
    }
    (expired, false)
}

/// The message as a consumer sees it: a quorum queue tells how often it
/// came back before in an `x-delivery-count` header.
fn message_for_delivery(queue: &Queue, taken: &Dequeued) -> Arc<Message> {
    if !queue.is_quorum() || taken.meta.returns == 0 {
        return Arc::clone(&taken.message);
    }
    let mut headers = taken
        .message
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(taken.meta.returns as i64),
    );
    Arc::new(Message {
        exchange: taken.message.exchange.clone(),
        routing_key: taken.message.routing_key.clone(),
        properties: taken.message.properties.clone().with_headers(headers),
        body: taken.message.body.clone(),
    })
}

/// After the active consumer of a single-active-consumer queue leaves, the
/// one with the highest priority (the earliest among equals) takes over; it
/// is moved to the front, where `deliver` looks.
fn promote_single_active_consumer(queue: &mut Queue) {
    let Some(best) = queue
        .consumers
        .iter()
        .enumerate()
        .max_by_key(|(index, consumer)| (consumer.priority, std::cmp::Reverse(*index)))
        .map(|(index, _)| index)
    else {
        return;
    };
    queue.consumers[..=best].rotate_right(1);
    queue.next_consumer = 0;
}

/// Notes in the log that a persistent message went to a consumer and came
/// back, so that after a clean restart it is still marked redelivered. A
/// delivery itself writes nothing: after a crash every recovered message
/// is marked redelivered, and a clean stop marks those still unacked
/// (`Broker::close_store`).
pub(crate) fn mark_returned(log: &MessageLog, queue: QueueId, stored: Stored) {
    if let Stored::Published(location) = stored {
        // A poisoned log refuses it; the broker is failing anyway.
        let _ = log.mark_returned(queue.0, location);
    }
}
