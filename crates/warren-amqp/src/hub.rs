//! The broker and the connections' writers, shared by every connection
//! task, the timer and the store's worker.
//!
//! The broker sits behind a readers-writer lock. Operations that move
//! messages (publish, ack, deliveries, rounds) take it shared, so any
//! number run at once on different cores; each queue and channel has its
//! own lock inside the broker (see `warren_core::broker`). Operations
//! that change the broker's shape (declares, consumers, channels and
//! connections coming and going) take it exclusively.
//!
//! Deliveries reach the writers through each channel's sink while the
//! channel's lock is held, so a channel's delivery tags go out in order.
//! A reply goes onto the writer before the lock is released, which keeps,
//! for example, a `basic.consume-ok` ahead of the first delivery to that
//! consumer: deliveries to it need the shared lock, which waits for the
//! exclusive one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::FieldTable;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::{Notify, watch};
use warren_core::{Broker, ConnectionId, Effect, Outbox};

use crate::alarms::{Alarms, MemoryMonitor};
use crate::error::AmqpError;
use crate::mailbox::Mailbox;
use crate::store_worker::StoreWork;
use crate::writer::{Outbound, OutboundQueue};

/// How often the broker's timer runs (message TTLs, queue expiry, consumer
/// timeouts): the precision of every deadline it enforces.
pub const TIMER_TICK: Duration = Duration::from_millis(10);

/// What channels count of publishing, outside the broker lock: confirms
/// go out when the log's fsync completes, not under a broker call, and
/// returns and confirm mode are the channel's, not the broker's.
#[derive(Default)]
struct PublishCounters {
    /// Publisher confirms (acks) sent.
    confirmed: AtomicU64,
    /// Messages published on channels in confirm mode.
    confirm_published: AtomicU64,
    /// Mandatory messages returned as unroutable.
    returned: AtomicU64,
    /// Channels that have published and are open (RabbitMQ's
    /// publishers).
    publishers: AtomicU64,
    /// Messages received, by body size: one count per bucket of
    /// `MESSAGE_SIZE_BUCKETS`, the last for larger ones.
    sizes: [AtomicU64; MESSAGE_SIZE_BUCKETS.len() + 1],
    /// Their body bytes.
    size_sum: AtomicU64,
}

/// The upper bounds, in bytes, of the message size histogram: RabbitMQ's
/// (`rabbit_msg_size_metrics`), which its dashboards query.
pub const MESSAGE_SIZE_BUCKETS: [u64; 8] = [
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
];

/// A reading of the publish counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishCounts {
    pub confirmed: u64,
    pub confirm_published: u64,
    pub returned: u64,
    pub publishers: u64,
    /// Messages per bucket of `MESSAGE_SIZE_BUCKETS` (not cumulative), the
    /// last for those larger than every bound.
    pub sizes: [u64; MESSAGE_SIZE_BUCKETS.len() + 1],
    pub size_sum: u64,
}

/// Counts its channel among the publishers while it lives.
pub struct PublisherMark {
    counters: Arc<PublishCounters>,
}

impl Drop for PublisherMark {
    fn drop(&mut self) {
        self.counters.publishers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hub, shared by every connection task and the timer.
#[derive(Clone)]
pub struct SharedHub {
    hub: Arc<Hub>,
    publishes: Arc<PublishCounters>,
    /// The broker's memory against its high watermark.
    memory: Arc<MemoryMonitor>,
    /// The resource alarms raised now.
    alarms: watch::Receiver<Alarms>,
}

/// The hub with the broker locked: shared (`SharedHub::read`) or
/// exclusive (`SharedHub::lock`).
pub struct HubGuard<'a, B> {
    pub broker: B,
    hub: &'a Hub,
}

pub type HubRead<'a> = HubGuard<'a, RwLockReadGuard<'a, Broker>>;
pub type HubWrite<'a> = HubGuard<'a, RwLockWriteGuard<'a, Broker>>;

impl SharedHub {
    pub fn new(hub: Hub, memory: Arc<MemoryMonitor>, alarms: watch::Receiver<Alarms>) -> Self {
        Self {
            hub: Arc::new(hub),
            publishes: Arc::new(PublishCounters::default()),
            memory,
            alarms,
        }
    }

