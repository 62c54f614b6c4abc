//! Connections and channels as the broker sees them: opening, closing
//! (which requeues unacked deliveries and deletes exclusive queues),
//! prefetch and publishing mode.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::Broker;
use super::delivery::{Settled, Settling};
use super::effect::Outbox;
use crate::ConnectionId;
use crate::session::ConnectionState;
use crate::session::channel::{Channel, ChannelMode, DeliverySink};

impl Broker {
    pub fn open_connection(&mut self, connection: ConnectionId, vhost: &str, cancel_notify: bool) {
        debug_assert!(self.vhost_exists(vhost));
        self.lifecycle.connections_opened += 1;
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
            self.lifecycle.connections_closed += 1;
            for queue in state.exclusive_queues {
                self.delete_queue_by_id(queue, out);
            }
        }
    }

    /// Opens a channel whose deliveries come back in operations' outboxes.
    pub fn open_channel(&mut self, connection: ConnectionId, channel: u16) {
        self.open_channel_with(connection, channel, None);
    }

    /// Opens a channel whose deliveries go to `sink` as they are made.
    pub fn open_channel_with(
        &mut self,
        connection: ConnectionId,
        channel: u16,
        sink: Option<Arc<dyn DeliverySink>>,
    ) {
        if let Some(state) = self.connections.get_mut(&connection) {
            self.lifecycle.channels_opened += 1;
            state.channels.insert(
                channel,
                Mutex::new(Channel {
                    sink,
                    ..Channel::default()
                }),
            );
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
            .map(Mutex::into_inner)
        else {
            return;
        };
        self.lifecycle.channels_closed += 1;
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
        &self,
        connection: ConnectionId,
        channel: u16,
        count: u32,
        out: &mut Outbox,
    ) {
        let Some(state) = self.channel(connection, channel) else {
            return;
        };
        let resume = state.unwritten.written(count);
        drop(state);
        if resume {
            self.resume_deliveries(connection, channel, out);
        }
    }

    /// Delivers to a channel the broker had stopped delivering to because
    /// its writer was behind.
    pub fn resume_deliveries(&self, connection: ConnectionId, channel: u16, out: &mut Outbox) {
        self.deliver_to_channel(connection, channel, out);
    }
}
