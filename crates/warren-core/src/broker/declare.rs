//! Declaring, binding, purging and deleting exchanges and queues, with
//! RabbitMQ's equivalence rules, exclusive and auto-delete lifetimes.

use amq_protocol::types::{FieldTable, ShortString};
use parking_lot::Mutex;
use warren_store::TopologyChange;

use super::Broker;
use super::effect::{Effect, Outbox};
use super::request::{ExchangeDeclare, QueueDeclare, QueueDeclared};
use crate::durable::entry::{DurableDestination, binding_entry};
use crate::error::{ArgumentOf, BrokerError, BrokerResult, ErrorCode, Inequivalence, Resource};
use crate::queue::Queue;
use crate::queue::arguments::{QueueArguments, QueueShape};
use crate::queue::discard::Discard;
use crate::stats::MessageCounts;
use crate::topology::bindings::Bindings;
use crate::topology::exchange::{
    Binding, Destination, Exchange, ExchangeKind, validate_headers_binding,
};
use crate::topology::{add_binding, remove_binding, remove_bindings_leading_to, remove_exchange};
use crate::{ConnectionId, QueueId};

impl Broker {
    pub(crate) fn declare_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        declare: ExchangeDeclare,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        let name = declare.name.as_str();
        if name.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        if declare.passive {
            return match vhost.exchanges.get(name) {
                Some(_) => Ok(()),
                None => Err(BrokerError::NotFound(Resource::Exchange {
                    name: name.to_owned(),
                    vhost: vhost_name,
                })),
            };
        }
        // RabbitMQ 3.x closed the connection with 503 here; the current
        // RabbitMQ closes only the channel, with 406.
        let Some(kind) = ExchangeKind::parse(declare.kind.as_str()) else {
            return Err(BrokerError::InvalidExchangeType(declare.kind.to_string()));
        };
        if let Some(alternate) = declare.arguments.inner().get("alternate-exchange")
            && crate::arguments::as_text(alternate).is_none()
        {
            return Err(BrokerError::InvalidArgument {
                key: "alternate-exchange".to_owned(),
                of: ArgumentOf::Exchange {
                    name: name.to_owned(),
                    vhost: vhost_name,
                },
                reason: "expected the name of an exchange as a string".to_owned(),
            });
        }
        if let Some(existing) = vhost.exchanges.get(name) {
            let inequivalent = |what: &str, received: &str, current: &str| {
                BrokerError::Inequivalent(Box::new(Inequivalence {
                    what: what.to_owned(),
                    resource: Resource::Exchange {
                        name: name.to_owned(),
                        vhost: vhost_name.clone(),
                    },
                    received: received.to_owned(),
                    current: current.to_owned(),
                }))
            };
            if existing.kind != kind {
                return Err(inequivalent("type", kind.name(), existing.kind.name()));
            }
            for (what, received, current) in [
                ("durable", declare.durable, existing.durable),
                ("auto_delete", declare.auto_delete, existing.auto_delete),
                ("internal", declare.internal, existing.internal),
            ] {
                if received != current {
                    return Err(inequivalent(
                        what,
                        &received.to_string(),
                        &current.to_string(),
                    ));
                }
            }
            let alternate = "alternate-exchange";
            let received =
                crate::queue::describe_argument(declare.arguments.inner().get(alternate));
            let current =
                crate::queue::describe_argument(existing.arguments.inner().get(alternate));
            if received != current {
                return Err(inequivalent(alternate, &received, &current));
            }
            return Ok(());
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::ReservedName {
                kind: "exchange",
                name: name.to_owned(),
            });
        }
        let exchange = Exchange {
            kind,
            durable: declare.durable,
            auto_delete: declare.auto_delete,
            internal: declare.internal,
            arguments: declare.arguments,
            policy: self
                .policies
                .get(&vhost_name)
                .map(|policies| policies.for_exchange(declare.name.as_str()))
                .unwrap_or_default(),
            name: declare.name,
            bindings: Bindings::new(kind),
            counts: Default::default(),
        };
        if let Some(entry) = exchange.durable_entry(&vhost_name) {
            self.topology_changes.push(TopologyChange::Added(entry));
        }
        vhost.exchanges.insert(exchange.name.clone(), exchange);
        Ok(())
    }

    pub(crate) fn delete_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        if name.is_empty() || name.starts_with("amq.") {
            return Err(if name.is_empty() {
                BrokerError::DefaultExchange
            } else {
                BrokerError::BuiltinExchange(name.to_owned())
            });
        }
        let Some(exchange) = vhost.exchanges.get(name) else {
            // Deleting what does not exist succeeds, as in RabbitMQ.
            return Ok(());
        };
        if if_unused && !exchange.bindings.is_empty() {
            return Err(BrokerError::InUse(Resource::Exchange {
                name: name.to_owned(),
                vhost: vhost_name,
            }));
        }
        remove_exchange(vhost, name, &mut self.topology_changes);
        Ok(())
    }

    /// `exchange.bind` (bind = true) and `exchange.unbind`. Unbinding
    /// succeeds when either exchange is gone, as in RabbitMQ: the binding
    /// went with it (an auto-delete exchange, typically, that just went).
    pub(crate) fn bind_exchange_unsaved(
        &mut self,
        connection: ConnectionId,
        destination: &str,
        source: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        if source.is_empty() || destination.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        for name in [destination, source] {
            if !vhost.exchanges.contains_key(name) {
                if !bind {
                    return Ok(());
                }
                return Err(BrokerError::NotFound(Resource::Exchange {
                    name: name.to_owned(),
                    vhost: vhost_name,
                }));
            }
        }
        let persisted = (vhost.exchanges[source].durable && vhost.exchanges[destination].durable)
            .then(|| {
                binding_entry(
                    &vhost_name,
                    source,
                    DurableDestination::Exchange(destination),
                    routing_key.as_str(),
                    &arguments,
                )
            });
        let binding = Binding {
            destination: Destination::Exchange(destination.into()),
            routing_key,
            arguments,
            persisted,
        };
        if bind {
            if vhost.exchanges[source].kind == ExchangeKind::Headers {
                validate_headers_binding(&binding.arguments)?;
            }
            add_binding(vhost, source, binding, &mut self.topology_changes);
        } else {
            remove_binding(vhost, source, &binding, &mut self.topology_changes);
        }
        Ok(())
    }

    // ----- queues --------------------------------------------------------

    /// `server_named`: the name came from `generate_queue_name`, so its
    /// `amq.gen-` prefix is the broker's own and not a reserved name.
    pub(crate) fn declare_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
        server_named: bool,
    ) -> BrokerResult<QueueDeclared> {
        let vhost_name = self.vhost_of(connection)?;
        let mut name = declare.name.clone();
        if declare.passive
            && let Some(declared) = self.declare_reply_to_passive(name.as_str())
        {
            return declared;
        }
        if let Some(id) = self.vhosts[&vhost_name].queues.get(name.as_str()).copied() {
            let now_ms = self.now_ms();
            let queue = self.queue_mut(id).expect("named queues exist");
            queue.check_access(connection)?;
            queue.last_used_ms = now_ms;
            if !declare.passive {
                queue.check_equivalent(
                    declare.durable,
                    declare.exclusive,
                    declare.auto_delete,
                    &declare.arguments,
                )?;
            }
            let declared = QueueDeclared {
                name,
                message_count: queue.ready_count() as u32,
                consumer_count: queue.consumers.len() as u32,
            };
            self.lifecycle.queues_declared += 1;
            return Ok(declared);
        }
        if declare.passive {
            return Err(BrokerError::NotFound(Resource::Queue {
                name: name.to_string(),
                vhost: vhost_name,
            }));
        }
        if name.as_str().is_empty() {
            name = self.generate_queue_name();
        } else if name.as_str().starts_with("amq.") && !server_named {
            return Err(BrokerError::ReservedName {
                kind: "queue",
                name: name.to_string(),
            });
        }
        let vhost_limit = self.vhosts[&vhost_name].queues_max;
        let queues_max = vhost_limit.map_or(self.limits.queues_per_vhost_max, |limit| {
            limit.min(self.limits.queues_per_vhost_max)
        });
        if self.vhosts[&vhost_name].queues.len() >= queues_max {
            return Err(BrokerError::QueueLimit {
                name: name.to_string(),
                vhost: vhost_name,
                max: queues_max,
            });
        }
        let args = QueueArguments::parse(
            &declare.arguments,
            &QueueShape {
                name: name.as_str(),
                vhost: &vhost_name,
                durable: declare.durable,
                exclusive: declare.exclusive,
                auto_delete: declare.auto_delete,
            },
        )?;
        self.next_queue_id += 1;
        let id = QueueId(self.next_queue_id);
        let owner = declare.exclusive.then_some(connection);
        let mut queue = Queue::new(
            id,
            name.clone(),
            vhost_name.clone(),
            declare.durable,
            owner,
            declare.auto_delete,
            declare.arguments,
            args,
            self.now_ms(),
        )
        .spill_to(self.spill.clone());
        self.policy_for_new_queue(&mut queue);
        let expires_ms = queue.args.expires_ms;
        if let Some(entry) = queue.durable_entry() {
            self.topology_changes
                .push(TopologyChange::Added(entry.into()));
        }
        self.queues.insert(id, Mutex::new(queue));
        if let Some(expires_ms) = expires_ms {
            self.schedule(id, self.now_ms().saturating_add(expires_ms));
        }
        self.vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists")
            .queues
            .insert(name.clone(), id);
        if let Some(owner) = owner
            && let Some(state) = self.connections.get_mut(&owner)
        {
            state.exclusive_queues.push(id);
        }
        self.lifecycle.queues_declared += 1;
        self.lifecycle.queues_created += 1;
        Ok(QueueDeclared {
            name,
            message_count: 0,
            consumer_count: 0,
        })
    }

    /// `queue.bind` (bind = true) and `queue.unbind`. Unbinding succeeds
    /// when the queue or the exchange is gone, as in RabbitMQ: clients
    /// unbind an auto-delete reply queue after cancelling its consumer,
    /// which deleted it and its bindings.
    pub(crate) fn bind_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        if exchange.is_empty() {
            return Err(BrokerError::DefaultExchange);
        }
        let id = match self.queue_for(connection, queue) {
            Ok(id) => id,
            Err(error) if !bind && error.code() == ErrorCode::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        let vhost_name = self.vhost_of(connection)?;
        let vhost = self
            .vhosts
            .get_mut(&vhost_name)
            .expect("connection's vhost exists");
        let Some(source) = vhost.exchanges.get(exchange) else {
            if !bind {
                return Ok(());
            }
            return Err(BrokerError::NotFound(Resource::Exchange {
                name: exchange.to_owned(),
                vhost: vhost_name,
            }));
        };
        let target = self.queues[&id].lock();
        let persisted = (source.durable && target.persists_messages()).then(|| {
            binding_entry(
                &vhost_name,
                exchange,
                DurableDestination::Queue(target.name.as_str()),
                routing_key.as_str(),
                &arguments,
            )
        });
        let binding = Binding {
            destination: Destination::Queue(id),
            routing_key,
            arguments,
            persisted,
        };
        if bind {
            if source.kind == ExchangeKind::Headers {
                validate_headers_binding(&binding.arguments)?;
            }
            add_binding(vhost, exchange, binding, &mut self.topology_changes);
        } else {
            remove_binding(vhost, exchange, &binding, &mut self.topology_changes);
        }
        Ok(())
    }

    /// Removes the queue's waiting messages; returns how many there were.
    pub fn purge_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        if super::reply_to::is_reply_to_name(queue) {
            return Err(BrokerError::ReplyToName(queue.to_owned()));
        }
        let id = self.queue_for(connection, queue)?;
        let queue = self.queue_mut(id).expect("queue_for returns live queues");
        let count = queue.ready_count() as u32;
        let discard = Discard::new(id, true, queue.take_backlog());
        self.dispose(discard, out);
        Ok(count)
    }

    /// Deletes a queue; returns the number of messages it held.
    pub(crate) fn delete_queue_unsaved(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        let id = match self.queue_for(connection, queue) {
            Ok(id) => id,
            // Deleting what does not exist succeeds, as in RabbitMQ.
            Err(error) if error.code() == ErrorCode::NotFound => return Ok(0),
            Err(error) => return Err(error),
        };
        let queue = self.queue_mut(id).expect("queue_for returns live queues");
        if if_unused && !queue.consumers.is_empty() {
            return Err(BrokerError::InUse(queue.resource()));
        }
        if if_empty && queue.ready_count() > 0 {
            return Err(BrokerError::NotEmpty(queue.resource()));
        }
        Ok(self.delete_queue_by_id(id, out))
    }

    /// Runs a discard: on the store's worker when there is one, since its
    /// cost grows with the queue, or here.
    fn dispose(&self, discard: Discard, out: &mut Outbox) {
        if discard.is_empty() {
            return;
        }
        match &self.store {
            Some(_) if self.store_worker => out.effects.push(Effect::Discard(discard)),
            Some(store) => discard.run_in_place(&store.log),
            None => {}
        }
    }

    pub(crate) fn delete_queue_by_id(&mut self, id: QueueId, out: &mut Outbox) -> u32 {
        let Some(mut queue) = self.queues.remove(&id).map(Mutex::into_inner) else {
            return 0;
        };
        queue.flow_gauge.mark_deleted();
        self.lifecycle.queues_deleted += 1;
        // Dead letters are routed before the operation that made them
        // ends, so none wait here; any that did would go with their queue.
        for dead in std::mem::take(&mut queue.dead_letters) {
            super::forget_stored(self.store.as_ref(), false, id, dead.stored);
        }
        if let Some(entry) = queue.durable_entry() {
            self.topology_changes
                .push(TopologyChange::Removed(entry.into()));
            // No mark will settle what it held: compaction drops it.
            if let Some(store) = &self.store {
                store.log.forget_queue(id.0);
            }
        }
        if let Some(at) = queue.scheduled_ms {
            self.timers.get_mut().remove(&(at, id));
        }
        let message_count = queue.ready_count() as u32;
        self.retired += MessageCounts {
            published: 0,
            unroutable: 0,
            ..queue.counts
        };
        // The topology no longer names the queue, so recovery ignores its
        // records; the log only needs to stop counting them.
        let discard = Discard::new(id, false, queue.take_backlog());
        self.dispose(discard, out);
        if let Some(vhost) = self.vhosts.get_mut(&queue.vhost) {
            vhost.queues.remove(queue.name.as_str());
            remove_bindings_leading_to(vhost, &Destination::Queue(id), &mut self.topology_changes);
        }
        if let Some(owner) = queue.exclusive_owner
            && let Some(state) = self.connections.get_mut(&owner)
        {
            state.exclusive_queues.retain(|queue| *queue != id);
        }
        for consumer in queue.consumers {
            let Some(connection) = self.connections.get_mut(&consumer.connection) else {
                continue;
            };
            if let Some(channel) = connection.channels.get_mut(&consumer.channel) {
                channel.get_mut().consumers.remove(&consumer.tag);
            }
            if connection.cancel_notify {
                out.effects.push(Effect::CancelConsumer {
                    connection: consumer.connection,
                    channel: consumer.channel,
                    consumer_tag: consumer.tag,
                });
            }
        }
        message_count
    }
}
