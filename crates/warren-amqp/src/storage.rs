//! The server's side of durability: opening the store and rebuilding the
//! broker from it, telling connections when publishes become durable, and
//! the free-disk alarm that blocks publishers (see `alarms`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};
use warren_core::{Broker, RecoveryError};
use warren_store::{LogConfig, MessageLog, OsFileSystem, SpillArea, StoreError, TopologyJournal};

use crate::alarms::Alarms;
use crate::config::StorageConfig;
use crate::hub::SharedHub;

/// How far the message log (or the topology journal) has made appends
/// durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurableProgress {
    pub ticket: u64,
    /// The log failed a write or fsync: nothing more will become durable.
    pub poisoned: bool,
}

/// What every connection watches.
#[derive(Debug, Clone)]
pub struct StorageSignals {
    pub durable: watch::Receiver<DurableProgress>,
    /// The topology journal's progress: a declaration's `*-ok` waits for it.
    pub topology: watch::Receiver<DurableProgress>,
    /// The resource alarms raised: while any is, publishers are blocked.
    pub alarms: watch::Receiver<Alarms>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("opening the message store: {0}")]
    Open(#[from] StoreError),
    #[error("recovering durable state: {0}")]
    Recover(#[from] RecoveryError),
}

/// Opens the store under `config.data_dir` (if any), recovers the broker's
/// durable state into `broker`, and returns the signals connections watch
/// plus the sender the resource monitors drive.
pub fn open(
    broker: &mut Broker,
    config: &StorageConfig,
) -> Result<(StorageSignals, watch::Sender<Alarms>), StorageError> {
    let (durable_sender, durable) = watch::channel(DurableProgress::default());
    let (topology_sender, topology) = watch::channel(DurableProgress::default());
    let (alarm_sender, alarms) = watch::channel(Alarms::default());
    if let Some(data_dir) = &config.data_dir {
        let fs = Arc::new(OsFileSystem::new());
        let listener = Box::new(move |result: Result<u64, StoreError>| {
            record_progress(&durable_sender, result);
        });
        let topology_listener = Box::new(move |result: Result<u64, StoreError>| {
            record_progress(&topology_sender, result);
        });
        let log_config = LogConfig {
            segment_size_bytes: config.segment_size_bytes,
            ..LogConfig::default()
        };
        let started = Instant::now();
        let messages_dir = data_dir.join("messages");
        let spill = SpillArea::open(fs.clone(), &messages_dir.join("spill"))?;
        let (topology, entries) = TopologyJournal::open(fs.clone(), data_dir, topology_listener)?;
        let mut summary = broker.restore_topology(&entries, Some(spill))?;
        // Each recovered message goes straight into its queue, which keeps
        // only the head of a long backlog in memory.
        let now_ms = broker.now_ms();
        let mut restored = 0;
        let (log, recovery) = MessageLog::open_with(
            fs,
            &messages_dir,
            log_config,
            listener,
            &mut |queue, message, payload| {
                let kept = broker.restore_message(queue, message, payload, now_ms);
                restored += usize::from(kept);
                kept
            },
        )?;
        summary.messages = restored;
        broker.attach_log(log, &recovery, topology, &mut summary);
        info!(
            data_dir = %data_dir.display(),
            exchanges = summary.exchanges,
            queues = summary.queues,
            bindings = summary.bindings,
            messages = summary.messages,
            segments = summary.segments_read,
            bytes = summary.bytes_read,
            torn_records_dropped = summary.torn_records_dropped,
            corrupt_records_skipped = summary.corrupt_records_skipped,
            clean_shutdown = summary.clean_shutdown,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "durable state recovered"
        );
    }
    Ok((
        StorageSignals {
            durable,
            topology,
            alarms,
        },
        alarm_sender,
    ))
}

fn record_progress(sender: &watch::Sender<DurableProgress>, result: Result<u64, StoreError>) {
    sender.send_modify(|progress| match result {
        Ok(ticket) => progress.ticket = ticket,
        Err(_) => progress.poisoned = true,
    });
}

/// Checks free disk space periodically and raises or clears the alarm.
pub async fn watch_disk(hub: SharedHub, config: StorageConfig, alarms: watch::Sender<Alarms>) {
    // The file system is asked outside the broker's lock.
    let Some(free_space) = hub.read().broker.message_log().map(MessageLog::free_space) else {
        return;
    };
    let mut ticker =
        tokio::time::interval(config.disk_check_interval.max(Duration::from_millis(50)));
    loop {
        ticker.tick().await;
        let available = match free_space.available_bytes() {
            Ok(available) => available,
            Err(error) => {
                warn!(%error, "could not read free disk space");
                continue;
            }
        };
        let low = available < config.disk_free_limit_bytes;
        if low != alarms.borrow().disk {
            if low {
                warn!(
                    available_bytes = available,
                    limit_bytes = config.disk_free_limit_bytes,
                    "free disk space is under the limit; blocking publishers"
                );
            } else {
                info!(
                    available_bytes = available,
                    "free disk space is back over the limit; unblocking publishers"
                );
            }
            alarms.send_modify(|alarms| alarms.disk = low);
        }
    }
}
