//! Who may connect to Warren and what they may do there: users with tags
//! and Argon2id password hashes, vhosts, and per-vhost permissions (three
//! regular expressions) with RabbitMQ's meaning, persisted in the data
//! directory and changed at run time.
//!
//! Nothing here knows AMQP or HTTP: the servers ask [`AccessControl`] to
//! log a user in, to open a vhost, and to check an operation on a named
//! queue or exchange, and turn its answers into their own error codes.

mod file;
mod internal;
mod limits;
pub mod password;
pub mod permissions;
mod registry;
pub mod tags;

pub use file::{ACCESS_FILE_NAME, FileError};
pub use internal::INTERNAL_USER;
pub use limits::{LimitError, VhostLimits};
pub use password::{HashingAlgorithm, PasswordError, PasswordHash};
pub use permissions::{Access, Pattern, PatternError, Permissions, Resource, ResourceKind};
pub use registry::{
    AccessControl, AccessError, DeclaredPassword, DeclaredUser, Definitions, Grant, LoginError,
    NAME_LENGTH_MAX_BYTES, PasswordChange, PermissionEntry, Refused, USERS_MAX, User, VHOSTS_MAX,
    VhostRefusal,
};
pub use tags::Tags;
