//! The durable topology: durable exchanges, queues and bindings, as opaque
//! entries encoded by the broker, kept as a snapshot plus a journal of
//! changes.
//!
//! A change (an entry added or removed) costs its own bytes: it is appended
//! to `topology.journal` by a thread of its own, which commits every change
//! that arrived during the previous fsync with one fsync (group commit) and
//! then reports the changes' ticket as durable. Whoever made the change
//! waits for that ticket before answering its client; nobody else waits for
//! anything. The thread also keeps the current set of entries, so that when
//! the journal has grown past the snapshot it writes a new snapshot
//! (`topology.dat`: a temporary file, fsync, rename over the old one, fsync
//! of the directory) and empties the journal, again without holding up the
//! broker.
//!
//! Replaying a journal over a snapshot that already contains its changes
//! gives that snapshot back (the last change to an entry decides whether it
//! is present), so a crash between writing a snapshot and emptying the
//! journal loses nothing and adds nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use crate::fs::FileSystem;
use crate::log::{DurableListener, StoreError, Ticket};
use crate::record::{self, Decoded, RecordKind};

const SNAPSHOT_NAME: &str = "topology.dat";
const TEMPORARY_NAME: &str = "topology.dat.tmp";
const JOURNAL_NAME: &str = "topology.journal";

/// The journal is folded into a new snapshot once it is larger than both
/// this and the snapshot itself: a snapshot then costs at most about as
/// much writing as the changes since the last one did.
const JOURNAL_COMPACT_MIN_BYTES: u64 = 1024 * 1024;

/// One change to the durable topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyChange {
    Added(Vec<u8>),
    Removed(Vec<u8>),
}

/// The durable topology's writer: hands changes to its thread and says
/// which ticket makes them durable.
pub struct TopologyJournal {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    listener: DurableListener,
    /// The last ticket made durable, for `wait_durable`.
    durable: Mutex<Ticket>,
    durable_changed: Condvar,
}

#[derive(Default)]
struct Pending {
    changes: Vec<TopologyChange>,
    /// The ticket of the last change handed in.
    assigned: Ticket,
    /// Set when a write or fsync failed: nothing more becomes durable.
    poisoned: Option<String>,
    /// Set by `close` or `abandon`: the thread stops once `changes` is
    /// written (close) or at once (abandon).
    stop: Option<Stop>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Flush,
    Abandon,
}

/// The entries on disk and where they live; owned by the writer thread.
struct Files {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    entries: BTreeSet<Vec<u8>>,
    snapshot_bytes: u64,
    journal_bytes: u64,
}

