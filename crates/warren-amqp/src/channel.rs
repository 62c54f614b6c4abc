//! Channel methods: content assembly, publisher confirms, transactions, and
//! the mapping from AMQP methods to broker operations and back.

use std::collections::VecDeque;
use std::sync::Arc;

use amq_protocol::protocol::{
    AMQPClass, BasicProperties, basic, channel, confirm, exchange, queue, tx,
};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};
use tracing::warn;
use warren_access::{Access, Resource};
use warren_core::{
    ChannelMode, Consume, DeliverySink, ErrorCode, ExchangeDeclare, FlowGauge, Message, Outbox,
    QueueDeclare,
};
use warren_proto::Frame;
use warren_store::Ticket;

use crate::authorize;
use crate::error::{AmqpError, AmqpResult};
use crate::hub::PublisherMark;
use crate::session::{
    FLOW_PAUSE_MAX, Fault, FlowHold, HeldReplies, Session, describe_frame, method_name,
};
use crate::writer::{ChannelSink, Outbound, OutboundQueue};

/// Class id of `basic`, the only class that carries content.
const CLASS_BASIC: u16 = 60;

/// A message being received: `basic.publish`, then a content header, then
/// body frames until the declared size is reached.
enum Content {
    Idle,
    AwaitingHeader(basic::Publish),
    AwaitingBody {
        publish: basic::Publish,
        properties: Box<BasicProperties>,
        body_size: usize,
        /// The body so far, in one buffer sized for the whole body when
        /// its first frame arrives: a body that spans frames is copied
        /// once, from the read buffer, and never joined afterwards.
        received: BytesMut,
    },
}

