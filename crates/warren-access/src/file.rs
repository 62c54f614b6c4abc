//! The access file: users (with their hashes), vhosts and permissions as
//! JSON in the data directory, rewritten whole and atomically after every
//! change (write a temporary file, fsync it, rename it over the old one,
//! fsync the directory), so a crash leaves either the old or the new file.
//! The file holds password hashes, so it is readable by the broker's user
//! alone (mode 0600), as RabbitMQ keeps its Mnesia directory.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file's name inside the data directory.
pub const ACCESS_FILE_NAME: &str = "access.json";

/// Largest access file read at start: far more than USERS_MAX users with
/// permissions in every vhost would need is still refused, rather than
/// read into memory whole.
const ACCESS_FILE_SIZE_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Owner read and write, nothing for group or others.
const ACCESS_FILE_MODE: u32 = 0o600;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccessFile {
    pub users: Vec<UserEntry>,
    pub vhosts: Vec<VhostEntry>,
    pub permissions: Vec<PermissionEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserEntry {
    pub name: String,
    /// None: the user cannot log in with a password (EXTERNAL only).
    pub password_hash: Option<String>,
    /// How `password_hash` was made, by its name in definitions files;
    /// absent for Argon2id (and in files written before RabbitMQ's hashes
    /// were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing_algorithm: Option<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VhostEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queues: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PermissionEntry {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub(crate) fn load(path: &Path) -> Result<Option<AccessFile>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let metadata = match fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io(error)),
    };
    if metadata.len() > ACCESS_FILE_SIZE_MAX_BYTES {
        return Err(FileError::Invalid {
            path: path.to_owned(),
            reason: format!("larger than {ACCESS_FILE_SIZE_MAX_BYTES} bytes"),
        });
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        // A file written by an older version, or copied in by hand: the
        // hashes in it should not stay readable by other local users.
        tracing::warn!(path = %path.display(), "access file was readable by others; restricting it to mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(ACCESS_FILE_MODE)).map_err(io)?;
    }
    let text = fs::read(path).map_err(io)?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|error| FileError::Invalid {
            path: path.to_owned(),
            reason: error.to_string(),
        })
}

pub(crate) fn save(path: &Path, contents: &AccessFile) -> Result<(), FileError> {
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(contents).expect("the access file serialises");
    let temporary = path.with_extension("json.tmp");
    {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(ACCESS_FILE_MODE)
            .open(&temporary)
            .map_err(io)?;
        // `mode` applies only when the file is created; a temporary file
        // left by a crash keeps whatever mode it had.
        file.set_permissions(fs::Permissions::from_mode(ACCESS_FILE_MODE))
            .map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    fs::rename(&temporary, path).map_err(io)?;
    if let Some(directory) = path.parent() {
        fs::File::open(directory)
            .and_then(|directory| directory.sync_all())
            .map_err(io)?;
    }
    Ok(())
}