    pub fn memory(&self) -> &Arc<MemoryMonitor> {
        &self.memory
    }

    /// The resource alarms raised now.
    pub fn alarms(&self) -> Alarms {
        *self.alarms.borrow()
    }

    /// A handle that does not keep the hub alive, for threads that must
    /// end with it.
    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub {
            hub: Arc::downgrade(&self.hub),
            publishes: Arc::clone(&self.publishes),
            memory: Arc::clone(&self.memory),
            alarms: self.alarms.clone(),
        }
    }

    pub fn count_confirms(&self, count: u64) {
        self.publishes.confirmed.fetch_add(count, Ordering::Relaxed);
    }

    /// A message published on a channel in confirm mode.
    pub fn count_confirm_publish(&self) {
        self.publishes
            .confirm_published
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A mandatory message returned to its publisher as unroutable.
    pub fn count_returned(&self) {
        self.publishes.returned.fetch_add(1, Ordering::Relaxed);
    }

    /// A channel published for the first time: it counts as a publisher
    /// until the mark is dropped with it.
    pub fn mark_publisher(&self) -> PublisherMark {
        self.publishes.publishers.fetch_add(1, Ordering::Relaxed);
        PublisherMark {
            counters: Arc::clone(&self.publishes),
        }
    }

    /// A message of `bytes` received from a publisher.
    pub fn observe_message_size(&self, bytes: usize) {
        let bytes = bytes as u64;
        let bucket = MESSAGE_SIZE_BUCKETS
            .iter()
            .position(|bound| bytes <= *bound)
            .unwrap_or(MESSAGE_SIZE_BUCKETS.len());
        self.publishes.sizes[bucket].fetch_add(1, Ordering::Relaxed);
        self.publishes.size_sum.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Publisher confirms sent since the start.
    pub fn confirmed(&self) -> u64 {
        self.publishes.confirmed.load(Ordering::Relaxed)
    }

    /// What channels counted of publishing since the start.
    pub fn publish_counts(&self) -> PublishCounts {
        PublishCounts {
            confirmed: self.confirmed(),
            confirm_published: self.publishes.confirm_published.load(Ordering::Relaxed),
            returned: self.publishes.returned.load(Ordering::Relaxed),
            publishers: self.publishes.publishers.load(Ordering::Relaxed),
            sizes: std::array::from_fn(|bucket| {
                self.publishes.sizes[bucket].load(Ordering::Relaxed)
            }),
            size_sum: self.publishes.size_sum.load(Ordering::Relaxed),
        }
    }

    /// Takes the broker exclusively, for an operation that changes its
    /// shape, and tells it the time, so that every operation sees the
    /// current time without the broker reading a clock itself.
    pub fn lock(&self) -> HubWrite<'_> {
        let broker = self.hub.broker.write();
        broker.advance_clock(wall_clock_ms());
        HubGuard {
            broker,
            hub: &self.hub,
        }
    }

    /// Takes the broker shared, for an operation that moves messages, or
    /// to read its state.
    pub fn read(&self) -> HubRead<'_> {
        let broker = self.hub.broker.read();
        broker.advance_clock(wall_clock_ms());
        HubGuard {
            broker,
            hub: &self.hub,
        }
    }

    /// Runs the broker's timer, and the rounds of work that operations
    /// leave (`Broker::continue_rounds`), until the task is dropped.
    pub async fn run_timer(self) {
        let rounds_waiting = Arc::clone(&self.hub.rounds_waiting);
        let mut interval = tokio::time::interval(TIMER_TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut more = tokio::select! {
                _ = interval.tick() => {
                    // Most ticks find nothing due; only one that does
                    // takes the broker exclusively.
                    let due = self.read().broker.tick_due();
                    if due {
                        let mut hub = self.lock();
                        let mut out = Outbox::default();
                        hub.broker.tick(&mut out);
                        hub.dispatch(&mut out);
                    }
                    self.read().broker.has_rounds()
                }
                () = rounds_waiting.notified() => true,
            };
            // A large settle (a channel closed with many unacked
            // deliveries) or a consumer catching up on a backlog goes on
            // in rounds of about a millisecond each, alongside other
            // operations; between rounds an exclusive operation waiting
            // for the lock gets it.
            while more {
                tokio::task::yield_now().await;
                let hub = self.read();
                let mut out = Outbox::default();
                more = hub.broker.continue_rounds(&mut out);
                hub.dispatch(&mut out);
                RwLockReadGuard::unlock_fair(hub.broker);
            }
        }
    }
}

