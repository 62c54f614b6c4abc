//! Connections and channels as the broker sees them: opening, closing
//! (which requeues unacked deliveries and deletes exclusive queues),
//! prefetch and publishing mode.

use std::collections::HashMap;

use super::Broker;
use super::delivery::{Settled, Settling};
use super::effect::Outbox;
use crate::ConnectionId;
use crate::session::ConnectionState;
use crate::session::channel::{Channel, ChannelMode};

impl Broker {
    pub fn open_connection(&mut self, connection: ConnectionId, vhost: &str, cancel_notify: bool) {
        debug_assert!(self.vhost_exists(vhost));
        self.connections.insert(
            connection,
            ConnectionState {
                vhost: vhost.to_owned(),
                channels: HashMap::new(),
                exclusive_queues: Vec::new(),
                cancel_notify,
            },
        );
    }

    /// Releases everything the connection held: its channels' unacked
    /// messages go back to their queues and its exclusive queues are deleted.
    pub(crate) fn close_connection_unsaved(&mut self, connection: ConnectionId, out: &mut Outbox) {
        let channels: Vec<u16> = match self.connections.get(&connection) {
            Some(state) => state.channels.keys().copied().collect(),
            None => return,
        };
        for channel in channels {
            self.close_channel_unsaved(connection, channel, out);
        }
        if let Some(state) = self.connections.remove(&connection) {
            for queue in state.exclusive_queues {
                self.delete_queue_by_id(queue, out);
            }
        }
    }

    pub fn open_channel(&mut self, connection: ConnectionId, channel: u16) {
        if let Some(state) = self.connections.get_mut(&connection) {
            state.channels.insert(channel, Channel::default());
        }
    }

    /// Cancels the channel's consumers and requeues its unacked messages, in
    /// delivery order, each to its original position.
    pub(crate) fn close_channel_unsaved(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        out: &mut Outbox,
    ) {
        let Some(state) = self
            .connections
            .get_mut(&connection)
            .and_then(|state| state.channels.remove(&channel))
        else {
            return;
        };
        let mut touched = Vec::new();
        for (tag, queue) in state.consumers {
            self.detach_consumer(queue, connection, channel, tag.as_str(), out);
            touched.push(queue);
        }
        self.settle_deliveries(
            connection,
            channel,
            Settling::Many(state.unacked),
            Settled::Requeue,
            out,
        );
        self.deliver_all(&touched, out);
    }

    /// Notes `confirm.select` or `tx.select`, which the management API shows.
    pub fn set_channel_mode(&mut self, connection: ConnectionId, channel: u16, mode: ChannelMode) {
        if let Some(state) = self.channel_mut(connection, channel) {
            state.mode = mode;
        }
    }

    /// `basic.qos` (prefetch_size has been checked by the caller).
    pub fn set_prefetch(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        prefetch_count: u16,
        global: bool,
        out: &mut Outbox,
    ) {
        if let Some(state) = self.channel_mut(connection, channel) {
            if global {
                state.global_prefetch = prefetch_count;
            } else {
                state.consumer_prefetch = prefetch_count;
            }
        }
        self.deliver_to_channel(connection, channel, out);
    }

    /// The writer has put `count` deliveries of this channel on the wire
    /// (what a writer does through `UnwrittenDeliveries::written` and
    /// `resume_deliveries`, in one call).
    pub fn deliveries_written(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        count: u32,
        out: &mut Outbox,
    ) {
        let Some(state) = self.channel_mut(connection, channel) else {
            return;
        };
        if state.unwritten.written(count) {
            self.resume_deliveries(connection, channel, out);
        }
    }

    /// Delivers to a channel the broker had stopped delivering to because
    /// its writer was behind.
    pub fn resume_deliveries(&mut self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        self.deliver_to_channel(connection, channel, out);
    }
}
