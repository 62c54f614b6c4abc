//! What an operation returns for others to carry out: deliveries and
//! notices for connections, slow store work for the store's worker.

use amq_protocol::types::ShortString;

use crate::ConnectionId;
use crate::error::BrokerError;
use crate::queue::ReadAhead;
use crate::queue::dead_letter::DeadLetter;
use crate::queue::discard::Discard;
pub use crate::session::channel::{Delivery, DeliverySink};

/// Something the broker decided that a connection, or the store's worker,
/// must carry out.
#[derive(Debug)]
pub enum Effect {
    /// A delivery to a channel without a `DeliverySink` (the state
    /// machine's own tests).
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
    /// Messages on their way to a dead-letter exchange: the operation
    /// that made them routes them before it ends (see `deliver_all`), in
    /// the order they died.
    pub(crate) dead_letters: Vec<DeadLetter>,
}

impl Outbox {
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}
