//! The broker's side of client sessions: each open connection's vhost,
//! channels and exclusive queues. A connection's socket, framing and
//! handshake are the server's; what the broker keeps is only what its
//! operations need.

pub(crate) mod channel;

use std::collections::HashMap;

use crate::QueueId;
use channel::Channel;

/// One open connection, as the broker knows it.
pub(crate) struct ConnectionState {
    pub(crate) vhost: String,
    pub(crate) channels: HashMap<u16, Channel>,
    pub(crate) exclusive_queues: Vec<QueueId>,
    /// Whether the client understands a server-sent `basic.cancel`.
    pub(crate) cancel_notify: bool,
}