/// An ack, nack or reject held by a transaction until commit.
enum Settle {
    Ack {
        delivery_tag: u64,
        multiple: bool,
    },
    Reject {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

#[derive(Default)]
struct Transaction {
    publishes: Vec<(bool, Arc<Message>)>,
    settles: Vec<Settle>,
}

/// What a confirm waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfirmWait {
    /// Nothing: the message was not written to the log.
    Nothing,
    /// The log's durable ticket reaching this.
    Durable(Ticket),
    /// The log refused the message: it gets a nack.
    Refused,
}

struct Confirms {
    /// Sequence number of the last publish on this channel.
    published: u64,
    /// Publishes not yet confirmed, in order. Confirms go out in publish
    /// order, so a transient publish behind a persistent one waits for it.
    waiting: VecDeque<(u64, ConfirmWait)>,
}

pub(crate) struct Channel {
    /// The broker sent `channel.close` and waits for `close-ok`.
    closing: bool,
    content: Content,
    confirms: Option<Confirms>,
    transaction: Option<Transaction>,
    /// The queue named by this channel's last `queue.declare-ok`, which an
    /// empty queue name stands for (see `expand_queue_shortcut`).
    last_declared_queue: Option<ShortString>,
    /// Where the broker puts this channel's deliveries.
    sink: Arc<ChannelSink>,
    /// Set once it publishes: a publisher until it closes.
    publisher: Option<PublisherMark>,
}

impl Channel {
    fn new(out: &OutboundQueue) -> Self {
        Self {
            closing: false,
            content: Content::Idle,
            confirms: None,
            transaction: None,
            last_declared_queue: None,
            sink: ChannelSink::new(out),
            publisher: None,
        }
    }
}

fn basic(method: basic::AMQPMethod) -> AMQPClass {
    AMQPClass::Basic(method)
}

/// AMQP 0-9-1's shortcut: in `queue.bind`, `queue.unbind`, `queue.purge`,
/// `queue.delete`, `basic.consume` and `basic.get`, an empty queue name
/// means the queue last declared on the channel (and in the bindings an
/// empty routing key with it means that queue's name too). With no queue
/// declared yet the method fails with 404, as in RabbitMQ. Done before the
/// permission checks, which then see the real name.
fn expand_queue_shortcut(
    method: &mut AMQPClass,
    last_declared: Option<&ShortString>,
) -> AmqpResult<()> {
    let (queue, routing_key) = match method {
        AMQPClass::Queue(queue::AMQPMethod::Bind(bind)) => {
            (&mut bind.queue, Some(&mut bind.routing_key))
        }
        AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => {
            (&mut unbind.queue, Some(&mut unbind.routing_key))
        }
        AMQPClass::Queue(queue::AMQPMethod::Purge(purge)) => (&mut purge.queue, None),
        AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => (&mut delete.queue, None),
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => (&mut consume.queue, None),
        AMQPClass::Basic(basic::AMQPMethod::Get(get)) => (&mut get.queue, None),
        _ => return Ok(()),
    };
    if !queue.as_str().is_empty() {
        return Ok(());
    }
    let last_declared =
        last_declared.ok_or_else(|| AmqpError::not_found("no previously declared queue"))?;
    if let Some(routing_key) = routing_key
        && routing_key.as_str().is_empty()
    {
        *routing_key = last_declared.clone();
    }
    *queue = last_declared.clone();
    Ok(())
}

impl Session {
    pub(crate) fn handle_channel_frame(&mut self, frame: Frame) -> Result<(), Fault> {
        let number = frame.channel();
        if let Frame::Method(_, method) = &frame
            && let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = **method
        {
            return self.open_channel(number);
        }
        let Some(state) = self.channels.get_mut(&number) else {
            return Err(Fault::connection(AmqpError::new(
                ErrorCode::ChannelError,
                format!(
                    "expected 'channel.open' on channel {number}, got {}",
                    describe_frame(&frame)
                ),
            )));
        };
        if state.closing {
            // Only the end of the closing handshake matters now.
            if let Frame::Method(_, method) = &frame {
                match **method {
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                        self.channels.remove(&number);
                    }
                    AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                        self.out.method(
                            number,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        );
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        let (class_id, method_id) = match &frame {
            Frame::Method(_, method) => (method.get_amqp_class_id(), method.get_amqp_method_id()),
            Frame::BasicQos { .. } => (60, 10),
            _ => (60, 40),
        };
        let result = match frame {
            Frame::Method(_, method) => self.handle_method(number, *method),
            Frame::BasicQos {
                prefetch_size,
                prefetch_count,
                global,
                ..
            } => self.basic_qos(number, prefetch_size, prefetch_count, global),
            Frame::Header {
                class_id,
                body_size,
                properties,
                ..
            } => self.content_header(number, class_id, body_size, *properties),
            Frame::Body(_, payload) => self.content_body(number, payload),
            Frame::Heartbeat(_) => unreachable!("heartbeats are handled by the connection"),
        };
        match result {
            Ok(()) => Ok(()),
            Err(error) if error.code.is_connection_error() => Err(Fault::Connection {
                error,
                class_id,
                method_id,
            }),
            Err(error) => {
                self.close_channel_on_error(number, error, class_id, method_id);
                Ok(())
            }
        }
    }

    /// A content header the frame decoder refused (its `headers` table over
    /// the limit): the message is refused as one over the size limit is,
    /// by closing its channel with 406; the body frames that follow are
    /// dropped with the closing channel.
    pub(crate) fn refuse_content_header(
        &mut self,
        number: u16,
        error: AmqpError,
    ) -> Result<(), Fault> {
        match self.channels.get(&number) {
            None => Err(Fault::connection(AmqpError::new(
                ErrorCode::ChannelError,
                format!("expected 'channel.open' on channel {number}, got a content header"),
            ))),
            Some(state) if state.closing => Ok(()),
            Some(_) => {
                self.close_channel_on_error(number, error, CLASS_BASIC, 40);
                Ok(())
            }
        }
    }

    /// The sink of an open channel's deliveries.
    fn sink_of(&self, number: u16) -> Option<Arc<ChannelSink>> {
        self.channels
            .get(&number)
            .map(|channel| Arc::clone(&channel.sink))
    }

    fn open_channel(&mut self, number: u16) -> Result<(), Fault> {
        if number > self.channel_max {
            return Err(Fault::Connection {
                error: AmqpError::not_allowed(format!(
                    "channel number {number} exceeds the negotiated channel_max ({})",
                    self.channel_max
                )),
                class_id: 20,
                method_id: 10,
            });
        }
        if self.channels.contains_key(&number) {
            return Err(Fault::Connection {
                error: AmqpError::new(
                    ErrorCode::ChannelError,
                    format!("second 'channel.open' seen on channel {number}"),
                ),
                class_id: 20,
                method_id: 10,
            });
        }
        let channel = Channel::new(&self.out);
        let sink: Arc<dyn DeliverySink> = channel.sink.clone();
        self.channels.insert(number, channel);
        self.hub
            .lock()
            .broker
            .open_channel_with(self.id, number, Some(sink));
        self.out.method(
            number,
            AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
        );
        Ok(())
    }

    /// The broker closes a channel on its own (a consumer timeout), unless
    /// the client is already closing it.
    pub(crate) fn close_channel_by_broker(&mut self, number: u16, error: AmqpError) {
        if self
            .channels
            .get(&number)
            .is_some_and(|state| !state.closing)
        {
            tracing::warn!(connection = self.id.0, channel = number, error = %error.text,
                "closing channel");
            self.close_channel_on_error(number, error, 0, 0);
        }
    }

    /// A soft error: the channel's deliveries are released and the client is
    /// sent `channel.close`; the connection carries on.
    fn close_channel_on_error(
        &mut self,
        number: u16,
        error: AmqpError,
        class_id: u16,
        method_id: u16,
    ) {
        // Every refusal is logged with its reason, as RabbitMQ logs every
        // channel exception: an operator sees who was refused what.
        warn!(connection = self.id.0, channel = number, user = %self.user,
            code = error.code.reply_code(), reason = %error.text, "channel closed on error");
        self.process_confirms();
        {
            let mut hub = self.hub.lock();
            let mut outbox = Outbox::default();
            hub.broker.close_channel(self.id, number, &mut outbox);
            hub.dispatch(&mut outbox);
        }
        if let Some(state) = self.channels.get_mut(&number) {
            *state = Channel::new(&self.out);
            state.closing = true;
        }
        self.out.method(
            number,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: error.code.reply_code(),
                reply_text: ShortString::from(error.reply_text()),
                class_id,
                method_id,
            })),
        );
    }

