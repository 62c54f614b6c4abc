//! A connection's writer: one task per connection that encodes outbound
//! frames and writes them in batches, so many small frames cost one system
//! call, and that sends heartbeats while the connection is otherwise quiet.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use warren_core::{ConnectionId, Delivery, DeliverySink, Message, UnwrittenDeliveries};
use warren_proto::FrameEncoder;

use crate::hub::SharedHub;
use crate::mailbox::Mailbox;
use crate::transport::WriteHalf;
use crate::turn::Turn;

/// Deliveries written per channel since the last report, with the
/// channel's unwritten count to lower.
type Written = HashMap<u16, (Arc<UnwrittenDeliveries>, u32)>;

/// Bytes gathered before a write is issued even if more frames are waiting.
const WRITE_BATCH_MAX_BYTES: usize = 256 * 1024;
/// Frames encoded between two looks at the clock for the end of a turn.
const ITEMS_BETWEEN_TURN_LOOKS: usize = 64;

/// One thing to put on a connection's socket.
#[derive(Debug)]
pub enum Outbound {
    Method(u16, AMQPClass),
    /// `basic.deliver` and the message's content.
    Deliver(Delivery),
    /// A method that carries content: `basic.get-ok` or `basic.return`.
    WithContent(u16, AMQPClass, Arc<Message>),
    /// The AMQP 0-9-1 protocol header, the answer to a wrong one.
    ProtocolHeader,
    /// Write what is queued, then close the socket.
    Close,
}

/// The sending side, shared by the connection's reader and the broker hub.
#[derive(Debug, Clone)]
pub struct OutboundQueue {
    items: Mailbox<Outbound>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
}

impl OutboundQueue {
    pub fn send(&self, item: Outbound) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if !self.items.push(item) {
            // The writer has gone: the socket is closed and the reader will
            // see that and clean up; nothing more can reach this peer.
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn method(&self, channel: u16, method: AMQPClass) {
        self.send(Outbound::Method(channel, method));
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Waits until the writer has taken items off the queue.
    pub async fn drained(&self) {
        self.drained.notified().await;
    }
}

/// Where the broker puts one channel's deliveries: the connection's
/// writer queue, except while the channel's own connection holds them back
/// (`hold`) so that the reply to its method goes out first: a
/// `basic.consume-ok` before the consumer's first delivery, a `qos-ok` or
/// `recover-ok` before the deliveries it lets through.
pub(crate) struct ChannelSink {
    out: OutboundQueue,
    held: Mutex<Option<Vec<Delivery>>>,
}

impl ChannelSink {
    pub(crate) fn new(out: &OutboundQueue) -> Arc<Self> {
        Arc::new(Self {
            out: out.clone(),
            held: Mutex::new(None),
        })
    }

    /// Holds deliveries back until the returned guard is dropped, which
    /// sends them, in order, ahead of any made after.
    pub(crate) fn hold(&self) -> HeldDeliveries<'_> {
        *self.held.lock() = Some(Vec::new());
        HeldDeliveries { sink: self }
    }
}

impl DeliverySink for ChannelSink {
    fn deliver(&self, delivery: Delivery) {
        let mut held = self.held.lock();
        match held.as_mut() {
            Some(held) => held.push(delivery),
            None => self.out.send(Outbound::Deliver(delivery)),
        }
    }
}

/// Deliveries held back by `ChannelSink::hold`, sent when this is dropped.
pub(crate) struct HeldDeliveries<'a> {
    sink: &'a ChannelSink,
}

impl Drop for HeldDeliveries<'_> {
    fn drop(&mut self) {
        let mut held = self.sink.held.lock();
        for delivery in held.take().unwrap_or_default() {
            self.sink.out.send(Outbound::Deliver(delivery));
        }
    }
}

pub struct Writer {
    connection: ConnectionId,
    items: Mailbox<Outbound>,
    queued: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    socket: WriteHalf,
    encoder: FrameEncoder,
    hub: SharedHub,
}

pub fn outbound_queue(
    connection: ConnectionId,
    socket: WriteHalf,
    hub: SharedHub,
) -> (OutboundQueue, Writer) {
    let items = Mailbox::new();
    let queued = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    let queue = OutboundQueue {
        items: items.clone(),
        queued: Arc::clone(&queued),
        drained: Arc::clone(&drained),
    };
    let writer = Writer {
        connection,
        items,
        queued,
        drained,
        socket,
        encoder: FrameEncoder::new(),
        hub,
    };
    (queue, writer)
}

/// A queue whose items a direct session takes itself, in process, instead
/// of a writer encoding them for a socket.
pub(crate) fn direct_queue() -> (OutboundQueue, OutboundReceiver) {
    let items = Mailbox::new();
    let queued = Arc::new(AtomicUsize::new(0));
    let drained = Arc::new(Notify::new());
    let queue = OutboundQueue {
        items: items.clone(),
        queued: Arc::clone(&queued),
        drained: Arc::clone(&drained),
    };
    (queue, OutboundReceiver { items, queued })
}

/// The taking side of a direct session's queue.
pub(crate) struct OutboundReceiver {
    items: Mailbox<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl OutboundReceiver {
    /// Moves everything queued into `batch`, which must be empty.
    pub(crate) fn take_all(&self, batch: &mut VecDeque<Outbound>) {
        self.items.take_all(batch);
        self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
    }

    /// Waits until an item may have been queued since the last `take_all`.
    pub(crate) async fn ready(&self) {
        self.items.ready().await;
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        self.items.close();
    }
}

/// What the reader tells the writer once the connection is tuned.
#[derive(Debug, Default)]
pub struct Tuning {
    frame_max_bytes: AtomicU32,
    heartbeat_s: AtomicU32,
}

impl Tuning {
    pub fn new(frame_max_bytes: u32) -> Self {
        Self {
            frame_max_bytes: AtomicU32::new(frame_max_bytes),
            heartbeat_s: AtomicU32::new(0),
        }
    }

