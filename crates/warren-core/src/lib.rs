//! Warren's broker model, with RabbitMQ's semantics: vhosts, exchanges and
//! their routing, queues, consumers, prefetch, acknowledgements.
//!
//! This crate is a state machine. It does no I/O and never blocks: the AMQP
//! server calls [`Broker`] operations and carries out the [`Effect`]s they
//! return. It never touches a socket and never parses a frame.
//!
//! Its modules follow the concepts, and their imports point one way:
//! `broker` (the operations, which coordinate everything else) uses
//! `topology` (vhosts, exchanges, bindings, routing), `queue` (a queue's
//! messages, consumers, arguments, dead-lettering, flow), `session`
//! (connections' channels and their unacknowledged deliveries) and
//! `durable` (the bytes of what is stored), and `policy` (which policies
//! apply to a queue or an exchange, over `queue`'s and `topology`'s
//! types); none of those uses `broker`.

mod broker;
mod durable;
mod error;
mod field;
mod limits;
mod message;
pub mod policy;
mod queue;
mod session;
mod stats;
mod topology;

pub use broker::inspect::{
    BindingInfo, ChannelInfo, ConsumerInfo, DestinationKind, ExchangeInfo, QueueInfo, Totals,
};
pub use broker::reply_to::REPLY_TO_QUEUE;
pub use broker::{
    Broker, Consume, DELIVERY_ROUND_MAX, Delivery, DeliverySink, Effect, ExchangeDeclare, GetOk,
    Outbox, Published, QueueDeclare, QueueDeclared, SETTLE_ROUND_MAX,
};
pub use durable::codec;
pub use durable::{RecoveryError, RecoverySummary};
pub use error::{
    ArgumentOf, BrokerError, BrokerResult, ErrorCode, Inequivalence, Resource, reply_text,
};
pub use limits::{FLOW_READY_MAX_DEFAULT, Limits};
pub use message::Message;
pub use queue::ages::{DELIVERY_COUNT_BUCKETS, DeliveryCounts};
pub use queue::arguments;
pub use queue::dead_letter::DeathReason;
pub use queue::discard::Discard;
pub use queue::flow::FlowGauge;
pub use queue::{
    EXPIRY_ROUND_MAX, READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, RESIDENT_BYTES_MAX,
    RESIDENT_MESSAGES_MAX, ReadAhead,
};
pub use session::channel::{ChannelMode, UnwrittenDeliveries};
pub use stats::{ExchangeCounts, LifecycleCounts, MessageCounts};
pub use topology::exchange::{ExchangeKind, ExchangePolicy, headers_match, topic_matches};

/// Identifies one client connection for the broker's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Identifies one queue; never reused, so a stale reference to a deleted
/// queue cannot reach a new queue of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);
