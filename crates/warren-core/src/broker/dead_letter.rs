//! Routing dead letters: the messages queues gave up on, republished
//! through their dead-letter exchanges.

use std::sync::Arc;

use super::Broker;
use super::effect::Outbox;
use super::forget_stored;
use super::request::Published;
use crate::QueueId;
use crate::queue::Queue;
use crate::queue::dead_letter::{DeadLetter, dead_lettered, is_cycle};
use crate::topology::route;

impl Broker {
    /// Republishes the dead letters waiting in the queues the operation
    /// left some in, through their dead-letter exchanges; returns the
    /// queues they reached. A queue without a dead-letter exchange, or
    /// whose exchange no longer exists, just drops the message, as
    /// RabbitMQ does.
    pub(crate) fn route_dead_letters(&self, out: &mut Outbox) -> Vec<QueueId> {
        let mut reached = Vec::new();
        let mut sources = std::mem::take(&mut out.dead_letter_sources);
        sources.dedup();
        for source in sources {
            self.route_dead_letters_of(source, &mut reached, out);
        }
        reached
    }

    /// Routes a queue's dead letters one by one, in the order they died.
    /// One operation at a time does this for a queue: another that finds
    /// it under way leaves its own letters to it, which sees them before it
    /// stops (the check and the stop are under the queue's lock, as is
    /// every letter's arrival).
    fn route_dead_letters_of(&self, source: QueueId, reached: &mut Vec<QueueId>, out: &mut Outbox) {
        let now_ms = self.now_ms();
        let mut routing = false;
        loop {
            let Some(mut queue) = self.queue(source) else {
                return;
            };
            if queue.routing_dead_letters && !routing {
                return;
            }
            let Some(dead) = queue.dead_letters.pop_front() else {
                queue.routing_dead_letters = false;
                return;
            };
            queue.routing_dead_letters = true;
            routing = true;
            let republished = queue
                .args
                .dead_letter_exchange
                .clone()
                .map(|exchange_name| {
                    let message = dead_lettered(
                        &dead.message,
                        queue.name.as_str(),
                        dead.reason,
                        exchange_name.as_str(),
                        queue.args.dead_letter_routing_key.as_ref(),
                        now_ms,
                    );
                    (exchange_name, queue.vhost.clone(), message)
                });
            // Routing may lead back to this queue: release it first.
            drop(queue);
            if let Some((exchange_name, vhost_name, message)) = republished
                && let Some(vhost) = self.vhosts.get(&vhost_name)
                && let Some(exchange) = vhost.exchanges.get(exchange_name.as_str())
            {
                let targets: Vec<QueueId> = route(vhost, exchange, &message)
                    .into_iter()
                    .filter(|target| {
                        self.queue(*target)
                            .is_some_and(|target| !is_cycle(&message, target.name.as_str()))
                    })
                    .collect();
                // The new copy is appended before the old one is removed, so a
                // crash in between leaves a duplicate, never a loss.
                let mut outcome = Published::default();
                self.enqueue_routed(&targets, Arc::new(message), &mut outcome, out);
                reached.extend(targets);
            }
            forget_stored(self.store.as_ref(), true, dead.queue, dead.stored);
        }
    }
}

/// Leaves a message the queue gave up on for its dead-letter exchange;
/// the operation routes it before it ends.
pub(crate) fn dead_letter(queue: &mut Queue, dead: DeadLetter, out: &mut Outbox) {
    queue.dead_letters.push_back(dead);
    out.dead_letter_sources.push(queue.id);
}
