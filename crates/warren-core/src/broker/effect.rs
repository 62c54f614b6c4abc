//! What an operation returns for others to carry out: deliveries and
//! notices for connections, slow store work for the store's worker.

use std::sync::Arc;

use amq_protocol::types::ShortString;

use crate::error::BrokerError;
use crate::queue::ReadAhead;
use crate::queue::discard::Discard;
use crate::session::channel::UnwrittenDeliveries;
use crate::{ConnectionId, Message};

/// A message handed to a consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub connection: ConnectionId,
    pub channel: u16,
    pub consumer_tag: ShortString,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// The channel's count of deliveries not yet on the wire, which the
    /// connection's writer lowers once it has written this one.
    pub unwritten: Arc<UnwrittenDeliveries>,
}

/// Something the broker decided that a connection, or the store's worker,
/// must carry out.
#[derive(Debug)]
pub enum Effect {
    Deliver(Delivery),
    /// The broker cancelled a consumer because its queue went away
    /// (`basic.cancel` sent by the server).
    CancelConsumer {
        connection: ConnectionId,
        channel: u16,
        consumer_tag: ShortString,
    },
    /// The broker closes a channel (a consumer timeout): the connection
    /// sends `channel.close` with this error and releases the channel.
    CloseChannel {
        connection: ConnectionId,
        channel: u16,
        error: BrokerError,
    },
    /// Read these paged-out messages back off the lock and hand them to
    /// `Broker::install_read_ahead` (only once `enable_store_worker` is on).
    ReadAhead(ReadAhead),
    /// Run this discard off the lock (only once `enable_store_worker` is
    /// on).
    Discard(Discard),
}

#[derive(Debug, Default)]
pub struct Outbox {
    pub effects: Vec<Effect>,
}

impl Outbox {
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}
