//! The broker and the connections' writers behind one lock.
//!
//! An operation locks the hub, calls the broker, queues its own reply and
//! the broker's effects onto the writers, and unlocks. Queueing while still
//! holding the lock is what keeps, for example, a `basic.consume-ok` ahead of
//! the first delivery to that consumer when another connection publishes at
//! the same moment.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, basic};
use parking_lot::Mutex;
use warren_core::{Broker, ConnectionId, Effect, Outbox};

use crate::writer::{Outbound, OutboundQueue};

pub type SharedHub = Arc<Mutex<Hub>>;

pub struct Hub {
    pub broker: Broker,
    writers: HashMap<ConnectionId, OutboundQueue>,
    next_connection: u64,
}

impl Hub {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            writers: HashMap::new(),
            next_connection: 0,
        }
    }

    pub fn allocate_connection_id(&mut self) -> ConnectionId {
        self.next_connection += 1;
        ConnectionId(self.next_connection)
    }

    pub fn register_writer(&mut self, connection: ConnectionId, writer: OutboundQueue) {
        self.writers.insert(connection, writer);
    }

    /// Forgets a connection and releases what it held in the broker.
    pub fn remove_connection(&mut self, connection: ConnectionId) {
        self.writers.remove(&connection);
        let mut out = Outbox::default();
        self.broker.close_connection(connection, &mut out);
        self.dispatch(&mut out);
    }

    /// Hands each effect to the writer of the connection it concerns.
    pub fn dispatch(&mut self, out: &mut Outbox) {
        for effect in out.effects.drain(..) {
            match effect {
                Effect::Deliver(delivery) => {
                    if let Some(writer) = self.writers.get(&delivery.connection) {
                        writer.send(Outbound::Deliver(delivery));
                    }
                }
                Effect::CancelConsumer {
                    connection,
                    channel,
                    consumer_tag,
                } => {
                    if let Some(writer) = self.writers.get(&connection) {
                        writer.method(
                            channel,
                            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                                consumer_tag,
                                nowait: true,
                            })),
                        );
                    }
                }
            }
        }
    }

    pub fn deliveries_written(&mut self, connection: ConnectionId, channel: u16, count: u32) {
        let mut out = Outbox::default();
        self.broker
            .deliveries_written(connection, channel, count, &mut out);
        self.dispatch(&mut out);
    }
}
