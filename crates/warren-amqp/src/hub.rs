//! The broker and the connections' writers behind one lock.
//!
//! An operation locks the hub, calls the broker, queues its own reply and
//! the broker's effects onto the writers, and unlocks. Queueing while still
//! holding the lock is what keeps, for example, a `basic.consume-ok` ahead of
//! the first delivery to that consumer when another connection publishes at
//! the same moment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::FieldTable;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use warren_core::{Broker, ConnectionId, Effect, Outbox};

use crate::error::AmqpError;
use crate::mailbox::Mailbox;
use crate::store_worker::StoreWork;
use crate::writer::{Outbound, OutboundQueue};

/// How often the broker's timer runs (message TTLs, queue expiry, consumer
/// timeouts): the precision of every deadline it enforces.
pub const TIMER_TICK: Duration = Duration::from_millis(10);

/// The hub, shared by every connection task and the timer.
#[derive(Clone)]
pub struct SharedHub {
    hub: Arc<Mutex<Hub>>,
    /// Publisher confirms (acks) sent, counted outside the lock: confirms
    /// go out when the log's fsync completes, not under a broker call.
    confirmed: Arc<AtomicU64>,
}

impl SharedHub {
    pub fn new(hub: Hub) -> Self {
        Self {
            hub: Arc::new(Mutex::new(hub)),
            confirmed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A handle that does not keep the hub alive, for threads that must
    /// end with it.
    pub(crate) fn downgrade(&self) -> WeakHub {
        WeakHub {
            hub: Arc::downgrade(&self.hub),
            confirmed: Arc::clone(&self.confirmed),
        }
    }

    pub fn count_confirms(&self, count: u64) {
        self.confirmed.fetch_add(count, Ordering::Relaxed);
    }

    /// Publisher confirms sent since the start.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    /// Locks the hub and tells the broker the time, so that every operation
    /// sees the current time without the broker reading a clock itself.
    pub fn lock(&self) -> MutexGuard<'_, Hub> {
        let mut hub = self.hub.lock();
        hub.broker.advance_clock(wall_clock_ms());
        hub
    }

    /// Runs the broker's timer, and the rounds of work that operations
    /// leave (`Broker::continue_rounds`), until the task is dropped.
    pub async fn run_timer(self) {
        let rounds_waiting = Arc::clone(&self.lock().rounds_waiting);
        let mut interval = tokio::time::interval(TIMER_TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut more = tokio::select! {
                _ = interval.tick() => {
                    let mut hub = self.lock();
                    let mut out = Outbox::default();
                    hub.broker.tick(&mut out);
                    hub.dispatch(&mut out);
                    hub.broker.has_rounds()
                }
                () = rounds_waiting.notified() => true,
            };
            // A large settle (a channel closed with many unacked
            // deliveries) or a consumer catching up on a backlog goes on
            // in rounds of about a millisecond each; between rounds the
            // lock goes to whoever waits for it.
            while more {
                tokio::task::yield_now().await;
                let mut hub = self.lock();
                let mut out = Outbox::default();
                more = hub.broker.continue_rounds(&mut out);
                hub.dispatch(&mut out);
                MutexGuard::unlock_fair(hub);
            }
        }
    }
}

/// The hub, as long as something else keeps it.
pub(crate) struct WeakHub {
    hub: Weak<Mutex<Hub>>,
    confirmed: Arc<AtomicU64>,
}

impl WeakHub {
    pub(crate) fn upgrade(&self) -> Option<SharedHub> {
        self.hub.upgrade().map(|hub| SharedHub {
            hub,
            confirmed: Arc::clone(&self.confirmed),
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
    /// The broker itself; other crates read it through `broker()`.
    pub(crate) broker: Broker,
    writers: HashMap<ConnectionId, OutboundQueue>,
    /// Unbounded, yet bounded in practice: the broker asks at most once per
    /// channel, and a connection has at most channel_max channels.
    notices: HashMap<ConnectionId, Mailbox<ConnectionNotice>>,
    connections: HashMap<ConnectionId, ConnectionInfo>,
    next_connection: u64,
    /// Where the store's slow work goes (`store_worker.rs`), once started.
    store_worker: Option<mpsc::Sender<StoreWork>>,
    /// Wakes the timer task when an operation left rounds of work, so
    /// that they go on at once rather than at the next tick.
    rounds_waiting: Arc<Notify>,
}

impl Hub {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            writers: HashMap::new(),
            notices: HashMap::new(),
            connections: HashMap::new(),
            next_connection: 0,
            store_worker: None,
            rounds_waiting: Arc::new(Notify::new()),
        }
    }

    pub(crate) fn set_store_worker(&mut self, work: mpsc::Sender<StoreWork>) {
        self.store_worker = Some(work);
    }

    /// The broker, to read its state (the management API's views, the
    /// metrics); changes go through sessions.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn allocate_connection_id(&mut self) -> ConnectionId {
        self.next_connection += 1;
        ConnectionId(self.next_connection)
    }