    /// Sends the confirms that are due on every channel: acks (coalesced
    /// with `multiple`) for publishes that are durable or needed no disk,
    /// nacks for publishes the log refused or can no longer make durable.
    pub(crate) fn process_confirms(&mut self) {
        let mut budget = self.confirm_budget();
        let numbers: Vec<u16> = self.channels.keys().copied().collect();
        for number in numbers {
            self.settle_confirms(number, &mut budget);
        }
        if self.confirms_waiting_max() == 0 {
            self.confirms_held = None;
        }
    }

    /// A publish reached a queue whose consumers are behind: hold back
    /// this publisher (see `FlowHold`).
    fn hold_back(&mut self, number: u16, gauge: Arc<FlowGauge>) {
        if self.channel(number).confirms.is_none() {
            self.paused_by = Some(gauge);
        } else if self.confirms_held.is_none() {
            self.confirms_held = Some(FlowHold {
                gauge,
                until: tokio::time::Instant::now() + FLOW_PAUSE_MAX,
            });
        }
    }

    /// How many confirms may go out now: as many as the held-back queue has
    /// room for, or all once the hold is over.
    fn confirm_budget(&mut self) -> usize {
        let Some(hold) = &self.confirms_held else {
            return usize::MAX;
        };
        let room = if tokio::time::Instant::now() >= hold.until {
            None
        } else {
            hold.gauge.room(self.config.limits.flow_ready_max)
        };
        room.unwrap_or_else(|| {
            self.confirms_held = None;
            usize::MAX
        })
    }

    pub(crate) fn process_channel_confirms(&mut self, number: u16) {
        let mut unlimited = usize::MAX;
        self.settle_confirms(number, &mut unlimited);
    }

