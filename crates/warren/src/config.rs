//! The configuration file: TOML, every key optional, defaults from the
//! servers' own configs.

use std::path::Path;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use warren_access::{
    AccessControl, DeclaredPassword, DeclaredUser, Definitions, PasswordHash, PermissionEntry,
    Permissions, Tags,
};
use warren_amqp::alarms::MemoryWatermark;
use warren_amqp::{AmqpConfig, default_definitions, default_loopback_users};
use warren_http::HttpConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// A definitions file (RabbitMQ's JSON, as `GET /api/definitions`
    /// exports it) applied at every start, as RabbitMQ's
    /// `load_definitions`.
    pub load_definitions: Option<PathBuf>,
    #[serde(default)]
    pub amqp: AmqpSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub auth: AuthSection,
    /// `[tls]`: AMQPS and HTTPS.
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub users: Vec<UserEntry>,
    #[serde(default)]
    pub vhosts: Vec<VhostEntry>,
    #[serde(default)]
    pub permissions: Vec<PermissionsEntry>,
    /// `[[model]]`: models served from queues (see docs/inference.md).
    #[serde(default, rename = "model")]
    pub models: Vec<warren_infer::deploy::ModelConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSection {
    pub channel_max: Option<u16>,
    pub frame_max_bytes: Option<u32>,
    pub heartbeat_s: Option<u16>,
    pub message_size_max_bytes: Option<u64>,
    pub connections_max: Option<usize>,
    pub connections_per_user_max: Option<usize>,
    pub table_depth_max: Option<u32>,
    pub headers_size_max_bytes: Option<u32>,
    pub queues_per_vhost_max: Option<usize>,
    pub handshake_timeout_s: Option<u64>,
    pub consumers_per_channel_max: Option<usize>,
    pub unacked_per_channel_max: Option<usize>,
    pub tx_operations_max: Option<usize>,
    pub pending_confirms_per_channel_max: Option<usize>,
    pub flow_ready_max: Option<usize>,
    /// The product `connection.start` names: "Warren" (the default) or
    /// "RabbitMQ", for clients that gate behaviour on the name.
    pub product: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub disk_free_limit_bytes: Option<u64>,
    pub disk_check_interval_ms: Option<u64>,
    pub segment_size_bytes: Option<u64>,
    /// A fraction of the machine's (or cgroup's) memory.
    pub memory_high_watermark: Option<f64>,
    /// The same in bytes; one or the other.
    pub memory_high_watermark_bytes: Option<u64>,
    pub memory_check_interval_ms: Option<u64>,
}

/// `[http]`: the limits of the HTTP side (docs/http-api.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub body_max_bytes: Option<usize>,
    pub inference_timeout_ms: Option<u64>,
    pub inference_in_flight_max: Option<usize>,
    pub websocket_prefetch_max: Option<u16>,
    pub get_count_max: Option<usize>,
    /// Seconds a finished job's result is kept.
    pub job_retention_s: Option<u64>,
    pub jobs_max: Option<usize>,
}

/// `[tls]`: certificates for AMQPS (on `--amqps-listen`, 5671 by default)
/// and, with `https = true`, for the HTTP listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CAs whose client certificates are accepted; enables EXTERNAL.
    pub ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate.
    #[serde(default)]
    pub verify_peer: bool,
    /// Serve the management API, dashboard and HTTP messaging over TLS.
    #[serde(default)]
    pub https: bool,
}

impl TlsSection {
    pub fn files(&self) -> warren_amqp::tls::TlsFiles {
        warren_amqp::tls::TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            ca_file: self.ca_file.clone(),
            verify_peer: self.verify_peer,
        }
    }
}

/// `[auth]`: who may log in from where.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Users who may log in only from a loopback address; default
    /// `["guest"]`, as RabbitMQ's `loopback_users`. `[]` lets guest in from
    /// anywhere.
    pub loopback_users: Option<Vec<String>>,
}

