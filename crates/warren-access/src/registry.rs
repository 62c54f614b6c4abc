//! [`AccessControl`]: the users, vhosts and permissions the broker knows,
//! the checks made against them, and the changes operators make at run
//! time, each persisted before it takes effect.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::file::{self, AccessFile, FileError};
use crate::internal::{INTERNAL_USER, InternalIdentity};
use crate::limits::{LimitError, VhostLimits};
use crate::password::{HashingAlgorithm, PasswordError, PasswordHash, VerifiedLogins, decoy_hash};
use crate::permissions::{Access, PatternError, Permissions, Resource, ResourceKind};
use crate::tags::{Tags, TagsError};

/// Users the broker holds; a bound on the access file and on memory.
pub const USERS_MAX: usize = 10_000;
/// Vhosts the broker holds (each has its own exchanges and queues).
pub const VHOSTS_MAX: usize = 4_096;
/// User and vhost names travel in AMQP short strings.
pub const NAME_LENGTH_MAX_BYTES: usize = 255;

/// A user as the broker stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    /// None: no password login (the user can only come in by EXTERNAL).
    pub password_hash: Option<PasswordHash>,
    pub tags: Tags,
}

/// One user's permissions in one vhost.
#[derive(Debug, Clone)]
pub struct PermissionEntry {
    pub user: String,
    pub vhost: String,
    pub permissions: Arc<Permissions>,
}

/// Users, vhosts and permissions to install: on the first start (the
/// defaults) or on every start (those the configuration file declares).
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    pub users: Vec<DeclaredUser>,
    pub vhosts: Vec<String>,
    pub permissions: Vec<PermissionEntry>,
}

#[derive(Debug, Clone)]
pub struct DeclaredUser {
    pub name: String,
    pub password: DeclaredPassword,
    pub tags: Tags,
}

#[derive(Debug, Clone)]
pub enum DeclaredPassword {
    /// Hashed at start; kept as is when the stored hash already matches.
    Plain(String),
    Hash(PasswordHash),
    None,
}

