//! The AMQP server's settings, each with the limit it puts on a peer.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use warren_access::{
    AccessControl, DeclaredPassword, DeclaredUser, Definitions, PermissionEntry, Permissions, Tags,
};
use warren_core::Limits;

use crate::alarms::MemoryWatermark;

#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// Highest channel number a connection may open (RabbitMQ's default).
    pub channel_max: u16,
    /// Largest frame, framing included, offered in `connection.tune`.
    /// 128 KiB is RabbitMQ's default: large enough that a body frame's
    /// framing overhead is negligible, small enough that a frame never
    /// holds a channel's turn on the socket for long.
    pub frame_max_bytes: u32,
    /// Heartbeat interval proposed to clients; 0 disables heartbeats.
    pub heartbeat_s: u16,
    /// Largest message body accepted: 128 MiB by default, RabbitMQ 3.x's
    /// default (ML payloads, such as images, tensors and batches of
    /// documents, are often that large), at most 512 MiB, RabbitMQ's
    /// ceiling. A body is assembled in one buffer and written to the store
    /// from it, and a queue keeps a body that large on disk while it waits.
    pub message_size_max_bytes: u64,
    /// Nesting of field tables and arrays a frame may carry (a top-level
    /// table is 1). Checked before the recursive parser runs, so a hostile
    /// frame cannot exhaust the stack; real traffic needs 4 (`x-death`).
    pub table_depth_max: u32,
    /// Encoded size of a message's `headers` table; past it the message is
    /// refused (406), whatever frame_max allows.
    pub headers_size_max_bytes: u32,
    /// Open client connections; a socket beyond this is closed on accept.
    pub connections_max: usize,
    /// Open connections one user may hold, so that one tenant (or one
    /// leaked credential) cannot take every slot of `connections_max`.
    pub connections_per_user_max: usize,
    /// Time a client has to finish the opening handshake.
    pub handshake_timeout: Duration,
    /// Frames queued for a connection's socket before the broker stops
    /// reading from that connection, so a client that does not read cannot
    /// make the broker buffer without limit.
    pub outbound_frames_max: usize,
    /// Messages and acks one transaction may hold before `tx.commit`.
    pub tx_operations_max: usize,
    /// Publishes awaiting their confirm on one channel (waiting for their
    /// fsync). Past this the broker stops reading from the connection until
    /// confirms go out, so a publisher cannot queue unbounded work.
    pub pending_confirms_per_channel_max: usize,
    pub storage: StorageConfig,
    pub limits: Limits,
    /// Users, vhosts and permissions.
    pub access: Arc<AccessControl>,
    /// AMQPS, when configured: AMQP over TLS on a second listener.
    pub amqps: Option<Amqps>,
    /// The product `connection.start` names.
    pub product: Product,
}

/// The RabbitMQ version whose AMQP behaviour Warren follows, reported where
/// tools and clients ask for RabbitMQ's version.
pub const RABBITMQ_COMPATIBLE_VERSION: &str = "3.13.0";

/// What the server says it is in `connection.start`'s `product` and
/// `version` properties. Some clients choose behaviour from them: amqplib's
/// and amqp091-go's RabbitMQ-only tests, and kombu and Celery, which take
/// `basic.qos`'s global flag to mean what RabbitMQ makes it mean only when
/// the product is "RabbitMQ".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Product {
    /// "Warren" and Warren's own version.
    #[default]
    Warren,
    /// "RabbitMQ" and `RABBITMQ_COMPATIBLE_VERSION`, for deployments whose
    /// clients gate behaviour on the name.
    RabbitMq,
}

impl Product {
    pub fn name(self) -> &'static str {
        match self {
            Product::Warren => "Warren",
            Product::RabbitMq => "RabbitMQ",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Product::Warren => env!("CARGO_PKG_VERSION"),
            Product::RabbitMq => RABBITMQ_COMPATIBLE_VERSION,
        }
    }
}

/// The AMQPS listener: its address and its rustls configuration.
#[derive(Debug, Clone)]
pub struct Amqps {
    pub address: std::net::SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            channel_max: 2047,
            frame_max_bytes: 131_072,
            heartbeat_s: 60,
            message_size_max_bytes: 128 * 1024 * 1024,
            table_depth_max: warren_proto::table_limits::TABLE_DEPTH_MAX_DEFAULT,
            headers_size_max_bytes: warren_proto::table_limits::HEADERS_SIZE_MAX_BYTES_DEFAULT,
            connections_max: 10_000,
            connections_per_user_max: 10_000,
            handshake_timeout: Duration::from_secs(10),
            outbound_frames_max: 4_096,
            tx_operations_max: 100_000,
            pending_confirms_per_channel_max: 10_000,
            storage: StorageConfig::default(),
            limits: Limits::default(),
            access: Arc::new(AccessControl::in_memory(
                default_definitions(),
                default_loopback_users(),
            )),
            amqps: None,
            product: Product::default(),
        }
    }
}

/// What a broker starts with when it has no access file yet, as RabbitMQ
/// does: the vhost `/` and the user `guest` (password `guest`, tagged
/// administrator) with every permission there.
pub fn default_definitions() -> Definitions {
    Definitions {
        users: vec![DeclaredUser {
            name: "guest".to_owned(),
            password: DeclaredPassword::Plain("guest".to_owned()),
            tags: Tags::administrator(),
        }],
        vhosts: vec!["/".to_owned()],
        permissions: vec![PermissionEntry {
            user: "guest".to_owned(),
            vhost: "/".to_owned(),
            permissions: Arc::new(Permissions::full()),
        }],
    }
}

/// RabbitMQ's `loopback_users` default: `guest` may log in only from the
/// machine itself, because everyone knows its password.
pub fn default_loopback_users() -> Vec<String> {
    vec!["guest".to_owned()]
}

/// Where and how durable state is kept.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Directory for the message log and the topology file; None keeps
    /// everything in memory.
    pub data_dir: Option<PathBuf>,
    /// Publishers are blocked (connection.blocked) while the data
    /// directory's file system has less than this free. 50 MB is RabbitMQ's
    /// default: room to finish in-flight writes and to let consumers drain.
    pub disk_free_limit_bytes: u64,
    /// How often free space is checked.
    pub disk_check_interval: Duration,
    pub segment_size_bytes: u64,
    /// Publishers are blocked while the broker's resident memory is over
    /// this (40% of the machine's or the cgroup's memory by default, as in
    /// RabbitMQ), and queues keep new messages on disk.
    pub memory_high_watermark: MemoryWatermark,
    /// How often resident memory is checked.
    pub memory_check_interval: Duration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            disk_free_limit_bytes: 50_000_000,
            disk_check_interval: Duration::from_secs(1),
            segment_size_bytes: 16 * 1024 * 1024,
            memory_high_watermark: MemoryWatermark::default(),
            memory_check_interval: Duration::from_secs(1),
        }
    }
}