    /// Sends the confirms (acks and nacks) of this channel that are due, at
    /// most `budget` acks.
    fn settle_confirms(&mut self, number: u16, budget: &mut usize) {
        let progress = *self.signals.durable.borrow();
        let Some(confirms) = self
            .channels
            .get_mut(&number)
            .and_then(|state| state.confirms.as_mut())
        else {
            return;
        };
        let mut ack_up_to = None;
        let mut acked = 0;
        while let Some(&(sequence, wait)) = confirms.waiting.front() {
            if *budget == 0 {
                break;
            }
            let verdict = match wait {
                ConfirmWait::Nothing => Some(true),
                ConfirmWait::Durable(ticket) if ticket <= progress.ticket => Some(true),
                ConfirmWait::Durable(_) if progress.poisoned => Some(false),
                ConfirmWait::Durable(_) => None,
                ConfirmWait::Refused => Some(false),
            };
            match verdict {
                None => break,
                Some(true) => {
                    ack_up_to = Some(sequence);
                    acked += 1;
                    *budget -= 1;
                }
                Some(false) => {
                    if let Some(delivery_tag) = ack_up_to.take() {
                        self.out.method(
                            number,
                            basic(basic::AMQPMethod::Ack(basic::Ack {
                                delivery_tag,
                                multiple: true,
                            })),
                        );
                    }
                    self.out.method(
                        number,
                        basic(basic::AMQPMethod::Nack(basic::Nack {
                            delivery_tag: sequence,
                            multiple: false,
                            requeue: false,
                        })),
                    );
                }
            }
            confirms.waiting.pop_front();
        }
        if acked > 0 {
            self.hub.count_confirms(acked);
        }
        if let Some(delivery_tag) = ack_up_to {
            self.out.method(
                number,
                basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag,
                    multiple: true,
                })),
            );
        }
    }

    /// The most publishes waiting for a confirm on any one channel.
    pub(crate) fn confirms_waiting_max(&self) -> usize {
        self.channels
            .values()
            .filter_map(|state| state.confirms.as_ref())
            .map(|confirms| confirms.waiting.len())
            .max()
            .unwrap_or(0)
    }

    fn channel(&mut self, number: u16) -> &mut Channel {
        self.channels
            .get_mut(&number)
            .expect("frame dispatch checked the channel is open")
    }

    /// Sends a reply, or keeps it behind a durable change this frame made
    /// (see `hold_replies`).
    fn reply(&self, number: u16, method: AMQPClass) {
        match self.held_replies.lock().as_mut() {
            Some(held) => held.replies.push((number, method)),
            None => self.out.method(number, method),
        }
    }

    /// Holds this frame's reply until the topology journal has made
    /// `ticket` durable: a `*-ok` is sent only for a change that survives a
    /// crash. The reader waits for it before it reads the next frame, so
    /// replies keep their order; no other connection waits.
    fn hold_replies(&self, ticket: Option<Ticket>) {
        if let Some(ticket) = ticket {
            let mut held = self.held_replies.lock();
            let held = held.get_or_insert_with(|| HeldReplies {
                ticket,
                replies: Vec::new(),
            });
            held.ticket = held.ticket.max(ticket);
        }
    }

    fn handle_method(&mut self, number: u16, mut method: AMQPClass) -> AmqpResult<()> {
        if !matches!(self.channel(number).content, Content::Idle) {
            return Err(AmqpError::new(
                ErrorCode::UnexpectedFrame,
                format!(
                    "expected content header or body for class 60 on channel {number}, got method {}",
                    method_name(&method)
                ),
            ));
        }
        let mut server_named = false;
        if let AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) = &mut method
            && !declare.passive
            && declare.queue.as_str().is_empty()
        {
            declare.queue = self.hub.lock().broker.generate_queue_name();
            server_named = true;
        }
        expand_queue_shortcut(
            &mut method,
            self.channel(number).last_declared_queue.as_ref(),
        )?;
        for (access, resource) in authorize::required(&method).into_iter().flatten() {
            self.authorize(number, access, resource)?;
        }
        match method {
            AMQPClass::Channel(method) => self.channel_method(number, method),
            AMQPClass::Exchange(method) => self.exchange_method(number, method),
            AMQPClass::Queue(method) => self.queue_method(number, method, server_named),
            AMQPClass::Basic(method) => self.basic_method(number, method),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let state = self.channel(number);
                if state.transaction.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if state.confirms.is_none() {
                    state.confirms = Some(Confirms {
                        published: 0,
                        waiting: VecDeque::new(),
                    });
                    self.hub
                        .lock()
                        .broker
                        .set_channel_mode(self.id, number, ChannelMode::Confirm);
                }
                if !select.nowait {
                    self.reply(
                        number,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(method) => self.tx_method(number, method),
            AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::Request(_)) => {
                self.reply(
                    number,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            other => Err(AmqpError::command_invalid(format!(
                "method {} is not valid from a client on channel {number}",
                method_name(&other)
            ))),
        }
    }

    /// One permission check; a refusal closes the channel with 403 naming
    /// the resource, and is logged with who was refused what.
    fn authorize(&mut self, number: u16, access: Access, resource: Resource<'_>) -> AmqpResult<()> {
        let grant = self
            .grant
            .as_mut()
            .expect("channels are opened only after connection.open");
        grant.check(access, resource).map_err(|refused| {
            warn!(
                connection = self.id.0,
                channel = number,
                user = %refused.user,
                vhost = %refused.vhost,
                permission = access.as_str(),
                "{refused}"
            );
            AmqpError::access_refused(refused.to_string())
        })
    }

    fn channel_method(&mut self, number: u16, method: channel::AMQPMethod) -> AmqpResult<()> {
        match method {
            channel::AMQPMethod::Close(_) => {
                self.process_channel_confirms(number);
                {
                    let mut hub = self.hub.lock();
                    let mut outbox = Outbox::default();
                    hub.broker.close_channel(self.id, number, &mut outbox);
                    hub.dispatch(&mut outbox);
                    self.hold_replies(hub.broker.take_topology_ticket());
                }
                self.channels.remove(&number);
                self.reply(
                    number,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            channel::AMQPMethod::CloseOk(_) => Ok(()),
            // As RabbitMQ: a client may not pause the broker's deliveries
            // with channel.flow (basic.qos is the way to limit them), so
            // active=false closes the connection with 540.
            channel::AMQPMethod::Flow(flow) if !flow.active => {
                Err(AmqpError::not_implemented("active=false"))
            }
            channel::AMQPMethod::Flow(_) => {
                self.reply(
                    number,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: true,
                    })),
                );
                Ok(())
            }
            channel::AMQPMethod::FlowOk(_) => Ok(()),
            other => Err(AmqpError::command_invalid(format!(
                "method {} is not valid from a client",
                method_name(&AMQPClass::Channel(other))
            ))),
        }
    }

    fn exchange_method(&mut self, number: u16, method: exchange::AMQPMethod) -> AmqpResult<()> {
        let mut hub = self.hub.lock();
        match method {
            exchange::AMQPMethod::Declare(declare) => {
                let nowait = declare.nowait;
                hub.broker.declare_exchange(
                    self.id,
                    ExchangeDeclare {
                        name: declare.exchange,
                        kind: declare.kind,
                        passive: declare.passive,
                        durable: declare.durable,
                        auto_delete: declare.auto_delete,
                        internal: declare.internal,
                        arguments: declare.arguments,
                    },
                )?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !nowait {
                    self.reply(
                        number,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            exchange::AMQPMethod::Delete(delete) => {
                hub.broker
                    .delete_exchange(self.id, delete.exchange.as_str(), delete.if_unused)?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !delete.nowait {
                    self.reply(
                        number,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Bind(bind) => {
                hub.broker.bind_exchange(
                    self.id,
                    bind.destination.as_str(),
                    bind.source.as_str(),
                    bind.routing_key,
                    bind.arguments,
                    true,
                )?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !bind.nowait {
                    self.reply(
                        number,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Unbind(unbind) => {
                hub.broker.bind_exchange(
                    self.id,
                    unbind.destination.as_str(),
                    unbind.source.as_str(),
                    unbind.routing_key,
                    unbind.arguments,
                    false,
                )?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !unbind.nowait {
                    self.reply(
                        number,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "method {} is not valid from a client",
                    method_name(&AMQPClass::Exchange(other))
                )));
            }
        }
        Ok(())
    }

    /// `server_named`: a `queue.declare` whose name the broker generated.
    fn queue_method(
        &mut self,
        number: u16,
        method: queue::AMQPMethod,
        server_named: bool,
    ) -> AmqpResult<()> {
        let mut hub = self.hub.lock();
        match method {
            queue::AMQPMethod::Declare(declare) => {
                let nowait = declare.nowait;
                let declare_queue = QueueDeclare {
                    name: declare.queue,
                    passive: declare.passive,
                    durable: declare.durable,
                    exclusive: declare.exclusive,
                    auto_delete: declare.auto_delete,
                    arguments: declare.arguments,
                };
                let declared = if server_named {
                    hub.broker
                        .declare_server_named_queue(self.id, declare_queue)?
                } else {
                    hub.broker.declare_queue(self.id, declare_queue)?
                };
                self.hold_replies(hub.broker.take_topology_ticket());
                if let Some(state) = self.channels.get_mut(&number) {
                    state.last_declared_queue = Some(declared.name.clone());
                }
                if !nowait {
                    self.reply(
                        number,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: declared.name,
                            message_count: declared.message_count,
                            consumer_count: declared.consumer_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Bind(bind) => {
                hub.broker.bind_queue(
                    self.id,
                    bind.queue.as_str(),
                    bind.exchange.as_str(),
                    bind.routing_key,
                    bind.arguments,
                    true,
                )?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !bind.nowait {
                    self.reply(
                        number,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
            }
            queue::AMQPMethod::Unbind(unbind) => {
                hub.broker.bind_queue(
                    self.id,
                    unbind.queue.as_str(),
                    unbind.exchange.as_str(),
                    unbind.routing_key,
                    unbind.arguments,
                    false,
                )?;
                self.reply(
                    number,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
            }
            queue::AMQPMethod::Purge(purge) => {
                let mut outbox = Outbox::default();
                let purged = hub
                    .broker
                    .purge_queue(self.id, purge.queue.as_str(), &mut outbox);
                hub.dispatch(&mut outbox);
                let message_count = purged?;
                if !purge.nowait {
                    self.reply(
                        number,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Delete(delete) => {
                let mut outbox = Outbox::default();
                let result = hub.broker.delete_queue(
                    self.id,
                    delete.queue.as_str(),
                    delete.if_unused,
                    delete.if_empty,
                    &mut outbox,
                );
                hub.dispatch(&mut outbox);
                let message_count = result?;
                self.hold_replies(hub.broker.take_topology_ticket());
                if !delete.nowait {
                    self.reply(
                        number,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count,
                        })),
                    );
                }
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "method {} is not valid from a client",
                    method_name(&AMQPClass::Queue(other))
                )));
            }
        }
        Ok(())
    }

    fn basic_qos(
        &mut self,
        number: u16,
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    ) -> AmqpResult<()> {
        if prefetch_size != 0 {
            return Err(AmqpError::not_implemented(format!(
                "prefetch_size!=0 ({prefetch_size})"
            )));
        }
        {
            let sink = self.sink_of(number);
            let mut hub = self.hub.lock();
            let _held = sink.as_deref().map(ChannelSink::hold);
            let mut outbox = Outbox::default();
            hub.broker
                .set_prefetch(self.id, number, prefetch_count, global, &mut outbox);
            // qos-ok goes first: the deliveries it unblocks come after it.
            self.reply(number, basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
            hub.dispatch(&mut outbox);
        }
        Ok(())
    }

    fn basic_method(&mut self, number: u16, method: basic::AMQPMethod) -> AmqpResult<()> {
        match method {
            basic::AMQPMethod::Publish(publish) => {
                if publish.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                self.channel(number).content = Content::AwaitingHeader(publish);
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) => {
                let sink = self.sink_of(number);
                let mut hub = self.hub.lock();
                let _held = sink.as_deref().map(ChannelSink::hold);
                let mut outbox = Outbox::default();
                let nowait = consume.nowait;
                let consumer_tag = hub.broker.consume(
                    self.id,
                    number,
                    Consume {
                        queue: consume.queue,
                        consumer_tag: consume.consumer_tag,
                        no_ack: consume.no_ack,
                        exclusive: consume.exclusive,
                        arguments: consume.arguments,
                    },
                    &mut outbox,
                )?;
                if !nowait {
                    self.reply(
                        number,
                        basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag,
                        })),
                    );
                }
                hub.dispatch(&mut outbox);
                Ok(())
            }
            basic::AMQPMethod::Cancel(cancel) => {
                let mut hub = self.hub.lock();
                let mut outbox = Outbox::default();
                hub.broker
                    .cancel(self.id, number, cancel.consumer_tag.as_str(), &mut outbox);
                self.hold_replies(hub.broker.take_topology_ticket());
                if !cancel.nowait {
                    self.reply(
                        number,
                        basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag,
                        })),
                    );
                }
                hub.dispatch(&mut outbox);
                Ok(())
            }
            basic::AMQPMethod::Get(get) => {
                let mut hub = self.hub.lock();
                let mut outbox = Outbox::default();
                let got =
                    hub.broker
                        .get(self.id, number, get.queue.as_str(), get.no_ack, &mut outbox);
                hub.dispatch(&mut outbox);
                match got? {
                    Some(got) => self.out.send(Outbound::WithContent(
                        number,
                        basic(basic::AMQPMethod::GetOk(basic::GetOk {
                            delivery_tag: got.delivery_tag,
                            redelivered: got.redelivered,
                            exchange: got.message.exchange.clone(),
                            routing_key: got.message.routing_key.clone(),
                            message_count: got.message_count,
                        })),
                        got.message,
                    )),
                    None => self.reply(
                        number,
                        basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                    ),
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(ack) => self.settle(
                number,
                Settle::Ack {
                    delivery_tag: ack.delivery_tag,
                    multiple: ack.multiple,
                },
            ),
            basic::AMQPMethod::Nack(nack) => self.settle(
                number,
                Settle::Reject {
                    delivery_tag: nack.delivery_tag,
                    multiple: nack.multiple,
                    requeue: nack.requeue,
                },
            ),
            basic::AMQPMethod::Reject(reject) => self.settle(
                number,
                Settle::Reject {
                    delivery_tag: reject.delivery_tag,
                    multiple: false,
                    requeue: reject.requeue,
                },
            ),
            basic::AMQPMethod::Recover(basic::Recover { requeue })
            | basic::AMQPMethod::RecoverAsync(basic::RecoverAsync { requeue }) => {
                if !requeue {
                    return Err(AmqpError::not_implemented("requeue=false"));
                }
                let is_async = matches!(method, basic::AMQPMethod::RecoverAsync(_));
                let sink = self.sink_of(number);
                let hub = self.hub.read();
                let _held = sink.as_deref().map(ChannelSink::hold);
                let mut outbox = Outbox::default();
                hub.broker.recover(self.id, number, &mut outbox);
                if !is_async {
                    self.reply(
                        number,
                        basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                hub.dispatch(&mut outbox);
                Ok(())
            }
            other => Err(AmqpError::command_invalid(format!(
                "method {} is not valid from a client",
                method_name(&basic(other))
            ))),
        }
    }

    fn settle(&mut self, number: u16, settle: Settle) -> AmqpResult<()> {
        let tx_operations_max = self.config.tx_operations_max;
        if let Some(transaction) = &mut self.channel(number).transaction {
            if transaction.settles.len() + transaction.publishes.len() >= tx_operations_max {
                return Err(AmqpError::precondition_failed(format!(
                    "transaction holds {tx_operations_max} operations, the most one may hold"
                )));
            }
            transaction.settles.push(settle);
            return Ok(());
        }
        self.settle_now(number, settle)
    }

    fn settle_now(&mut self, number: u16, settle: Settle) -> AmqpResult<()> {
        let hub = self.hub.read();
        let mut outbox = Outbox::default();
        let result = match settle {
            Settle::Ack {
                delivery_tag,
                multiple,
            } => hub
                .broker
                .ack(self.id, number, delivery_tag, multiple, &mut outbox),
            Settle::Reject {
                delivery_tag,
                multiple,
                requeue,
            } => hub.broker.reject(
                self.id,
                number,
                delivery_tag,
                multiple,
                requeue,
                &mut outbox,
            ),
        };
        hub.dispatch(&mut outbox);
        Ok(result?)
    }

    fn tx_method(&mut self, number: u16, method: tx::AMQPMethod) -> AmqpResult<()> {
        match method {
            tx::AMQPMethod::Select(_) => {
                let state = self.channel(number);
                if state.confirms.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if state.transaction.is_none() {
                    state.transaction = Some(Transaction::default());
                    self.hub.lock().broker.set_channel_mode(
                        self.id,
                        number,
                        ChannelMode::Transactional,
                    );
                }
                self.reply(
                    number,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(transaction) = self
                    .channel(number)
                    .transaction
                    .as_mut()
                    .map(std::mem::take)
                else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                };
                let mut durable_at = None;
                for (mandatory, message) in transaction.publishes {
                    durable_at = self.publish_now(number, mandatory, message)?.or(durable_at);
                }
                for settle in transaction.settles {
                    self.settle_now(number, settle)?;
                }
                match durable_at {
                    // commit-ok once the transaction's messages are on disk.
                    Some(ticket) => self.commit_waiting = Some((number, ticket)),
                    None => self.reply(
                        number,
                        AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                    ),
                }
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(transaction) = self.channel(number).transaction.as_mut() else {
                    return Err(AmqpError::precondition_failed(
                        "channel is not transactional",
                    ));
                };
                *transaction = Transaction::default();
                self.reply(
                    number,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            other => Err(AmqpError::command_invalid(format!(
                "method {} is not valid from a client",
                method_name(&AMQPClass::Tx(other))
            ))),
        }
    }

    // ----- content -------------------------------------------------------

    fn content_header(
        &mut self,
        number: u16,
        class_id: u16,
        body_size: u64,
        properties: BasicProperties,
    ) -> AmqpResult<()> {
        let size_max = self.config.message_size_max_bytes;
        let state = self.channel(number);
        let Content::AwaitingHeader(publish) = std::mem::replace(&mut state.content, Content::Idle)
        else {
            return Err(AmqpError::new(
                ErrorCode::UnexpectedFrame,
                format!("content header on channel {number} without a preceding basic.publish"),
            ));
        };
        if class_id != CLASS_BASIC {
            return Err(AmqpError::new(
                ErrorCode::UnexpectedFrame,
                format!(
                    "content header for class {class_id}; only class 60 (basic) carries content"
                ),
            ));
        }
        if body_size > size_max {
            return Err(AmqpError::precondition_failed(format!(
                "message size {body_size} is larger than configured max size {size_max}"
            )));
        }
        if body_size == 0 {
            return self.publish(number, publish, properties, Bytes::new());
        }
        state.content = Content::AwaitingBody {
            publish,
            properties: Box::new(properties),
            body_size: body_size as usize,
            received: BytesMut::new(),
        };
        Ok(())
    }

    fn content_body(&mut self, number: u16, payload: Bytes) -> AmqpResult<()> {
        let state = self.channel(number);
        let Content::AwaitingBody {
            body_size,
            received,
            ..
        } = &mut state.content
        else {
            return Err(AmqpError::new(
                ErrorCode::UnexpectedFrame,
                format!(
                    "content body frame on channel {number} without a preceding content header"
                ),
            ));
        };
        let total = received.len() + payload.len();
        if total > *body_size {
            return Err(AmqpError::new(
                ErrorCode::UnexpectedFrame,
                format!(
                    "content body on channel {number} is {total} bytes, more than the {body_size} its header declared"
                ),
            ));
        }
        // A body that comes in one frame is used as it is, without a copy.
        let whole_in_one_frame = received.is_empty() && total == *body_size;
        if !whole_in_one_frame {
            if received.capacity() == 0 {
                received.reserve(*body_size);
            }
            received.extend_from_slice(&payload);
            if total < *body_size {
                return Ok(());
            }
        }
        let Content::AwaitingBody {
            publish,
            properties,
            received,
            ..
        } = std::mem::replace(&mut state.content, Content::Idle)
        else {
            unreachable!("matched above");
        };
        let body = if whole_in_one_frame {
            payload
        } else {
            received.freeze()
        };
        self.publish(number, publish, *properties, body)
    }

    fn publish(
        &mut self,
        number: u16,
        publish: basic::Publish,
        properties: BasicProperties,
        body: Bytes,
    ) -> AmqpResult<()> {
        if let Some(user_id) = properties.user_id()
            && user_id.as_str() != self.user
        {
            return Err(AmqpError::precondition_failed(format!(
                "user_id property set to '{user_id}' but authenticated user was '{}'",
                self.user
            )));
        }
        let message = Arc::new(Message {
            exchange: publish.exchange,
            routing_key: publish.routing_key,
            properties,
            body,
        });
        let tx_operations_max = self.config.tx_operations_max;
        if let Some(transaction) = &mut self.channel(number).transaction {
            if transaction.settles.len() + transaction.publishes.len() >= tx_operations_max {
                return Err(AmqpError::precondition_failed(format!(
                    "transaction holds {tx_operations_max} operations, the most one may hold"
                )));
            }
            transaction.publishes.push((publish.mandatory, message));
            return Ok(());
        }
        self.publish_now(number, publish.mandatory, message)
            .map(|_| ())
    }

    /// Publishes and registers the confirm; returns the ticket the message
    /// waits on when it went to the log.
    fn publish_now(
        &mut self,
        number: u16,
        mandatory: bool,
        message: Arc<Message>,
    ) -> AmqpResult<Option<Ticket>> {
        self.has_published = true;
        self.hub.observe_message_size(message.body.len());
        if let Some(channel) = self.channels.get_mut(&number)
            && channel.publisher.is_none()
        {
            channel.publisher = Some(self.hub.mark_publisher());
        }
        let (published, flow_gauge) = {
            let hub = self.hub.read();
            let mut outbox = Outbox::default();
            let published = hub
                .broker
                .publish(self.id, number, Arc::clone(&message), &mut outbox);
            hub.dispatch(&mut outbox);
            let published = published?;
            let flow_gauge = published
                .flow
                .and_then(|queue| hub.broker.flow_gauge(queue));
            (published, flow_gauge)
        };
        if let Some(gauge) = flow_gauge {
            self.hold_back(number, gauge);
        }
        if published.routed == 0 && mandatory {
            self.hub.count_returned();
            // The return must reach the client before the confirm.
            self.process_channel_confirms(number);
            self.out.send(Outbound::WithContent(
                number,
                basic(basic::AMQPMethod::Return(basic::Return {
                    reply_code: 312,
                    reply_text: "NO_ROUTE".into(),
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                })),
                message,
            ));
        }
        let wait = match (&published.store_error, published.ticket) {
            (Some(error), _) => {
                tracing::warn!(connection = self.id.0, %error, "publish refused by the message store");
                ConfirmWait::Refused
            }
            // A full queue with x-overflow=reject-publish refused it.
            (None, _) if published.rejected => ConfirmWait::Refused,
            (None, Some(ticket)) => ConfirmWait::Durable(ticket),
            (None, None) => ConfirmWait::Nothing,
        };
        if let Some(confirms) = &mut self.channel(number).confirms {
            confirms.published += 1;
            let sequence = confirms.published;
            confirms.waiting.push_back((sequence, wait));
            self.hub.count_confirm_publish();
        }
        Ok(published.ticket)
    }
}
