//! Passwords: stored as Argon2id hashes (PHC strings, salt included),
//! checked by the `argon2` crate, whose comparison runs in constant time.
//! A hash imported from RabbitMQ's definitions (a 4-byte salt and the
//! SHA-256, SHA-512 or MD5 of the salt and the password, in base64) is kept
//! as it came, so that its user logs in with the same password, and
//! checked in constant time too; every password set through Warren gets
//! Argon2id.
//!
//! Argon2id is deliberately slow (tens of milliseconds and 19 MiB per check
//! with the crate's defaults, OWASP's recommendation), which a broker cannot
//! afford on every HTTP request of a polling dashboard. So a successful
//! check is remembered: [`VerifiedLogins`] keeps, per user, a keyed digest
//! (HMAC-SHA256 under a key drawn at start) of the password that matched
//! and the hash it matched. The password itself is never kept, the digest is
//! useless outside this process, and changing the user's password changes
//! the hash, which invalidates the entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use argon2::password_hash::{PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Argon2, PasswordHash as PhcHash};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use md5::Md5;
use parking_lot::Mutex;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// Longest password accepted: Argon2 takes any length, but the broker
/// should not hash megabytes for a peer that has not logged in.
pub const PASSWORD_LENGTH_MAX_BYTES: usize = 1024;

/// Users whose successful logins are remembered; past this the memory is
/// cleared (the next login of each user pays for one Argon2 check again).
pub const VERIFIED_LOGINS_MAX: usize = 4096;

/// How a password hash was made: Warren's Argon2id, or one of RabbitMQ's
/// salted digests (`rabbit_password_hashing_*`), by their names in
/// definitions files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashingAlgorithm {
    Argon2id,
    RabbitSha256,
    RabbitSha512,
    RabbitMd5,
}

impl HashingAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            HashingAlgorithm::Argon2id => "argon2id",
            HashingAlgorithm::RabbitSha256 => "rabbit_password_hashing_sha256",
            HashingAlgorithm::RabbitSha512 => "rabbit_password_hashing_sha512",
            HashingAlgorithm::RabbitMd5 => "rabbit_password_hashing_md5",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            HashingAlgorithm::Argon2id,
            HashingAlgorithm::RabbitSha256,
            HashingAlgorithm::RabbitSha512,
            HashingAlgorithm::RabbitMd5,
        ]
        .into_iter()
        .find(|algorithm| algorithm.name() == name)
    }

    /// The digest length of a RabbitMQ hash; None for Argon2id.
    fn digest_bytes(self) -> Option<usize> {
        match self {
            HashingAlgorithm::Argon2id => None,
            HashingAlgorithm::RabbitSha256 => Some(32),
            HashingAlgorithm::RabbitSha512 => Some(64),
            HashingAlgorithm::RabbitMd5 => Some(16),
        }
    }
}

/// RabbitMQ's salt, before the digest in its hashes.
const RABBIT_SALT_BYTES: usize = 4;

/// A password hash: an Argon2id PHC string (`$argon2id$v=19$m=...$salt$hash`)
/// or a RabbitMQ salted digest, with the text it is stored and exported as.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    algorithm: HashingAlgorithm,
    text: String,
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    #[error("not an Argon2id hash in PHC form ($argon2id$v=19$...): {0}")]
    NotArgon2id(String),
    #[error(
        "not a {algorithm} hash: expected base64 of a {salt}-byte salt and a {digest}-byte digest"
    )]
    NotRabbitHash {
        algorithm: &'static str,
        salt: usize,
        digest: usize,
    },
    #[error("password longer than {PASSWORD_LENGTH_MAX_BYTES} bytes")]
    TooLong,
    #[error("hashing failed: {0}")]
    Hashing(String),
}

impl PasswordHash {
    /// Hashes a password with a fresh random salt.
    pub fn generate(password: &str) -> Result<Self, PasswordError> {
        if password.len() > PASSWORD_LENGTH_MAX_BYTES {
            return Err(PasswordError::TooLong);
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| PasswordError::Hashing(e.to_string()));
        return_freed_memory();
        Ok(Self {
            algorithm: HashingAlgorithm::Argon2id,
            text: hash?,
        })
    }

