//! The message log: one append-only sequence of segment files shared by all
//! durable queues, written by a commit thread that batches every record
//! appended while the previous fsync ran (group commit).
//!
//! A publish is durable once the commit thread has fsynced the batch that
//! holds it; callers learn this through the ticket each append returns and
//! the listener the log calls after every fsync. A failed write or fsync
//! poisons the log: it never retries and never reports durability again, and
//! every later append fails, so nothing is confirmed that may not be on disk.
//!
//! A segment file is deleted once no live message is in it and no record in
//! it is still needed to mark a message in an older, surviving segment as
//! removed or delivered (its "back references").

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::compact::{
    CompactionReport, compact_sparse_segments, compaction_loop, worth_compacting,
};
use crate::fs::FileSystem;
use crate::record::{self, Decoded, MARK_BYTES, Mark, RecordKind};
use crate::replay::{RecoveredSink, Replayed, replay};

/// Where a record lives: segment number, byte offset, encoded length.
///
/// A queue keeps one per message it has on disk, so its size is a backlog's
/// memory: 16 bytes. A 32-bit offset is enough because a segment is closed
/// once it passes its size (at most 1 GiB) and one record is at most a
/// message (at most 512 MiB) and its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    pub segment: u64,
    pub offset: u32,
    pub length: u32,
}

/// Counts appends; an append is durable once the durable ticket reaches it.
pub type Ticket = u64;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the message store is poisoned by an earlier failure ({0}); restart the broker")]
    Poisoned(String),
    /// A message could not be read back: the disk refused (`kind` says
    /// how), or the record there does not decode (`InvalidData`).
    #[error("reading the message at segment {segment} offset {offset}: {reason}")]
    Read {
        segment: u64,
        offset: u64,
        kind: io::ErrorKind,
        reason: String,
    },
    /// A file operation failed; `kind` is the operating system's verdict
    /// (`StorageFull`, `PermissionDenied`, ...), for callers that treat
    /// them apart.
    #[error("{operation} {path}: {reason}")]
    Io {
        operation: &'static str,
        path: String,
        kind: io::ErrorKind,
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(operation: &'static str, path: &Path, error: io::Error) -> Self {
        StoreError::Io {
            operation,
            path: path.display().to_string(),
            kind: error.kind(),
            reason: error.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A segment is closed and a new one started past this size. 16 MiB
    /// keeps recovery reads and deletions granular without making the
    /// directory large.
    pub segment_size_bytes: u64,
    /// Bytes appended but not yet written beyond which the log reports
    /// itself congested, so publishers are slowed instead of queueing
    /// unbounded data in memory.
    pub pending_bytes_max: usize,
    /// How long a quiet log waits before closing a segment that holds no
    /// live message, so an idle store gives its space back.
    pub idle_roll_after: Duration,
    /// How often the compaction thread looks for segments that are mostly
    /// dead; None leaves compaction to `MessageLog::compact_now`.
    pub compaction_interval: Option<Duration>,
    /// A segment is rewritten once at least half of it, and at least this
    /// much, is dead: the data directory then stays within twice the live
    /// data plus this much per segment, and no segment is rewritten for
    /// less than a page. A segment is usually rewritten twice: when it is
    /// sealed with its long-lived messages among dead ones, and again once
    /// the messages that were in flight then have gone.
    pub compaction_min_dead_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_size_bytes: 16 * 1024 * 1024,
            pending_bytes_max: 64 * 1024 * 1024,
            idle_roll_after: Duration::from_secs(1),
            compaction_interval: Some(Duration::from_secs(1)),
            compaction_min_dead_bytes: 4 * 1024,
        }
    }
}

/// Told after every commit: the new durable ticket, or the error that
/// poisoned the log.
pub type DurableListener = Box<dyn Fn(Result<Ticket, StoreError>) + Send + Sync>;

/// A message found by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub sequence: u64,
    pub location: Location,
    /// Whether the message may have been handed to a consumer before the
    /// restart. After an unclean shutdown this is true for every message.
    pub delivered: bool,
}

/// What `open` found on disk.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Per queue id, its messages in sequence order.
    pub queues: BTreeMap<u64, Vec<RecoveredMessage>>,
    pub clean_shutdown: bool,
    pub segments_read: usize,
    pub bytes_read: u64,
    pub torn_records_dropped: usize,
    pub corrupt_records_skipped: usize,
}

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";
const CLEAN_SHUTDOWN_MARKER: &str = "clean-shutdown";

/// The file a segment's records are in: `<number>.seg` as first written,
/// `<number>.<generation>.seg` once compaction has rewritten it.
pub(crate) fn segment_file(segment: u64, generation: u32) -> String {
    if generation == 0 {
        format!("{segment:020}{SEGMENT_SUFFIX}")
    } else {
        format!("{segment:020}.{generation}{SEGMENT_SUFFIX}")
    }
}

pub(crate) fn segment_name(segment: u64) -> String {
    segment_file(segment, 0)
}

