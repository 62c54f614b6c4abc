//! The file operations the store needs, behind a trait so tests can replace
//! the disk with one that tears writes, fails fsyncs, runs out of space and
//! crashes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// What the store asks of a file system. Paths are absolute or relative to
/// the process; the store only ever uses paths under its own directory.
pub trait FileSystem: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Reads a whole file into `buffer`, replacing what it held; a caller
    /// reading many files keeps one buffer and its pages.
    fn read_all_into(&self, path: &Path, buffer: &mut Vec<u8>) -> io::Result<()> {
        *buffer = self.read_all(path)?;
        Ok(())
    }
    fn read_at(&self, path: &Path, offset: u64, length: usize) -> io::Result<Vec<u8>>;
    /// Appends to a file, creating it if it does not exist.
    fn append(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Creates or replaces a file with `data` (not synced).
    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Makes a file's data durable (fdatasync).
    fn sync(&self, path: &Path) -> io::Result<()>;
    /// Makes a directory's entries (created, renamed, removed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn truncate(&self, path: &Path, length: u64) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Bytes available to the broker on the file system holding `dir`.
    fn available_bytes(&self, dir: &Path) -> io::Result<u64>;
}

/// Open handles kept for reads and appends; beyond this many the cache is
/// emptied, so a store with many segments cannot exhaust file descriptors.
const OPEN_FILES_MAX: usize = 256;

/// The real file system, with a small cache of open handles so that paging
/// a backlog in does not open a file per message.
#[derive(Default)]
pub struct OsFileSystem {
    handles: Mutex<HashMap<PathBuf, Arc<File>>>,
}

impl OsFileSystem {
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(&self, path: &Path) -> io::Result<Arc<File>> {
        let mut handles = self.handles.lock();
        if let Some(file) = handles.get(path) {
            return Ok(Arc::clone(file));
        }
        if handles.len() >= OPEN_FILES_MAX {
            handles.clear();
        }
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(path)?,
        );
        handles.insert(path.to_path_buf(), Arc::clone(&file));
        Ok(file)
    }

    fn forget(&self, path: &Path) {
        self.handles.lock().remove(path);
    }
}

impl FileSystem for OsFileSystem {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn read_all_into(&self, path: &Path, buffer: &mut Vec<u8>) -> io::Result<()> {
        use std::io::Read;
        buffer.clear();
        File::open(path)?.read_to_end(buffer)?;
        Ok(())
    }

    fn read_at(&self, path: &Path, offset: u64, length: usize) -> io::Result<Vec<u8>> {
        let file = self.handle(path)?;
        let mut buffer = vec![0; length];
        file.read_exact_at(&mut buffer, offset)?;
        Ok(buffer)
    }

