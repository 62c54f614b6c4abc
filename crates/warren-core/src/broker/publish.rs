//! Publishing: routing a message and enqueueing it on every queue it
//! reaches, with length limits, persistence and flow control.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use warren_store::RecordKind;

use super::Broker;
use super::dead_letter::dead_letter;
use super::effect::Outbox;
use super::request::Published;
use crate::durable::codec::encode_message_head;
use crate::error::{BrokerError, BrokerResult, Resource};
use crate::queue::Stored;
use crate::queue::arguments::{Overflow, message_expiration_ms};
use crate::queue::dead_letter::{DeadLetter, DeathReason};
use crate::topology::route;
use crate::{ConnectionId, Message, QueueId};

impl Broker {
    /// Routes a message and enqueues it on every queue it reaches. A
    /// persistent message bound for a durable queue is appended to the log;
    /// the outcome carries the ticket to wait for before confirming it.
    pub fn publish(
        &self,
        connection: ConnectionId,
        channel: u16,
        message: Arc<Message>,
        out: &mut Outbox,
    ) -> BrokerResult<Published> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = &self.vhosts[&vhost_name];
        let exchange_name = message.exchange.clone();
        let exchange_name = exchange_name.as_str();
        let Some(exchange) = vhost.exchanges.get(exchange_name) else {
            return Err(BrokerError::NotFound(Resource::Exchange {
                name: exchange_name.to_owned(),
                vhost: vhost_name,
            }));
        };
        if exchange.internal {
            return Err(BrokerError::InternalExchange(Resource::Exchange {
                name: exchange_name.to_owned(),
                vhost: vhost_name,
            }));
        }
        message_expiration_ms(message.properties.expiration().as_ref())?;
        self.published.fetch_add(1, Ordering::Relaxed);
        let message = self.address_replies(connection, channel, message)?;
        if exchange_name.is_empty()
            && super::reply_to::is_reply_to_name(message.routing_key.as_str())
        {
            let routed = self.deliver_reply(message, out);
            return Ok(Published {
                routed,
                ..Published::default()
            });
        }
        let vhost = &self.vhosts[&vhost_name];
        let exchange = &vhost.exchanges[exchange_name];
        let targets = route(vhost, exchange, &message);
        exchange.count_publish(!targets.is_empty());
        if targets.is_empty() {
            self.unroutable.fetch_add(1, Ordering::Relaxed);
        }
        let mut outcome = Published {
            routed: targets.len(),
            ..Published::default()
        };
        self.enqueue_routed(&targets, message, &mut outcome, out);
        self.deliver_all(&targets, out);
        outcome.flow = self
            .queue_over_flow_limit(&targets)
            .filter(|_| !self.connection_consumes(connection));
        // A message with a TTL of 0 that found no consumer expires now.
        if self.expire_due_heads(&targets, out) {
            self.deliver_all(&[], out);
        }
        Ok(outcome)
    }

    /// Puts a routed message on each of its queues, applying their length
    /// limits; dead letters it causes are left in `out` for `deliver_all`.
    pub(crate) fn enqueue_routed(
        &self,
        targets: &[QueueId],
        message: Arc<Message>,
        outcome: &mut Published,
        out: &mut Outbox,
    ) {
        let log = self.store.as_ref().map(|store| &store.log);
        let now_ms = self.now_ms();
        let mut head: Option<Vec<u8>> = None;
        for id in targets {
            let Some(mut queue) = self.queue(*id) else {
                continue;
            };
            if queue.args.overflow != Overflow::DropHead && queue.would_overflow(message.body.len())
            {
                outcome.rejected = true;
                if queue.args.overflow == Overflow::RejectPublishDlx {
                    let dead = DeadLetter {
                        queue: *id,
                        sequence: 0,
                        message: Arc::clone(&message),
                        stored: Stored::Nowhere,
                        reason: DeathReason::Maxlen,
                    };
                    dead_letter(&mut queue, dead, out);
                }
                continue;
            }
            let sequence = queue.allocate_sequence();
            let mut stored = Stored::Nowhere;
            if queue.persists(&message)
                && let Some(log) = log
            {
                let head = head.get_or_insert_with(|| encode_message_head(&message, now_ms));
                match log.append_message_with_tail(
                    RecordKind::Publish,
                    id.0,
                    sequence,
                    head,
                    &message.body,
                ) {
                    Ok((location, ticket)) => {
                        stored = Stored::Published(location);
                        outcome.ticket = Some(ticket);
                    }
                    Err(error) => outcome.store_error = Some(error),
                }
            }
            let meta = queue.meta_for(&message, now_ms);
            queue.counts.published += 1;
            queue.enqueue(sequence, Arc::clone(&message), stored, meta, log);
            while queue.over_length() {
                let Some(dropped) = queue.pop_loaded(log, now_ms) else {
                    break;
                };
                let dead = DeadLetter {
                    queue: *id,
                    sequence: dropped.sequence,
                    message: dropped.message,
                    stored: dropped.stored,
                    reason: DeathReason::Maxlen,
                };
                dead_letter(&mut queue, dead, out);
            }
            if let Some(at) = meta.expires.deadline() {
                self.schedule_locked(&mut queue, at);
            }
        }
    }
}
