//! The broker's state machine: the operations on vhosts, exchanges,
//! queues, connections' channels, consumers and unacknowledged deliveries.
//!
//! Every operation puts the deliveries and notifications it causes for any
//! connection into an [`Outbox`] (or a channel's [`DeliverySink`]). It never
//! blocks on I/O and never touches a socket.
//!
//! Operations come in two kinds, by what they may change:
//!
//! - Operations on `&mut self` change the shape of the broker: vhosts,
//!   exchanges, bindings, queues coming and going, connections and channels
//!   opening and closing, consumers starting and stopping. The server runs
//!   them one at a time (the write side of its readers-writer lock).
//! - Operations on `&self` move messages: publish, deliver, ack, reject,
//!   the rounds of large settles and deliveries, timers. The server runs
//!   any number of them at once (the read side). Each queue is behind a
//!   lock of its own and each channel behind another, so two of them wait
//!   for each other only where they touch the same queue or channel.
//!
//! Lock order: a queue's lock may be held while a channel's is taken
//! (delivering records the delivery on the consumer's channel), never the
//! reverse, and never two queues' at once: a settle takes deliveries off
//! its channel first and then visits their queues one by one; dead letters
//! are routed after their source queue's lock is released. The timer and
//! deadline sets and the pending rounds are leaves: nothing is locked while
//! one of them is held.
//!
//! `Broker`'s fields are private to this module and its children, one per
//! kind of operation; the state they coordinate (topology, queues,
//! sessions) lives in the modules beside this one, which never call back
//! into the broker.

mod connections;
mod dead_letter;
mod declare;
mod delivery;
mod durable;
mod effect;
mod flow;
pub mod inspect;
mod policies;
mod publish;
mod recovery;
pub mod reply_to;
mod request;
mod timers;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use amq_protocol::types::ShortString;
use parking_lot::{Mutex, MutexGuard};
use warren_store::{SpillArea, Ticket, TopologyChange};

pub use delivery::{DELIVERY_ROUND_MAX, SETTLE_ROUND_MAX};
pub use effect::{Delivery, DeliverySink, Effect, Outbox};
pub use request::{Consume, ExchangeDeclare, GetOk, Published, QueueDeclare, QueueDeclared};

use crate::durable::Store;
use crate::error::{BrokerError, BrokerResult, Resource};
use crate::limits::Limits;
use crate::policy::VhostPolicies;
use crate::queue::discard::forget_copy;
use crate::queue::{Queue, Stored};
use crate::session::ConnectionState;
use crate::session::channel::{AckDeadlines, Channel};
use crate::stats::{LifecycleCounts, MessageCounts};
use crate::topology::VHost;
use crate::{ConnectionId, QueueId};
use delivery::{PendingDeliveries, SettleRound};

pub struct Broker {
    vhosts: HashMap<String, VHost>,
    /// Each queue behind its own lock (see the module's lock order).
    queues: HashMap<QueueId, Mutex<Queue>>,
    connections: HashMap<ConnectionId, ConnectionState>,
    next_queue_id: u64,
    /// The message log and topology file; None for a broker that keeps
    /// everything in memory (tests of the state machine).
    store: Option<Store>,
    /// Where queues keep what does not fit their heads in memory: the
    /// store's spill area, set before recovery creates the durable queues.
    spill: Option<Arc<SpillArea>>,
    /// Whether the caller runs the store's slow work off the broker's locks
    /// (`Effect::ReadAhead`, `Effect::Discard`).
    store_worker: bool,
    name_state: u64,
    limits: Limits,
    /// The time as the caller last gave it, ms since the UNIX epoch; never
    /// goes backwards.
    now_ms: AtomicU64,
    /// Queues that want the timer at a given time (message expiry,
    /// `x-expires`), earliest first.
    timers: Mutex<BTreeSet<(u64, QueueId)>>,
    /// Channels with a delivery under `x-consumer-timeout`, by deadline.
    ack_deadlines: Mutex<AckDeadlines>,
    /// Messages published by clients, and those no queue received.
    published: AtomicU64,
    unroutable: AtomicU64,
    /// The counts of deleted queues: with the live queues' counts, the
    /// broker-wide totals.
    retired: MessageCounts,
    lifecycle: LifecycleCounts,
    /// Deliveries of large settles still to be settled, oldest first (see
    /// `continue_rounds`).
    pending_settles: Mutex<VecDeque<SettleRound>>,
    /// Queues whose deliveries a round cut short (see `continue_rounds`).
    pending_deliveries: Mutex<PendingDeliveries>,
    /// Set whenever a round is left in either; see `has_rounds`.
    rounds_hint: AtomicBool,
    /// The broker's memory is over its high watermark: queues keep no new
    /// message body in memory (see `set_memory_pressure`).
    memory_pressure: AtomicBool,
    /// Each vhost's policies and operator policies, by vhost name.
    policies: HashMap<String, VhostPolicies>,
    /// Durable entries the current operation added and removed, handed to
    /// the topology journal when it ends (`sync_topology`).
    topology_changes: Vec<TopologyChange>,
    /// The journal ticket that makes the last recorded changes durable,
    /// until the caller takes it to hold its reply for it.
    topology_ticket: Option<Ticket>,
}