    /// Accepts a hash made elsewhere (by `warren ctl hash-password`, or
    /// copied from another broker's definitions), refusing anything but
    /// Argon2id.
    pub fn parse(phc: &str) -> Result<Self, PasswordError> {
        let parsed = PhcHash::new(phc).map_err(|e| PasswordError::NotArgon2id(e.to_string()))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(PasswordError::NotArgon2id(format!(
                "algorithm is '{}'",
                parsed.algorithm
            )));
        }
        Ok(Self {
            algorithm: HashingAlgorithm::Argon2id,
            text: phc.to_owned(),
        })
    }

    /// A hash as a definitions file gives it, with its algorithm.
    pub fn with_algorithm(text: &str, algorithm: HashingAlgorithm) -> Result<Self, PasswordError> {
        let Some(digest) = algorithm.digest_bytes() else {
            // Definitions carry hashes in base64, as RabbitMQ requires of
            // every hash it imports; a PHC string may come either way.
            if text.starts_with('$') {
                return Self::parse(text);
            }
            let decoded = BASE64
                .decode(text)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| PasswordError::NotArgon2id("neither PHC nor base64".to_owned()))?;
            return Self::parse(&decoded);
        };
        let refused = || PasswordError::NotRabbitHash {
            algorithm: algorithm.name(),
            salt: RABBIT_SALT_BYTES,
            digest,
        };
        let decoded = BASE64.decode(text).map_err(|_| refused())?;
        if decoded.len() != RABBIT_SALT_BYTES + digest {
            return Err(refused());
        }
        Ok(Self {
            algorithm,
            text: text.to_owned(),
        })
    }

    /// The text it is stored and exported as: the PHC string, or
    /// RabbitMQ's base64.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The hash as definitions carry it, in base64 whatever its form, so
    /// that RabbitMQ's import (which decodes every hash) takes a file with
    /// Argon2id users too; `with_algorithm` reads it back.
    pub fn to_base64(&self) -> String {
        match self.algorithm {
            HashingAlgorithm::Argon2id => BASE64.encode(&self.text),
            _ => self.text.clone(),
        }
    }

    pub fn algorithm(&self) -> HashingAlgorithm {
        self.algorithm
    }

    /// The slow check. Always runs the full Argon2 computation, so a wrong
    /// password costs as much as a right one.
    pub fn verify(&self, password: &str) -> bool {
        if password.len() > PASSWORD_LENGTH_MAX_BYTES {
            return false;
        }
        if self.algorithm != HashingAlgorithm::Argon2id {
            let matched = self.verify_salted(password);
            if !matched {
                // A refusal takes as long as one for an unknown user (the
                // decoy's Argon2 check), so timing does not tell which
                // users came from RabbitMQ.
                decoy_hash().verify(password);
            }
            return matched;
        }
        let Ok(parsed) = PhcHash::new(&self.text) else {
            return false;
        };
        let matched = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        return_freed_memory();
        matched
    }

    /// RabbitMQ's check: the digest of the salt followed by the password,
    /// compared in constant time.
    fn verify_salted(&self, password: &str) -> bool {
        let Ok(decoded) = BASE64.decode(&self.text) else {
            return false;
        };
        let (salt, expected) = decoded.split_at(RABBIT_SALT_BYTES.min(decoded.len()));
        let computed: Vec<u8> = match self.algorithm {
            HashingAlgorithm::RabbitSha256 => Sha256::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            HashingAlgorithm::RabbitSha512 => Sha512::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            HashingAlgorithm::RabbitMd5 => Md5::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec(),
            HashingAlgorithm::Argon2id => return false,
        };
        bool::from(computed.as_slice().ct_eq(expected))
    }
}

/// Gives the memory an Argon2 computation freed back to the operating
/// system.
/// glibc keeps a freed block of this size in the checking thread's arena,
/// so without this every thread that ever ran a check would hold its
/// 19 MiB for good (four checks at once: 77 MiB of a broker's resident
/// memory, for a burst of logins that is long over).
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // is thread-safe and touches no memory that is in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A hash no password matches, checked against when a login names an
/// unknown user so that the answer takes as long as for a known one.
pub(crate) fn decoy_hash() -> &'static PasswordHash {
    static DECOY: std::sync::OnceLock<PasswordHash> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut random = [0u8; 32];
        OsRng.fill_bytes(&mut random);
        let secret: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
        PasswordHash::generate(&secret).expect("a 64-byte password hashes")
    })
}

