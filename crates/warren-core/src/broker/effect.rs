//! What an operation returns for others to carry out: deliveries and
//! notices for connections, slow store work for the store's worker.

use amq_protocol::types::ShortString;

use crate::error::BrokerError;
use crate::queue::ReadAhead;
use crate::queue::discard::Discard;
pub use crate::session::channel::{Delivery, DeliverySink};
use crate::{ConnectionId, QueueId};

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
    /// Read these paged-out messages back off the broker's locks and hand them to
    /// `Broker::install_read_ahead` (only once `enable_store_worker` is on).
    ReadAhead(ReadAhead),
    /// Run this discard off the broker's locks (only once `enable_store_worker` is
    /// on).
    Discard(Discard),
}

#[derive(Debug, Default)]
pub struct Outbox {
    pub effects: Vec<Effect>,
    /// Queues the operation left dead letters in: it routes them before
    /// it ends (see `deliver_all`).
    pub(crate) dead_letter_sources: Vec<QueueId>,
}

impl Outbox {
    pub fn take(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }
}
