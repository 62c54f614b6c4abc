//! The configuration file: TOML, every key optional, defaults from the
//! servers' own configs.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use warren_amqp::{AmqpConfig, User};
use warren_http::HttpConfig;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub amqp: AmqpSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub users: Vec<UserEntry>,
    #[serde(default)]
    pub vhosts: Vec<VhostEntry>,
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
    pub handshake_timeout_s: Option<u64>,
    pub consumers_per_channel_max: Option<usize>,
    pub unacked_per_channel_max: Option<usize>,
    pub tx_operations_max: Option<usize>,
    pub pending_confirms_per_channel_max: Option<usize>,
    pub flow_ready_max: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub disk_free_limit_bytes: Option<u64>,
    pub disk_check_interval_ms: Option<u64>,
    pub segment_size_bytes: Option<u64>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub loopback_only: bool,
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
        if let Some(seconds) = section.handshake_timeout_s {
            config.handshake_timeout = std::time::Duration::from_secs(seconds);
        }
        if let Some(consumers) = section.consumers_per_channel_max {
            config.limits.consumers_per_channel_max = consumers;
        }
        if let Some(unacked) = section.unacked_per_channel_max {
            config.limits.unacked_per_channel_max = unacked;
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
        for entry in &self.users {
            anyhow::ensure!(
                !entry.name.is_empty(),
                "a [[users]] entry has an empty name"
            );
            config.users.retain(|user| user.name != entry.name);
            config.users.push(User {
                name: entry.name.clone(),
                password: entry.password.clone(),
                loopback_only: entry.loopback_only,
            });
        }
        for vhost in &self.vhosts {
            if !config.vhosts.contains(&vhost.name) {
                config.vhosts.push(vhost.name.clone());
            }
        }
        Ok(config)
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
        assert_eq!(amqp.users.len(), 1);
    }

    #[test]
    fn users_and_limits_are_read() {
        let config: FileConfig = toml::from_str(
            r#"
            [amqp]
            channel_max = 16
            [[users]]
            name = "alice"
            password = "secret"
            [[vhosts]]
            name = "ml"
            "#,
        )
        .unwrap();
        let amqp = config.amqp_config().unwrap();
        assert_eq!(amqp.channel_max, 16);
        assert!(
            amqp.users
                .iter()
                .any(|user| user.name == "alice" && !user.loopback_only)
        );
        assert!(amqp.vhosts.contains(&"ml".to_owned()));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("[amqp]\nchanel_max = 3").is_err());
        let config: FileConfig = toml::from_str("[amqp]\nframe_max_bytes = 100").unwrap();
        assert!(config.amqp_config().is_err());
    }
}
