//! The durable topology file: durable exchanges, queues and bindings, as
//! opaque entries encoded by the broker. It is small and changes rarely, so
//! every change rewrites it whole: write a temporary file, fsync it, rename
//! it over the old one, fsync the directory. A crash leaves either the old
//! file or the new one, never a mix.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fs::FileSystem;
use crate::log::StoreError;
use crate::record::{self, Decoded, RecordKind};

const FILE_NAME: &str = "topology.dat";
const TEMPORARY_NAME: &str = "topology.dat.tmp";

pub struct TopologyFile {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
}

impl TopologyFile {
    pub fn new(fs: Arc<dyn FileSystem>, dir: &Path) -> Self {
        Self {
            fs,
            dir: dir.to_path_buf(),
        }
    }

    /// The entries last saved, in order; none if nothing was ever saved.
    /// An entry whose checksum fails is skipped and logged.
    pub fn load(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let path = self.dir.join(FILE_NAME);
        if !self.fs.exists(&path) {
            return Ok(Vec::new());
        }
        let bytes = self.fs.read_all(&path).map_err(|error| StoreError::Io {
            operation: "reading",
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        let mut entries = Vec::new();
        let mut offset = 0;
        while offset < bytes.len() {
            match record::decode(&bytes[offset..]) {
                Decoded::Record(record, length) => {
                    if record.kind == RecordKind::Topology {
                        entries.push(record.payload.to_vec());
                    }
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
        Ok(entries)
    }

    /// Replaces the saved topology with `entries`, durably.
    pub fn save(&self, entries: &[Vec<u8>]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            record::encode(&mut bytes, RecordKind::Topology, 0, index as u64, entry);
        }
        let temporary = self.dir.join(TEMPORARY_NAME);
        let path = self.dir.join(FILE_NAME);
        let io = |operation: &'static str, path: &Path| {
            let path = path.display().to_string();
            move |error: std::io::Error| StoreError::Io {
                operation,
                path,
                reason: error.to_string(),
            }
        };
        self.fs
            .create_dir_all(&self.dir)
            .map_err(io("creating", &self.dir))?;
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
            .map_err(io("fsync of", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::SimulatedFileSystem;

    #[test]
    fn saved_entries_load_back_and_a_new_save_replaces_them() {
        let fs = SimulatedFileSystem::new();
        let file = TopologyFile::new(fs.clone(), Path::new("/data"));
        assert!(file.load().unwrap().is_empty());
        file.save(&[b"exchange".to_vec(), b"queue".to_vec()])
            .unwrap();
        assert_eq!(
            file.load().unwrap(),
            vec![b"exchange".to_vec(), b"queue".to_vec()]
        );
        file.save(&[b"queue".to_vec()]).unwrap();
        fs.crash(|_| 0);
        assert_eq!(file.load().unwrap(), vec![b"queue".to_vec()]);
    }

    #[test]
    fn a_failed_sync_leaves_the_old_topology() {
        let fs = SimulatedFileSystem::new();
        let file = TopologyFile::new(fs.clone(), Path::new("/data"));
        file.save(&[b"old".to_vec()]).unwrap();
        fs.fail_next_syncs(1);
        assert!(file.save(&[b"new".to_vec()]).is_err());
        fs.crash(|_| 0);
        assert_eq!(file.load().unwrap(), vec![b"old".to_vec()]);
    }
}