/// The segment number and generation a file name stands for, if it is a
/// segment's.
pub(crate) fn parse_segment_file(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    match stem.split_once('.') {
        None => Some((stem.parse().ok()?, 0)),
        Some((number, generation)) => {
            let generation: u32 = generation.parse().ok()?;
            (generation > 0).then_some(())?;
            Some((number.parse().ok()?, generation))
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct SegmentState {
    /// Queues' shares of the messages published into this segment that
    /// have not left them yet.
    pub(crate) live: u64,
    /// The shares written into the segment, or kept by its last
    /// compaction: with `live`, how much of it is dead.
    pub(crate) shares: u64,
    /// Live `Paged` records. Nothing on disk tells a live one from a dead
    /// one, so compaction leaves a segment alone while it has any.
    pub(crate) paged_live: u64,
    /// The file's length.
    pub(crate) bytes: u64,
    /// Holds records compaction does not rewrite: version-1 records, or
    /// damaged ones.
    pub(crate) keep_as_is: bool,
    /// Older segments holding messages that records in this one remove or
    /// mark delivered.
    pub(crate) back_references: BTreeSet<u64>,
    /// Whether the file exists on disk yet.
    pub(crate) created: bool,
    /// Set once compaction has rewritten the file.
    pub(crate) compacted: Option<CompactedFile>,
    /// Compaction is rewriting the file: it stays until that is done.
    pub(crate) compacting: bool,
    /// A rewritten file whose kept marks name a segment compaction has
    /// since folded them into: rewriting it again drops them.
    pub(crate) stale_marks: bool,
}

impl SegmentState {
    pub(crate) fn generation(&self) -> u32 {
        self.compacted.as_ref().map_or(0, |file| file.generation)
    }
}

/// A segment file compaction rewrote, holding only what was still needed.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompactedFile {
    pub(crate) generation: u32,
    /// Where records moved: (first offset, offset in this file) of a kept
    /// message every `ANCHOR_SPACING_BYTES` or so, in order of both. A
    /// message is found by reading from the anchor before its first offset
    /// to the next one, so a compacted segment costs a few bytes of memory
    /// however many messages it keeps.
    pub(crate) anchors: Vec<(u32, u32)>,
    /// The segment that was active when it was compacted: marks for it in
    /// older segments than this are folded into its kept records, so
    /// compaction of those drops them.
    pub(crate) boundary: u64,
}

/// How far apart `CompactedFile::anchors` are in the rewritten file.
pub(crate) const ANCHOR_SPACING_BYTES: u32 = 64 * 1024;

/// A payload tail at least this long is written from the caller's buffer
/// instead of being copied into the log's own (see `append_message_with_tail`).
const SHARED_TAIL_MIN_BYTES: usize = 64 * 1024;

/// Bytes waiting to be written at `base_offset` of a segment.
pub(crate) struct PendingWrite {
    pub(crate) segment: u64,
    pub(crate) base_offset: u64,
    data: PendingData,
}

enum PendingData {
    /// Records encoded into the log's own buffer.
    Encoded(Vec<u8>),
    /// The tail of a record's payload, still in the buffer it came in (a
    /// large message body shared with the broker's `Message`).
    Shared(Bytes),
}

impl PendingData {
    fn as_slice(&self) -> &[u8] {
        match self {
            PendingData::Encoded(bytes) => bytes,
            PendingData::Shared(bytes) => bytes,
        }
    }
}

pub(crate) struct State {
    pub(crate) active_segment: u64,
    pub(crate) active_length: u64,
    pub(crate) pending: Vec<PendingWrite>,
    pub(crate) pending_bytes: usize,
    /// Messages settled, and messages returned by consumers, since the
    /// last batch: the commit thread writes each list as one record at the
    /// end of its next batch, so an ack costs 16 bytes, not a record.
    pub(crate) settled: Vec<Mark>,
    pub(crate) returned: Vec<Mark>,
    /// Whether `pending` holds a record that must reach the disk: anything
    /// but Paged records, which only free memory and which recovery
    /// ignores, so a batch of nothing else is written without an fsync.
    pub(crate) pending_needs_sync: bool,
    /// A batch written without an fsync created a segment, whose directory
    /// entry the next synced batch makes durable.
    pub(crate) directory_unsynced: bool,
    /// The batch the commit thread is writing, still readable by `read`.
    pub(crate) in_flight: Option<Arc<Vec<PendingWrite>>>,
    pub(crate) last_ticket: Ticket,
    pub(crate) durable_ticket: Ticket,
    pub(crate) segments: BTreeMap<u64, SegmentState>,
    pub(crate) poisoned: Option<String>,
    pub(crate) shutting_down: bool,
    pub(crate) last_append: Instant,
    /// Queues deleted while they held messages on disk, and the segment
    /// that was active then: compaction drops their messages, which no
    /// mark settles. Forgotten once every older segment is gone.
    pub(crate) deleted_queues: BTreeMap<u64, u64>,
}

/// Upper bounds of the commit-duration buckets (write and fsync of one
/// batch), in microseconds.
pub const COMMIT_DURATION_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// How long the commit thread's synced batches took to write and fsync.
#[derive(Default)]
pub(crate) struct CommitTimes {
    /// One count per bound of `COMMIT_DURATION_BOUNDS_US`, then overflow.
    counts: [AtomicU64; COMMIT_DURATION_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A copy of the commit durations: (upper bound in µs, batches in that
/// bucket), the last bound None (overflow).
#[derive(Debug, Clone, Default)]
pub struct CommitTimesSnapshot {
    pub buckets: Vec<(Option<u64>, u64)>,
    pub count: u64,
    pub sum_us: u64,
}

impl CommitTimes {
    fn observe(&self, elapsed: Duration) {
        let micros = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let bucket = COMMIT_DURATION_BOUNDS_US.partition_point(|bound| *bound < micros);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CommitTimesSnapshot {
        let buckets: Vec<(Option<u64>, u64)> = self
            .counts
            .iter()
            .enumerate()
            .map(|(index, count)| {
                (
                    COMMIT_DURATION_BOUNDS_US.get(index).copied(),
                    count.load(Ordering::Relaxed),
                )
            })
            .collect();
        CommitTimesSnapshot {
            count: buckets.iter().map(|(_, count)| count).sum(),
            buckets,
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) commit_times: CommitTimes,
    pub(crate) fs: Arc<dyn FileSystem>,
    pub(crate) dir: PathBuf,
    pub(crate) config: LogConfig,
    pub(crate) state: Mutex<State>,
    pub(crate) work: Condvar,
    /// Signalled after every batch is written.
    pub(crate) written: Condvar,
    /// Wakes the compaction thread to stop.
    pub(crate) compaction_wake: Condvar,
    pub(crate) listener: DurableListener,
}

/// Reads the free space of the disk a log is on (see `MessageLog::free_space`).
pub struct FreeSpace {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
}

impl FreeSpace {
    pub fn available_bytes(&self) -> io::Result<u64> {
        self.fs.available_bytes(&self.dir)
    }
}

pub struct MessageLog {
    shared: Arc<Shared>,
    commit_thread: Option<JoinHandle<()>>,
    compaction_thread: Option<JoinHandle<()>>,
}

impl MessageLog {
    /// Reads every segment in `dir`, rebuilding which messages are live, and
    /// starts the commit thread. New records go to a fresh segment. The
    /// recovered messages are in the returned `Recovery`'s `queues`.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        config: LogConfig,
        listener: DurableListener,
    ) -> Result<(Self, Recovery), StoreError> {
        let mut queues: BTreeMap<u64, Vec<RecoveredMessage>> = BTreeMap::new();
        let (log, mut recovery) =
            Self::open_with(fs, dir, config, listener, &mut |queue, message, _| {
                queues.entry(queue).or_default().push(message);
                true
            })?;
        recovery.queues = queues;
        Ok((log, recovery))
    }

    /// As `open`, but hands each recovered message to `sink` as recovery
    /// meets it, with its payload, instead of gathering them: recovery then
    /// keeps nothing per message (see `replay`).
    pub fn open_with(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        config: LogConfig,
        listener: DurableListener,
        sink: &mut RecoveredSink<'_>,
    ) -> Result<(Self, Recovery), StoreError> {
        fs.create_dir_all(dir)
            .map_err(|error| StoreError::io("creating", dir, error))?;
        let marker = dir.join(CLEAN_SHUTDOWN_MARKER);
        let clean_shutdown = fs.exists(&marker);
        if clean_shutdown {
            // Gone before anything is written, so a crash from here on is
            // never taken for a clean shutdown.
            fs.remove(&marker)
                .map_err(|error| StoreError::io("removing", &marker, error))?;
            fs.sync_dir(dir)
                .map_err(|error| StoreError::io("syncing", dir, error))?;
        }
        let Replayed {
            segments,
            recovery,
            newest,
            deleted_queues,
        } = replay(fs.as_ref(), dir, clean_shutdown, sink)?;
        let active_segment = newest + 1;
        let crashed_with_messages =
            !clean_shutdown && segments.values().any(|segment| segment.live > 0);
        let mut state = State {
            active_segment,
            active_length: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            settled: Vec::new(),
            returned: Vec::new(),
            pending_needs_sync: false,
            directory_unsynced: false,
            in_flight: None,
            last_ticket: 0,
            durable_ticket: 0,
            segments,
            poisoned: None,
            shutting_down: false,
            last_append: Instant::now(),
            deleted_queues: deleted_queues
                .into_iter()
                .map(|queue| (queue, newest))
                .collect(),
        };
        state.segments.entry(active_segment).or_default();
        let shared = Arc::new(Shared {
            commit_times: CommitTimes::default(),
            fs,
            dir: dir.to_path_buf(),
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            written: Condvar::new(),
            compaction_wake: Condvar::new(),
            listener,
        });
        if crashed_with_messages {
            note_crash_restart(&shared)?;
        }
        let thread_shared = Arc::clone(&shared);
        let commit_thread = std::thread::Builder::new()
            .name("warren-commit".into())
            .spawn(move || commit_loop(&thread_shared))
            .map_err(|error| StoreError::io("starting commit thread for", dir, error))?;
        let compaction_thread = match shared.config.compaction_interval {
            Some(interval) => {
                let thread_shared = Arc::clone(&shared);
                Some(
                    std::thread::Builder::new()
                        .name("warren-compact".into())
                        .spawn(move || compaction_loop(&thread_shared, interval))
                        .map_err(|error| {
                            StoreError::io("starting compaction thread for", dir, error)
                        })?,
                )
            }
            None => None,
        };
        Ok((
            Self {
                shared,
                commit_thread: Some(commit_thread),
                compaction_thread,
            },
            recovery,
        ))
    }

    /// Appends a `Publish` (persistent) or `Paged` (transient, memory
    /// relief) record for a message now in `queue`.
    pub fn append_message(
        &self,
        kind: RecordKind,
        queue: u64,
        sequence: u64,
        payload: &[u8],
    ) -> Result<(Location, Ticket), StoreError> {
        self.append_message_with_tail(kind, queue, sequence, payload, &Bytes::new())
    }

    /// Appends a message record whose payload is `head` then `tail`. A
    /// large `tail` (a message body) is not copied: the log keeps a
    /// reference to it until it is written, so a large message is held in
    /// memory once, in the buffer it arrived in, and only until it is on
    /// disk.
    pub fn append_message_with_tail(
        &self,
        kind: RecordKind,
        queue: u64,
        sequence: u64,
        head: &[u8],
        tail: &Bytes,
    ) -> Result<(Location, Ticket), StoreError> {
        debug_assert!(matches!(kind, RecordKind::Publish | RecordKind::Paged));
        let mut state = self.shared.state.lock();
        let (location, ticket) =
            append_locked(&self.shared, &mut state, kind, queue, sequence, head, tail)?;
        let segment = state.segments.entry(location.segment).or_default();
        segment.live += 1;
        if kind == RecordKind::Paged {
            segment.paged_live += 1;
        } else {
            segment.shares += 1;
        }
        Ok((location, ticket))
    }

    /// Appends a persistent message that entered each of `queues`: one
    /// `Message` record, whose body is written once however many queues
    /// hold it. Each queue gives the returned location back when the
    /// message leaves it (`settle`).
    pub fn append_routed(
        &self,
        queues: &[u64],
        head: &[u8],
        tail: &Bytes,
    ) -> Result<(Location, Ticket), StoreError> {
        debug_assert!(!queues.is_empty());
        let mut prefixed = Vec::with_capacity(queues.len() * record::ROUTE_BYTES + head.len());
        record::encode_routes(&mut prefixed, queues);
        prefixed.extend_from_slice(head);
        let mut state = self.shared.state.lock();
        let (location, ticket) = append_locked(
            &self.shared,
            &mut state,
            RecordKind::Message,
            0,
            queues.len() as u64,
            &prefixed,
            tail,
        )?;
        let segment = state.segments.entry(location.segment).or_default();
        segment.live += queues.len() as u64;
        segment.shares += queues.len() as u64;
        Ok((location, ticket))
    }

    /// Records that the message at `published_at` left `queue`. Not waited
    /// for: it is written with the next batch, and a crash before then
    /// brings the message back, marked redelivered.
    pub fn settle(&self, queue: u64, published_at: Location) -> Result<(), StoreError> {
        add_mark(&self.shared, Marking::Settled, queue, published_at)
    }

    /// Records that the message at `published_at` went to a consumer of
    /// `queue` and may come back: after a clean restart it is marked
    /// redelivered.
    pub fn mark_returned(&self, queue: u64, published_at: Location) -> Result<(), StoreError> {
        add_mark(&self.shared, Marking::Returned, queue, published_at)
    }

    /// Records that a message left its queue, as a version-1 `Remove`
    /// record; the broker now uses `settle`, and tests use this to write
    /// logs as older versions did.
    pub fn append_remove(
        &self,
        queue: u64,
        sequence: u64,
        published_at: Location,
    ) -> Result<Ticket, StoreError> {
        append_reference(
            &self.shared,
            RecordKind::Remove,
            queue,
            sequence,
            published_at,
        )
    }

    /// Records that a message was handed to a consumer, as a version-1
    /// `Delivered` record (see `append_remove`).
    pub fn append_delivered(
        &self,
        queue: u64,
        sequence: u64,
        published_at: Location,
    ) -> Result<Ticket, StoreError> {
        append_reference(
            &self.shared,
            RecordKind::Delivered,
            queue,
            sequence,
            published_at,
        )
    }

    /// Forgets a message without writing anything: a paged transient
    /// message that left its queue, or a message of a deleted queue (whose
    /// records recovery ignores once the queue is gone from the topology).
    pub fn release(&self, location: Location) {
        release_locked(&mut self.shared.state.lock(), location);
    }

    /// Forgets a `Paged` record whose message left its queue.
    pub fn release_paged(&self, location: Location) {
        release_paged_locked(&mut self.shared.state.lock(), location);
    }

    /// Reads a message's payload back, from memory if it is not written yet.
    /// The payload is a view of the one buffer the record was read into.
    pub fn read(&self, location: Location) -> Result<Bytes, StoreError> {
        read_payload(&self.shared, location)
    }

    /// A handle for another thread, which reads messages back and forgets
    /// them without whatever lock the log's owner holds it under.
    pub fn handle(&self) -> LogHandle {
        LogHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn durable_ticket(&self) -> Ticket {
        self.shared.state.lock().durable_ticket
    }

    /// Whether appended data waits for the disk faster than it drains.
    pub fn is_congested(&self) -> bool {
        self.shared.state.lock().pending_bytes > self.shared.config.pending_bytes_max
    }

    pub fn poisoned(&self) -> Option<String> {
        self.shared.state.lock().poisoned.clone()
    }

    /// Segment files on disk, for tests and metrics.
    pub fn segment_count(&self) -> usize {
        self.shared
            .state
            .lock()
            .segments
            .values()
            .filter(|segment| segment.created)
            .count()
    }

    /// How long group commits (write and fsync) have taken; batches of
    /// Paged records alone, written without an fsync, are not counted.
    pub fn commit_times(&self) -> CommitTimesSnapshot {
        self.shared.commit_times.snapshot()
    }

    pub fn available_bytes(&self) -> io::Result<u64> {
        self.shared.fs.available_bytes(&self.shared.dir)
    }

    /// A handle that reads the free space of the log's disk without the
    /// log, so that whoever guards the log need not be held while the
    /// file system answers.
    pub fn free_space(&self) -> FreeSpace {
        FreeSpace {
            fs: Arc::clone(&self.shared.fs),
            dir: self.shared.dir.clone(),
        }
    }

    /// Writes and syncs everything appended, stops the commit thread and
    /// leaves the clean-shutdown marker, so the next start knows exactly
    /// which messages were delivered.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.stop_commit_thread();
        let state = self.shared.state.lock();
        if let Some(reason) = &state.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        drop(state);
        let marker = self.shared.dir.join(CLEAN_SHUTDOWN_MARKER);
        let fs = &self.shared.fs;
        fs.write(&marker, b"")
            .map_err(|error| StoreError::io("writing", &marker, error))?;
        fs.sync(&marker)
            .map_err(|error| StoreError::io("syncing", &marker, error))?;
        fs.sync_dir(&self.shared.dir)
            .map_err(|error| StoreError::io("syncing", &self.shared.dir, error))
    }

    /// Stops at once, dropping what is not yet written, the way a crash
    /// would. Only tests have a use for this.
    pub fn abandon(mut self) {
        {
            let mut state = self.shared.state.lock();
            state.pending.clear();
            state.settled.clear();
            state.returned.clear();
            state.pending_bytes = 0;
        }
        self.stop_commit_thread();
    }

    fn stop_commit_thread(&mut self) {
        self.shared.state.lock().shutting_down = true;
        self.shared.work.notify_one();
        self.shared.compaction_wake.notify_all();
        self.shared.written.notify_all();
        // Compaction first: it may be waiting for the commit thread.
        if let Some(thread) = self.compaction_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.commit_thread.take() {
            let _ = thread.join();
        }
    }

    /// Rewrites now every segment that is mostly dead (see `compact`), as
    /// the compaction thread does every `LogConfig::compaction_interval`.
    pub fn compact_now(&self) -> Result<CompactionReport, StoreError> {
        compact_sparse_segments(&self.shared)
    }

    /// Records that a queue was deleted: no mark will settle the messages
    /// it held, so compaction drops them instead.
    pub fn forget_queue(&self, queue: u64) {
        let mut state = self.shared.state.lock();
        let active = state.active_segment;
        state.deleted_queues.insert(queue, active);
    }
}

/// The log for another thread than its owner's (see `MessageLog::handle`):
/// it reads messages back and forgets them, which needs no lock but the
/// log's own.
#[derive(Clone)]
pub struct LogHandle {
    shared: Arc<Shared>,
}

impl LogHandle {
    pub fn read(&self, location: Location) -> Result<Bytes, StoreError> {
        read_payload(&self.shared, location)
    }

    /// Reads several payloads, each as `read` would, in the order asked:
    /// records that lie close together in a segment are read with one
    /// system call, which makes reading a queue's next messages ahead
    /// cheaper than reading them one at a time.
    pub fn read_many(&self, locations: &[Location]) -> Vec<Result<Bytes, StoreError>> {
        read_payloads(&self.shared, locations)
    }

    /// As `MessageLog::append_remove`.
    pub fn append_remove(
        &self,
        queue: u64,
        sequence: u64,
        published_at: Location,
    ) -> Result<Ticket, StoreError> {
        append_reference(
            &self.shared,
            RecordKind::Remove,
            queue,
            sequence,
            published_at,
        )
    }

    /// As `MessageLog::release`.
    pub fn release(&self, location: Location) {
        release_locked(&mut self.shared.state.lock(), location);
    }

    /// As `MessageLog::release_paged`.
    pub fn release_paged(&self, location: Location) {
        release_paged_locked(&mut self.shared.state.lock(), location);
    }

    /// As `MessageLog::settle`.
    pub fn settle(&self, queue: u64, published_at: Location) -> Result<(), StoreError> {
        add_mark(&self.shared, Marking::Settled, queue, published_at)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Marking {
    Settled,
    Returned,
}

fn add_mark(
    shared: &Shared,
    marking: Marking,
    queue: u64,
    published_at: Location,
) -> Result<(), StoreError> {
    let mut state = shared.state.lock();
    if let Some(reason) = &state.poisoned {
        return Err(StoreError::Poisoned(reason.clone()));
    }
    let mark = Mark {
        queue,
        segment: published_at.segment,
        offset: published_at.offset,
    };
    match marking {
        Marking::Settled => {
            state.settled.push(mark);
            release_locked(&mut state, published_at);
        }
        Marking::Returned => state.returned.push(mark),
    }
    state.pending_bytes += MARK_BYTES;
    shared.work.notify_one();
    Ok(())
}

/// Appends the record that keeps every message recovered after a crash
/// marked redelivered (see `RecordKind::CrashRestart`). It names every
/// older segment, so it outlives all of them.
fn note_crash_restart(shared: &Shared) -> Result<(), StoreError> {
    let mut state = shared.state.lock();
    let (location, _) = append_locked(
        shared,
        &mut state,
        RecordKind::CrashRestart,
        0,
        0,
        &[],
        &Bytes::new(),
    )?;
    let older: BTreeSet<u64> = state
        .segments
        .range(..location.segment)
        .map(|(n, _)| *n)
        .collect();
    state
        .segments
        .entry(location.segment)
        .or_default()
        .back_references
        .extend(older);
    Ok(())
}

/// Appends the marks gathered since the last batch as one record of each
/// kind, at the end of what the commit thread is about to write: every
/// message they name was appended before them.
fn append_marks(shared: &Shared, state: &mut State) {
    for kind in [RecordKind::Settled, RecordKind::Returned] {
        let marks = match kind {
            RecordKind::Settled => std::mem::take(&mut state.settled),
            _ => std::mem::take(&mut state.returned),
        };
        if marks.is_empty() {
            continue;
        }
        state.pending_bytes = state.pending_bytes.saturating_sub(marks.len() * MARK_BYTES);
        let mut payload = Vec::with_capacity(marks.len() * MARK_BYTES);
        for mark in &marks {
            record::encode_mark(&mut payload, *mark);
        }
        let Ok((location, _)) = append_locked(
            shared,
            state,
            kind,
            0,
            marks.len() as u64,
            &payload,
            &Bytes::new(),
        ) else {
            return; // poisoned: nothing more is written
        };
        // This record must outlive the older segments whose messages it
        // settles or marks (see `collect_deletable`).
        for mark in &marks {
            if mark.segment < location.segment && state.segments.contains_key(&mark.segment) {
                state
                    .segments
                    .entry(location.segment)
                    .or_default()
                    .back_references
                    .insert(mark.segment);
            }
        }
    }
}

fn append_reference(
    shared: &Shared,
    kind: RecordKind,
    queue: u64,
    sequence: u64,
    published_at: Location,
) -> Result<Ticket, StoreError> {
    let mut state = shared.state.lock();
    let (location, ticket) = append_locked(
        shared,
        &mut state,
        kind,
        queue,
        sequence,
        &[],
        &Bytes::new(),
    )?;
    if published_at.segment < location.segment && state.segments.contains_key(&published_at.segment)
    {
        state
            .segments
            .entry(location.segment)
            .or_default()
            .back_references
            .insert(published_at.segment);
    }
    if kind == RecordKind::Remove {
        release_locked(&mut state, published_at);
    }
    Ok(ticket)
}

fn append_locked(
    shared: &Shared,
    state: &mut State,
    kind: RecordKind,
    queue: u64,
    sequence: u64,
    head: &[u8],
    tail: &Bytes,
) -> Result<(Location, Ticket), StoreError> {
    if let Some(reason) = &state.poisoned {
        return Err(StoreError::Poisoned(reason.clone()));
    }
    let length = record::encoded_length(head.len() + tail.len()) as u64;
    if state.active_length > 0 && state.active_length + length > shared.config.segment_size_bytes {
        state.active_segment += 1;
        state.active_length = 0;
        state.segments.entry(state.active_segment).or_default();
    }
    let segment = state.active_segment;
    let offset = state.active_length;
    let Ok(record_offset) = u32::try_from(offset) else {
        return Err(StoreError::Poisoned(format!(
            "segment {segment} grew past 4 GiB, which a record's location cannot address"
        )));
    };
    // Records go into the last pending write's own buffer unless that
    // write is in another segment or is a shared tail.
    let appendable = matches!(
        state.pending.last(),
        Some(PendingWrite { segment: last, data: PendingData::Encoded(_), .. }) if *last == segment
    );
    if !appendable {
        state.pending.push(PendingWrite {
            segment,
            base_offset: offset,
            data: PendingData::Encoded(Vec::with_capacity(64 * 1024)),
        });
    }
    let Some(PendingWrite {
        data: PendingData::Encoded(buffer),
        ..
    }) = state.pending.last_mut()
    else {
        unreachable!("the last pending write is an encoded one");
    };
    if tail.len() >= SHARED_TAIL_MIN_BYTES {
        let head_length =
            record::encode_head(buffer, kind, queue, sequence, head, tail) - tail.len();
        state.pending.push(PendingWrite {
            segment,
            base_offset: offset + head_length as u64,
            data: PendingData::Shared(tail.clone()),
        });
    } else {
        record::encode_head(buffer, kind, queue, sequence, head, tail);
        buffer.extend_from_slice(tail);
    }
    state.active_length += length;
    let segment_state = state.segments.entry(segment).or_default();
    segment_state.bytes += length;
    segment_state.keep_as_is |= matches!(
        kind,
        RecordKind::Publish | RecordKind::Remove | RecordKind::Delivered
    );
    state.pending_bytes += length as usize;
    state.pending_needs_sync |= kind != RecordKind::Paged;
    state.last_ticket += 1;
    state.last_append = Instant::now();
    shared.work.notify_one();
    Ok((
        Location {
            segment,
            offset: record_offset,
            length: length as u32,
        },
        state.last_ticket,
    ))
}

/// How far apart two records of one segment may lie and still be read with
/// one system call by `read_payloads`: the bytes between them are read and
/// thrown away, which costs less than a second call for small gaps.
const READ_GAP_MAX_BYTES: u64 = 16 * 1024;
/// The most one such call reads, so a batch of reads never needs a large
/// buffer however its records lie.
const READ_SPAN_MAX_BYTES: u64 = 1024 * 1024;

/// Reads several payloads, each as `read_payload` would, with one lock of
/// the log's state for them all and one system call for each run of
/// records that lie close together in a segment. Each payload gets a
/// buffer of its own, so a message kept long does not keep its neighbours'
/// bytes in memory.
fn read_payloads(shared: &Shared, locations: &[Location]) -> Vec<Result<Bytes, StoreError>> {
    let mut payloads: Vec<Option<Result<Bytes, StoreError>>> = vec![None; locations.len()];
    // Messages of compacted segments, read one by one.
    let mut moved: Vec<usize> = Vec::new();
    {
        let state = shared.state.lock();
        let in_flight = state.in_flight.as_deref().map(Vec::as_slice).unwrap_or(&[]);
        // Writes reach the file in order, so in each segment everything from
        // the first write still in memory on is in memory.
        let mut unwritten_from: BTreeMap<u64, u64> = BTreeMap::new();
        for write in in_flight.iter().chain(state.pending.iter()) {
            let from = unwritten_from
                .entry(write.segment)
                .or_insert(write.base_offset);
            *from = (*from).min(write.base_offset);
        }
        for (payload, &location) in payloads.iter_mut().zip(locations) {
            let end = u64::from(location.offset) + u64::from(location.length);
            let may_be_in_memory = unwritten_from
                .get(&location.segment)
                .is_some_and(|&from| end > from);
            if may_be_in_memory
                && let Some(bytes) =
                    gather_unwritten(state.pending.iter().chain(in_flight.iter()), location)
            {
                *payload = Some(payload_of(bytes, location));
            }
        }
        for (index, location) in locations.iter().enumerate() {
            let compacted = state
                .segments
                .get(&location.segment)
                .is_some_and(|segment| segment.compacted.is_some());
            if compacted && payloads[index].is_none() {
                moved.push(index);
            }
        }
    }
    for &index in &moved {
        payloads[index] = Some(read_payload(shared, locations[index]));
    }
    let mut on_disk: Vec<usize> = (0..locations.len())
        .filter(|&index| payloads[index].is_none())
        .collect();
    on_disk.sort_by_key(|&index| (locations[index].segment, locations[index].offset));
    let mut runs = on_disk.as_slice();
    while let Some(&first) = runs.first() {
        let segment = locations[first].segment;
        let start = u64::from(locations[first].offset);
        let mut end = start + u64::from(locations[first].length);
        let mut taken = 1;
        for &index in &runs[1..] {
            let location = locations[index];
            let offset = u64::from(location.offset);
            let record_end = offset + u64::from(location.length);
            if location.segment != segment
                || offset > end + READ_GAP_MAX_BYTES
                || record_end.max(end) - start > READ_SPAN_MAX_BYTES
            {
                break;
            }
            end = end.max(record_end);
            taken += 1;
        }
        let (run, rest) = runs.split_at(taken);
        runs = rest;
        let path = shared.dir.join(segment_name(segment));
        match shared.fs.read_at(&path, start, (end - start) as usize) {
            Ok(span) => {
                for &index in run {
                    let location = locations[index];
                    let from = (u64::from(location.offset) - start) as usize;
                    let record = span[from..from + location.length as usize].to_vec();
                    payloads[index] = Some(payload_of(record, location));
                }
            }
            Err(error) => {
                for &index in run {
                    payloads[index] = Some(Err(read_error(locations[index], &error)));
                }
            }
        }
    }
    payloads
        .into_iter()
        .zip(locations)
        .map(|(payload, &location)| {
            match payload.expect("every location is read from memory or from disk") {
                // Compaction may have replaced the file since the lock was
                // held: `read_payload` looks again.
                Err(_) => read_payload(shared, location),
                read => read,
            }
        })
        .collect()
}

fn read_error(location: Location, error: &io::Error) -> StoreError {
    StoreError::Read {
        segment: location.segment,
        offset: location.offset.into(),
        kind: error.kind(),
        reason: error.to_string(),
    }
}

/// The payload of the record in `bytes`, read from `location`.
fn payload_of(bytes: Vec<u8>, location: Location) -> Result<Bytes, StoreError> {
    let invalid = |reason: String| StoreError::Read {
        segment: location.segment,
        offset: location.offset.into(),
        kind: io::ErrorKind::InvalidData,
        reason,
    };
    let payload_start = match record::decode(&bytes) {
        Decoded::Record(record, used) if record.kind == RecordKind::Message => {
            let (_, message) = record::split_routes(record.sequence, record.payload)
                .ok_or_else(|| invalid("a message record shorter than its routes".to_owned()))?;
            used - message.len()
        }
        Decoded::Record(record, used) if record.kind == RecordKind::Kept => {
            let (_, message) = record::split_kept(record.sequence, record.payload)
                .ok_or_else(|| invalid("a kept record shorter than its routes".to_owned()))?;
            used - message.len()
        }
        Decoded::Record(record, used) => used - record.payload.len(),
        other => Err(invalid(format!("record does not decode ({other:?})")))?,
    };
    Ok(Bytes::from(bytes).slice(payload_start..))
}

/// Where a record is to be read from, as the log's state says while its
/// lock is held.
enum Source {
    Memory(Vec<u8>),
    /// In the file as first written, at its location.
    Original,
    /// In a compacted file, somewhere between two anchors.
    Moved {
        generation: u32,
        start: u64,
        end: u64,
    },
}

fn source_of(state: &State, location: Location) -> Source {
    let in_flight = state.in_flight.as_deref().map(Vec::as_slice).unwrap_or(&[]);
    if let Some(bytes) = gather_unwritten(state.pending.iter().chain(in_flight.iter()), location) {
        return Source::Memory(bytes);
    }
    let Some(segment) = state.segments.get(&location.segment) else {
        return Source::Original;
    };
    let Some(file) = &segment.compacted else {
        return Source::Original;
    };
    let after = file
        .anchors
        .partition_point(|(original, _)| *original <= location.offset);
    let start = match after {
        0 => 0,
        _ => u64::from(file.anchors[after - 1].1),
    };
    let end = file
        .anchors
        .get(after)
        .map_or(segment.bytes, |(_, moved_to)| u64::from(*moved_to));
    Source::Moved {
        generation: file.generation,
        start,
        end,
    }
}

/// How many times a read looks again when compaction replaced the file it
/// was reading: once is all one compaction needs.
const READ_ATTEMPTS: usize = 3;

fn read_payload(shared: &Shared, location: Location) -> Result<Bytes, StoreError> {
    let mut attempt = 1;
    loop {
        let (source, generation) = {
            let state = shared.state.lock();
            let generation = state
                .segments
                .get(&location.segment)
                .map(SegmentState::generation);
            (source_of(&state, location), generation)
        };
        let read = match source {
            Source::Memory(bytes) => return payload_of(bytes, location),
            Source::Original => shared
                .fs
                .read_at(
                    &shared.dir.join(segment_name(location.segment)),
                    location.offset.into(),
                    location.length as usize,
                )
                .map_err(|error| read_error(location, &error))
                .and_then(|bytes| payload_of(bytes, location)),
            Source::Moved {
                generation,
                start,
                end,
            } => read_moved(shared, location, generation, start, end),
        };
        let replaced = || {
            let state = shared.state.lock();
            state
                .segments
                .get(&location.segment)
                .map(SegmentState::generation)
                != generation
        };
        match read {
            Err(_) if attempt < READ_ATTEMPTS && replaced() => attempt += 1,
            read => return read,
        }
    }
}

/// Finds a message in a compacted file by reading the records between
/// the anchors around it.
fn read_moved(
    shared: &Shared,
    location: Location,
    generation: u32,
    start: u64,
    end: u64,
) -> Result<Bytes, StoreError> {
    let path = shared.dir.join(segment_file(location.segment, generation));
    let span = shared
        .fs
        .read_at(&path, start, (end - start) as usize)
        .map_err(|error| read_error(location, &error))?;
    let mut offset = 0;
    while offset < span.len() {
        let Decoded::Record(record, length) = record::decode(&span[offset..]) else {
            break;
        };
        if record.kind == RecordKind::Kept {
            let original = record::OriginalPlace::from_field(record.queue);
            if original.offset == location.offset {
                return payload_of(span[offset..offset + length].to_vec(), location);
            }
            if original.offset > location.offset {
                break;
            }
        }
        offset += length;
    }
    Err(StoreError::Read {
        segment: location.segment,
        offset: location.offset.into(),
        kind: io::ErrorKind::NotFound,
        reason: "compaction did not keep this message".to_owned(),
    })
}

impl Drop for MessageLog {
    fn drop(&mut self) {
        self.stop_commit_thread();
    }
}

/// The bytes at `location` if they are all among `writes` (not on disk
/// yet); a record may span an encoded write and the shared tail after it.
fn gather_unwritten<'a>(
    writes: impl Iterator<Item = &'a PendingWrite>,
    location: Location,
) -> Option<Vec<u8>> {
    let start = u64::from(location.offset);
    let end = start + u64::from(location.length);
    let mut gathered = Vec::new();
    for write in writes.filter(|write| write.segment == location.segment) {
        let bytes = write.data.as_slice();
        let write_end = write.base_offset + bytes.len() as u64;
        let next = start + gathered.len() as u64;
        if write.base_offset <= next && next < write_end {
            let from = (next - write.base_offset) as usize;
            let to = (end.min(write_end) - write.base_offset) as usize;
            gathered.extend_from_slice(&bytes[from..to]);
            if gathered.len() as u64 == end - start {
                return Some(gathered);
            }
        }
    }
    None
}

fn release_locked(state: &mut State, location: Location) {
    if let Some(segment) = state.segments.get_mut(&location.segment) {
        debug_assert!(
            segment.live > 0,
            "released a message the log does not count"
        );
        segment.live = segment.live.saturating_sub(1);
    }
}

fn release_paged_locked(state: &mut State, location: Location) {
    release_locked(state, location);
    if let Some(segment) = state.segments.get_mut(&location.segment) {
        segment.paged_live = segment.paged_live.saturating_sub(1);
    }
}

fn commit_loop(shared: &Shared) {
    loop {
        let (batch, ticket, sync) = {
            let mut state = shared.state.lock();
            while state.pending.is_empty()
                && state.settled.is_empty()
                && state.returned.is_empty()
                && !state.shutting_down
            {
                let timed_out = shared
                    .work
                    .wait_for(&mut state, shared.config.idle_roll_after)
                    .timed_out();
                if timed_out && state.poisoned.is_none() {
                    roll_if_idle(shared, &mut state);
                    let doomed = collect_deletable(&mut state);
                    drop(state);
                    delete_segments(shared, &doomed);
                    state = shared.state.lock();
                }
            }
            if state.poisoned.is_none() {
                append_marks(shared, &mut state);
            }
            if state.pending.is_empty() {
                return; // shutting down with nothing left to write
            }
            let batch = Arc::new(std::mem::take(&mut state.pending));
            state.pending_bytes = 0;
            state.in_flight = Some(Arc::clone(&batch));
            let sync = Syncs {
                files: std::mem::take(&mut state.pending_needs_sync),
                directory: state.directory_unsynced,
            };
            (batch, state.last_ticket, sync)
        };
        let started = Instant::now();
        let result = write_batch(shared, &batch, sync);
        if sync.files {
            // What a publisher waits for: a write and its fsync.
            shared.commit_times.observe(started.elapsed());
        }
        // The batch may hold large message bodies: they go before anyone
        // hears the batch is durable.
        drop(batch);
        let doomed = {
            let mut state = shared.state.lock();
            state.in_flight = None;
            match &result {
                Ok(created) => {
                    for segment in created {
                        state.segments.entry(*segment).or_default().created = true;
                    }
                    if sync.files {
                        state.directory_unsynced = false;
                    } else if !created.is_empty() {
                        state.directory_unsynced = true;
                    }
                    state.durable_ticket = ticket;
                    shared.written.notify_all();
                    collect_deletable(&mut state)
                }
                Err(error) => {
                    state.poisoned = Some(error.to_string());
                    shared.written.notify_all();
                    Vec::new()
                }
            }
        };
        match result {
            Ok(_) => {
                delete_segments(shared, &doomed);
                (shared.listener)(Ok(ticket));
            }
            Err(error) => {
                tracing::error!(%error, "message store write failed; the store is poisoned: \
                    no more confirms until the broker is restarted");
                (shared.listener)(Err(StoreError::Poisoned(error.to_string())));
                // Keep draining so appenders are answered, but never write again.
                let mut state = shared.state.lock();
                while !state.shutting_down {
                    state.pending.clear();
                    state.settled.clear();
                    state.returned.clear();
                    state.pending_bytes = 0;
                    shared.work.wait_for(&mut state, Duration::from_secs(1));
                }
                return;
            }
        }
    }
}

/// What a batch's commit makes durable.
#[derive(Clone, Copy)]
struct Syncs {
    /// The files the batch wrote: false for a batch of Paged records only.
    files: bool,
    /// The directory, for a segment an earlier, unsynced batch created.
    directory: bool,
}

/// Writes a batch and, unless it holds only Paged records, fsyncs every
/// file it touched; returns the segments created by it.
fn write_batch(
    shared: &Shared,
    batch: &[PendingWrite],
    sync: Syncs,
) -> Result<Vec<u64>, StoreError> {
    let mut touched: Vec<u64> = Vec::new();
    let mut created = Vec::new();
    for write in batch {
        let path = shared.dir.join(segment_name(write.segment));
        shared
            .fs
            .append(&path, write.data.as_slice())
            .map_err(|error| StoreError::io("writing", &path, error))?;
        if write.base_offset == 0 {
            created.push(write.segment);
        }
        if !touched.contains(&write.segment) {
            touched.push(write.segment);
        }
    }
    if !sync.files {
        return Ok(created);
    }
    for segment in &touched {
        let path = shared.dir.join(segment_name(*segment));
        shared
            .fs
            .sync(&path)
            .map_err(|error| StoreError::io("fsync of", &path, error))?;
    }
    if !created.is_empty() || sync.directory {
        shared
            .fs
            .sync_dir(&shared.dir)
            .map_err(|error| StoreError::io("fsync of", &shared.dir, error))?;
    }
    Ok(created)
}

/// Starts a new segment when the active one holds only dead records, or
/// is mostly dead, and nothing has been appended for a while, so that its
/// file can go or be compacted: a long-lived message in the segment that
/// was being written when traffic stopped would otherwise keep all of it.
fn roll_if_idle(shared: &Shared, state: &mut State) {
    let active = state.active_segment;
    let quiet = state.last_append.elapsed() >= shared.config.idle_roll_after;
    let dead = state.segments.get(&active).is_some_and(|segment| {
        segment.live == 0 || worth_compacting(segment, shared.config.compaction_min_dead_bytes)
    });
    if quiet && dead && state.active_length > 0 && state.pending.is_empty() {
        state.active_segment += 1;
        state.active_length = 0;
        state.segments.entry(state.active_segment).or_default();
    }
}

/// Takes out of the map every segment that can be deleted, oldest first, so
/// a segment whose back references die in the same pass goes too.
pub(crate) fn collect_deletable(state: &mut State) -> Vec<(u64, u32)> {
    let mut doomed = Vec::new();
    // A segment with bytes still waiting to be written must stay: the log
    // rolls to a new segment when appending, so the previous one can lose
    // its last live message before its tail reaches the disk, and deleting
    // it then would let the next write recreate the file behind our back.
    let in_flight = state.in_flight.as_deref().map(Vec::as_slice).unwrap_or(&[]);
    let unwritten: Vec<u64> = state
        .pending
        .iter()
        .chain(in_flight)
        .map(|write| write.segment)
        .collect();
    let candidates: Vec<u64> = state.segments.keys().copied().collect();
    for segment in candidates {
        if segment == state.active_segment || unwritten.contains(&segment) {
            continue;
        }
        let deletable = state.segments.get(&segment).is_some_and(|info| {
            info.live == 0
                && !info.compacting
                && info
                    .back_references
                    .iter()
                    .all(|older| !state.segments.contains_key(older))
        });
        if deletable {
            let info = state.segments.remove(&segment).expect("present");
            if info.created {
                doomed.push((segment, info.generation()));
            }
        }
    }
    doomed
}

pub(crate) fn delete_segments(shared: &Shared, segments: &[(u64, u32)]) {
    for &(segment, generation) in segments {
        let path = shared.dir.join(segment_file(segment, generation));
        if let Err(error) = shared.fs.remove(&path) {
            tracing::warn!(path = %path.display(), %error, "could not delete a dead segment");
        }
    }
}