/// What a user's password becomes in [`AccessControl::put_user`].
#[derive(Debug, Clone)]
pub enum PasswordChange {
    Keep,
    Set(PasswordHash),
    Clear,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown user, wrong password or no password: one answer for all, so
    /// a peer cannot tell which.
    #[error("login refused for user '{user}'")]
    Refused { user: String },
    #[error("user '{user}' can only connect via localhost")]
    LoopbackOnly { user: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VhostRefusal {
    #[error("vhost '{0}' not found")]
    NotFound(String),
    #[error("access to vhost '{vhost}' refused for user '{user}'")]
    NoPermissions { user: String, vhost: String },
}

/// A permission check that failed, worded as RabbitMQ words it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("access to {kind} '{name}' in vhost '{vhost}' refused for user '{user}'")]
pub struct Refused {
    pub kind: &'static str,
    pub name: String,
    pub vhost: String,
    pub user: String,
    pub access: Access,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no user '{0}'")]
    UserNotFound(String),
    #[error("no vhost '{0}'")]
    VhostNotFound(String),
    #[error("{what} name '{name}' is empty or longer than {NAME_LENGTH_MAX_BYTES} bytes")]
    BadName { what: &'static str, name: String },
    #[error("user name '{0}' is reserved for the broker itself")]
    ReservedUserName(String),
    #[error("cannot add {what}: the limit of {limit} is reached")]
    TooMany { what: &'static str, limit: usize },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error(transparent)]
    Tags(#[from] TagsError),
    #[error("saving the access file: {0}")]
    Storage(#[from] FileError),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

#[derive(Clone, Default)]
struct State {
    users: BTreeMap<String, User>,
    vhosts: BTreeMap<String, VhostLimits>,
    /// Keyed by (user, vhost).
    permissions: BTreeMap<(String, String), Arc<Permissions>>,
}

pub struct AccessControl {
    state: RwLock<State>,
    /// Bumped by every change, so cached grants know to look again.
    generation: AtomicU64,
    /// None keeps everything in memory (a broker without a data directory).
    path: Option<PathBuf>,
    /// Users who may log in only from a loopback address.
    loopback_users: Vec<String>,
    logins: VerifiedLogins,
    internal: InternalIdentity,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AccessControl {
    /// Loads the access file in `data_dir` (if any), installing `defaults`
    /// when there is none yet, then installs `declared` over it.
    pub fn open(
        data_dir: Option<PathBuf>,
        defaults: Definitions,
        declared: Definitions,
        loopback_users: Vec<String>,
    ) -> Result<Self, AccessError> {
        let path = data_dir.map(|dir| dir.join(file::ACCESS_FILE_NAME));
        let stored = match &path {
            Some(path) => file::load(path)?,
            None => None,
        };
        let mut state = State::default();
        match stored {
            Some(contents) => state.restore(contents, path.as_ref().expect("read from a path"))?,
            None => state.install(defaults)?,
        }
        state.install(declared)?;
        let access = Self {
            state: RwLock::new(state),
            generation: AtomicU64::new(0),
            path,
            loopback_users,
            logins: VerifiedLogins::default(),
            internal: InternalIdentity::generate(),
        };
        access.persist(&access.state.read())?;
        Ok(access)
    }

    /// A broker in memory with the defaults only (tests, and the default
    /// configuration without a data directory).
    pub fn in_memory(defaults: Definitions, loopback_users: Vec<String>) -> Self {
        Self::open(None, defaults, Definitions::default(), loopback_users)
            .expect("definitions without a file install")
    }

    fn persist(&self, state: &State) -> Result<(), AccessError> {
        if let Some(path) = &self.path {
            file::save(path, &state.to_file())?;
        }
        Ok(())
    }

    /// Applies a change to a copy of the state, saves it, and only then
    /// makes it the state: a change that cannot be saved does not happen.
    fn change<T>(
        &self,
        apply: impl FnOnce(&mut State) -> Result<T, AccessError>,
    ) -> Result<T, AccessError> {
        let mut state = self.state.write();
        let mut next = state.clone();
        let result = apply(&mut next)?;
        self.persist(&next)?;
        *state = next;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(result)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The password of [`INTERNAL_USER`] for this run of the broker, for
    /// the clients the broker itself starts (see the `internal` module).
    pub fn internal_secret(&self) -> &str {
        self.internal.secret()
    }

    // ----- logging in ------------------------------------------------------

    /// PLAIN, AMQPLAIN and HTTP basic: the password against the user's hash.
    /// Slow (Argon2) unless this login succeeded before: call it off the
    /// async executor.
    pub fn login_with_password(
        &self,
        name: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<User, LoginError> {
        let refused = || LoginError::Refused {
            user: name.to_owned(),
        };
        if name == INTERNAL_USER {
            return self.login_internal(password, peer).ok_or_else(refused);
        }
        let user = self.user(name);
        let matched = match user.as_ref().and_then(|user| user.password_hash.as_ref()) {
            Some(hash) => self.logins.verify(name, password, hash),
            None => {
                // Same cost as a real check, so timing does not tell
                // whether the user exists.
                decoy_hash().verify(password);
                false
            }
        };
        let user = user.filter(|_| matched).ok_or_else(refused)?;
        self.check_origin(&user, peer)?;
        Ok(user)
    }

    /// EXTERNAL: the peer proved the name with a certificate the TLS layer
    /// verified, so only the user's existence and origin are checked.
    pub fn login_external(&self, name: &str, peer: IpAddr) -> Result<User, LoginError> {
        let user = self.user(name).ok_or_else(|| LoginError::Refused {
            user: name.to_owned(),
        })?;
        self.check_origin(&user, peer)?;
        Ok(user)
    }

    /// The broker's own identity: the right secret, from loopback only.
    fn login_internal(&self, password: &str, peer: IpAddr) -> Option<User> {
        (is_loopback(peer) && self.internal.verify(password)).then(|| User {
            name: INTERNAL_USER.to_owned(),
            password_hash: None,
            tags: Tags::default(),
        })
    }

    fn check_origin(&self, user: &User, peer: IpAddr) -> Result<(), LoginError> {
        if self.loopback_users.contains(&user.name) && !is_loopback(peer) {
            return Err(LoginError::LoopbackOnly {
                user: user.name.clone(),
            });
        }
        Ok(())
    }

    // ----- authorisation ---------------------------------------------------

    /// What `connection.open` checks: the vhost exists and the user has
    /// permissions in it.
    pub fn open_vhost(&self, user: &str, vhost: &str) -> Result<Arc<Permissions>, VhostRefusal> {
        let state = self.state.read();
        if !state.vhosts.contains_key(vhost) {
            return Err(VhostRefusal::NotFound(vhost.to_owned()));
        }
        if user == INTERNAL_USER {
            return Ok(full_permissions());
        }
        state
            .permissions
            .get(&(user.to_owned(), vhost.to_owned()))
            .cloned()
            .ok_or_else(|| VhostRefusal::NoPermissions {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
            })
    }

    pub fn permissions_of(&self, user: &str, vhost: &str) -> Option<Arc<Permissions>> {
        if user == INTERNAL_USER {
            return self.vhost_exists(vhost).then(full_permissions);
        }
        self.state
            .read()
            .permissions
            .get(&(user.to_owned(), vhost.to_owned()))
            .cloned()
    }

    /// One check, without a cache (the management API's reads).
    pub fn check(
        &self,
        user: &str,
        vhost: &str,
        access: Access,
        resource: Resource<'_>,
    ) -> Result<(), Refused> {
        let allowed = self
            .permissions_of(user, vhost)
            .is_some_and(|permissions| permissions.allows(access, resource));
        if allowed {
            Ok(())
        } else {
            Err(refusal(user, vhost, access, resource))
        }
    }

    // ----- reading ---------------------------------------------------------

    pub fn user(&self, name: &str) -> Option<User> {
        self.state.read().users.get(name).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.state.read().users.values().cloned().collect()
    }

    pub fn vhost_exists(&self, name: &str) -> bool {
        self.state.read().vhosts.contains_key(name)
    }

    pub fn vhosts(&self) -> Vec<String> {
        self.state.read().vhosts.keys().cloned().collect()
    }

    pub fn permissions(&self) -> Vec<PermissionEntry> {
        self.state
            .read()
            .permissions
            .iter()
            .map(|((user, vhost), permissions)| PermissionEntry {
                user: user.clone(),
                vhost: vhost.clone(),
                permissions: Arc::clone(permissions),
            })
            .collect()
    }

    /// Vhosts a user may open.
    pub fn vhosts_of(&self, user: &str) -> Vec<String> {
        self.state
            .read()
            .permissions
            .keys()
            .filter(|(owner, _)| owner == user)
            .map(|(_, vhost)| vhost.clone())
            .collect()
    }

    // ----- changing --------------------------------------------------------

    /// Creates or updates a user; true when created.
    pub fn put_user(
        &self,
        name: &str,
        password: PasswordChange,
        tags: Tags,
    ) -> Result<bool, AccessError> {
        check_user_name(name)?;
        let created = self.change(|state| {
            let existing = state.users.get(name);
            if existing.is_none() && state.users.len() >= USERS_MAX {
                return Err(AccessError::TooMany {
                    what: "user",
                    limit: USERS_MAX,
                });
            }
            let password_hash = match password {
                PasswordChange::Keep => existing.and_then(|user| user.password_hash.clone()),
                PasswordChange::Set(hash) => Some(hash),
                PasswordChange::Clear => None,
            };
            let created = existing.is_none();
            state.users.insert(
                name.to_owned(),
                User {
                    name: name.to_owned(),
                    password_hash,
                    tags,
                },
            );
            Ok(created)
        })?;
        self.logins.forget(name);
        Ok(created)
    }

    /// Deletes a user and their permissions. The caller closes their
    /// connections.
    pub fn delete_user(&self, name: &str) -> Result<(), AccessError> {
        self.change(|state| {
            state
                .users
                .remove(name)
                .ok_or_else(|| AccessError::UserNotFound(name.to_owned()))?;
            state.permissions.retain(|(user, _), _| user != name);
            Ok(())
        })?;
        self.logins.forget(name);
        Ok(())
    }

    pub fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        permissions: Permissions,
    ) -> Result<(), AccessError> {
        self.change(|state| state.set_permissions(user, vhost, Arc::new(permissions)))
    }

    pub fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), AccessError> {
        self.change(|state| {
            state.require_user(user)?;
            state.require_vhost(vhost)?;
            state
                .permissions
                .remove(&(user.to_owned(), vhost.to_owned()));
            Ok(())
        })
    }

    /// Creates a vhost; true when it did not exist.
    pub fn add_vhost(&self, name: &str) -> Result<bool, AccessError> {
        check_name("vhost", name)?;
        if self.vhost_exists(name) {
            return Ok(false);
        }
        self.change(|state| state.add_vhost(name))
    }

    /// A vhost's limits; None for a vhost that does not exist.
    pub fn vhost_limits(&self, vhost: &str) -> Option<VhostLimits> {
        self.state.read().vhosts.get(vhost).copied()
    }

    /// Every vhost that has a limit, with its limits.
    pub fn all_vhost_limits(&self) -> Vec<(String, VhostLimits)> {
        self.state
            .read()
            .vhosts
            .iter()
            .filter(|(_, limits)| !limits.is_empty())
            .map(|(name, limits)| (name.clone(), *limits))
            .collect()
    }

    /// Sets (or, with a negative value, lifts) one of a vhost's limits.
    pub fn set_vhost_limit(&self, vhost: &str, name: &str, value: i64) -> Result<(), AccessError> {
        self.change(|state| {
            let limits = state
                .vhosts
                .get_mut(vhost)
                .ok_or_else(|| AccessError::VhostNotFound(vhost.to_owned()))?;
            limits.set(name, value)?;
            Ok(())
        })
    }

    /// Deletes a vhost and every permission in it. The caller deletes its
    /// queues and exchanges and closes its connections.
    pub fn delete_vhost(&self, name: &str) -> Result<(), AccessError> {
        self.change(|state| {
            state
                .vhosts
                .remove(name)
                .ok_or_else(|| AccessError::VhostNotFound(name.to_owned()))?;
            state.permissions.retain(|(_, vhost), _| vhost != name);
            Ok(())
        })
    }
}

/// A connection's view of its own permissions, refreshed only when an
/// operator has changed something since the last check: the publish path
/// pays for one atomic load and, for the exchange it last published to, a
/// comparison (a regular-expression match for any other).
#[derive(Debug)]
pub struct Grant {
    access: Arc<AccessControl>,
    user: String,
    vhost: String,
    permissions: Option<Arc<Permissions>>,
    generation: u64,
    /// The last check that passed: a publisher sending to one exchange
    /// again and again pays a comparison rather than a regular-expression
    /// match. Forgotten when the permissions change.
    last_allowed: Option<(Access, ResourceKind, String)>,
}

impl Grant {
    pub fn new(access: Arc<AccessControl>, user: &str, vhost: &str) -> Self {
        let generation = access.generation();
        let permissions = access.permissions_of(user, vhost);
        Self {
            access,
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            permissions,
            generation,
            last_allowed: None,
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    pub fn check(&mut self, access: Access, resource: Resource<'_>) -> Result<(), Refused> {
        let generation = self.access.generation();
        if generation != self.generation {
            self.permissions = self.access.permissions_of(&self.user, &self.vhost);
            self.generation = generation;
            self.last_allowed = None;
        }
        if let Some((last_access, last_kind, last_name)) = &self.last_allowed
            && *last_access == access
            && *last_kind == resource.kind
            && last_name == resource.name
        {
            return Ok(());
        }
        match &self.permissions {
            Some(permissions) if permissions.allows(access, resource) => {
                self.last_allowed = Some((access, resource.kind, resource.name.to_owned()));
                Ok(())
            }
            _ => Err(refusal(&self.user, &self.vhost, access, resource)),
        }
    }
}

fn refusal(user: &str, vhost: &str, access: Access, resource: Resource<'_>) -> Refused {
    Refused {
        kind: resource.kind.as_str(),
        name: resource.matched_name().to_owned(),
        vhost: vhost.to_owned(),
        user: user.to_owned(),
        access,
    }
}

/// What the broker's own identity holds in every vhost.
fn full_permissions() -> Arc<Permissions> {
    static FULL: std::sync::OnceLock<Arc<Permissions>> = std::sync::OnceLock::new();
    FULL.get_or_init(|| Arc::new(Permissions::full())).clone()
}

/// A user name operators may give: valid, and not the broker's own.
fn check_user_name(name: &str) -> Result<(), AccessError> {
    check_name("user", name)?;
    if name == INTERNAL_USER {
        return Err(AccessError::ReservedUserName(name.to_owned()));
    }
    Ok(())
}

fn check_name(what: &'static str, name: &str) -> Result<(), AccessError> {
    if name.is_empty() || name.len() > NAME_LENGTH_MAX_BYTES {
        return Err(AccessError::BadName {
            what,
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn is_loopback(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl State {
    fn require_user(&self, name: &str) -> Result<(), AccessError> {
        if self.users.contains_key(name) {
            Ok(())
        } else {
            Err(AccessError::UserNotFound(name.to_owned()))
        }
    }

    fn require_vhost(&self, name: &str) -> Result<(), AccessError> {
        if self.vhosts.contains_key(name) {
            Ok(())
        } else {
            Err(AccessError::VhostNotFound(name.to_owned()))
        }
    }

    fn add_vhost(&mut self, name: &str) -> Result<bool, AccessError> {
        check_name("vhost", name)?;
        if self.vhosts.contains_key(name) {
            return Ok(false);
        }
        if self.vhosts.len() >= VHOSTS_MAX {
            return Err(AccessError::TooMany {
                what: "vhost",
                limit: VHOSTS_MAX,
            });
        }
        self.vhosts.insert(name.to_owned(), VhostLimits::default());
        Ok(true)
    }

    fn set_permissions(
        &mut self,
        user: &str,
        vhost: &str,
        permissions: Arc<Permissions>,
    ) -> Result<(), AccessError> {
        self.require_user(user)?;
        self.require_vhost(vhost)?;
        self.permissions
            .insert((user.to_owned(), vhost.to_owned()), permissions);
        Ok(())
    }

    fn install(&mut self, definitions: Definitions) -> Result<(), AccessError> {
        for vhost in &definitions.vhosts {
            self.add_vhost(vhost)?;
        }
        for declared in definitions.users {
            check_user_name(&declared.name)?;
            let existing = self
                .users
                .get(&declared.name)
                .and_then(|user| user.password_hash.clone());
            let password_hash = match declared.password {
                DeclaredPassword::Plain(password) => match existing {
                    Some(hash) if hash.verify(&password) => Some(hash),
                    _ => Some(PasswordHash::generate(&password)?),
                },
                DeclaredPassword::Hash(hash) => Some(hash),
                DeclaredPassword::None => None,
            };
            if !self.users.contains_key(&declared.name) && self.users.len() >= USERS_MAX {
                return Err(AccessError::TooMany {
                    what: "user",
                    limit: USERS_MAX,
                });
            }
            self.users.insert(
                declared.name.clone(),
                User {
                    name: declared.name,
                    password_hash,
                    tags: declared.tags,
                },
            );
        }
        for entry in definitions.permissions {
            self.set_permissions(&entry.user, &entry.vhost, entry.permissions)?;
        }
        Ok(())
    }

    fn restore(&mut self, contents: AccessFile, path: &Path) -> Result<(), AccessError> {
        let invalid = |reason: String| {
            AccessError::Storage(FileError::Invalid {
                path: path.to_owned(),
                reason,
            })
        };
        for vhost in contents.vhosts {
            self.add_vhost(&vhost.name)?;
            self.vhosts.insert(
                vhost.name,
                VhostLimits {
                    max_connections: vhost.max_connections,
                    max_queues: vhost.max_queues,
                },
            );
        }
        for user in contents.users {
            check_user_name(&user.name)?;
            let algorithm = match user.hashing_algorithm.as_deref() {
                None => HashingAlgorithm::Argon2id,
                Some(name) => HashingAlgorithm::from_name(name).ok_or_else(|| {
                    invalid(format!(
                        "user '{}': unknown hashing algorithm '{name}'",
                        user.name
                    ))
                })?,
            };
            let password_hash = user
                .password_hash
                .map(|hash| PasswordHash::with_algorithm(&hash, algorithm))
                .transpose()
                .map_err(|error| invalid(format!("user '{}': {error}", user.name)))?;
            let tags = Tags::new(&user.tags)?;
            self.users.insert(
                user.name.clone(),
                User {
                    name: user.name,
                    password_hash,
                    tags,
                },
            );
        }
        for entry in contents.permissions {
            let permissions = Permissions::new(&entry.configure, &entry.write, &entry.read)?;
            self.set_permissions(&entry.user, &entry.vhost, Arc::new(permissions))?;
        }
        Ok(())
    }

    fn to_file(&self) -> AccessFile {
        AccessFile {
            users: self
                .users
                .values()
                .map(|user| file::UserEntry {
                    name: user.name.clone(),
                    password_hash: user
                        .password_hash
                        .as_ref()
                        .map(|hash| hash.as_str().to_owned()),
                    hashing_algorithm: user
                        .password_hash
                        .as_ref()
                        .map(PasswordHash::algorithm)
                        .filter(|algorithm| *algorithm != HashingAlgorithm::Argon2id)
                        .map(|algorithm| algorithm.name().to_owned()),
                    tags: user.tags.iter().map(str::to_owned).collect(),
                })
                .collect(),
            vhosts: self
                .vhosts
                .iter()
                .map(|(name, limits)| file::VhostEntry {
                    name: name.clone(),
                    max_connections: limits.max_connections,
                    max_queues: limits.max_queues,
                })
                .collect(),
            permissions: self
                .permissions
                .iter()
                .map(|((user, vhost), permissions)| file::PermissionEntry {
                    user: user.clone(),
                    vhost: vhost.clone(),
                    configure: permissions.configure.as_str().to_owned(),
                    write: permissions.write.as_str().to_owned(),
                    read: permissions.read.as_str().to_owned(),
                })
                .collect(),
        }
    }
}
