//! Direct sessions: the HTTP side's way into the broker, in process.
//!
//! A direct session is a connection without a socket, as RabbitMQ's
//! management plugin opens direct connections. The hub registers it like
//! any connection: it is listed, counts toward its user's connection limit,
//! and what it holds (consumers, unacknowledged deliveries, exclusive
//! queues) is released when it is dropped. Its methods go through the same
//! `Session` code that an AMQP channel's frames go through, so permissions,
//! error codes, durable `*-ok`s and publisher confirms are the same. Nothing
//! is encoded: methods go in as values and replies and deliveries come back
//! as values.
//!
//! A direct session has one channel. Its user has already proved who they
//! are to the HTTP side, so opening one checks the vhost and the user's
//! connection limit, not a password.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic, channel, confirm};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;
use tokio::sync::watch;
use warren_access::{Grant, VhostRefusal};
use warren_core::{Delivery, ErrorCode, Message};
use warren_proto::Frame;

use crate::config::AmqpConfig;
use crate::error::AmqpError;
use crate::hub::{ConnectionInfo, ConnectionNotice, SharedHub, wall_clock_ms};
use crate::mailbox::Mailbox;
use crate::session::{FLOW_POLL_INTERVAL, Fault, Session, shutdown_fault};
use crate::storage::StorageSignals;
use crate::writer::{Outbound, OutboundReceiver, direct_queue};

/// The one channel of a direct session.
const DIRECT_CHANNEL: u16 = 1;

/// Class id of `basic`, the only class that carries content.
const CLASS_BASIC: u16 = 60;

/// Opens direct sessions; cheap to clone.
#[derive(Clone)]
pub struct DirectConnector {
    config: Arc<AmqpConfig>,
    hub: SharedHub,
    signals: StorageSignals,
    shutdown: watch::Receiver<bool>,
}

/// Why a direct session was not opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("vhost '{0}' not found")]
    VhostNotFound(String),
    /// No permissions in the vhost, or the user's connection limit.
    #[error("{0}")]
    Refused(String),
}

/// Who opens a direct session, and from where, for the connection list.
#[derive(Debug, Clone, Copy)]
pub struct DirectLogin<'a> {
    /// A user the caller has authenticated.
    pub user: &'a str,
    pub vhost: &'a str,
    /// The address the request came from.
    pub peer: SocketAddr,
    /// The address it came in on.
    pub local: SocketAddr,
    /// The connection's name in the management API.
    pub name: &'a str,
}

/// The answer to a method that has one.
#[derive(Debug)]
pub enum Reply {
    Method(AMQPClass),
    /// `basic.get-ok` and its message.
    WithContent(AMQPClass, Arc<Message>),
}

/// What reaches a direct session's consumers.
#[derive(Debug)]
pub enum Event {
    Delivery(Delivery),
    /// The broker cancelled this consumer (its queue was deleted).
    Cancelled {
        consumer_tag: ShortString,
    },
}

/// The broker's verdict on one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The message is safe; `returned` when no queue took it (mandatory).
    Ack { returned: bool },
    /// The broker refused it (a full queue with `reject-publish`, a failed
    /// store).
    Nack,
}

/// Publisher confirms as a direct session sees them.
#[derive(Debug, Default)]
struct Confirms {
    selected: bool,
    /// Sequence number of the last publish.
    published: u64,
    /// Every publish up to here is acknowledged unless nacked.
    acked_up_to: u64,
    nacked: BTreeSet<u64>,
    returned: BTreeSet<u64>,
}

impl Confirms {
    fn verdict(&self, sequence: u64) -> Option<Confirmation> {
        if self.nacked.contains(&sequence) {
            Some(Confirmation::Nack)
        } else if sequence <= self.acked_up_to {
            Some(Confirmation::Ack {
                returned: self.returned.contains(&sequence),
            })
        } else {
            None
        }
    }
}