impl Broker {
    /// `seed` makes server-generated names unpredictable across runs.
    pub fn new(vhost_names: &[String], limits: Limits, seed: u64) -> Self {
        let mut broker = Self {
            vhosts: HashMap::new(),
            queues: HashMap::new(),
            connections: HashMap::new(),
            next_queue_id: 0,
            store: None,
            spill: None,
            store_worker: false,
            name_state: seed | 1,
            limits,
            now_ms: AtomicU64::new(0),
            timers: Mutex::new(BTreeSet::new()),
            ack_deadlines: Mutex::new(AckDeadlines::new()),
            published: AtomicU64::new(0),
            unroutable: AtomicU64::new(0),
            retired: MessageCounts::default(),
            lifecycle: LifecycleCounts::default(),
            pending_settles: Mutex::new(VecDeque::new()),
            pending_deliveries: Mutex::new(PendingDeliveries::default()),
            rounds_hint: AtomicBool::new(false),
            memory_pressure: AtomicBool::new(false),
            policies: HashMap::new(),
            topology_changes: Vec::new(),
            topology_ticket: None,
        };
        broker.add_vhost("/");
        for name in vhost_names {
            broker.add_vhost(name);
        }
        broker
    }

    /// Raised and cleared by the server's memory alarm. While raised, a
    /// message arriving in a queue with a store is written to the log and
    /// its body not kept in memory, as if the queue were past its resident
    /// limits; bodies already in memory stay until their messages leave.
    pub fn set_memory_pressure(&self, raised: bool) {
        self.memory_pressure.store(raised, Ordering::Relaxed);
    }

    pub fn memory_pressure(&self) -> bool {
        self.memory_pressure.load(Ordering::Relaxed)
    }

    pub fn add_vhost(&mut self, name: &str) {
        self.vhosts
            .entry(name.to_owned())
            .or_insert_with(|| VHost::new(name));
    }

    /// A vhost's `max-queues` limit (None: only the broker-wide one).
    /// Queues already past it stay; new ones are refused.
    pub fn set_vhost_queue_limit(&mut self, vhost: &str, max: Option<usize>) {
        self.add_vhost(vhost);
        if let Some(state) = self.vhosts.get_mut(vhost) {
            state.queues_max = max;
        }
    }

