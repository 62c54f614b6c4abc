//! Routing dead letters: the messages queues gave up on, republished
//! through their dead-letter exchanges.

use std::sync::Arc;

use super::Broker;
use super::effect::Outbox;
use super::forget_stored;
use super::request::Published;
use crate::QueueId;
use crate::queue::dead_letter::{dead_lettered, is_cycle};
use crate::topology::route;

impl Broker {
    /// Republishes the waiting dead letters through their queues'
    /// dead-letter exchanges; returns the queues they reached. A queue
    /// without a dead-letter exchange, or whose exchange no longer exists,
    /// just drops the message, as RabbitMQ does.
    pub(crate) fn route_dead_letters(&self, out: &mut Outbox) -> Vec<QueueId> {
        let mut reached = Vec::new();
        let now_ms = self.now_ms();
        for dead in std::mem::take(&mut out.dead_letters) {
            let queue = self.queue(dead.queue);
            let queue_exists = queue.is_some();
            let republished = queue.and_then(|queue| {
                let exchange_name = queue.args.dead_letter_exchange.as_ref()?;
                let vhost = self.vhosts.get(&queue.vhost)?;
                let exchange = vhost.exchanges.get(exchange_name.as_str())?;
                let message = dead_lettered(
                    &dead.message,
                    queue.name.as_str(),
                    dead.reason,
                    exchange_name.as_str(),
                    queue.args.dead_letter_routing_key.as_ref(),
                    now_ms,
                );
                // Routing may lead back to this queue: release it first.
                drop(queue);
                let targets: Vec<QueueId> = route(vhost, exchange, &message)
                    .into_iter()
                    .filter(|target| {
                        self.queue(*target)
                            .is_some_and(|target| !is_cycle(&message, target.name.as_str()))
                    })
                    .collect();
                Some((Arc::new(message), targets))
            });
            if let Some((message, targets)) = republished {
                // The new copy is appended before the old one is removed, so a
                // crash in between leaves a duplicate, never a loss.
                let mut outcome = Published::default();
                self.enqueue_routed(&targets, message, &mut outcome, out);
                reached.extend(targets);
            }
            forget_stored(
                self.store.as_ref(),
                queue_exists,
                dead.queue,
                dead.sequence,
                dead.stored,
            );
        }
        reached
    }
}