impl DirectConnector {
    pub(crate) fn new(
        config: Arc<AmqpConfig>,
        hub: SharedHub,
        signals: StorageSignals,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            config,
            hub,
            signals,
            shutdown,
        }
    }

    /// Opens a session as `login.user` in `login.vhost`, with its channel
    /// open.
    pub fn open(&self, login: DirectLogin<'_>) -> Result<DirectSession, OpenError> {
        let DirectLogin {
            user,
            vhost,
            peer,
            local,
            name,
        } = login;
        self.config
            .access
            .open_vhost(user, vhost)
            .map_err(|refusal| match refusal {
                VhostRefusal::NotFound(vhost) => OpenError::VhostNotFound(vhost),
                refusal => OpenError::Refused(refusal.to_string()),
            })?;
        let (out, received) = direct_queue();
        let notices = Mailbox::new();
        let id = {
            let mut hub = self.hub.lock();
            let user_connections_max = self.config.connections_per_user_max;
            if hub.connections_of_user(user) >= user_connections_max {
                return Err(OpenError::Refused(format!(
                    "Connection refused for user '{user}'. User connection limit \
                     ({user_connections_max}) is reached"
                )));
            }
            let id = hub.allocate_connection_id();
            hub.broker.add_vhost(vhost);
            hub.broker.open_connection(id, vhost, true);
            let mut client_properties = FieldTable::default();
            client_properties.insert("connection_name".into(), AMQPValue::LongString(name.into()));
            client_properties.insert(
                "product".into(),
                AMQPValue::LongString("Warren HTTP API".into()),
            );
            let info = ConnectionInfo {
                id,
                peer,
                local,
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                client_properties,
                connected_at_ms: wall_clock_ms(),
                channel_max: 1,
                frame_max_bytes: self.config.frame_max_bytes,
                heartbeat_s: 0,
                direct: true,
            };
            hub.register_connection(info, out.clone(), notices.clone());
            id
        };
        let mut session = Session::new(
            id,
            Arc::clone(&self.config),
            self.hub.clone(),
            out,
            self.signals.clone(),
            self.shutdown.clone(),
        );
        session.user = user.to_owned();
        session.grant = Some(Grant::new(Arc::clone(&self.config.access), user, vhost));
        let mut direct = DirectSession {
            session,
            received,
            batch: VecDeque::new(),
            replies: VecDeque::new(),
            events: VecDeque::new(),
            notices,
            notices_taken: VecDeque::new(),
            failed: None,
            confirms: Confirms::default(),
        };
        let opened = direct.feed(Frame::Method(
            DIRECT_CHANNEL,
            Box::new(AMQPClass::Channel(channel::AMQPMethod::Open(
                channel::Open {},
            ))),
        ));
        direct.take();
        direct.replies.clear();
        match opened {
            Ok(()) => Ok(direct),
            Err(error) => Err(OpenError::Refused(error.text)),
        }
    }
}

/// One in-process session with one channel; closing it (dropping it)
/// releases what it holds, as a closed connection does.
pub struct DirectSession {
    session: Session,
    received: OutboundReceiver,
    /// Taken from the queue and not looked at yet.
    batch: VecDeque<Outbound>,
    replies: VecDeque<Reply>,
    /// Deliveries and cancels not yet taken; at most the channel's limit of
    /// unwritten deliveries (`Limits::deliveries_unwritten_per_channel_max`).
    events: VecDeque<Event>,
    notices: Mailbox<ConnectionNotice>,
    notices_taken: VecDeque<ConnectionNotice>,
    /// The broker closed the channel (or the session): every later call
    /// fails with this.
    failed: Option<AmqpError>,
    confirms: Confirms,
}

impl DirectSession {
    /// Sends a method that has a reply and waits for it. A refusal closes
    /// the channel, as for an AMQP client, and is returned here.
    pub async fn call(&mut self, method: AMQPClass) -> Result<Reply, AmqpError> {
        self.feed(Frame::Method(DIRECT_CHANNEL, Box::new(method)))?;
        self.settle_held_replies().await?;
        loop {
            self.take();
            if let Some(reply) = self.replies.pop_front() {
                return Ok(reply);
            }
            self.check()?;
            self.wait(true).await?;
        }
    }

    /// Sends a method that has no reply (an ack, a nack, a reject).
    pub fn send(&mut self, method: AMQPClass) -> Result<(), AmqpError> {
        self.feed(Frame::Method(DIRECT_CHANNEL, Box::new(method)))?;
        self.take();
        self.check()
    }

