//! The bounds on what one client may make the broker hold.

/// The default for `Limits::flow_ready_max`: far under what a queue holds
/// in memory (`RESIDENT_MESSAGES_MAX`), so a queue whose consumers keep up
/// delivers from memory, and a message waits behind about a millisecond of
/// its consumers' work.
pub const FLOW_READY_MAX_DEFAULT: usize = 100;

/// Bounds on what one channel may hold; each exists so that one peer cannot
/// grow the broker's memory without limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Consumers one channel may hold.
    pub consumers_per_channel_max: usize,
    /// Unacknowledged deliveries one channel may hold, whatever its prefetch:
    /// a consumer with prefetch 0 stops receiving at this many.
    pub unacked_per_channel_max: usize,
    /// Deliveries handed to a connection's writer but not yet written to its
    /// socket. A consumer that does not read its socket stops receiving here
    /// instead of making the broker buffer its whole queue.
    pub deliveries_unwritten_per_channel_max: u32,
    /// Ready messages in a queue with consumers past which publishers to it
    /// are held back until it is down to half (see `queue/flow.rs`); 0 turns flow
    /// control off.
    pub flow_ready_max: usize,
    /// Queues one vhost may hold, so that one tenant cannot exhaust the
    /// broker's memory with declarations; RabbitMQ's `max-queues` vhost
    /// limit, on by default here.
    pub queues_per_vhost_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            consumers_per_channel_max: 1_000,
            unacked_per_channel_max: 100_000,
            deliveries_unwritten_per_channel_max: 2_048,
            flow_ready_max: FLOW_READY_MAX_DEFAULT,
            queues_per_vhost_max: 100_000,
        }
    }
}
