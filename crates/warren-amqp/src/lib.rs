//! Warren's AMQP 0-9-1 server: the tokio listener, one reader task and one
//! writer task per connection, channel state, and the mapping between AMQP
//! methods and `warren-core` broker operations, with RabbitMQ's error codes.

pub mod auth;
mod channel;
mod config;
mod connection;
mod hub;
mod mailbox;
mod server;
mod storage;
mod writer;

pub use config::{AmqpConfig, StorageConfig, User};
pub use hub::{ConnectionInfo, Hub, SharedHub, wall_clock_ms};
pub use server::{AmqpServer, StartError};
pub use warren_proto::FRAME_MIN_SIZE_BYTES;
