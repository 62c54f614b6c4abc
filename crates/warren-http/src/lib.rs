//! Warren's HTTP side: the management API shaped like RabbitMQ's,
//! messaging over plain HTTP and WebSocket, KServe v2 inference on the
//! models' queues, Prometheus metrics and the web dashboard.
//!
//! Reads come straight from the broker under its lock (`warren-core`'s
//! inspection views); everything that changes the broker goes through a
//! direct session opened in process as the requesting user (`session.rs`),
//! so that HTTP clients get exactly the broker's semantics and refusals.

mod api;
mod auth;
mod backlog;
mod body;
mod dashboard;
mod error;
mod inference;
mod jobs;
mod json;
mod lenient;
mod metrics;
pub mod model_events;
pub mod models;
mod rabbitmq_metrics;
mod rates;
mod session;
mod state;
mod tensor_wire;
mod tls;
mod triton;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{delete, get, post, put};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use warren_amqp::{Admin, DirectConnector, SharedHub};

use crate::tls::TlsListener;

pub use error::ApiError;
pub use jobs::JobsError;
pub use state::{HttpConfig, NodeInfo};

use crate::inference::Inference;
use crate::models::ModelDirectory;
use crate::rates::Rates;
use crate::state::AppState;

/// Why the HTTP side could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpStartError {
    #[error("{0}")]
    Listen(#[from] std::io::Error),
    #[error("{0}")]
    Jobs(#[from] JobsError),
}

pub struct HttpServer {
    listener: TcpListener,
    state: AppState,
}

/// What the HTTP side is given by the binary.
pub struct HttpContext {
    pub hub: SharedHub,
    pub admin: Admin,
    /// Opens in-process sessions with the broker.
    pub direct: DirectConnector,
    pub amqp_address: SocketAddr,
    /// The AMQPS listener, when TLS is configured.
    pub amqps_address: Option<SocketAddr>,
    pub models: Arc<dyn ModelDirectory>,
    pub node_name: String,
    pub data_dir: Option<std::path::PathBuf>,
    /// Below this much free disk the broker blocks publishers.
    pub disk_free_limit_bytes: u64,
    /// The TLS listeners' certificate files, when TLS is configured.
    pub tls_files: Option<warren_amqp::tls::TlsFiles>,
}

impl HttpServer {
    pub async fn bind(
        address: SocketAddr,
        config: HttpConfig,
        context: HttpContext,
    ) -> Result<Self, HttpStartError> {
        let listener = warren_amqp::listen::bind(address).await?;
        let http_address = listener.local_addr()?;
        let jobs = match &context.data_dir {
            None => None,
            Some(data_dir) => Some(Arc::new(jobs::Jobs::open(jobs::JobsConfig {
                dir: data_dir.join("jobs"),
                queue: config.job_queue.clone(),
                retention: config.job_retention,
                jobs_max: config.jobs_max,
            })?)),
        };
        let state = AppState {
            jobs,
            inference: Arc::new(Inference::new(config.inference_in_flight_max)),
            config: Arc::new(config),
            hub: context.hub,
            admin: context.admin,
            direct: context.direct,
            rates: Arc::new(Rates::default()),
            models: context.models,
            node: Arc::new(NodeInfo {
                name: context.node_name,
                amqp_address: context.amqp_address,
                amqps_address: context.amqps_address,
                http_address,
                data_dir: context.data_dir.clone(),
                disk_free_limit_bytes: context.disk_free_limit_bytes,
                tls_files: context.tls_files,
                started: std::time::Instant::now(),
                cluster_name: parking_lot::Mutex::new(
                    context
                        .data_dir
                        .as_deref()
                        .and_then(state::read_cluster_name),
                ),
            }),
        };
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Applies a definitions file (RabbitMQ's format) before the broker
    /// takes clients: `load_definitions` in the configuration.
    pub async fn load_definitions(&self, definitions: &[u8]) -> Result<(), String> {
        api::definitions::load(&self.state, definitions)
            .await
            .map_err(|error| error.to_string())
    }

    /// Serves until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let sampler = tokio::spawn(Arc::clone(&self.state.rates).run(self.state.hub.clone()));
        let job_store = tokio::spawn(jobs::collect_results(self.state.clone(), shutdown.clone()));
        let tls = self.state.config.tls.clone();
        let app = router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        let served = match tls {
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            Some(config) => {
                // tap_io makes axum hand the peer's address to handlers
                // (ConnectInfo) for a listener of our own, as for TCP.
                let listener = TlsListener::new(self.listener, config)?.tap_io(|_| ());
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        };
        sampler.abort();
        job_store.abort();
        served
    }
}

fn router(state: AppState) -> Router {
    use api::{
        access, bindings, connections, consume, definitions, exchanges, health, messages, nodes,
        overview, parameters, policies, queues,
    };
    let binding_path = "/api/bindings/{vhost}/e/{source}/{kind}/{destination}";
    Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/{*path}", get(dashboard::asset))
        .route("/metrics", get(metrics::metrics))
        .route("/metrics/per-object", get(metrics::per_object))
        .route("/metrics/detailed", get(metrics::detailed))
        .route("/api/overview", get(overview::overview))
        .route("/api/whoami", get(overview::whoami))
        .route("/api/nodes", get(nodes::list))
        .route("/api/nodes/{name}", get(nodes::show))
        .route("/api/extensions", get(nodes::extensions))
        .route(
            "/api/cluster-name",
            get(nodes::cluster_name).put(nodes::set_cluster_name),
        )
        .route(
            "/api/health/checks/certificate-expiration/{within}/{unit}",
            get(health::certificate_expiration),
        )
        .route("/api/health/checks/alarms", get(health::alarms))
        .route("/api/health/checks/local-alarms", get(health::local_alarms))
        .route(
            "/api/health/checks/port-listener/{port}",
            get(health::port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(health::protocol_listener),
        )
        .route(
            "/api/health/checks/virtual-hosts",
            get(health::virtual_hosts),
        )
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(health::not_critical),
        )
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(health::not_critical),
        )
        .route("/api/aliveness-test/{vhost}", get(health::aliveness))
        .route("/api/vhosts", get(overview::vhosts))
        .route(
            "/api/vm-memory-high-watermark",
            get(overview::memory_watermark).put(overview::put_memory_watermark),
        )
        .route(
            "/api/vhosts/{vhost}",
            get(overview::vhost)
                .put(access::put_vhost)
                .delete(access::delete_vhost),
        )
        .route(
            "/api/vhosts/{vhost}/permissions",
            get(access::vhost_permissions),
        )
        .route("/api/users", get(access::users))
        .route(
            "/api/users/{user}",
            get(access::show_user)
                .put(access::put_user)
                .delete(access::delete_user),
        )
        .route(
            "/api/users/{user}/permissions",
            get(access::user_permissions),
        )
        .route("/api/permissions", get(access::permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(access::show_permission)
                .put(access::put_permission)
                .delete(access::delete_permission),
        )
        .route(
            "/api/definitions",
            get(definitions::export_all).post(definitions::import_all),
        )
        .route(
            "/api/definitions/{vhost}",
            get(definitions::export_vhost).post(definitions::import_vhost),
        )
        .route("/api/vhost-limits", get(parameters::vhost_limits))
        .route("/api/vhost-limits/{vhost}", get(parameters::vhost_limits))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            put(parameters::put_vhost_limit).delete(parameters::delete_vhost_limit),
        )
        .route("/api/parameters", get(parameters::parameters))
        .route("/api/parameters/{component}", get(parameters::parameters))
        .route(
            "/api/parameters/{component}/{vhost}",
            get(parameters::parameters),
        )
        .route(
            "/api/parameters/{component}/{vhost}/{name}",
            put(parameters::put_parameter).delete(parameters::delete_parameter),
        )
        .route("/api/policies", get(policies::list))
        .route("/api/policies/{vhost}", get(policies::list))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policies::show)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route("/api/operator-policies", get(policies::list_operator))
        .route(
            "/api/operator-policies/{vhost}",
            get(policies::list_operator),
        )
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(policies::show_operator)
                .put(policies::put_operator)
                .delete(policies::delete_operator),
        )
        .route("/api/queues", get(queues::list))
        .route("/api/queues/{vhost}", get(queues::list))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queues::show)
                .put(queues::declare)
                .delete(queues::delete),
        )
        .route("/api/queues/{vhost}/{name}/contents", delete(queues::purge))
        .route(
            "/api/queues/{vhost}/{name}/bindings",
            get(bindings::of_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(messages::get))
        .route(
            "/api/queues/{vhost}/{name}/messages",
            post(messages::post_to_queue),
        )
        .route("/api/queues/{vhost}/{name}/consume", get(consume::consume))
        .route("/api/exchanges", get(exchanges::list))
        .route("/api/exchanges/{vhost}", get(exchanges::list))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchanges::show)
                .put(exchanges::declare)
                .delete(exchanges::delete),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(messages::publish),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/messages",
            post(messages::post_to_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(bindings::from_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(bindings::to_exchange),
        )
        .route("/api/bindings", get(bindings::list))
        .route("/api/bindings/{vhost}", get(bindings::list))
        .route(
            binding_path,
            get(bindings::list_between)
                .post(bindings::create)
                .put(bindings::create),
        )
        .route(
            &format!("{binding_path}/{{key}}"),
            get(bindings::show).delete(bindings::delete),
        )
        .route("/api/connections", get(connections::list))
        .route(
            "/api/connections/{name}",
            get(connections::show).delete(connections::close),
        )
        .route("/api/channels", get(connections::channels))
        .route("/api/consumers", get(connections::consumers))
        .route("/api/consumers/{vhost}", get(connections::consumers))
        .route("/api/models", get(api::models::list))
        .route("/api/models/events", get(api::models::events))
        .route(
            "/api/models/{name}/versions/{version}",
            axum::routing::put(api::models::load).delete(api::models::unload),
        )
        .merge(kserve_routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(api::listing::shape_collections))
        .with_state(state)
}

/// KServe v2 (Open Inference Protocol) with Triton's extensions. Its
/// errors are `{"error": MESSAGE}`, as the protocol has them, rather than
/// the management API's `{"error": KIND, "reason": MESSAGE}`.
fn kserve_routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(inference::server_metadata))
        .route("/v2/health/live", get(inference::live))
        .route("/v2/health/ready", get(inference::ready))
        .route("/v2/repository/index", post(triton::repository_index))
        .route("/v2/jobs/{id}", get(jobs::status).delete(jobs::forget))
        .route("/v2/models/stats", get(triton::all_stats))
        .route("/v2/models/{name}", get(inference::model_metadata))
        .route("/v2/models/{name}/ready", get(inference::model_ready))
        .route("/v2/models/{name}/config", get(triton::config))
        .route("/v2/models/{name}/stats", get(triton::stats))
        .route("/v2/models/{name}/infer", post(inference::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(inference::version_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(inference::version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(triton::version_config),
        )
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(triton::version_stats),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(inference::infer_version),
        )
        .layer(axum::middleware::map_response(error::kserve_error_body))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such path: {}", uri.path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