impl TopologyJournal {
    /// Loads the durable topology under `dir` and starts the writer.
    /// Returns the entries, ordered by their bytes (the broker's entries
    /// start with their kind, so exchanges come before queues, and queues
    /// before bindings). An entry whose checksum fails is skipped and
    /// logged. `listener` is told each ticket that becomes durable, or the
    /// error that stopped the journal.
    pub fn open(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        listener: DurableListener,
    ) -> Result<(Self, Vec<Vec<u8>>), StoreError> {
        let mut files = Files {
            fs,
            dir: dir.to_path_buf(),
            entries: BTreeSet::new(),
            snapshot_bytes: 0,
            journal_bytes: 0,
        };
        files.fs.create_dir_all(dir).map_err(io("creating", dir))?;
        for record in files.read_records(SNAPSHOT_NAME)? {
            if let (RecordKind::Topology, entry) = record {
                files.entries.insert(entry);
            }
        }
        let journal = files.read_records(JOURNAL_NAME)?;
        let replayed = !journal.is_empty();
        for record in journal {
            match record {
                (RecordKind::Topology, entry) => {
                    files.entries.insert(entry);
                }
                (RecordKind::TopologyRemoved, entry) => {
                    files.entries.remove(&entry);
                }
                _ => {}
            }
        }
        // Start from a snapshot of everything and an empty journal, which
        // also drops a torn tail the journal may end in.
        if replayed || !files.fs.exists(&dir.join(SNAPSHOT_NAME)) {
            files.write_snapshot()?;
        } else {
            files.snapshot_bytes = files.encoded_snapshot_bytes();
            files.empty_journal()?;
        }
        let entries = files.entries.iter().cloned().collect();
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            listener,
            durable: Mutex::new(0),
            durable_changed: Condvar::new(),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("warren-topology".into())
                .spawn(move || write_loop(&shared, files))
                .map_err(|error| StoreError::Io {
                    operation: "starting",
                    path: "the topology writer thread".into(),
                    kind: error.kind(),
                    reason: error.to_string(),
                })?
        };
        Ok((
            Self {
                shared,
                thread: Some(thread),
            },
            entries,
        ))
    }

    /// Hands `changes` to the writer; they are durable once the listener
    /// reports the returned ticket (or a later one). Refused once a write
    /// has failed.
    pub fn record(&self, changes: Vec<TopologyChange>) -> Result<Ticket, StoreError> {
        let mut pending = self.shared.pending.lock();
        if let Some(reason) = &pending.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        pending.changes.extend(changes);
        pending.assigned += 1;
        self.shared.wake.notify_one();
        Ok(pending.assigned)
    }

    /// Blocks until `ticket` is durable, for callers outside the server's
    /// event loop (tests, tools); the server watches the listener instead.
    pub fn wait_durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        self.waiter().wait_durable(ticket)
    }

    /// A handle that can wait for tickets without borrowing the journal
    /// (so without holding whatever lock guards it).
    pub fn waiter(&self) -> TopologyWaiter {
        TopologyWaiter {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Writes what is pending and stops the writer.
    pub fn close(mut self) {
        self.stop(Stop::Flush);
    }

    /// Stops the writer the way a crash would: what is pending is not
    /// written. Only tests have a use for this.
    pub fn abandon(mut self) {
        self.stop(Stop::Abandon);
    }

    fn stop(&mut self, how: Stop) {
        self.shared.pending.lock().stop = Some(how);
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TopologyJournal {
    fn drop(&mut self) {
        self.stop(Stop::Flush);
    }
}

/// Waits for the topology journal to make a ticket durable.
#[derive(Clone)]
pub struct TopologyWaiter {
    shared: Arc<Shared>,
}

impl TopologyWaiter {
    /// Blocks until `ticket` is durable, or the journal has failed.
    pub fn wait_durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        let mut durable = self.shared.durable.lock();
        loop {
            if *durable >= ticket {
                return Ok(());
            }
            if let Some(reason) = &self.shared.pending.lock().poisoned {
                return Err(StoreError::Poisoned(reason.clone()));
            }
            self.shared
                .durable_changed
                .wait_for(&mut durable, std::time::Duration::from_millis(50));
        }
    }
}

fn write_loop(shared: &Shared, mut files: Files) {
    loop {
        let (changes, ticket) = {
            let mut pending = shared.pending.lock();
            while pending.changes.is_empty() && pending.stop.is_none() {
                shared.wake.wait(&mut pending);
            }
            if pending.stop == Some(Stop::Abandon)
                || (pending.changes.is_empty() && pending.stop.is_some())
            {
                return;
            }
            (std::mem::take(&mut pending.changes), pending.assigned)
        };
        match files.append(&changes) {
            Ok(()) => {
                *shared.durable.lock() = ticket;
                shared.durable_changed.notify_all();
                (shared.listener)(Ok(ticket));
            }
            Err(error) => {
                tracing::error!(%error, "could not write the durable topology");
                shared.pending.lock().poisoned = Some(error.to_string());
                (shared.listener)(Err(StoreError::Poisoned(error.to_string())));
                return;
            }
        }
        if files.journal_bytes > JOURNAL_COMPACT_MIN_BYTES.max(files.snapshot_bytes)
            && let Err(error) = files.write_snapshot()
        {
            // The journal still holds every change; the next compaction
            // tries again.
            tracing::warn!(%error, "could not write a topology snapshot");
        }
    }
}

impl Files {
    /// The records of one file, in order; none if it does not exist.
    fn read_records(&self, name: &str) -> Result<Vec<(RecordKind, Vec<u8>)>, StoreError> {
        let path = self.dir.join(name);
        if !self.fs.exists(&path) {
            return Ok(Vec::new());
        }
        let bytes = self.fs.read_all(&path).map_err(io("reading", &path))?;
        let mut records = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            match record::decode(&bytes[offset..]) {
                Decoded::Record(record, length) => {
                    records.push((record.kind, record.payload.to_vec()));
                    offset += length;
                }
                Decoded::Corrupt(length) => {
                    tracing::error!(path = %path.display(), offset, "skipping a topology entry whose checksum does not match");
                    offset += length;
                }
                Decoded::Torn | Decoded::Garbage => {
                    tracing::error!(path = %path.display(), offset, "the topology file ends in unreadable bytes");
                    break;
                }
            }
        }
        Ok(records)
    }

    /// Appends the changes to the journal and syncs it.
    fn append(&mut self, changes: &[TopologyChange]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for change in changes {
            let (kind, entry) = match change {
                TopologyChange::Added(entry) => (RecordKind::Topology, entry),
                TopologyChange::Removed(entry) => (RecordKind::TopologyRemoved, entry),
            };
            record::encode(&mut bytes, kind, 0, 0, entry);
        }
        let path = self.dir.join(JOURNAL_NAME);
        self.fs
            .append(&path, &bytes)
            .map_err(io("appending to", &path))?;
        self.fs.sync(&path).map_err(io("fsync of", &path))?;
        self.journal_bytes += bytes.len() as u64;
        for change in changes {
            match change {
                TopologyChange::Added(entry) => self.entries.insert(entry.clone()),
                TopologyChange::Removed(entry) => self.entries.remove(entry),
            };
        }
        Ok(())
    }

    fn encoded_snapshot_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|entry| record::encoded_length(entry.len()) as u64)
            .sum()
    }

    /// Replaces the snapshot with the current entries, durably, then
    /// empties the journal.
    fn write_snapshot(&mut self) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for (index, entry) in self.entries.iter().enumerate() {
            record::encode(&mut bytes, RecordKind::Topology, 0, index as u64, entry);
        }
        let temporary = self.dir.join(TEMPORARY_NAME);
        let path = self.dir.join(SNAPSHOT_NAME);
        self.fs
            .write(&temporary, &bytes)
            .map_err(io("writing", &temporary))?;
        self.fs
            .sync(&temporary)
            .map_err(io("fsync of", &temporary))?;
        self.fs
            .rename(&temporary, &path)
            .map_err(io("renaming", &temporary))?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(io("fsync of", &self.dir))?;
        self.snapshot_bytes = bytes.len() as u64;
        self.empty_journal()
    }

    fn empty_journal(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join(JOURNAL_NAME);
        self.fs.write(&path, &[]).map_err(io("emptying", &path))?;
        self.fs.sync(&path).map_err(io("fsync of", &path))?;
        self.journal_bytes = 0;
        Ok(())
    }
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.display().to_string();
    move |error| StoreError::Io {
        operation,
        path,
        kind: error.kind(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::fs::SimulatedFileSystem;

    fn open(
        fs: &Arc<SimulatedFileSystem>,
    ) -> (TopologyJournal, Vec<Vec<u8>>, mpsc::Receiver<Ticket>) {
        let (sender, durable) = mpsc::channel();
        let sender = Mutex::new(sender);
        let listener: DurableListener = Box::new(move |result| {
            if let Ok(ticket) = result {
                let _ = sender.lock().send(ticket);
            }
        });
        let (journal, entries) =
            TopologyJournal::open(fs.clone(), Path::new("/data"), listener).unwrap();
        (journal, entries, durable)
    }

    fn wait_for(durable: &mpsc::Receiver<Ticket>, ticket: Ticket) {
        while durable.recv().unwrap() < ticket {}
    }

    fn added(entry: &[u8]) -> TopologyChange {
        TopologyChange::Added(entry.to_vec())
    }

    #[test]
    fn durable_changes_survive_a_crash_and_come_back_in_order() {
        let fs = SimulatedFileSystem::new();
        let (journal, entries, durable) = open(&fs);
        assert!(entries.is_empty());
        let ticket = journal
            .record(vec![added(b"\x02queue"), added(b"\x01exchange")])
            .unwrap();
        wait_for(&durable, ticket);
        let ticket = journal
            .record(vec![
                TopologyChange::Removed(b"\x02queue".to_vec()),
                added(b"\x03binding"),
            ])
            .unwrap();
        wait_for(&durable, ticket);
        journal.abandon();
        fs.crash(|_| 0);
        let (_journal, entries, _) = open(&fs);
        assert_eq!(
            entries,
            vec![b"\x01exchange".to_vec(), b"\x03binding".to_vec()]
        );
    }

    #[test]
    fn a_change_not_yet_durable_may_be_lost_but_never_half_applied() {
        let fs = SimulatedFileSystem::new();
        let (journal, _, durable) = open(&fs);
        let ticket = journal.record(vec![added(b"\x01kept")]).unwrap();
        wait_for(&durable, ticket);
        fs.pause_syncs();
        journal
            .record(vec![added(b"\x01torn"), added(b"\x02torn")])
            .unwrap();
        while fs.syncs_waiting() == 0 {
            std::thread::yield_now();
        }
        // The crash keeps part of the unsynced append: a torn record.
        fs.crash(|unsynced| unsynced / 2);
        fs.resume_syncs();
        journal.abandon();
        let (_journal, entries, _) = open(&fs);
        assert!(entries.contains(&b"\x01kept".to_vec()));
        assert!(!entries.contains(&b"\x02torn".to_vec()));
    }

    #[test]
    fn a_long_journal_is_folded_into_a_snapshot() {
        let fs = SimulatedFileSystem::new();
        let (journal, _, durable) = open(&fs);
        let entry = vec![2u8; 1000];
        let mut ticket = 0;
        // Adding and removing the same entry grows the journal, not the
        // topology: the snapshot stays one entry long.
        for _ in 0..1_500 {
            ticket = journal
                .record(vec![TopologyChange::Added(entry.clone())])
                .unwrap();
            journal
                .record(vec![TopologyChange::Removed(entry.clone())])
                .unwrap();
        }
        ticket = journal
            .record(vec![TopologyChange::Added(entry.clone())])
            .unwrap()
            .max(ticket);
        wait_for(&durable, ticket);
        journal.close();
        let journal_bytes = fs
            .file_length(&Path::new("/data").join(JOURNAL_NAME))
            .unwrap();
        assert!(
            journal_bytes as u64 <= JOURNAL_COMPACT_MIN_BYTES + 2_000,
            "journal of {journal_bytes} bytes was never folded"
        );
        fs.crash(|_| 0);
        let (_journal, entries, _) = open(&fs);
        assert_eq!(entries, vec![entry]);
    }

    #[test]
    fn a_failed_fsync_is_reported_and_refuses_further_changes() {
        let fs = SimulatedFileSystem::new();
        let (sender, failures) = mpsc::channel();
        let sender = Mutex::new(sender);
        let listener: DurableListener = Box::new(move |result| {
            if result.is_err() {
                let _ = sender.lock().send(());
            }
        });
        let (journal, _) = TopologyJournal::open(fs.clone(), Path::new("/data"), listener).unwrap();
        fs.fail_next_syncs(1);
        journal.record(vec![added(b"\x01lost")]).unwrap();
        failures.recv().unwrap();
        assert!(matches!(
            journal.record(vec![added(b"\x01refused")]),
            Err(StoreError::Poisoned(_))
        ));
    }

    #[test]
    fn a_snapshot_of_the_older_format_loads() {
        // Before the journal, every change rewrote topology.dat whole with
        // the same records; such a file loads as the snapshot.
        let fs = SimulatedFileSystem::new();
        let mut bytes = Vec::new();
        record::encode(&mut bytes, RecordKind::Topology, 0, 0, b"\x01exchange");
        record::encode(&mut bytes, RecordKind::Topology, 0, 1, b"\x02queue");
        fs.write(&Path::new("/data").join(SNAPSHOT_NAME), &bytes)
            .unwrap();
        fs.sync(&Path::new("/data").join(SNAPSHOT_NAME)).unwrap();
        let (_journal, entries, _) = open(&fs);
        assert_eq!(
            entries,
            vec![b"\x01exchange".to_vec(), b"\x02queue".to_vec()]
        );
    }
}