    /// `basic.qos` for this session's consumers.
    pub async fn qos(&mut self, prefetch_count: u16) -> Result<(), AmqpError> {
        self.feed(Frame::BasicQos {
            channel: DIRECT_CHANNEL,
            prefetch_size: 0,
            prefetch_count,
            global: false,
        })?;
        loop {
            self.take();
            if self.replies.pop_front().is_some() {
                return Ok(());
            }
            self.check()?;
            self.wait(false).await?;
        }
    }

    /// Publishes with a publisher confirm, returning the publish's sequence
    /// number for `confirmation`. The session turns confirms on first.
    pub async fn publish(
        &mut self,
        publish: basic::Publish,
        properties: BasicProperties,
        body: Bytes,
    ) -> Result<u64, AmqpError> {
        if !self.confirms.selected {
            let select = confirm::Select { nowait: false };
            self.call(AMQPClass::Confirm(confirm::AMQPMethod::Select(select)))
                .await?;
            self.confirms.selected = true;
        }
        self.confirms.published += 1;
        let body_size = body.len() as u64;
        self.feed(Frame::Method(
            DIRECT_CHANNEL,
            Box::new(AMQPClass::Basic(basic::AMQPMethod::Publish(publish))),
        ))?;
        self.feed(Frame::Header {
            channel: DIRECT_CHANNEL,
            class_id: CLASS_BASIC,
            body_size,
            properties: Box::new(properties),
        })?;
        if body_size > 0 {
            self.feed(Frame::Body(DIRECT_CHANNEL, body))?;
        }
        // A return is queued while the publish is handled, so it is taken
        // now, while it can only be this publish's.
        self.take();
        self.check()?;
        Ok(self.confirms.published)
    }

    /// Waits for the broker's verdict on publish `sequence`: it comes once
    /// the message is durable (or needed no disk), as for any publisher.
    pub async fn confirmation(&mut self, sequence: u64) -> Result<Confirmation, AmqpError> {
        loop {
            self.session.process_confirms();
            self.take();
            if let Some(verdict) = self.confirms.verdict(sequence) {
                return Ok(verdict);
            }
            self.check()?;
            self.wait(true).await?;
        }
    }

    /// The next delivery to this session's consumers, or word that the
    /// broker cancelled one.
    pub async fn next_event(&mut self) -> Result<Event, AmqpError> {
        loop {
            self.take();
            if let Some(event) = self.events.pop_front() {
                // Taking a delivery is what writing it is for a socket.
                if let Event::Delivery(delivery) = &event
                    && delivery.unwritten.written(1)
                {
                    self.session
                        .hub
                        .lock()
                        .resume_deliveries(self.session.id, delivery.channel);
                }
                return Ok(event);
            }
            self.check()?;
            self.wait(self.session.confirms_waiting_max() > 0).await?;
        }
    }

