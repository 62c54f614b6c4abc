//! Warren's AMQP 0-9-1 server: the tokio listener, one reader task and one
//! writer task per connection, channel state, and the mapping between AMQP
//! methods and `warren-core` broker operations, with RabbitMQ's error codes.

mod admin;
pub mod alarms;
pub mod auth;
mod authorize;
mod channel;
mod config;
mod connection;
mod direct;
mod error;
mod hub;
pub mod listen;
mod mailbox;
mod server;
mod session;
mod storage;
mod store_worker;
pub mod tls;
mod transport;
mod turn;
mod writer;

pub use admin::{Admin, AdminError};
pub use config::{
    AmqpConfig, Amqps, Product, RABBITMQ_COMPATIBLE_VERSION, StorageConfig, default_definitions,
    default_loopback_users,
};
pub use direct::{
    Confirmation, DirectConnector, DirectLogin, DirectSession, Event, OpenError, Reply,
};
pub use error::{AmqpError, AmqpResult};
pub use hub::{ConnectionInfo, Hub, MESSAGE_SIZE_BUCKETS, PublishCounts, SharedHub, wall_clock_ms};
pub use server::{AmqpServer, StartError};
pub use warren_proto::FRAME_MIN_SIZE_BYTES;
pub use warren_proto::table_limits::TABLE_DEPTH_CEILING;
