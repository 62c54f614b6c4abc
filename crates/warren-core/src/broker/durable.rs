//! What survives a restart: durable exchanges, queues and bindings (the
//! topology journal) and persistent messages in durable queues (the message
//! log): each operation's durable wrapper and the store's lifecycle.
//!
//! An operation that adds or removes something durable notes the entry it
//! added or removed as it makes the change (`Broker::topology_changes`);
//! when the operation ends, `sync_topology` hands those entries to the
//! journal and keeps the ticket that makes them durable, which the caller
//! takes (`take_topology_ticket`) to hold its `*-ok` until the journal has
//! synced. An operation that changes nothing durable writes nothing.

use amq_protocol::types::{FieldTable, ShortString};
use warren_store::{MessageLog, Sequence, StoreError, Ticket, TopologyWaiter};

use super::Broker;
use super::effect::Outbox;
use super::request::{ExchangeDeclare, QueueDeclare, QueueDeclared};
use crate::error::{BrokerError, BrokerResult};
use crate::topology::remove_exchange;
use crate::{ConnectionId, Message, QueueId};

/// Every operation that can change the durable topology (an auto-delete
/// queue losing its last consumer included) hands its changes to the
/// journal before it returns; the caller holds the `*-ok` reply until the
/// ticket it takes with `take_topology_ticket` is durable, so a reply is
/// only sent for a change that survives a crash.
impl Broker {
    pub fn declare_exchange(
        &mut self,
        connection: ConnectionId,
        declare: ExchangeDeclare,
    ) -> BrokerResult<()> {
        self.declare_exchange_unsaved(connection, declare)?;
        self.sync_topology()
    }

    pub fn delete_exchange(
        &mut self,
        connection: ConnectionId,
        name: &str,
        if_unused: bool,
    ) -> BrokerResult<()> {
        self.delete_exchange_unsaved(connection, name, if_unused)?;
        self.sync_topology()
    }

    /// `exchange.bind` (bind = true) and `exchange.unbind`.
    pub fn bind_exchange(
        &mut self,
        connection: ConnectionId,
        destination: &str,
        source: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        self.bind_exchange_unsaved(
            connection,
            destination,
            source,
            routing_key,
            arguments,
            bind,
        )?;
        self.sync_topology()
    }

    pub fn declare_queue(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
    ) -> BrokerResult<QueueDeclared> {
        let declared = self.declare_queue_unsaved(connection, declare, false)?;
        self.sync_topology()?;
        Ok(declared)
    }

    /// Declares a queue under a name from `generate_queue_name`.
    pub fn declare_server_named_queue(
        &mut self,
        connection: ConnectionId,
        declare: QueueDeclare,
    ) -> BrokerResult<QueueDeclared> {
        let declared = self.declare_queue_unsaved(connection, declare, true)?;
        self.sync_topology()?;
        Ok(declared)
    }

    /// Deletes a vhost with its queues, their messages and its exchanges.
    /// Connections still open in it get 320 on their next operation; the
    /// caller closes them.
    pub fn delete_vhost(&mut self, name: &str, out: &mut Outbox) -> BrokerResult<()> {
        let Some(vhost) = self.vhosts.get(name) else {
            return Ok(());
        };
        let queues: Vec<QueueId> = vhost.queues.values().copied().collect();
        for id in queues {
            self.delete_queue_by_id(id, out);
        }
        self.drop_policies(name);
        if let Some(mut vhost) = self.vhosts.remove(name) {
            let names: Vec<ShortString> = vhost.exchanges.keys().cloned().collect();
            for name in names {
                remove_exchange(&mut vhost, name.as_str(), &mut self.topology_changes);
            }
        }
        self.sync_topology()
    }

    /// `queue.bind` (bind = true) and `queue.unbind`.
    pub fn bind_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        exchange: &str,
        routing_key: ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> BrokerResult<()> {
        self.bind_queue_unsaved(connection, queue, exchange, routing_key, arguments, bind)?;
        self.sync_topology()
    }

    /// Deletes a queue; returns the number of messages it held.
    pub fn delete_queue(
        &mut self,
        connection: ConnectionId,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
        out: &mut Outbox,
    ) -> BrokerResult<u32> {
        let count = self.delete_queue_unsaved(connection, queue, if_unused, if_empty, out)?;
        self.sync_topology()?;
        Ok(count)
    }