    pub fn vhost_exists(&self, name: &str) -> bool {
        self.vhosts.contains_key(name)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    // ----- helpers -------------------------------------------------------

    /// The vhost a connection opened, which an operator may have deleted
    /// since: the connection is then being closed, and every operation it
    /// still sends is refused with 320 instead of touching the vhost.
    pub(crate) fn vhost_of(&self, connection: ConnectionId) -> BrokerResult<String> {
        let vhost = self
            .connections
            .get(&connection)
            .map(|state| state.vhost.clone())
            .ok_or(BrokerError::ConnectionNotOpen)?;
        if !self.vhosts.contains_key(&vhost) {
            return Err(BrokerError::VhostDeleted(vhost));
        }
        Ok(vhost)
    }

    pub(crate) fn channel_mut(
        &mut self,
        connection: ConnectionId,
        channel: u16,
    ) -> Option<&mut Channel> {
        self.connections
            .get_mut(&connection)
            .and_then(|state| state.channels.get_mut(&channel))
            .map(Mutex::get_mut)
    }

    /// A channel, locked; never taken while holding another channel.
    pub(crate) fn channel(
        &self,
        connection: ConnectionId,
        channel: u16,
    ) -> Option<MutexGuard<'_, Channel>> {
        self.connections
            .get(&connection)
            .and_then(|state| state.channels.get(&channel))
            .map(Mutex::lock)
    }

    pub(crate) fn queue_mut(&mut self, id: QueueId) -> Option<&mut Queue> {
        self.queues.get_mut(&id).map(Mutex::get_mut)
    }

    /// A queue, locked; never taken while holding another queue or a
    /// channel.
    pub(crate) fn queue(&self, id: QueueId) -> Option<MutexGuard<'_, Queue>> {
        self.queues.get(&id).map(Mutex::lock)
    }

    /// Finds a queue by name for a connection, refusing another connection's
    /// exclusive queue.
    pub(crate) fn queue_for(&self, connection: ConnectionId, name: &str) -> BrokerResult<QueueId> {
        let vhost_name = self.vhost_of(connection)?;
        let id = self.vhosts[&vhost_name]
            .queues
            .get(name)
            .copied()
            .ok_or_else(|| {
                BrokerError::NotFound(Resource::Queue {
                    name: name.to_owned(),
                    vhost: vhost_name.clone(),
                })
            })?;
        self.queue(id)
            .expect("a vhost names live queues")
            .check_access(connection)?;
        Ok(id)
    }

    /// A fresh name for a queue declared with an empty name, handed out
    /// before the declaration so that permissions can be checked against
    /// the name the queue will have, as RabbitMQ does.
    pub fn generate_queue_name(&mut self) -> ShortString {
        self.generate_name("amq.gen-").into()
    }

    /// A name like RabbitMQ's server-generated ones: a prefix and 22
    /// URL-safe characters.
    pub(crate) fn generate_name(&mut self, prefix: &str) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut name = String::with_capacity(prefix.len() + 22);
        name.push_str(prefix);
        for _ in 0..22 {
            // xorshift64: unpredictable enough for names, which only need to
            // be unique; uniqueness is checked against existing queues below.
            self.name_state ^= self.name_state << 13;
            self.name_state ^= self.name_state >> 7;
            self.name_state ^= self.name_state << 17;
            name.push(ALPHABET[(self.name_state % 64) as usize] as char);
        }
        if self
            .vhosts
            .values()
            .any(|vhost| vhost.queues.contains_key(name.as_str()))
        {
            return self.generate_name(prefix);
        }
        name
    }

    // ----- introspection -------------------------------------------------

    pub fn queue_counts(&self, vhost: &str, queue: &str) -> Option<(usize, usize)> {
        let id = self.vhosts.get(vhost)?.queues.get(queue)?;
        let queue = self.queue(*id)?;
        Some((queue.ready_count(), queue.consumers.len()))
    }

    pub fn unacked_count(&self, connection: ConnectionId, channel: u16) -> usize {
        self.connections
            .get(&connection)
            .and_then(|state| state.channels.get(&channel))
            .map_or(0, |state| state.lock().unacked.len())
    }
}

/// A message has left `queue` for good: its record is settled for that
/// queue (or, when `queue_exists` is false because the queue was deleted,
/// the log just stops counting it); a `Paged` record is simply released.
pub(crate) fn forget_stored(
    store: Option<&Store>,
    queue_exists: bool,
    queue: QueueId,
    stored: Stored,
) {
    if let Some(store) = store {
        forget_copy(&store.log, queue_exists, queue, stored);
    }
}
