//! Direct reply-to (`amq.rabbitmq.reply-to`): RPC replies that go straight
//! to the requesting channel without a reply queue.
//!
//! A requester consumes from the pseudo-queue `amq.rabbitmq.reply-to` in
//! no-ack mode, then publishes requests with `reply_to` set to that name;
//! the broker rewrites `reply_to` into an address naming the requester's
//! channel. A responder publishes its reply to the default exchange with
//! that address as routing key, and the broker hands it to the requester's
//! reply consumer. When the requester has gone, the reply is dropped.

use std::sync::Arc;

use amq_protocol::types::ShortString;

use super::Broker;
use super::effect::{Delivery, Effect, Outbox};
use super::request::{Consume, QueueDeclared};
use crate::error::{BrokerError, BrokerResult};
use crate::session::channel::ReplyConsumer;
use crate::{ConnectionId, Message};
/// The pseudo-queue a requester consumes from.
pub const REPLY_TO_QUEUE: &str = "amq.rabbitmq.reply-to";
/// The prefix of the addresses the broker writes into `reply_to`.
const REPLY_ADDRESS_PREFIX: &str = "amq.rabbitmq.reply-to.";

/// Whether a queue name belongs to direct reply-to.
pub fn is_reply_to_name(name: &str) -> bool {
    name == REPLY_TO_QUEUE || name.starts_with(REPLY_ADDRESS_PREFIX)
}

impl Broker {
    /// `basic.consume` on `amq.rabbitmq.reply-to`.
    pub(crate) fn consume_replies(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consume: Consume,
    ) -> BrokerResult<ShortString> {
        if consume.queue.as_str() != REPLY_TO_QUEUE {
            return Err(BrokerError::ConsumeFromReplyAddress {
                queue: consume.queue.to_string(),
                pseudo_queue: REPLY_TO_QUEUE,
            });
        }
        if !consume.no_ack {
            return Err(BrokerError::ReplyConsumerAcks);
        }
        let tag = if consume.consumer_tag.as_str().is_empty() {
            ShortString::from(self.generate_name("amq.ctag-"))
        } else {
            consume.consumer_tag
        };
        let nonce = self.generate_name("");
        let state = self
            .channel_mut(connection, channel)
            .expect("consume on an open channel");
        if state.reply_consumer.is_some() {
            return Err(BrokerError::ReplyConsumerExists);
        }
        if state.consumers.contains_key(&tag) {
            return Err(BrokerError::ConsumerTagInUse(tag.to_string()));
        }
        state.reply_consumer = Some(ReplyConsumer {
            tag: tag.clone(),
            address: format!("{REPLY_ADDRESS_PREFIX}{}.{channel}.{nonce}", connection.0).into(),
        });
        Ok(tag)
    }

    /// Rewrites a request's `reply_to` of `amq.rabbitmq.reply-to` into the
    /// publishing channel's reply address.
    pub(crate) fn address_replies(
        &self,
        connection: ConnectionId,
        channel: u16,
        message: Arc<Message>,
    ) -> BrokerResult<Arc<Message>> {
        if message.properties.reply_to().as_ref().map(|to| to.as_str()) != Some(REPLY_TO_QUEUE) {
            return Ok(message);
        }
        let Some(reply) = self
            .connections
            .get(&connection)
            .and_then(|state| state.channels.get(&channel))
            .and_then(|state| {
                state
                    .lock()
                    .reply_consumer
                    .as_ref()
                    .map(|reply| reply.address.clone())
            })
        else {
            return Err(BrokerError::NoReplyConsumer);
        };
        Ok(Arc::new(Message {
            exchange: message.exchange.clone(),
            routing_key: message.routing_key.clone(),
            properties: message.properties.clone().with_reply_to(reply),
            body: message.body.clone(),
        }))
    }

    /// Delivers a reply published to a reply address. A reply counts as
    /// routed even when the requester has gone (it is then dropped), as in
    /// current RabbitMQ: a mandatory reply is never returned. Returns the
    /// routed count, 0 only for an address that is not well formed.
    pub(crate) fn deliver_reply(&self, message: Arc<Message>, out: &mut Outbox) -> usize {
        let address = message.routing_key.as_str();
        let Some((connection, channel)) = parse_address(address) else {
            return 0;
        };
        let Some(mut state) = self.channel(connection, channel) else {
            return 1;
        };
        let Some(reply) = state
            .reply_consumer
            .as_ref()
            .filter(|reply| reply.address.as_str() == address)
        else {
            return 1;
        };
        let consumer_tag = reply.tag.clone();
        let delivery_tag = state.take_delivery_tag();
        state.unwritten.add_one();
        let delivery = Delivery {
            connection,
            channel,
            consumer_tag,
            delivery_tag,
            redelivered: false,
            message,
            unwritten: Arc::clone(&state.unwritten),
        };
        if let Some(delivery) = state.hand_over(delivery) {
            out.effects.push(Effect::Deliver(delivery));
        }
        1
    }

    /// A passive `queue.declare` of the pseudo-queue succeeds, as do those
    /// of live reply addresses (clients use it to check a requester is
    /// still there). None: not a direct reply-to name.
    pub(crate) fn declare_reply_to_passive(
        &self,
        name: &str,
    ) -> Option<BrokerResult<QueueDeclared>> {
        if !is_reply_to_name(name) {
            return None;
        }
        let live = name == REPLY_TO_QUEUE
            || parse_address(name).is_some_and(|(connection, channel)| {
                self.connections
                    .get(&connection)
                    .and_then(|state| state.channels.get(&channel))
                    .is_some_and(|state| {
                        state
                            .lock()
                            .reply_consumer
                            .as_ref()
                            .is_some_and(|reply| reply.address.as_str() == name)
                    })
            });
        Some(if live {
            Ok(QueueDeclared {
                name: name.into(),
                message_count: 0,
                consumer_count: u32::from(name != REPLY_TO_QUEUE),
            })
        } else {
            Err(BrokerError::ReplyToName(name.to_owned()))
        })
    }
}

fn parse_address(address: &str) -> Option<(ConnectionId, u16)> {
    let mut parts = address.strip_prefix(REPLY_ADDRESS_PREFIX)?.splitn(3, '.');
    let connection = parts.next()?.parse().ok()?;
    let channel = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((ConnectionId(connection), channel))
}