    pub(crate) fn register_connection(
        &mut self,
        info: ConnectionInfo,
        writer: OutboundQueue,
        notices: Mailbox<ConnectionNotice>,
    ) {
        self.writers.insert(info.id, writer);
        self.notices.insert(info.id, notices);
        self.connections.insert(info.id, info);
    }

    /// The open connections, oldest first.
    pub fn connection_infos(&self) -> Vec<ConnectionInfo> {
        let mut infos: Vec<ConnectionInfo> = self.connections.values().cloned().collect();
        infos.sort_by_key(|info| info.id);
        infos
    }

    pub fn connection_info(&self, connection: ConnectionId) -> Option<&ConnectionInfo> {
        self.connections.get(&connection)
    }

    /// Open connections logged in as `user`; a scan, made once per
    /// `connection.open`, which is cheap next to the login before it.
    pub(crate) fn connections_of_user(&self, user: &str) -> usize {
        self.connections
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
        self.notices.get(&connection).is_some_and(|notices| {
            notices.push(ConnectionNotice::Close {
                reason: reason.to_owned(),
            })
        })
    }

    /// Forgets a connection and releases what it held in the broker.
    pub fn remove_connection(&mut self, connection: ConnectionId) {
        self.writers.remove(&connection);
        self.notices.remove(&connection);
        self.connections.remove(&connection);
        let mut out = Outbox::default();
        self.broker.close_connection(connection, &mut out);
        // Nobody is left to hold a reply for what closing changed.
        self.broker.take_topology_ticket();
        self.dispatch(&mut out);
    }

    /// Hands each effect to the writer of the connection it concerns.
    pub fn dispatch(&mut self, out: &mut Outbox) {
        if self.broker.has_rounds() {
            self.rounds_waiting.notify_one();
        }
        for effect in out.effects.drain(..) {
            match effect {
                Effect::Deliver(delivery) => {
                    if let Some(writer) = self.writers.get(&delivery.connection) {
                        writer.send(Outbound::Deliver(delivery));
                    }
                }
                Effect::CloseChannel {
                    connection,
                    channel,
                    error,
                } => {
                    if let Some(notices) = self.notices.get(&connection) {
                        notices.push(ConnectionNotice::CloseChannel {
                            channel,
                            error: error.into(),
                        });
                    }
                }
                // Sending fails only once the worker has stopped, with the
                // hub going away.
                Effect::ReadAhead(request) => {
                    if let Some(work) = &self.store_worker {
                        let _ = work.send(StoreWork::ReadAhead(request));
                    }
                }
                Effect::Discard(discard) => {
                    if let Some(work) = &self.store_worker {
                        let _ = work.send(StoreWork::Discard(discard));
                    }
                }
                Effect::CancelConsumer {
                    connection,
                    channel,
                    consumer_tag,
                } => {
                    if let Some(writer) = self.writers.get(&connection) {
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
    pub fn resume_deliveries(&mut self, connection: ConnectionId, channel: u16) {
        let mut out = Outbox::default();
        self.broker.resume_deliveries(connection, channel, &mut out);
        self.dispatch(&mut out);
    }
}
