//! What every HTTP handler shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use warren_amqp::{Admin, DirectConnector, SharedHub};

use crate::inference::Inference;
use crate::jobs::Jobs;
use crate::models::ModelDirectory;
use crate::rates::Rates;

/// The HTTP server's settings, each a limit on what a client can make it
/// hold.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted (publishes, inference requests).
    pub body_max_bytes: usize,
    /// How long an inference request waits for the model's reply.
    pub inference_timeout: Duration,
    /// Inference requests one model may have in flight over HTTP; past
    /// this the answer is 429.
    pub inference_in_flight_max: usize,
    /// Messages a WebSocket consumer may hold unacknowledged, at most.
    pub websocket_prefetch_max: u16,
    /// Messages one `POST .../get` may take.
    pub get_count_max: usize,
    /// The queue the job store consumes: where model workers publish the
    /// results of jobs.
    pub job_queue: String,
    /// How long a finished job's result is kept.
    pub job_retention: Duration,
    /// Jobs kept at once; past this an asynchronous submission is 429.
    pub jobs_max: usize,
    /// HTTPS: the rustls configuration, when the API is served over TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_max_bytes: 16 * 1024 * 1024,
            inference_timeout: Duration::from_secs(30),
            inference_in_flight_max: 1_024,
            websocket_prefetch_max: 1_000,
            get_count_max: 1_000,
            job_queue: "warren.jobs".to_owned(),
            job_retention: Duration::from_secs(24 * 3600),
            jobs_max: 100_000,
            tls: None,
        }
    }
}

/// Where the node listens and keeps its data, for `/api/overview` and the
/// metrics.
#[derive(Debug)]
pub struct NodeInfo {
    pub name: String,
    pub amqp_address: SocketAddr,
    pub amqps_address: Option<SocketAddr>,
    pub http_address: SocketAddr,
    pub data_dir: Option<PathBuf>,
    pub disk_free_limit_bytes: u64,
    /// The certificate files of the TLS listeners (AMQPS, and HTTPS when
    /// the API is served over TLS), for the certificate-expiration check.
    pub tls_files: Option<warren_amqp::tls::TlsFiles>,
    /// When the HTTP side started, for `uptime`.
    pub started: std::time::Instant,
    /// The name set through `PUT /api/cluster-name`; the node's name
    /// until then (see `api/nodes.rs`).
    pub cluster_name: parking_lot::Mutex<Option<String>>,
}

/// The file in the data directory that keeps the cluster name.
const CLUSTER_NAME_FILE: &str = "cluster_name";

/// The cluster name kept in `data_dir`, if one was set.
pub fn read_cluster_name(data_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(CLUSTER_NAME_FILE)).ok()?;
    Some(text.trim_end_matches('\n').to_owned()).filter(|name| !name.is_empty())
}

impl NodeInfo {
    /// The protocols the node listens for and where, as RabbitMQ names
    /// them.
    pub fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut listeners = vec![("amqp", self.amqp_address), ("http", self.http_address)];
        if let Some(amqps) = self.amqps_address {
            listeners.push(("amqp/ssl", amqps));
        }
        listeners
    }

    /// RabbitMQ's cluster name: the node's name until one is set.
    pub fn cluster_name(&self) -> String {
        self.cluster_name
            .lock()
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }

    /// Sets the cluster name, kept across restarts in the data directory
    /// (written to a new file and renamed over the old, so that a crash
    /// leaves one name or the other).
    pub fn set_cluster_name(&self, name: &str) -> std::io::Result<()> {
        if let Some(dir) = &self.data_dir {
            let staged = dir.join(format!("{CLUSTER_NAME_FILE}.new"));
            std::fs::write(&staged, format!("{name}\n"))?;
            std::fs::File::open(&staged)?.sync_all()?;
            std::fs::rename(&staged, dir.join(CLUSTER_NAME_FILE))?;
            std::fs::File::open(dir)?.sync_all()?;
        }
        *self.cluster_name.lock() = Some(name.to_owned());
        Ok(())
    }
}

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<HttpConfig>,
    pub hub: SharedHub,
    /// Changes to users, vhosts and permissions.
    pub admin: Admin,
    /// Opens in-process sessions with the broker (see `session.rs`).
    pub direct: DirectConnector,
    pub rates: Arc<Rates>,
    pub models: Arc<dyn ModelDirectory>,
    pub inference: Arc<Inference>,
    /// Asynchronous inference jobs; None without a data directory.
    pub jobs: Option<Arc<Jobs>>,
    pub node: Arc<NodeInfo>,
}

impl AppState {
    /// Users, vhosts and permissions.
    pub fn access(&self) -> &Arc<warren_access::AccessControl> {
        self.admin.access()
    }
}
