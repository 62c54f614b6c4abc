//! Warren's integration tests, one binary: each module starts the real
//! `warren` binary (see `common`) and drives it with real clients.

mod common;

mod backlog;
mod basic;
mod command_invalid;
mod confirms_tx;
mod connection;
mod crash_recovery;
mod exchanges;
mod flow;
mod heartbeat;
mod hostile;
mod inference;
mod malformed;
mod permissions;
mod queues;
mod stall;
mod tls;
mod tutorials;
