//! A backlog whose memory does not grow with its length.
//!
//! A [`SpillingBacklog`] keeps the head of a queue in memory (at most
//! [`HEAD_WINDOW`] messages that never left, plus those that came back)
//! and writes the index entries of the messages behind it to files of its
//! own, in batches of [`SPILL_BATCH`]; as consumers take from the head, it
//! reads the next batch back. A queue of ten million messages then holds
//! a few thousand entries in memory, and its disk holds the rest at
//! `M::ENCODED_BYTES` each.
//!
//! Spill files are not durable and are never fsynced: they only spare
//! memory. What survives a restart is in the message log, which recovery
//! reads; [`SpillArea::open`] deletes whatever a previous run left.
//!
//! A message is spilled only once its body is stored elsewhere (`M` says
//! so through [`SpillEntry::can_spill`]); the queue stores a body before
//! pushing it behind a spilled tail (see [`Backlog::holds_in_memory`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fs::FileSystem;
use crate::log::StoreError;
use crate::{Backlog, MemoryBacklog, Sequence};

/// Messages that never left the queue which its head keeps in memory;
/// those behind wait in spill files. Enough for the read-ahead's window
/// and for the resident bodies (`RESIDENT_MESSAGES_MAX` in the broker).
pub const HEAD_WINDOW: usize = 4_096;
/// Entries written or read back at once: one write or read of
/// `SPILL_BATCH * M::ENCODED_BYTES` bytes (56 KiB for the broker's
/// entries).
pub const SPILL_BATCH: usize = 1_024;
/// Entries per spill file. A file is deleted once every entry in it has
/// been read back, so this bounds the disk a drained backlog still holds.
pub const CHUNK_ENTRIES: u32 = 65_536;

const SPILL_SUFFIX: &str = ".spill";

/// How a backlog entry is written to a spill file: a fixed number of bytes,
/// so that the n-th entry of a file is found by arithmetic.
pub trait SpillEntry: Sized + Send {
    const ENCODED_BYTES: usize;

    /// Whether the entry can leave memory: its message's body is stored
    /// somewhere the entry points to.
    fn can_spill(&self) -> bool;

    /// Appends exactly `ENCODED_BYTES` bytes.
    fn encode(&self, sequence: Sequence, out: &mut Vec<u8>);

    /// None when the bytes are not an entry this version wrote.
    fn decode(bytes: &[u8]) -> Option<(Sequence, Self)>;
}

/// The directory spill files live in, shared by every backlog of a broker.
pub struct SpillArea {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    next_backlog: AtomicU64,
    /// Entries written and not yet read back, over all backlogs.
    entries_on_disk: AtomicU64,
}

impl std::fmt::Debug for SpillArea {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SpillArea")
            .field("dir", &self.dir)
            .finish()
    }
}

impl SpillArea {
    /// Creates `dir` and deletes the spill files a previous run left: they
    /// described backlogs that recovery rebuilds from the log.
    pub fn open(fs: Arc<dyn FileSystem>, dir: &Path) -> Result<Arc<Self>, StoreError> {
        fs.create_dir_all(dir)
            .map_err(|error| StoreError::io("creating", dir, error))?;
        let names = fs
            .list(dir)
            .map_err(|error| StoreError::io("listing", dir, error))?;
        for name in names.iter().filter(|name| name.ends_with(SPILL_SUFFIX)) {
            let path = dir.join(name);
            fs.remove(&path)
                .map_err(|error| StoreError::io("removing", &path, error))?;
        }
        Ok(Arc::new(Self {
            fs,
            dir: dir.to_path_buf(),
            next_backlog: AtomicU64::new(1),
            entries_on_disk: AtomicU64::new(0),
        }))
    }

    /// Entries waiting in spill files, over every backlog.
    pub fn entries_on_disk(&self) -> u64 {
        self.entries_on_disk.load(Ordering::Relaxed)
    }

    fn chunk_path(&self, backlog: u64, chunk: u64) -> PathBuf {
        self.dir
            .join(format!("{backlog:016x}-{chunk:010}{SPILL_SUFFIX}"))
    }
}

/// One spill file: entries `read..written` are still to be read back.
#[derive(Debug)]
struct Chunk {
    number: u64,
    written: u32,
    read: u32,
    /// A write to it failed, possibly leaving part of an entry at its end:
    /// nothing more is appended, and the next entries go to a new file.
    sealed: bool,
}

/// Where a backlog spills, and what of it is on disk.
struct Spill {
    area: Arc<SpillArea>,
    backlog: u64,
    next_chunk: u64,
    /// Oldest first.
    chunks: VecDeque<Chunk>,
    entries_on_disk: usize,
    /// The last write or read failed; reported once until one succeeds.
    failing: bool,
    /// Unwritten entries at which the next write is tried: a batch, or a
    /// batch more than when a write last failed, so a full disk is not
    /// tried again at every message.
    write_at: usize,
}

