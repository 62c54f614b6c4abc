//! Warren's broker model, with RabbitMQ's semantics: vhosts, exchanges and
//! their routing, queues, consumers, prefetch, acknowledgements.
//!
//! This crate is a state machine. It does no I/O and never blocks: the AMQP
//! server calls [`Broker`] operations and carries out the [`Effect`]s they
//! return. It never touches a socket and never parses a frame.

pub mod arguments;
mod bindings;
mod broker;
pub mod codec;
mod dead_letter;
mod delivery;
mod discard;
mod durable;
mod error;
mod exchange;
mod flow;
mod inspect;
mod message;
mod priority;
mod queue;
mod reply_to;
mod stats;
mod timers;

pub use broker::{
    Broker, ChannelMode, Consume, Delivery, Effect, ExchangeDeclare, GetOk, Limits, Outbox,
    Published, QueueDeclare, QueueDeclared, UnwrittenDeliveries,
};
pub use dead_letter::DeathReason;
pub use discard::Discard;
pub use durable::{RecoveryError, RecoverySummary};
pub use error::{BrokerError, BrokerResult, ErrorCode};
pub use exchange::{ExchangeKind, headers_match, topic_matches};
pub use flow::FlowGauge;
pub use inspect::{
    BindingInfo, ChannelInfo, ConsumerInfo, DestinationKind, ExchangeInfo, QueueInfo, Totals,
};
pub use message::Message;
pub use queue::{
    READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, RESIDENT_BYTES_MAX, RESIDENT_MESSAGES_MAX, ReadAhead,
};
pub use reply_to::REPLY_TO_QUEUE;
pub use stats::{ExchangeCounts, MessageCounts};

/// Identifies one client connection for the broker's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Identifies one queue; never reused, so a stale reference to a deleted
/// queue cannot reach a new queue of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);
