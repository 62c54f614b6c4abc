//! A published message as the broker holds it: immutable and shared, so a
//! message routed to ten queues is stored once.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::ShortString;
use bytes::Bytes;

#[derive(Debug)]
pub struct Message {
    /// The exchange it was published to, reported to consumers on delivery.
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
    pub body: Bytes,
}

impl Message {
    /// Whether the publisher asked for the message to survive a restart
    /// (delivery_mode 2).
    pub fn is_persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }

    pub fn body_size_bytes(&self) -> usize {
        self.body.len()
    }
}
