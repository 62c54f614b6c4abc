//! Time in the broker: message TTLs, queue expiry (`x-expires`) and
//! consumer acknowledgement timeouts (`x-consumer-timeout`).
//!
//! The broker never reads a clock. The server tells it the time with
//! [`Broker::advance_clock`] before each operation and calls
//! [`Broker::tick`] periodically; tests move time by hand. A queue that
//! needs the timer puts its deadline in `Broker::timers`; a deadline that
//! turns out to be early (the head it was set for was consumed) costs one
//! look at the queue and is set again.

use std::sync::atomic::Ordering;

use super::Broker;
use super::delivery::expired_messages;
use super::effect::{Effect, Outbox};
use crate::QueueId;
use crate::durable::message_log;
use crate::error::BrokerError;
use crate::queue::Queue;

impl Broker {
    /// Sets the broker's notion of now, in ms since the UNIX epoch. Time
    /// never goes backwards: an earlier value (a clock stepped back) is
    /// ignored.
    pub fn advance_clock(&self, now_ms: u64) {
        // Read first: the clock moves once a millisecond, and a write on
        // every operation would bounce the line between cores.
        if now_ms > self.now_ms.load(Ordering::Relaxed) {
            self.now_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Whether `tick` has anything to do now: a queue's or a channel's
    /// deadline has come. Cheap, so that the server can look every tick
    /// and take the broker exclusively only when it must.
    pub fn tick_due(&self) -> bool {
        let now_ms = self.now_ms();
        self.timers
            .lock()
            .first()
            .is_some_and(|&(at, _)| at <= now_ms)
            || self
                .ack_deadlines
                .lock()
                .first()
                .is_some_and(|&(at, _, _)| at <= now_ms)
    }

    /// Does what is due at the current time: expires messages at queue
    /// heads, deletes queues unused for their `x-expires`, and asks
    /// connections to close channels whose deliveries were not acked
    /// within their queue's `x-consumer-timeout`.
    pub fn tick(&mut self, out: &mut Outbox) {
        let mut touched = Vec::new();
        let mut deleted_any = false;
        let now_ms = self.now_ms();
        // Only what is due as the tick starts: a queue with more expiries
        // due than one look takes is scheduled again for now, and waits
        // for the next tick.
        let mut due = Vec::new();
        let timers = self.timers.get_mut();
        while let Some(&(at, id)) = timers.first() {
            if at > now_ms {
                break;
            }
            timers.pop_first();
            due.push(id);
        }
        for id in due {
            if let Some(queue) = self.queue_mut(id) {
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
    pub(crate) fn schedule(&self, id: QueueId, at: u64) {
        if let Some(mut queue) = self.queue(id) {
            self.schedule_locked(&mut queue, at);
        }
    }

    /// `schedule`, for a queue the caller holds.
    pub(crate) fn schedule_locked(&self, queue: &mut Queue, at: u64) {
        match queue.scheduled_ms {
            Some(current) if current <= at => {}
            current => {
                let mut timers = self.timers.lock();
                if let Some(current) = current {
                    timers.remove(&(current, queue.id));
                }
                queue.scheduled_ms = Some(at);
                timers.insert((at, queue.id));
            }
        }
    }

    /// Expires the messages at the heads of `queues` that are due now (a
    /// TTL of 0 that found no consumer); returns whether any did.
    pub(crate) fn expire_due_heads(&self, queues: &[QueueId], out: &mut Outbox) -> bool {
        let mut any = false;
        let now_ms = self.now_ms();
        for id in queues {
            let Some(mut queue) = self.queue(*id) else {
                continue;
            };
            if !queue
                .head_expiry()
                .is_some_and(|expiry| expiry.is_due(now_ms))
            {
                continue;
            }
            let mut expired = Vec::new();
            let log = message_log(self.store.as_ref());
            if let Some(at) = queue.expire_head(log, now_ms, &mut expired) {
                self.schedule_locked(&mut queue, at);
            }
            any |= !expired.is_empty();
            expired_messages(&mut queue, expired, out);
        }
        any
    }

    fn service_queue(&mut self, id: QueueId, out: &mut Outbox) -> Serviced {
        let now_ms = self.now_ms();
        let Some(queue) = self.queues.get_mut(&id).map(parking_lot::Mutex::get_mut) else {
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
            expired_messages(queue, expired, out);
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
        let now_ms = self.now_ms();
        let ack_deadlines = self.ack_deadlines.get_mut();
        while let Some(&(at, connection, number)) = ack_deadlines.first() {
            if at > now_ms {
                break;
            }
            ack_deadlines.pop_first();
            let Some(channel) = self
                .connections
                .get_mut(&connection)
                .and_then(|state| state.channels.get_mut(&number))
                .map(parking_lot::Mutex::get_mut)
            else {
                continue;
            };
            match channel.ack_deadline_ms {
                None => continue,
                Some(at) if at > now_ms => {
                    // Stale: a later deadline replaced this one.
                    ack_deadlines.insert((at, connection, number));
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
                    let queue = self.queues.get_mut(&unacked.queue)?.get_mut();
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
                    ack_deadlines.insert((at, connection, number));
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