/// Successful logins remembered by keyed digest (see the module comment).
pub struct VerifiedLogins {
    key: [u8; 32],
    entries: Mutex<HashMap<String, Remembered>>,
    /// One lock per user whose password is being checked right now: a
    /// burst of logins as one user (a fleet of clients reconnecting) runs
    /// one Argon2 check, and the others find its result remembered.
    checking: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Argon2 checks run, for tests and for whoever wonders what logins
    /// cost.
    slow_checks: AtomicU64,
}

struct Remembered {
    hash: PasswordHash,
    digest: [u8; 32],
}

impl Default for VerifiedLogins {
    fn default() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self {
            key,
            entries: Mutex::new(HashMap::new()),
            checking: Mutex::new(HashMap::new()),
            slow_checks: AtomicU64::new(0),
        }
    }
}

impl VerifiedLogins {
    fn digest(&self, user: &str, password: &str) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(&(user.len() as u64).to_be_bytes());
        mac.update(user.as_bytes());
        mac.update(password.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Checks `password` against `hash`, answering from memory when this
    /// user last logged in with the same password against the same hash.
    pub fn verify(&self, user: &str, password: &str, hash: &PasswordHash) -> bool {
        let digest = self.digest(user, password);
        if self.remembers(user, &digest, hash) {
            return true;
        }
        let user_lock = Arc::clone(self.checking.lock().entry(user.to_owned()).or_default());
        let matched = {
            let _checking = user_lock.lock();
            // Whoever held the lock may have just checked this password;
            // a match is remembered before the lock is let go.
            self.remembers(user, &digest, hash) || self.check(user, password, digest, hash)
        };
        let mut checking = self.checking.lock();
        // The map's reference and ours: nobody else waits to check.
        if Arc::strong_count(&user_lock) == 2 {
            checking.remove(user);
        }
        matched
    }

    /// The Argon2 check, remembered when it matches.
    fn check(&self, user: &str, password: &str, digest: [u8; 32], hash: &PasswordHash) -> bool {
        self.slow_checks.fetch_add(1, Ordering::Relaxed);
        if !hash.verify(password) {
            return false;
        }
        let mut entries = self.entries.lock();
        if entries.len() >= VERIFIED_LOGINS_MAX && !entries.contains_key(user) {
            entries.clear();
        }
        entries.insert(
            user.to_owned(),
            Remembered {
                hash: hash.clone(),
                digest,
            },
        );
        true
    }

    /// Argon2 checks run so far.
    pub fn slow_checks(&self) -> u64 {
        self.slow_checks.load(Ordering::Relaxed)
    }

    fn remembers(&self, user: &str, digest: &[u8; 32], hash: &PasswordHash) -> bool {
        self.entries
            .lock()
            .get(user)
            .is_some_and(|entry| entry.hash == *hash && bool::from(entry.digest.ct_eq(digest)))
    }

    pub fn forget(&self, user: &str) {
        self.entries.lock().remove(user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's documented example: the password "test12" with the salt
    /// 90 8D C6 0A, hashed with SHA-256 (`rabbitmqctl hash_password`'s
    /// form), and the same salt and password under SHA-512 and MD5.
    const RABBIT_SHA256: &str = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR";
    const RABBIT_SHA512: &str = "kI3GChuNuIYf8lRbCCxZjgjKwsY19ns6+uFO0zcXRBGA/XGJPYD8OWMy7EB8TaOmAzjP2azv84GbINYwX2cDWb4DHnc=";
    const RABBIT_MD5: &str = "kI3GChNpte2FApYFXScl+0dIluk=";

    #[test]
    fn rabbitmq_hashes_check_the_password_they_were_made_from() {
        for (text, algorithm) in [
            (RABBIT_SHA256, HashingAlgorithm::RabbitSha256),
            (RABBIT_SHA512, HashingAlgorithm::RabbitSha512),
            (RABBIT_MD5, HashingAlgorithm::RabbitMd5),
        ] {
            let hash = PasswordHash::with_algorithm(text, algorithm).unwrap();
            assert!(hash.verify("test12"), "{algorithm:?}");
            assert!(!hash.verify("test13"), "{algorithm:?}");
            assert!(!hash.verify(""), "{algorithm:?}");
            assert_eq!(hash.as_str(), text);
            assert_eq!(hash.algorithm(), algorithm);
            assert_eq!(
                HashingAlgorithm::from_name(algorithm.name()),
                Some(algorithm)
            );
        }
    }

    #[test]
    fn rabbitmq_hashes_of_the_wrong_shape_are_refused() {
        let sha256 = HashingAlgorithm::RabbitSha256;
        for bad in ["not base64!", "", "kI3GCg==", RABBIT_MD5, RABBIT_SHA512] {
            let error = PasswordHash::with_algorithm(bad, sha256).unwrap_err();
            assert!(
                error.to_string().contains("rabbit_password_hashing_sha256"),
                "{bad}"
            );
        }
        assert!(PasswordHash::with_algorithm(RABBIT_SHA256, HashingAlgorithm::Argon2id).is_err());
    }

    #[test]
    fn argon2id_hashes_travel_in_base64_in_definitions() {
        let hash = PasswordHash::generate("portable").unwrap();
        let carried = hash.to_base64();
        assert!(!carried.contains('$'), "{carried}");
        let back = PasswordHash::with_algorithm(&carried, HashingAlgorithm::Argon2id).unwrap();
        assert_eq!(back, hash);
        assert!(back.verify("portable"));
        let raw = PasswordHash::with_algorithm(hash.as_str(), HashingAlgorithm::Argon2id).unwrap();
        assert_eq!(raw, hash);
        assert_eq!(HashingAlgorithm::from_name("bcrypt"), None);
    }

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = PasswordHash::generate("s3cret").unwrap();
        assert!(hash.as_str().starts_with("$argon2id$"));
        assert!(hash.verify("s3cret"));
        assert!(!hash.verify("s3creT"));
        assert!(!hash.verify(""));
    }

    #[test]
    fn the_same_password_gets_a_different_salt() {
        let first = PasswordHash::generate("same").unwrap();
        let second = PasswordHash::generate("same").unwrap();
        assert_ne!(first, second);
        assert!(second.verify("same"));
    }

    #[test]
    fn only_argon2id_hashes_are_accepted() {
        let hash = PasswordHash::generate("x").unwrap();
        assert_eq!(PasswordHash::parse(hash.as_str()).unwrap(), hash);
        let argon2i = hash.as_str().replacen("$argon2id$", "$argon2i$", 1);
        assert!(PasswordHash::parse(&argon2i).is_err());
        assert!(PasswordHash::parse("plaintext").is_err());
        assert!(PasswordHash::parse("").is_err());
    }

    #[test]
    fn remembered_logins_follow_the_hash() {
        let logins = VerifiedLogins::default();
        let old = PasswordHash::generate("old").unwrap();
        assert!(logins.verify("alice", "old", &old));
        assert!(logins.verify("alice", "old", &old));
        assert!(!logins.verify("alice", "wrong", &old));
        // Another user with the same password is not alice.
        assert!(!logins.verify("bob", "old", &PasswordHash::generate("new").unwrap()));
        // After a password change the remembered login no longer counts.
        let new = PasswordHash::generate("new").unwrap();
        assert!(!logins.verify("alice", "old", &new));
        assert!(logins.verify("alice", "new", &new));
    }

    #[test]
    fn the_decoy_matches_nothing_likely() {
        assert!(!decoy_hash().verify("guest"));
        assert!(!decoy_hash().verify(""));
    }

    #[test]
    fn a_burst_of_logins_as_one_user_runs_one_argon2_check() {
        let logins = Arc::new(VerifiedLogins::default());
        let hash = PasswordHash::generate("fleet").unwrap();
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (logins, hash, start) = (Arc::clone(&logins), hash.clone(), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    logins.verify("worker", "fleet", &hash)
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().unwrap());
        }
        assert_eq!(logins.slow_checks(), 1);

        // A wrong password is never remembered: each try pays in full.
        assert!(!logins.verify("worker", "guess", &hash));
        assert!(!logins.verify("worker", "guess", &hash));
        assert_eq!(logins.slow_checks(), 3);
        assert!(logins.checking.lock().is_empty(), "no lock left behind");
    }
}
