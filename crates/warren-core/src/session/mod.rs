//! The broker's side of client sessions: each open connection's vhost,
//! channels and exclusive queues. A connection's socket, framing and
//! handshake are the server's; what the broker keeps is only what its
//! operations need.

pub(crate) mod channel;

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::QueueId;
use channel::Channel;

/// One open connection, as the broker knows it.
pub(crate) struct ConnectionState {
    pub(crate) vhost: String,
    /// Each channel behind its own lock: deliveries from several queues
    /// reach it at once.
    pub(crate) channels: HashMap<u16, Mutex<Channel>>,
    pub(crate) exclusive_queues: Vec<QueueId>,
    /// Whether the client understands a server-sent `basic.cancel`.
    pub(crate) cancel_notify: bool,
}
