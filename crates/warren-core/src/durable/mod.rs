//! What survives a restart, as bytes: the broker's handle on the message
//! log and the topology journal, the layout of messages (`codec`) and of
//! the topology's entries (`entry`). What is written when is decided by
//! the operations in `broker`; this module knows no broker state.

pub mod codec;
pub(crate) mod entry;

use warren_store::{MessageLog, StoreError, TopologyJournal};

/// The broker's handle on disk.
pub struct Store {
    pub log: MessageLog,
    pub(crate) topology: TopologyJournal,
}

/// What recovery rebuilt, for the log line that reports it.
#[derive(Debug, Default, Clone)]
pub struct RecoverySummary {
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
    pub messages: usize,
    pub segments_read: usize,
    pub bytes_read: u64,
    pub torn_records_dropped: usize,
    pub corrupt_records_skipped: usize,
    pub clean_shutdown: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the topology file is malformed: {0}")]
    Topology(String),
}

pub(crate) fn message_log(store: Option<&Store>) -> Option<&MessageLog> {
    store.map(|store| &store.log)
}