    fn check(&self) -> Result<(), AmqpError> {
        match &self.failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Hands one frame to the session.
    fn feed(&mut self, frame: Frame) -> Result<(), AmqpError> {
        self.check()?;
        match self.session.handle_channel_frame(frame) {
            Ok(()) => Ok(()),
            Err(fault) => {
                let error = fault_error(fault);
                self.failed = Some(error.clone());
                Err(error)
            }
        }
    }

    /// Sends the replies a durable change held back once the topology
    /// journal has it, as an AMQP connection does before reading on.
    async fn settle_held_replies(&mut self) -> Result<(), AmqpError> {
        if let Some(held) = self.session.held_replies.get_mut().take() {
            let released = self.session.release_held_replies(held).await;
            released.map_err(|fault| self.fail(fault))?;
        }
        if let Some((channel, ticket)) = self.session.commit_waiting.take() {
            let committed = self.session.finish_commit(channel, ticket).await;
            committed.map_err(|fault| self.fail(fault))?;
        }
        Ok(())
    }

    fn fail(&mut self, fault: Fault) -> AmqpError {
        let error = fault_error(fault);
        self.failed = Some(error.clone());
        error
    }

    /// Waits for something to look at: an item on the queue, a notice, the
    /// log's progress (when `durable`), or the next look at a queue that
    /// holds this publisher back.
    async fn wait(&mut self, durable: bool) -> Result<(), AmqpError> {
        let flow_held = self.session.confirms_held.is_some();
        tokio::select! {
            () = self.received.ready() => Ok(()),
            () = self.notices.ready() => {
                self.handle_notices();
                Ok(())
            }
            changed = self.session.signals.durable.changed(), if durable => match changed {
                Ok(()) => Ok(()),
                Err(_) => Err(self.fail(shutdown_fault())),
            },
            () = tokio::time::sleep(FLOW_POLL_INTERVAL), if flow_held => Ok(()),
            _ = self.session.shutdown.changed() => Err(self.fail(shutdown_fault())),
        }
    }

    fn handle_notices(&mut self) {
        self.notices.take_all(&mut self.notices_taken);
        while let Some(notice) = self.notices_taken.pop_front() {
            match notice {
                ConnectionNotice::CloseChannel { channel, error } => {
                    self.session.close_channel_by_broker(channel, error);
                }
                ConnectionNotice::Close { reason } => {
                    self.failed = Some(AmqpError::new(ErrorCode::ConnectionForced, reason));
                }
            }
        }
    }

    /// Takes what the broker queued for this session and sorts it: replies,
    /// confirms, consumer events, and a channel closed by the broker.
    fn take(&mut self) {
        self.received.take_all(&mut self.batch);
        while let Some(item) = self.batch.pop_front() {
            self.absorb(item);
        }
    }

    fn absorb(&mut self, item: Outbound) {
        match item {
            // Counted as written once the caller takes it (`next_event`),
            // so the channel's unwritten limit bounds what waits here.
            Outbound::Deliver(delivery) => self.events.push_back(Event::Delivery(delivery)),
            Outbound::Method(_, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))) => {
                if ack.multiple {
                    self.confirms.acked_up_to = self.confirms.acked_up_to.max(ack.delivery_tag);
                } else if ack.delivery_tag == self.confirms.acked_up_to + 1 {
                    self.confirms.acked_up_to = ack.delivery_tag;
                }
            }
            Outbound::Method(_, AMQPClass::Basic(basic::AMQPMethod::Nack(nack))) => {
                self.confirms.nacked.insert(nack.delivery_tag);
            }
            Outbound::Method(_, AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel))) => {
                self.events.push_back(Event::Cancelled {
                    consumer_tag: cancel.consumer_tag,
                });
            }
            Outbound::Method(number, AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                let code = ErrorCode::from_reply_code(close.reply_code)
                    .unwrap_or(ErrorCode::InternalError);
                let text = close.reply_text.as_str();
                let text = text
                    .strip_prefix(code.name())
                    .and_then(|rest| rest.strip_prefix(" - "))
                    .unwrap_or(text);
                self.failed = Some(AmqpError::new(code, text));
                // The closing handshake's end, so that the session forgets
                // the channel.
                let close_ok =
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}));
                let _ = self
                    .session
                    .handle_channel_frame(Frame::Method(number, Box::new(close_ok)));
            }
            Outbound::Method(_, method) => self.replies.push_back(Reply::Method(method)),
            Outbound::WithContent(_, AMQPClass::Basic(basic::AMQPMethod::Return(_)), _) => {
                self.confirms.returned.insert(self.confirms.published);
            }
            Outbound::WithContent(_, method, message) => {
                self.replies.push_back(Reply::WithContent(method, message));
            }
            Outbound::ProtocolHeader | Outbound::Close => {}
        }
    }
}

impl Drop for DirectSession {
    fn drop(&mut self) {
        self.session.hub.lock().remove_connection(self.session.id);
    }
}

fn fault_error(fault: Fault) -> AmqpError {
    match fault {
        Fault::Connection { error, .. } => error,
        Fault::Gone | Fault::ClosedByClient => {
            AmqpError::new(ErrorCode::ConnectionForced, "the session is closed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nack_wins_over_a_later_multiple_ack() {
        let mut confirms = Confirms {
            acked_up_to: 5,
            ..Confirms::default()
        };
        confirms.nacked.insert(3);
        confirms.returned.insert(4);
        assert_eq!(confirms.verdict(3), Some(Confirmation::Nack));
        assert_eq!(
            confirms.verdict(4),
            Some(Confirmation::Ack { returned: true })
        );
        assert_eq!(
            confirms.verdict(5),
            Some(Confirmation::Ack { returned: false })
        );
        assert_eq!(confirms.verdict(6), None);
    }
}