/// A backlog that keeps its head in memory and the rest in spill files,
/// or everything in memory when it has no [`SpillArea`].
///
/// Its messages are, in the order they are taken: those in `head`
/// (returned ones first, see [`MemoryBacklog`]), those in the spill files,
/// then `unwritten`, the newest arrivals waiting to make a batch.
pub struct SpillingBacklog<M> {
    head: MemoryBacklog<M>,
    spill: Option<Spill>,
    unwritten: VecDeque<(Sequence, M)>,
}

impl<M> Default for SpillingBacklog<M> {
    fn default() -> Self {
        Self {
            head: MemoryBacklog::default(),
            spill: None,
            unwritten: VecDeque::new(),
        }
    }
}

impl<M: SpillEntry> SpillingBacklog<M> {
    /// A backlog that spills into `area`, or keeps everything in memory
    /// without one.
    pub fn new(area: Option<Arc<SpillArea>>) -> Self {
        Self {
            head: MemoryBacklog::default(),
            spill: area.map(|area| Spill {
                backlog: area.next_backlog.fetch_add(1, Ordering::Relaxed),
                area,
                next_chunk: 1,
                chunks: VecDeque::new(),
                entries_on_disk: 0,
                failing: false,
                write_at: SPILL_BATCH,
            }),
            unwritten: VecDeque::new(),
        }
    }

    /// Whether messages wait behind the head, on disk or about to be.
    fn has_tail(&self) -> bool {
        !self.unwritten.is_empty()
            || self
                .spill
                .as_ref()
                .is_some_and(|spill| spill.entries_on_disk > 0)
    }

    /// Messages in spill files, for tests and metrics.
    pub fn spilled_len(&self) -> usize {
        self.spill.as_ref().map_or(0, |spill| spill.entries_on_disk)
    }

    /// Writes the unwritten entries that can leave memory, oldest first;
    /// an entry that cannot (its body is stored nowhere) and those behind
    /// it stay until it can.
    fn write_out(&mut self) {
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        let spillable = self
            .unwritten
            .iter()
            .take_while(|(_, entry)| entry.can_spill())
            .count();
        let mut written = 0;
        let mut bytes = Vec::new();
        while written < spillable {
            if spill
                .chunks
                .back()
                .is_none_or(|chunk| chunk.sealed || chunk.written == CHUNK_ENTRIES)
            {
                spill.chunks.push_back(Chunk {
                    number: spill.next_chunk,
                    written: 0,
                    read: 0,
                    sealed: false,
                });
                spill.next_chunk += 1;
            }
            let chunk = spill.chunks.back_mut().expect("just ensured");
            let room = (CHUNK_ENTRIES - chunk.written) as usize;
            let count = room.min(spillable - written);
            bytes.clear();
            for (sequence, entry) in self.unwritten.range(written..written + count) {
                entry.encode(*sequence, &mut bytes);
            }
            debug_assert_eq!(bytes.len(), count * M::ENCODED_BYTES);
            let path = spill.area.chunk_path(spill.backlog, chunk.number);
            if let Err(error) = spill.area.fs.append(&path, &bytes) {
                chunk.sealed = true;
                if chunk.written == 0 {
                    // Nothing of it is to be read: the file goes now.
                    spill.chunks.pop_back();
                    if spill.area.fs.exists(&path) {
                        let _ = spill.area.fs.remove(&path);
                    }
                }
                if !spill.failing {
                    tracing::warn!(path = %path.display(), %error,
                        "could not spill a queue's backlog to disk; keeping it in memory");
                    spill.failing = true;
                }
                break;
            }
            spill.failing = false;
            chunk.written += count as u32;
            spill.entries_on_disk += count;
            spill
                .area
                .entries_on_disk
                .fetch_add(count as u64, Ordering::Relaxed);
            written += count;
        }
        self.unwritten.drain(..written);
        spill.write_at = if self.unwritten.len() < SPILL_BATCH {
            SPILL_BATCH
        } else {
            self.unwritten.len() + SPILL_BATCH
        };
    }

    /// Brings messages from behind the head into it while it has room for
    /// a batch: from the spill files first, then from `unwritten` once the
    /// files are empty.
    fn refill(&mut self) {
        while self.head.arrived_len() + SPILL_BATCH <= HEAD_WINDOW && self.has_tail() {
            let on_disk = self
                .spill
                .as_ref()
                .is_some_and(|spill| spill.entries_on_disk > 0);
            if !on_disk {
                let room = HEAD_WINDOW - self.head.arrived_len();
                for _ in 0..room.min(self.unwritten.len()) {
                    let (sequence, entry) = self.unwritten.pop_front().expect("counted");
                    self.head.push_back(sequence, entry);
                }
                continue;
            }
            if !self.read_back() {
                // Left on disk; the next take tries again.
                return;
            }
        }
    }