    pub fn set(&self, frame_max_bytes: u32, heartbeat_s: u16) {
        self.frame_max_bytes
            .store(frame_max_bytes, Ordering::Relaxed);
        self.heartbeat_s
            .store(heartbeat_s as u32, Ordering::Relaxed);
    }

    fn frame_max_bytes(&self) -> u32 {
        self.frame_max_bytes.load(Ordering::Relaxed)
    }

    /// How long the writer may stay silent before it sends a heartbeat:
    /// half the negotiated interval, as RabbitMQ does.
    fn quiet_max(&self) -> Duration {
        match self.heartbeat_s.load(Ordering::Relaxed) {
            0 => Duration::from_secs(3600),
            seconds => Duration::from_millis(seconds as u64 * 500),
        }
    }
}

impl Writer {
    /// Runs until `Outbound::Close` is written or the socket fails.
    pub async fn run(mut self, tuning: Arc<Tuning>) {
        let mut written: Written = HashMap::new();
        let mut turn = Turn::new();
        let mut batch = VecDeque::new();
        loop {
            self.items.take_all(&mut batch);
            if batch.is_empty() {
                if tokio::time::timeout(tuning.quiet_max(), self.items.ready())
                    .await
                    .is_err()
                    && tuning.heartbeat_s.load(Ordering::Relaxed) != 0
                {
                    self.encoder.heartbeat();
                    if self.flush().await.is_err() {
                        return;
                    }
                }
                continue;
            }
            let frame_max_bytes = tuning.frame_max_bytes();
            let mut encoded = 0usize;
            while let Some(item) = batch.pop_front() {
                if matches!(item, Outbound::Close) {
                    let _ = self.write_out(encoded, &mut written).await;
                    let _ = self.socket.shutdown().await;
                    return;
                }
                self.encode(item, frame_max_bytes, &mut written);
                encoded += 1;
                // A backlog taken at once can be thousands of deliveries
                // long: what is encoded goes out when the turn is over, and
                // the other tasks run before the rest is encoded.
                let turn_over = encoded.is_multiple_of(ITEMS_BETWEEN_TURN_LOOKS) && turn.is_over();
                if self.encoder.len() >= WRITE_BATCH_MAX_BYTES || turn_over {
                    if self.write_out(encoded, &mut written).await.is_err() {
                        return;
                    }
                    encoded = 0;
                    turn.end_if_long().await;
                }
            }
            if self.write_out(encoded, &mut written).await.is_err() {
                return;
            }
            // A consumer that reads as fast as the broker delivers keeps
            // this loop busy without a socket write ever waiting.
            turn.end_if_long().await;
        }
    }

    /// Writes what is encoded, then tells the reader (waiting for room) and
    /// the broker (waiting to send more deliveries) how far it got.
    async fn write_out(&mut self, encoded: usize, written: &mut Written) -> std::io::Result<()> {
        self.queued.fetch_sub(encoded, Ordering::Relaxed);
        // One waiter at most (the reader); notify_one keeps the wake-up if
        // the reader has not started waiting yet.
        self.drained.notify_one();
        self.flush().await?;
        if !written.is_empty() {
            self.report_written(written);
        }
        Ok(())
    }

    fn encode(&mut self, item: Outbound, frame_max_bytes: u32, written: &mut Written) {
        match item {
            Outbound::Method(channel, method) => self.encoder.method(channel, &method),
            Outbound::Deliver(delivery) => {
                let message = &delivery.message;
                let method = AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: delivery.consumer_tag,
                    delivery_tag: delivery.delivery_tag,
                    redelivered: delivery.redelivered,
                    exchange: message.exchange.clone(),
                    routing_key: message.routing_key.clone(),
                }));
                self.encoder.method(delivery.channel, &method);
                self.encode_content(
                    delivery.channel,
                    &message.properties,
                    &message.body,
                    frame_max_bytes,
                );
                written
                    .entry(delivery.channel)
                    .or_insert_with(|| (Arc::clone(&delivery.unwritten), 0))
                    .1 += 1;
            }
            Outbound::WithContent(channel, method, message) => {
                self.encoder.method(channel, &method);
                self.encode_content(channel, &message.properties, &message.body, frame_max_bytes);
            }
            Outbound::ProtocolHeader => self.encoder.protocol_header(),
            Outbound::Close => unreachable!("handled by the caller"),
        }
    }

    fn encode_content(
        &mut self,
        channel: u16,
        properties: &BasicProperties,
        body: &[u8],
        frame_max_bytes: u32,
    ) {
        self.encoder
            .content(channel, properties, body, frame_max_bytes);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.encoder.is_empty() {
            return Ok(());
        }
        let result = self.socket.write_all(self.encoder.bytes()).await;
        self.encoder.clear();
        result
    }

    /// Lowers each channel's count of unwritten deliveries; only a channel
    /// the broker stopped delivering to, because this writer was behind,
    /// costs a visit to the broker.
    fn report_written(&mut self, written: &mut Written) {
        let stopped: Vec<u16> = written
            .drain()
            .filter(|(_, (unwritten, count))| unwritten.written(*count))
            .map(|(channel, _)| channel)
            .collect();
        if stopped.is_empty() {
            return;
        }
        let hub = self.hub.read();
        for channel in stopped {
            hub.resume_deliveries(self.connection, channel);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Nothing will be written any more: drop what is queued and
        // release a reader waiting for room so it can notice the closed
        // socket.
        self.items.close();
        self.queued.store(0, Ordering::Relaxed);
        self.drained.notify_one();
    }
}