    /// Releases everything the connection held: its channels' unacked
    /// messages go back to their queues and its exclusive queues are deleted.
    pub fn close_connection(&mut self, connection: ConnectionId, out: &mut Outbox) {
        self.close_connection_unsaved(connection, out);
        let _ = self.sync_topology();
    }

    /// Cancels the channel's consumers and requeues its unacked messages, in
    /// delivery order, each to its original position.
    pub fn close_channel(&mut self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        self.close_channel_unsaved(connection, channel, out);
        let _ = self.sync_topology();
    }

    /// `basic.cancel`; returns whether the consumer existed.
    pub fn cancel(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        consumer_tag: &str,
        out: &mut Outbox,
    ) -> bool {
        let existed = self.cancel_unsaved(connection, channel, consumer_tag, out);
        let _ = self.sync_topology();
        existed
    }

    /// Writes everything pending and marks the shutdown clean. Persistent
    /// messages still with consumers are marked returned first, so that
    /// after the restart they come back redelivered.
    pub fn close_store(&mut self) -> Result<(), StoreError> {
        if let Some(store) = &self.store {
            for connection in self.connections.values() {
                for channel in connection.channels.values() {
                    for unacked in channel.lock().unacked.values() {
                        super::delivery::mark_returned(&store.log, unacked.queue, unacked.stored);
                    }
                }
            }
        }
        match self.store.take() {
            Some(store) => {
                store.topology.close();
                store.log.close()
            }
            None => Ok(()),
        }
    }

    /// Drops the store the way a crash would: nothing pending is written
    /// and no clean-shutdown marker is left. Only tests have a use for this.
    pub fn abandon_store(&mut self) {
        if let Some(store) = self.store.take() {
            store.topology.abandon();
            store.log.abandon();
        }
    }

    pub fn message_log(&self) -> Option<&MessageLog> {
        self.store.as_ref().map(|store| &store.log)
    }

    /// From now on the caller runs the store's slow work on a thread of
    /// its own, off the broker's locks: it reads paged-out messages back ahead of
    /// the consumers (`Effect::ReadAhead`, answered with
    /// `install_read_ahead`) and runs the discards of purged and deleted
    /// queues (`Effect::Discard`).
    pub fn enable_store_worker(&mut self) {
        self.store_worker = true;
    }

    /// Puts the messages a read-ahead brought back in place, each as
    /// `(sequence, message, arrival time)`; a queue gone meanwhile, or a
    /// message taken meanwhile, is passed over.
    pub fn install_read_ahead(
        &self,
        queue: QueueId,
        loaded: Vec<(Sequence, Message, Option<u64>)>,
    ) {
        let Some(mut queue) = self.queue(queue) else {
            return;
        };
        for (sequence, message, arrived_ms) in loaded {
            queue.install(sequence, message, arrived_ms);
        }
        queue.read_ahead_done();
    }

    /// Hands the durable changes the operation made to the journal; the
    /// ticket that makes them durable waits in `topology_ticket` for the
    /// caller. Nothing is written when nothing durable changed.
    pub(crate) fn sync_topology(&mut self) -> Result<(), BrokerError> {
        if self.topology_changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.topology_changes);
        let Some(store) = &self.store else {
            return Ok(());
        };
        let ticket = store.topology.record(changes).map_err(|error| {
            tracing::error!(%error, "could not save the durable topology");
            BrokerError::TopologyNotSaved(error.to_string())
        })?;
        self.topology_ticket = Some(ticket);
        Ok(())
    }

    /// The journal ticket the last operation's durable changes wait for, if
    /// it made any: its reply goes out once the journal reports it.
    pub fn take_topology_ticket(&mut self) -> Option<Ticket> {
        self.topology_ticket.take()
    }

    /// Blocks until the last operation's durable changes are on disk: what
    /// the server does, without blocking, before it replies. For tests and
    /// tools that drive the broker directly.
    pub fn wait_for_topology(&mut self) -> Result<(), StoreError> {
        match (self.topology_ticket.take(), &self.store) {
            (Some(ticket), Some(store)) => store.topology.wait_durable(ticket),
            _ => Ok(()),
        }
    }

    /// The last operation's ticket with a handle to wait for it outside
    /// the broker's locks; None when it changed nothing durable.
    pub fn take_topology_wait(&mut self) -> Option<(TopologyWaiter, Ticket)> {
        let ticket = self.topology_ticket.take()?;
        Some((self.store.as_ref()?.topology.waiter(), ticket))
    }
}
