//! Consumers and acknowledgements: `basic.consume`, `basic.get`, acks,
//! nacks, requeue, and the round-robin delivery of a queue's messages to
//! consumers that have room under their prefetch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use amq_protocol::types::ShortString;

use warren_store::MessageLog;

use crate::broker::{ConnectionState, Unacked, forget_stored, message_log};
use crate::durable::Store;
use crate::error::{BrokerError, BrokerResult};
use crate::queue::{Dequeued, Stored};
use crate::queue::{Queue, QueueConsumer};
use crate::{Broker, ConnectionId, Consume, Delivery, Effect, GetOk, Limits, Outbox, QueueId};

impl Broker {
    pub fn consume(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consume: Consume,
        out: &mut Outbox,
    ) -> BrokerResult<ShortString> {
        let id = self.queue_for(connection, consume.queue.as_str())?;
        let tag = if consume.consumer_tag.as_str().is_empty() {
            ShortString::from(self.generate_name("amq.ctag-"))
        } else {
            consume.consumer_tag
        };
        let consumers_max = self.limits.consumers_per_channel_max;
        let state = self
            .channel_mut(connection, channel)
            .expect("consume on an open channel");
        if state.consumers.contains_key(&tag) {
            return Err(BrokerError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        if state.consumers.len() >= consumers_max {
            return Err(BrokerError::precondition_failed(format!(
                "channel {channel} already has {consumers_max} consumers, the most a channel may hold"
            )));
        }
        let prefetch_count = state.consumer_prefetch;
        let queue = self
            .queues
            .get_mut(&id)
            .expect("queue_for returns live queues");
        if consume.exclusive && !queue.consumers.is_empty()
            || queue.consumers.iter().any(|consumer| consumer.exclusive)
        {
            return Err(BrokerError::access_refused(format!(
                "{} in exclusive use",
                queue.describe()
            )));
        }
        queue.consumers.push(QueueConsumer {
            connection,
            channel,
            tag: tag.clone(),
            no_ack: consume.no_ack,
            exclusive: consume.exclusive,
            prefetch_count,
            unacked: 0,
        });
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
        let Some(queue) = self
            .channel_mut(connection, channel)
            .and_then(|state| state.consumers.remove(consumer_tag))
        else {
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
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        queue.consumers.retain(|consumer| {
            !(consumer.connection == connection
                && consumer.channel == channel
                && consumer.tag.as_str() == consumer_tag)
        });
        if queue.auto_delete && queue.had_consumer && queue.consumers.is_empty() {
            self.delete_queue_by_id(id, out);
        }
    }

    pub fn get(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        queue: &str,
        no_ack: bool,
    ) -> BrokerResult<Option<GetOk>> {
        let id = self.queue_for(connection, queue)?;
        let queue = self
            .queues
            .get_mut(&id)
            .expect("queue_for returns live queues");
        let log = message_log(self.store.as_ref());
        let Some(taken) = queue.dequeue(log) else {
            return Ok(None);
        };
        let message_count = queue.ready_count() as u32;
        if no_ack {
            forget_stored(self.store.as_ref(), true, id, taken.sequence, taken.stored);
        } else {
            record_delivery(log, id, &taken);
        }
        let state = self
            .connections
            .get_mut(&connection)
            .and_then(|state| state.channels.get_mut(&channel))
            .expect("get on an open channel");
        let delivery_tag = state.take_delivery_tag();
        if !no_ack {
            state.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: id,
                    sequence: taken.sequence,
                    message: Arc::clone(&taken.message),
                    stored: taken.stored,
                    consumer_tag: None,
                },
            );
        }
        Ok(Some(GetOk {
            delivery_tag,
            redelivered: taken.redelivered,
            message: taken.message,
            message_count,
        }))
    }

    // ----- acknowledgements ----------------------------------------------

    pub fn ack(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        out: &mut Outbox,
    ) -> BrokerResult<()> {
        let settled = self.settle(connection, channel, delivery_tag, multiple)?;
        let touched = self.requeue_or_discard(settled, false);
        self.after_settle(connection, channel, &touched, out);
        Ok(())
    }

    /// `basic.nack` and `basic.reject`: requeued messages go back to their
    /// original position, marked redelivered; others are discarded.
    pub fn reject(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
        out: &mut Outbox,
    ) -> BrokerResult<()> {
        let settled = self.settle(connection, channel, delivery_tag, multiple)?;
        let touched = self.requeue_or_discard(settled, requeue);
        self.after_settle(connection, channel, &touched, out);
        Ok(())
    }

    /// `basic.recover`: every unacked message on the channel is requeued.
    pub fn recover(&mut self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        let settled = match self.channel_mut(connection, channel) {
            Some(state) => std::mem::take(&mut state.unacked).into_values().collect(),
            None => return,
        };
        let touched = self.requeue_or_discard(settled, true);
        self.after_settle(connection, channel, &touched, out);
    }

    /// Puts settled deliveries back in their queues, or lets them go.
    pub(crate) fn requeue_or_discard(
        &mut self,
        settled: Vec<Unacked>,
        requeue: bool,
    ) -> Vec<QueueId> {
        let mut touched = Vec::with_capacity(settled.len());
        for unacked in settled {
            touched.push(unacked.queue);
            match self.queues.get_mut(&unacked.queue) {
                Some(queue) if requeue => {
                    queue.requeue(unacked.sequence, unacked.message, unacked.stored)
                }
                Some(_) => forget_stored(
                    self.store.as_ref(),
                    true,
                    unacked.queue,
                    unacked.sequence,
                    unacked.stored,
                ),
                None => forget_stored(
                    self.store.as_ref(),
                    false,
                    unacked.queue,
                    unacked.sequence,
                    unacked.stored,
                ),
            }
        }
        touched
    }

    /// Takes the deliveries an ack, nack or reject names off the channel.
    fn settle(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
    ) -> BrokerResult<Vec<Unacked>> {
        let state = self
            .channel_mut(connection, channel)
            .expect("settle on an open channel");
        let unknown =
            || BrokerError::precondition_failed(format!("unknown delivery tag {delivery_tag}"));
        let settled: Vec<Unacked> = if multiple {
            if delivery_tag != 0 && !state.unacked.contains_key(&delivery_tag) {
                return Err(unknown());
            }
            let keep = if delivery_tag == 0 {
                BTreeMap::new()
            } else {
                state.unacked.split_off(&(delivery_tag + 1))
            };
            std::mem::replace(&mut state.unacked, keep)
                .into_values()
                .collect()
        } else {
            vec![state.unacked.remove(&delivery_tag).ok_or_else(unknown)?]
        };
        for unacked in &settled {
            let Some(tag) = &unacked.consumer_tag else {
                continue;
            };
            let Some(queue) = self.queues.get_mut(&unacked.queue) else {
                continue;
            };
            if let Some(consumer) = queue.consumers.iter_mut().find(|consumer| {
                consumer.connection == connection
                    && consumer.channel == channel
                    && consumer.tag == *tag
            }) {
                consumer.unacked = consumer.unacked.saturating_sub(1);
            }
        }
        Ok(settled)
    }

    fn after_settle(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        touched: &[QueueId],
        out: &mut Outbox,
    ) {
        self.deliver_all(touched, out);
        // A global prefetch frees room for every consumer on the channel.
        if self
            .channel_mut(connection, channel)
            .is_some_and(|state| state.global_prefetch != 0)
        {
            self.deliver_to_channel(connection, channel, out);
        }
    }

    // ----- delivery ------------------------------------------------------

    pub(crate) fn deliver_all(&mut self, queues: &[QueueId], out: &mut Outbox) {
        for (index, id) in queues.iter().enumerate() {
            if queues[..index].contains(id) {
                continue;
            }
            if let Some(queue) = self.queues.get_mut(id) {
                deliver(
                    *id,
                    queue,
                    &mut self.connections,
                    &self.limits,
                    self.store.as_ref(),
                    out,
                );
            }
        }
    }

    pub(crate) fn deliver_to_channel(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        out: &mut Outbox,
    ) {
        let queues: Vec<QueueId> = match self.channel_mut(connection, channel) {
            Some(state) => state.consumers.values().copied().collect(),
            None => return,
        };
        self.deliver_all(&queues, out);
    }
}

/// Hands a queue's waiting messages to its consumers, round-robin, while any
/// consumer has room.
fn deliver(
    queue_id: QueueId,
    queue: &mut Queue,
    connections: &mut HashMap<ConnectionId, ConnectionState>,
    limits: &Limits,
    store: Option<&Store>,
    out: &mut Outbox,
) {
    let log = message_log(store);
    while queue.ready_count() > 0 {
        let count = queue.consumers.len();
        let chosen = (0..count)
            .map(|offset| (queue.next_consumer + offset) % count)
            .find(|&index| {
                let consumer = &queue.consumers[index];
                consumer.has_credit()
                    && connections
                        .get(&consumer.connection)
                        .and_then(|state| state.channels.get(&consumer.channel))
                        .is_some_and(|state| state.accepts(consumer.no_ack, limits))
            });
        let Some(index) = chosen else {
            return;
        };
        queue.next_consumer = (index + 1) % count;
        let Some(taken) = queue.dequeue(log) else {
            return;
        };
        let consumer = &mut queue.consumers[index];
        let state = connections
            .get_mut(&consumer.connection)
            .and_then(|state| state.channels.get_mut(&consumer.channel))
            .expect("chosen consumer's channel is open");
        let delivery_tag = state.take_delivery_tag();
        if consumer.no_ack {
            forget_stored(store, true, queue_id, taken.sequence, taken.stored);
        } else {
            record_delivery(log, queue_id, &taken);
            consumer.unacked += 1;
            state.unacked.insert(
                delivery_tag,
                Unacked {
                    queue: queue_id,
                    sequence: taken.sequence,
                    message: Arc::clone(&taken.message),
                    stored: taken.stored,
                    consumer_tag: Some(consumer.tag.clone()),
                },
            );
        }
        state.deliveries_unwritten += 1;
        out.effects.push(Effect::Deliver(Delivery {
            connection: consumer.connection,
            channel: consumer.channel,
            consumer_tag: consumer.tag.clone(),
            delivery_tag,
            redelivered: taken.redelivered,
            message: taken.message,
        }));
    }
}

/// Notes in the log that a persistent message went to a consumer, so that
/// after a clean restart it comes back marked redelivered. A redelivery is
/// recorded too: a message marked redelivered only because the broker
/// crashed has no Delivered record of its own yet.
fn record_delivery(log: Option<&MessageLog>, queue: QueueId, taken: &Dequeued) {
    if let (Some(log), Stored::Published(location)) = (log, taken.stored) {
        let _ = log.append_delivered(queue.0, taken.sequence, location);
    }
}
