//! Time in the broker: message TTLs, queue expiry (`x-expires`) and
//! consumer acknowledgement timeouts (`x-consumer-timeout`).
//!
//! The broker never reads a clock. The server tells it the time with
//! [`Broker::advance_clock`] before each operation and calls
//! [`Broker::tick`] periodically; tests move time by hand. A queue that
//! needs the timer puts its deadline in `Broker::timers`; a deadline that
//! turns out to be early (the head it was set for was consumed) costs one
//! look at the queue and is set again.

use super::Broker;
use super::effect::{Effect, Outbox};
use crate::QueueId;
use crate::durable::message_log;
use crate::error::BrokerError;
impl Broker {
    /// Sets the broker's notion of now, in ms since the UNIX epoch. Time
    /// never goes backwards: an earlier value (a clock stepped back) is
    /// ignored.
    pub fn advance_clock(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Does what is due at the current time: expires messages at queue
    /// heads, deletes queues unused for their `x-expires`, and asks
    /// connections to close channels whose deliveries were not acked
    /// within their queue's `x-consumer-timeout`.
    pub fn tick(&mut self, out: &mut Outbox) {
        let mut touched = Vec::new();
        let mut deleted_any = false;
        while let Some(&(at, id)) = self.timers.first() {
            if at > self.now_ms {
                break;
            }
            self.timers.pop_first();
            if let Some(queue) = self.queues.get_mut(&id) {
                queue.scheduled_ms = None;
            }
            match self.service_queue(id, out) {
                Serviced::Deleted => deleted_any = true,
                Serviced::Kept => touched.push(id),
            }
        }
        self.deliver_all(&touched, out);
        if deleted_any {
            // Nobody waits on this save; a failure has been logged and the
            // queue comes back after a restart, to expire again.
            let _ = self.sync_topology();
            self.topology_ticket = None;
        }
        self.check_ack_deadlines(out);
    }

    /// Asks the timer to look at queue `id` at `at` (or earlier, if it is
    /// already due to).
    pub(crate) fn schedule(&mut self, id: QueueId, at: u64) {
        let Some(queue) = self.queues.get_mut(&id) else {
            return;
        };
        match queue.scheduled_ms {
            Some(current) if current <= at => {}
            current => {
                if let Some(current) = current {
                    self.timers.remove(&(current, id));
                }
                queue.scheduled_ms = Some(at);
                self.timers.insert((at, id));
            }
        }
    }

    /// Expires the messages at the heads of `queues` that are due now (a
    /// TTL of 0 that found no consumer); returns whether any did.
    pub(crate) fn expire_due_heads(&mut self, queues: &[QueueId]) -> bool {
        let mut any = false;
        for id in queues {
            let Some(queue) = self.queues.get_mut(id) else {
                continue;
            };
            if !queue
                .head_expiry()
                .is_some_and(|expiry| expiry.is_due(self.now_ms))
            {
                continue;
            }
            let mut expired = Vec::new();
            let log = message_log(self.store.as_ref());
            queue.expire_head(log, self.now_ms, &mut expired);
            any |= !expired.is_empty();
            self.expired(*id, expired);
        }
        any
    }

    fn service_queue(&mut self, id: QueueId, out: &mut Outbox) -> Serviced {
        let now_ms = self.now_ms;
        let Some(queue) = self.queues.get_mut(&id) else {
            return Serviced::Deleted;
        };
        let mut next: Option<u64> = None;
        if let Some(expires_ms) = queue.args.expires_ms
            && queue.consumers.is_empty()
        {
            let deadline = queue.last_used_ms.saturating_add(expires_ms);
            if deadline <= now_ms {
                tracing::debug!(queue = %queue.name, vhost = %queue.vhost, "queue expired unused");
                self.delete_queue_by_id(id, out);
                return Serviced::Deleted;
            }
            next = Some(deadline);
        }
        // A head recovered from the log has an unknown expiry; read it only
        // where the queue itself has a TTL.
        let look = queue.head_expiry().is_some_and(|expiry| {
            expiry.deadline().is_some()
                || (expiry.is_unknown() && queue.args.message_ttl_ms.is_some())
        });
        if look {
            let log = message_log(self.store.as_ref());
            let mut expired = Vec::new();
            if let Some(at) = queue.expire_head(log, now_ms, &mut expired) {
                next = Some(next.map_or(at, |next| next.min(at)));
            }
            self.expired(id, expired);
        }
        if let Some(at) = next {
            self.schedule(id, at);
        }
        Serviced::Kept
    }

    /// Closes, through their connections, the channels holding a delivery
    /// past its acknowledgement deadline. The messages go back to their
    /// queues when the channel closes. Looks only at channels whose
    /// earliest deadline is due, not at every channel.
    fn check_ack_deadlines(&mut self, out: &mut Outbox) {
        let now_ms = self.now_ms;
        while let Some(&(at, connection, number)) = self.ack_deadlines.first() {
            if at > now_ms {
                break;
            }
            self.ack_deadlines.pop_first();
            let Some(channel) = self
                .connections
                .get_mut(&connection)
                .and_then(|state| state.channels.get_mut(&number))
            else {
                continue;
            };
            match channel.ack_deadline_ms {
                None => continue,
                Some(at) if at > now_ms => {
                    // Stale: a later deadline replaced this one.
                    self.ack_deadlines.insert((at, connection, number));
                    continue;
                }
                Some(_) if channel.closing => continue,
                Some(_) => {}
            }
            let overdue = channel
                .unacked
                .values()
                .filter_map(|unacked| {
                    let at = unacked.ack_deadline_ms?;
                    let queue = self.queues.get(&unacked.queue)?;
                    Some((at, queue.args.consumer_timeout_ms.unwrap_or(0)))
                })
                .min();
            match overdue {
                Some((at, timeout_ms)) if at <= now_ms => {
                    channel.closing = true;
                    out.effects.push(Effect::CloseChannel {
                        connection,
                        channel: number,
                        error: BrokerError::ConsumerTimeout {
                            channel: number,
                            timeout_ms,
                        },
                    });
                }
                Some((at, _)) => {
                    channel.ack_deadline_ms = Some(at);
                    self.ack_deadlines.insert((at, connection, number));
                }
                None => channel.ack_deadline_ms = None,
            }
        }
    }
}

enum Serviced {
    Deleted,
    Kept,
}