/// The hub, as long as something else keeps it.
pub(crate) struct WeakHub {
    hub: Weak<Hub>,
    publishes: Arc<PublishCounters>,
    memory: Arc<MemoryMonitor>,
    alarms: watch::Receiver<Alarms>,
}

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<SharedHub> {
        self.hub.upgrade().map(|hub| SharedHub {
            hub,
            publishes: Arc::clone(&self.publishes),
            memory: Arc::clone(&self.memory),
            alarms: self.alarms.clone(),
        })
    }
}

/// Milliseconds since the UNIX epoch: message TTLs are kept in wall-clock
/// time so that they keep counting across a restart.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What the broker asks of a connection's reader, outside any request.
#[derive(Debug)]
pub enum ConnectionNotice {
    /// Close this channel with this error (a consumer timeout).
    CloseChannel { channel: u16, error: AmqpError },
    /// Close the whole connection with 320 CONNECTION_FORCED (an operator
    /// asked for it through the management API).
    Close { reason: String },
}

/// What the management API shows about an open connection; fixed once the
/// opening handshake is done.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    pub client_properties: FieldTable,
    pub connected_at_ms: u64,
    pub channel_max: u16,
    pub frame_max_bytes: u32,
    pub heartbeat_s: u16,
    /// A direct session (the HTTP side's, in process) rather than a
    /// network connection.
    pub direct: bool,
}

impl ConnectionInfo {
    /// RabbitMQ's name for a connection: "PEER -> LOCAL".
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }
}

pub struct Hub {
    broker: RwLock<Broker>,
    /// The connections and their writers; taken briefly, never while
    /// waiting for the broker.
    registry: Mutex<Registry>,
    /// Where the store's slow work goes (`store_worker.rs`), once started.
    store_worker: OnceLock<mpsc::Sender<StoreWork>>,
    /// Wakes the timer task when an operation left rounds of work, so
    /// that they go on at once rather than at the next tick.
    rounds_waiting: Arc<Notify>,
}

#[derive(Default)]
struct Registry {
    writers: HashMap<ConnectionId, OutboundQueue>,
    /// Unbounded, yet bounded in practice: the broker asks at most once per
    /// channel, and a connection has at most channel_max channels.
    notices: HashMap<ConnectionId, Mailbox<ConnectionNotice>>,
    connections: HashMap<ConnectionId, ConnectionInfo>,
    next_connection: u64,
}

impl Hub {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker: RwLock::new(broker),
            registry: Mutex::new(Registry::default()),
            store_worker: OnceLock::new(),
            rounds_waiting: Arc::new(Notify::new()),
        }
    }
}