    /// Reads one batch from the oldest spill file into the head; false if
    /// the disk refused.
    fn read_back(&mut self) -> bool {
        let spill = self.spill.as_mut().expect("entries on disk have a spill");
        let Some(chunk) = spill.chunks.front_mut() else {
            return false;
        };
        let count = (chunk.written - chunk.read).min(SPILL_BATCH as u32);
        let path = spill.area.chunk_path(spill.backlog, chunk.number);
        let offset = u64::from(chunk.read) * M::ENCODED_BYTES as u64;
        let decoded: Option<Vec<(Sequence, M)>> =
            match spill
                .area
                .fs
                .read_at(&path, offset, count as usize * M::ENCODED_BYTES)
            {
                Ok(bytes) => bytes
                    .chunks_exact(M::ENCODED_BYTES)
                    .map(M::decode)
                    .collect(),
                Err(error) => {
                    if !spill.failing {
                        tracing::error!(path = %path.display(), %error,
                        "could not read a queue's spilled backlog back; retrying on the next take");
                        spill.failing = true;
                    }
                    return false;
                }
            };
        let Some(entries) = decoded else {
            if !spill.failing {
                tracing::error!(path = %path.display(), offset,
                    "a spilled backlog entry does not decode; retrying on the next take");
                spill.failing = true;
            }
            return false;
        };
        spill.failing = false;
        chunk.read += count;
        let emptied = (chunk.read == chunk.written).then_some(chunk.number);
        spill.entries_on_disk -= count as usize;
        spill
            .area
            .entries_on_disk
            .fetch_sub(u64::from(count), Ordering::Relaxed);
        // Every file but the newest is full or sealed, so a file read to
        // its end is done with; the newest, emptied, goes too, and the next
        // write starts a new one.
        if let Some(number) = emptied {
            spill.chunks.pop_front();
            remove_chunk(&spill.area, spill.backlog, number);
        }
        for (sequence, entry) in entries {
            self.head.push_back(sequence, entry);
        }
        true
    }
}

fn remove_chunk(area: &SpillArea, backlog: u64, chunk: u64) {
    let path = area.chunk_path(backlog, chunk);
    if let Err(error) = area.fs.remove(&path) {
        tracing::warn!(path = %path.display(), %error, "could not delete a spill file");
    }
}

impl<M> Drop for SpillingBacklog<M> {
    fn drop(&mut self) {
        if let Some(spill) = &self.spill {
            spill
                .area
                .entries_on_disk
                .fetch_sub(spill.entries_on_disk as u64, Ordering::Relaxed);
            for chunk in &spill.chunks {
                remove_chunk(&spill.area, spill.backlog, chunk.number);
            }
        }
    }
}

impl<M: SpillEntry> Backlog<M> for SpillingBacklog<M> {
    fn push_back(&mut self, sequence: Sequence, message: M) {
        let behind_head = self.has_tail() || self.head.arrived_len() >= HEAD_WINDOW;
        if self.spill.is_none() || !behind_head {
            self.head.push_back(sequence, message);
            return;
        }
        self.unwritten.push_back((sequence, message));
        if self
            .spill
            .as_ref()
            .is_some_and(|spill| self.unwritten.len() >= spill.write_at)
        {
            self.write_out();
        }
    }

    fn holds_in_memory(&self, _next: &M) -> bool {
        self.spill.is_none() || (!self.has_tail() && self.head.arrived_len() < HEAD_WINDOW)
    }

    fn pop_front(&mut self) -> Option<(Sequence, M)> {
        if self.head.is_empty() {
            self.refill();
        }
        let taken = self.head.pop_front();
        if self.has_tail() {
            self.refill();
        }
        taken
    }

    fn front(&self) -> Option<(Sequence, &M)> {
        self.head.front()
    }

    fn requeue(&mut self, sequence: Sequence, message: M) {
        self.head.requeue(sequence, message);
    }

    fn len(&self) -> usize {
        self.head.len() + self.spilled_len() + self.unwritten.len()
    }

    fn visit_head_mut(&mut self, count: usize, visit: &mut dyn FnMut(Sequence, &mut M)) {
        self.head.visit_head_mut(count, visit);
    }

    fn get_mut(&mut self, sequence: Sequence) -> Option<&mut M> {
        self.head.get_mut(sequence)
    }
}