    fn append(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let file = self.handle(path)?;
        (&*file).write_all(data)
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.forget(path);
        std::fs::write(path, data)
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        self.handle(path)?.sync_data()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn truncate(&self, path: &Path, length: u64) -> io::Result<()> {
        let file = self.handle(path)?;
        file.set_len(length)?;
        file.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.forget(from);
        self.forget(to);
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.forget(path);
        std::fs::remove_file(path)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn available_bytes(&self, dir: &Path) -> io::Result<u64> {
        fs4::available_space(dir)
    }
}

/// An in-memory file system that remembers how much of each file has been
/// synced, so that a simulated crash can throw away, or tear, what was not.
#[derive(Default)]
pub struct SimulatedFileSystem {
    state: Mutex<SimulatedState>,
    /// While true, `sync` waits: lets a test hold the commit thread in the
    /// middle of a commit.
    syncs_paused: Mutex<bool>,
    syncs_resumed: Condvar,
    /// Syncs currently held by `pause_syncs`.
    syncs_waiting: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct SimulatedState {
    files: HashMap<PathBuf, SimulatedFile>,
    /// Total bytes the "disk" holds; writes beyond fail with ENOSPC.
    capacity_bytes: Option<u64>,
    /// The next this many syncs fail with EIO.
    failing_syncs: u32,
}

#[derive(Default, Clone)]
struct SimulatedFile {
    data: Vec<u8>,
    synced_length: usize,
}

impl SimulatedFileSystem {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_capacity(&self, capacity_bytes: Option<u64>) {
        self.state.lock().capacity_bytes = capacity_bytes;
    }

    pub fn pause_syncs(&self) {
        *self.syncs_paused.lock() = true;
    }

    pub fn syncs_waiting(&self) -> usize {
        self.syncs_waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn resume_syncs(&self) {
        *self.syncs_paused.lock() = false;
        self.syncs_resumed.notify_all();
    }

    pub fn fail_next_syncs(&self, count: u32) {
        self.state.lock().failing_syncs = count;
    }

    /// Loses everything not synced. `keep_unsynced` chooses, per file, how
    /// many of its unsynced bytes survive (a torn write keeps part of them).
    pub fn crash(&self, mut keep_unsynced: impl FnMut(usize) -> usize) {
        let mut state = self.state.lock();
        for file in state.files.values_mut() {
            let unsynced = file.data.len() - file.synced_length;
            let kept = keep_unsynced(unsynced).min(unsynced);
            file.data.truncate(file.synced_length + kept);
            file.synced_length = file.data.len();
        }
    }

    /// Flips one byte of a file, as a bad sector would.
    pub fn corrupt(&self, path: &Path, offset: usize) {
        if let Some(file) = self.state.lock().files.get_mut(path)
            && offset < file.data.len()
        {
            file.data[offset] ^= 0xFF;
        }
    }

    pub fn file_length(&self, path: &Path) -> Option<usize> {
        self.state
            .lock()
            .files
            .get(path)
            .map(|file| file.data.len())
    }

    fn used_bytes(state: &SimulatedState) -> u64 {
        state
            .files
            .values()
            .map(|file| file.data.len() as u64)
            .sum()
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl FileSystem for SimulatedFileSystem {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.state.lock();
        Ok(state
            .files
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn read_all(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        state
            .files
            .get(path)
            .map(|file| file.data.clone())
            .ok_or_else(|| not_found(path))
    }

    fn read_at(&self, path: &Path, offset: u64, length: usize) -> io::Result<Vec<u8>> {
        let state = self.state.lock();
        let file = state.files.get(path).ok_or_else(|| not_found(path))?;
        let start = offset as usize;
        file.data
            .get(start..start + length)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file"))
    }

    fn append(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        if let Some(capacity) = state.capacity_bytes {
            let used = Self::used_bytes(&state);
            if used + data.len() as u64 > capacity {
                // A real disk may take part of the write before failing.
                let room = capacity.saturating_sub(used) as usize;
                state
                    .files
                    .entry(path.to_path_buf())
                    .or_default()
                    .data
                    .extend_from_slice(&data[..room]);
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
        }
        state
            .files
            .entry(path.to_path_buf())
            .or_default()
            .data
            .extend_from_slice(data);
        Ok(())
    }

    fn write(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut state = self.state.lock();
        state.files.insert(
            path.to_path_buf(),
            SimulatedFile {
                data: data.to_vec(),
                synced_length: 0,
            },
        );
        Ok(())
    }

    fn sync(&self, path: &Path) -> io::Result<()> {
        {
            let mut paused = self.syncs_paused.lock();
            if *paused {
                self.syncs_waiting
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                while *paused {
                    self.syncs_resumed.wait(&mut paused);
                }
                self.syncs_waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let mut state = self.state.lock();
        if state.failing_syncs > 0 {
            state.failing_syncs -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
        file.synced_length = file.data.len();
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn truncate(&self, path: &Path, length: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.get_mut(path).ok_or_else(|| not_found(path))?;
        file.data.truncate(length as usize);
        file.synced_length = file.synced_length.min(file.data.len());
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        let file = state.files.remove(from).ok_or_else(|| not_found(from))?;
        state.files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state
            .files
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| not_found(path))
    }

    fn exists(&self, path: &Path) -> bool {
        self.state.lock().files.contains_key(path)
    }

    fn available_bytes(&self, _dir: &Path) -> io::Result<u64> {
        let state = self.state.lock();
        Ok(match state.capacity_bytes {
            Some(capacity) => capacity.saturating_sub(Self::used_bytes(&state)),
            None => u64::MAX,
        })
    }
}