impl<B: Deref<Target = Broker>> HubGuard<'_, B> {
    pub(crate) fn set_store_worker(&self, work: mpsc::Sender<StoreWork>) {
        let _ = self.hub.store_worker.set(work);
    }

    /// The broker, to read its state (the management API's views, the
    /// metrics); changes go through sessions.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn allocate_connection_id(&self) -> ConnectionId {
        let mut registry = self.hub.registry.lock();
        registry.next_connection += 1;
        ConnectionId(registry.next_connection)
    }

    pub(crate) fn register_connection(
        &self,
        info: ConnectionInfo,
        writer: OutboundQueue,
        notices: Mailbox<ConnectionNotice>,
    ) {
        let mut registry = self.hub.registry.lock();
        registry.writers.insert(info.id, writer);
        registry.notices.insert(info.id, notices);
        registry.connections.insert(info.id, info);
    }

    /// The open connections, oldest first.
    pub fn connection_infos(&self) -> Vec<ConnectionInfo> {
        let mut infos: Vec<ConnectionInfo> = self
            .hub
            .registry
            .lock()
            .connections
            .values()
            .cloned()
            .collect();
        infos.sort_by_key(|info| info.id);
        infos
    }

    pub fn connection_info(&self, connection: ConnectionId) -> Option<ConnectionInfo> {
        self.hub
            .registry
            .lock()
            .connections
            .get(&connection)
            .cloned()
    }

    /// Open connections logged in as `user`; a scan, made once per
    /// `connection.open`, which is cheap next to the login before it.
    /// Client connections open in a vhost (the HTTP API's direct sessions
    /// not counted).
    pub(crate) fn client_connections_in(&self, vhost: &str) -> usize {
        self.hub
            .registry
            .lock()
            .connections
            .values()
            .filter(|info| info.vhost == vhost && !info.direct)
            .count()
    }

    pub(crate) fn connections_of_user(&self, user: &str) -> usize {
        self.hub
            .registry
            .lock()
            .connections
            .values()
            .filter(|info| info.user == user)
            .count()
    }

    /// Asks every connection that matches to close with 320
    /// CONNECTION_FORCED (its user or its vhost was deleted); returns how
    /// many were asked.
    pub fn close_connections_where(
        &self,
        matches: impl Fn(&ConnectionInfo) -> bool,
        reason: &str,
    ) -> usize {
        let chosen: Vec<ConnectionId> = self
            .hub
            .registry
            .lock()
            .connections
            .values()
            .filter(|info| matches(info))
            .map(|info| info.id)
            .collect();
        chosen
            .into_iter()
            .filter(|id| self.close_connection(*id, reason))
            .count()
    }

    /// Asks a connection to close itself with 320 CONNECTION_FORCED;
    /// false when it is not open.
    pub fn close_connection(&self, connection: ConnectionId, reason: &str) -> bool {
        self.hub
            .registry
            .lock()
            .notices
            .get(&connection)
            .is_some_and(|notices| {
                notices.push(ConnectionNotice::Close {
                    reason: reason.to_owned(),
                })
            })
    }

    /// Hands each effect to the writer of the connection it concerns.
    pub fn dispatch(&self, out: &mut Outbox) {
        if self.broker.has_rounds() {
            self.hub.rounds_waiting.notify_one();
        }
        if out.effects.is_empty() {
            return;
        }
        let registry = self.hub.registry.lock();
        for effect in out.effects.drain(..) {
            match effect {
                Effect::Deliver(delivery) => {
                    if let Some(writer) = registry.writers.get(&delivery.connection) {
                        writer.send(Outbound::Deliver(delivery));
                    }
                }
                Effect::CloseChannel {
                    connection,
                    channel,
                    error,
                } => {
                    if let Some(notices) = registry.notices.get(&connection) {
                        notices.push(ConnectionNotice::CloseChannel {
                            channel,
                            error: error.into(),
                        });
                    }
                }
                // Sending fails only once the worker has stopped, with the
                // hub going away.
                Effect::ReadAhead(request) => {
                    if let Some(work) = self.hub.store_worker.get() {
                        let _ = work.send(StoreWork::ReadAhead(request));
                    }
                }
                Effect::Discard(discard) => {
                    if let Some(work) = self.hub.store_worker.get() {
                        let _ = work.send(StoreWork::Discard(discard));
                    }
                }
                Effect::CancelConsumer {
                    connection,
                    channel,
                    consumer_tag,
                } => {
                    if let Some(writer) = registry.writers.get(&connection) {
                        writer.method(
                            channel,
                            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                                consumer_tag,
                                nowait: true,
                            })),
                        );
                    }
                }
            }
        }
    }

    /// Delivers again to a channel whose writer had fallen behind.
    pub fn resume_deliveries(&self, connection: ConnectionId, channel: u16) {
        let mut out = Outbox::default();
        self.broker.resume_deliveries(connection, channel, &mut out);
        self.dispatch(&mut out);
    }
}

impl HubWrite<'_> {
    /// Forgets a connection and releases what it held in the broker.
    pub fn remove_connection(&mut self, connection: ConnectionId) {
        {
            let mut registry = self.hub.registry.lock();
            registry.writers.remove(&connection);
            registry.notices.remove(&connection);
            registry.connections.remove(&connection);
        }
        let mut out = Outbox::default();
        self.broker.close_connection(connection, &mut out);
        // Nobody is left to hold a reply for what closing changed.
        self.broker.take_topology_ticket();
        self.dispatch(&mut out);
    }
}
