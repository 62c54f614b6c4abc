//! Publishing: routing a message and enqueueing it on every queue it
//! reaches, with length limits, persistence and flow control.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use warren_store::{Location, MessageLog};

use super::Broker;
use super::dead_letter::dead_letter;
use super::effect::Outbox;
use super::policies::drop_over_length;
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
        // The message is written once, naming every durable queue that
        // keeps it, before any of them holds it.
        let stored = match log {
            Some(log) => self.append_persistent(log, targets, &message, now_ms, outcome),
            None => None,
        };
        for id in targets {
            let Some(mut queue) = self.queue(*id) else {
                continue;
            };
            let record = stored
                .as_ref()
                .filter(|(queues, _)| queues.binary_search(&id.0).is_ok());
            if queue.args.overflow != Overflow::DropHead && queue.would_overflow(message.body.len())
            {
                outcome.rejected = true;
                if let (Some(log), Some((_, location))) = (log, record) {
                    // Full since the message was written: it never entered.
                    let _ = log.settle(id.0, *location);
                }
                if queue.args.overflow == Overflow::RejectPublishDlx {
                    let dead = DeadLetter {
                        queue: *id,
                        message: Arc::clone(&message),
                        stored: Stored::Nowhere,
                        reason: DeathReason::Maxlen,
                    };
                    dead_letter(&mut queue, dead, out);
                }
                continue;
            }
            let sequence = queue.allocate_sequence();
            let stored = record.map_or(Stored::Nowhere, |(_, location)| {
                Stored::Published(*location)
            });
            let meta = queue.meta_for(&message, now_ms);
            queue.counts.published += 1;
            queue.enqueue(
                sequence,
                Arc::clone(&message),
                stored,
                meta,
                log,
                self.memory_pressure(),
            );
            drop_over_length(&mut queue, log, now_ms, out);
            if let Some(at) = meta.expires.deadline() {
                self.schedule_locked(&mut queue, at);
            }
        }
    }

    /// Appends a persistent message to the log once for all the durable
    /// queues among `targets` that have room for it; returns those queues
    /// and the record's location. A queue that is full by the time the
    /// message reaches it settles its share at once.
    fn append_persistent(
        &self,
        log: &MessageLog,
        targets: &[QueueId],
        message: &Message,
        now_ms: u64,
        outcome: &mut Published,
    ) -> Option<(Vec<u64>, Location)> {
        let mut keeping: Vec<u64> = targets
            .iter()
            .filter(|id| {
                self.queue(**id).is_some_and(|queue| {
                    queue.persists(message)
                        && (queue.args.overflow == Overflow::DropHead
                            || !queue.would_overflow(message.body.len()))
                })
            })
            .map(|id| id.0)
            .collect();
        if keeping.is_empty() {
            return None;
        }
        // Sorted, so that each queue finds itself by binary search.
        keeping.sort_unstable();
        let head = encode_message_head(message, now_ms);
        match log.append_routed(&keeping, &head, &message.body) {
            Ok((location, ticket)) => {
                outcome.ticket = Some(ticket);
                Some((keeping, location))
            }
            Err(error) => {
                outcome.store_error = Some(error);
                None
            }
        }
    }
}