/// `[[users]]`: installed (or updated) at every start.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    /// Hashed with Argon2id at start; never stored as given.
    pub password: Option<String>,
    /// An Argon2id PHC string (`warren ctl hash-password` makes one), so
    /// that the configuration file need not hold the password.
    pub password_hash: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `[[permissions]]`: a user's rights in a vhost, as RabbitMQ's
/// `set_permissions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionsEntry {
    pub user: String,
    #[serde(default = "default_vhost")]
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

fn default_vhost() -> String {
    "/".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostEntry {
    pub name: String,
}

/// The largest message body a client may be allowed to send: RabbitMQ's
/// own ceiling (512 MiB).
const MESSAGE_SIZE_CEILING_BYTES: u64 = 512 * 1024 * 1024;

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    pub fn http_config(&self) -> anyhow::Result<HttpConfig> {
        let mut config = HttpConfig::default();
        let section = &self.http;
        if let Some(bytes) = section.body_max_bytes {
            anyhow::ensure!(bytes > 0, "http.body_max_bytes must be at least 1");
            config.body_max_bytes = bytes;
        }
        if let Some(ms) = section.inference_timeout_ms {
            anyhow::ensure!(ms > 0, "http.inference_timeout_ms must be at least 1");
            config.inference_timeout = std::time::Duration::from_millis(ms);
        }
        if let Some(count) = section.inference_in_flight_max {
            anyhow::ensure!(count > 0, "http.inference_in_flight_max must be at least 1");
            config.inference_in_flight_max = count;
        }
        if let Some(count) = section.websocket_prefetch_max {
            anyhow::ensure!(count > 0, "http.websocket_prefetch_max must be at least 1");
            config.websocket_prefetch_max = count;
        }
        if let Some(count) = section.get_count_max {
            anyhow::ensure!(count > 0, "http.get_count_max must be at least 1");
            config.get_count_max = count;
        }
        if let Some(seconds) = section.job_retention_s {
            anyhow::ensure!(seconds > 0, "http.job_retention_s must be at least 1");
            config.job_retention = std::time::Duration::from_secs(seconds);
        }
        if let Some(count) = section.jobs_max {
            anyhow::ensure!(count > 0, "http.jobs_max must be at least 1");
            config.jobs_max = count;
        }
        // Where the in-process workers publish jobs' results.
        config.job_queue = warren_infer::worker::JOB_QUEUE_DEFAULT.to_owned();
        if let Some(tls) = self.tls.as_ref().filter(|tls| tls.https) {
            config.tls = Some(
                warren_amqp::tls::server_config(&tls.files(), warren_amqp::tls::HTTPS_ALPN)
                    .context("[tls] for HTTPS")?,
            );
        }
        Ok(config)
    }

    pub fn amqp_config(&self) -> anyhow::Result<AmqpConfig> {
        let mut config = AmqpConfig::default();
        let section = &self.amqp;
        if let Some(channel_max) = section.channel_max {
            anyhow::ensure!(channel_max > 0, "amqp.channel_max must be at least 1");
            config.channel_max = channel_max;
        }
        if let Some(frame_max) = section.frame_max_bytes {
            anyhow::ensure!(
                frame_max >= warren_amqp::FRAME_MIN_SIZE_BYTES,
                "amqp.frame_max_bytes must be at least 4096 (the AMQP 0-9-1 minimum)"
            );
            config.frame_max_bytes = frame_max;
        }
        if let Some(heartbeat) = section.heartbeat_s {
            config.heartbeat_s = heartbeat;
        }
        if let Some(size) = section.message_size_max_bytes {
            anyhow::ensure!(
                size > 0 && size <= MESSAGE_SIZE_CEILING_BYTES,
                "amqp.message_size_max_bytes must be between 1 and {MESSAGE_SIZE_CEILING_BYTES}"
            );
            config.message_size_max_bytes = size;
        }
        if let Some(connections) = section.connections_max {
            config.connections_max = connections;
        }
        if let Some(connections) = section.connections_per_user_max {
            anyhow::ensure!(
                connections > 0,
                "amqp.connections_per_user_max must be at least 1"
            );
            config.connections_per_user_max = connections;
        }
        if let Some(depth) = section.table_depth_max {
            let ceiling = warren_amqp::TABLE_DEPTH_CEILING;
            anyhow::ensure!(
                (1..=ceiling).contains(&depth),
                "amqp.table_depth_max must be between 1 and {ceiling}"
            );
            config.table_depth_max = depth;
        }
        if let Some(size) = section.headers_size_max_bytes {
            anyhow::ensure!(size > 0, "amqp.headers_size_max_bytes must be at least 1");
            config.headers_size_max_bytes = size;
        }
        if let Some(queues) = section.queues_per_vhost_max {
            anyhow::ensure!(queues > 0, "amqp.queues_per_vhost_max must be at least 1");
            config.limits.queues_per_vhost_max = queues;
        }
        if let Some(seconds) = section.handshake_timeout_s {
            config.handshake_timeout = std::time::Duration::from_secs(seconds);
        }
        if let Some(consumers) = section.consumers_per_channel_max {
            config.limits.consumers_per_channel_max = consumers;
        }
        if let Some(unacked) = section.unacked_per_channel_max {
            config.limits.unacked_per_channel_max = unacked;
        }
        if let Some(product) = &section.product {
            config.product = match product.as_str() {
                "Warren" => warren_amqp::Product::Warren,
                "RabbitMQ" => warren_amqp::Product::RabbitMq,
                other => {
                    anyhow::bail!("amqp.product must be \"Warren\" or \"RabbitMQ\", not {other:?}")
                }
            };
        }
        if let Some(ready) = section.flow_ready_max {
            config.limits.flow_ready_max = ready;
        }
        if let Some(operations) = section.tx_operations_max {
            config.tx_operations_max = operations;
        }
        if let Some(pending) = section.pending_confirms_per_channel_max {
            config.pending_confirms_per_channel_max = pending;
        }
        let storage = &self.storage;
        if let Some(limit) = storage.disk_free_limit_bytes {
            config.storage.disk_free_limit_bytes = limit;
        }
        if let Some(interval) = storage.disk_check_interval_ms {
            anyhow::ensure!(
                interval >= 50,
                "storage.disk_check_interval_ms must be at least 50"
            );
            config.storage.disk_check_interval = std::time::Duration::from_millis(interval);
        }
        if let Some(size) = storage.segment_size_bytes {
            anyhow::ensure!(
                (64 * 1024..=1024 * 1024 * 1024).contains(&size),
                "storage.segment_size_bytes must be between 64 KiB and 1 GiB"
            );
            config.storage.segment_size_bytes = size;
        }
        let watermark = match (
            storage.memory_high_watermark,
            storage.memory_high_watermark_bytes,
        ) {
            (Some(_), Some(_)) => anyhow::bail!(
                "storage.memory_high_watermark and storage.memory_high_watermark_bytes \
                 are two ways of saying one thing: give one"
            ),
            (Some(fraction), None) => Some(MemoryWatermark::Relative(fraction)),
            (None, Some(bytes)) => Some(MemoryWatermark::Absolute(bytes)),
            (None, None) => None,
        };
        if let Some(watermark) = watermark {
            config.storage.memory_high_watermark = watermark
                .validated()
                .map_err(|error| anyhow::anyhow!("storage: {error}"))?;
        }
        if let Some(interval) = storage.memory_check_interval_ms {
            anyhow::ensure!(
                interval >= 50,
                "storage.memory_check_interval_ms must be at least 50"
            );
            config.storage.memory_check_interval = std::time::Duration::from_millis(interval);
        }
        Ok(config)
    }

    /// The users, vhosts and permissions of the configuration file.
    fn declared_definitions(&self) -> anyhow::Result<Definitions> {
        let mut definitions = Definitions::default();
        for entry in &self.users {
            let password = match (&entry.password, &entry.password_hash) {
                (Some(_), Some(_)) => anyhow::bail!(
                    "user '{}': give password or password_hash, not both",
                    entry.name
                ),
                (Some(password), None) => DeclaredPassword::Plain(password.clone()),
                (None, Some(hash)) => DeclaredPassword::Hash(
                    PasswordHash::parse(hash)
                        .with_context(|| format!("user '{}': password_hash", entry.name))?,
                ),
                (None, None) => DeclaredPassword::None,
            };
            definitions.users.push(DeclaredUser {
                name: entry.name.clone(),
                password,
                tags: Tags::new(&entry.tags)
                    .with_context(|| format!("user '{}': tags", entry.name))?,
            });
        }
        definitions.vhosts = self.vhosts.iter().map(|vhost| vhost.name.clone()).collect();
        for entry in &self.permissions {
            let permissions = Permissions::new(&entry.configure, &entry.write, &entry.read)
                .with_context(|| format!("permissions of '{}' in '{}'", entry.user, entry.vhost))?;
            definitions.permissions.push(PermissionEntry {
                user: entry.user.clone(),
                vhost: entry.vhost.clone(),
                permissions: Arc::new(permissions),
            });
        }
        Ok(definitions)
    }

    /// Opens the access file in the data directory (RabbitMQ's defaults
    /// on the first start) and applies the configuration file's users,
    /// vhosts and permissions over it.
    pub fn access_control(&self, data_dir: Option<PathBuf>) -> anyhow::Result<AccessControl> {
        let loopback_users = self
            .auth
            .loopback_users
            .clone()
            .unwrap_or_else(default_loopback_users);
        AccessControl::open(
            data_dir,
            default_definitions(),
            self.declared_definitions()?,
            loopback_users,
        )
        .context("loading users, vhosts and permissions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config: FileConfig = toml::from_str("").unwrap();
        let amqp = config.amqp_config().unwrap();
        assert_eq!(amqp.channel_max, 2047);
        assert_eq!(amqp.frame_max_bytes, 131_072);
        let access = config.access_control(None).unwrap();
        assert_eq!(access.users().len(), 1, "only guest");
    }

    #[test]
    fn users_and_limits_are_read() {
        let config: FileConfig = toml::from_str(
            r#"
            [amqp]
            channel_max = 16
            [auth]
            loopback_users = []
            [[users]]
            name = "alice"
            password = "secret"
            tags = ["management"]
            [[vhosts]]
            name = "ml"
            [[permissions]]
            user = "alice"
            vhost = "ml"
            configure = "^alice\\."
            write = ".*"
            read = ".*"
            "#,
        )
        .unwrap();
        let amqp = config.amqp_config().unwrap();
        assert_eq!(amqp.channel_max, 16);
        let access = config.access_control(None).unwrap();
        let remote = std::net::IpAddr::from([192, 0, 2, 7]);
        let alice = access
            .login_with_password("alice", "secret", remote)
            .unwrap();
        assert!(alice.tags.can_manage());
        assert!(access.login_with_password("guest", "guest", remote).is_ok());
        assert!(access.open_vhost("alice", "ml").is_ok());
        assert!(access.open_vhost("alice", "/").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("[amqp]\nchanel_max = 3").is_err());
        let config: FileConfig = toml::from_str("[amqp]\nframe_max_bytes = 100").unwrap();
        assert!(config.amqp_config().is_err());
        let bad_pattern =
            "[[permissions]]\nuser = \"guest\"\nconfigure = \"(\"\nwrite = \"\"\nread = \"\"";
        let config: FileConfig = toml::from_str(bad_pattern).unwrap();
        assert!(config.access_control(None).is_err());
        let config: FileConfig =
            toml::from_str("[[users]]\nname = \"x\"\npassword_hash = \"md5\"").unwrap();
        assert!(config.access_control(None).is_err());
    }
}
