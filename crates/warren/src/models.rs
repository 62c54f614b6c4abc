//! The deployed models as the HTTP side sees them, and their life at run
//! time: the versions `[[model]]` declares, loaded at start, and versions
//! loaded and unloaded through the management API. Each load, switch and
//! unload is a model event (warren-http's `model_events.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use warren_amqp::SharedHub;
use warren_http::model_events::ModelEvents;
use warren_http::models::{
    DirectoryError, HistogramView, Lifecycle, Loading, ModelDirectory, ModelStats, ModelStatus,
    TensorSpec, compare_versions,
};
use warren_infer::deploy::{
    ModelConfig, REPOSITORY_MODEL_FILE, RunningModel, TaskKind, prepare_one, start_model,
};
use warren_infer::metrics::{HistogramSnapshot, ModelMetrics};
use warren_infer::runtime::onnx::loaded_library;
use warren_infer::task::Task;
use warren_infer::tensor::TensorInfo;

/// How long a loaded version's workers get to start consuming its queue
/// before the load counts as failed.
const CONSUMING_TIMEOUT: Duration = Duration::from_secs(30);
const CONSUMING_POLL: Duration = Duration::from_millis(20);

/// One model version and where it is in its life.
struct Deployed {
    config: ModelConfig,
    metrics: Arc<ModelMetrics>,
    lifecycle: Mutex<Lifecycle>,
    running: Mutex<Option<RunningModel>>,
    /// The loaded task, kept apart from `running` so that costing a
    /// request (tokenizing it) takes no lock.
    task: OnceLock<Arc<dyn Task>>,
}

impl Deployed {
    fn new(config: ModelConfig, metrics: Arc<ModelMetrics>) -> Self {
        Self {
            config,
            metrics,
            lifecycle: Mutex::new(Lifecycle::Loading),
            running: Mutex::new(None),
            task: OnceLock::new(),
        }
    }

    fn started(&self, running: RunningModel) {
        let _ = self.task.set(Arc::clone(running.task()));
        *self.running.lock().expect("running lock") = Some(running);
    }

    fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.lock().expect("lifecycle lock")
    }

    fn set_lifecycle(&self, lifecycle: Lifecycle) {
        *self.lifecycle.lock().expect("lifecycle lock") = lifecycle;
    }
}

/// What starting workers needs: the broker's address for them, the
/// broker's shutdown, and the broker itself to see them consume.
struct Runner {
    broker_url: String,
    shutdown: watch::Receiver<bool>,
    hub: SharedHub,
}

/// Empty until the configured models are added: the HTTP server starts
/// first, so that the broker answers while large models load.
pub struct DeployedModels {
    versions: RwLock<Vec<Arc<Deployed>>>,
    runner: OnceLock<Runner>,
    events: Arc<ModelEvents>,
    /// Serialises loads, so that two loads of one version cannot both
    /// pass the check that it is new.
    loading: tokio::sync::Mutex<()>,
}

impl DeployedModels {
    pub fn new(events: Arc<ModelEvents>) -> Self {
        Self {
            versions: RwLock::new(Vec::new()),
            runner: OnceLock::new(),
            events,
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// Makes the configured models visible, loading; only the first call
    /// counts.
    pub fn set(&self, configs: &[ModelConfig], metrics: &[Arc<ModelMetrics>]) {
        let mut versions = self.versions.write().expect("versions lock");
        if !versions.is_empty() {
            return;
        }
        for (config, metrics) in configs.iter().zip(metrics) {
            versions.push(Arc::new(Deployed::new(config.clone(), Arc::clone(metrics))));
        }
    }

    /// Loads and starts the configured models, in order, against
    /// `broker_url`; a model that cannot be loaded stops the start.
    pub async fn start(
        &self,
        broker_url: String,
        shutdown: watch::Receiver<bool>,
        hub: SharedHub,
    ) -> Result<(), warren_infer::deploy::DeployError> {
        let runner = self.runner.get_or_init(|| Runner {
            broker_url,
            shutdown,
            hub,
        });
        let configured: Vec<Arc<Deployed>> = self.versions.read().expect("versions lock").clone();
        for deployed in configured {
            let running = start_model(
                &deployed.config,
                &deployed.metrics,
                &runner.broker_url,
                runner.shutdown.clone(),
            )
            .await?;
            deployed.started(running);
            deployed.set_lifecycle(Lifecycle::Serving);
            self.events.publish(
                "loaded",
                &deployed.config.name,
                &deployed.config.version,
                json!({"queue": deployed.config.queue}),
            );
        }
        Ok(())
    }

    /// Waits for every version's workers to stop (after the broker's
    /// shutdown) and logs what each served.
    pub async fn finish(&self) {
        let versions: Vec<Arc<Deployed>> = self.versions.read().expect("versions lock").clone();
        for deployed in versions {
            let running = deployed.running.lock().expect("running lock").take();
            if let Some(running) = running {
                running.stop().await;
            }
            deployed.metrics.snapshot().log_summary();
        }
    }

    fn find(&self, name: &str, version: &str) -> Option<Arc<Deployed>> {
        self.versions
            .read()
            .expect("versions lock")
            .iter()
            .find(|deployed| deployed.config.name == name && deployed.config.version == version)
            .cloned()
    }

    /// The version of `name` that takes its traffic: the newest serving.
    fn default_version(&self, name: &str) -> Option<String> {
        self.versions
            .read()
            .expect("versions lock")
            .iter()
            .filter(|deployed| {
                deployed.config.name == name && deployed.lifecycle() == Lifecycle::Serving
            })
            .map(|deployed| deployed.config.version.clone())
            .max_by(|a, b| compare_versions(a, b))
    }

    /// Loads one version (see [`ModelDirectory::load`]).
    async fn load_version(
        self: Arc<Self>,
        entry: serde_json::Value,
    ) -> Result<ModelStatus, DirectoryError> {
        let mut config: ModelConfig = serde_json::from_value(entry)
            .map_err(|error| DirectoryError::Invalid(format!("the model entry: {error}")))?;
        // A Triton-style model directory: the version is its subdirectory
        // of that number, on a queue of its own as at start.
        if config.path.is_dir() {
            config.path = config
                .path
                .join(&config.version)
                .join(REPOSITORY_MODEL_FILE);
            config.queue = format!("{}.{}", config.queue, config.version);
        }
        let metrics =
            prepare_one(&config).map_err(|error| DirectoryError::Invalid(error.to_string()))?;
        let runner = self.runner.get().ok_or_else(|| {
            DirectoryError::Failed("the broker is still starting its models".to_owned())
        })?;
        let _loading = self.loading.lock().await;
        {
            let versions = self.versions.read().expect("versions lock");
            if versions.iter().any(|deployed| {
                deployed.config.name == config.name && deployed.config.version == config.version
            }) {
                return Err(DirectoryError::Exists(format!(
                    "model '{}' already has a version '{}'",
                    config.name, config.version
                )));
            }
            if let Some(other) = versions
                .iter()
                .find(|deployed| deployed.config.queue == config.queue)
            {
                return Err(DirectoryError::Invalid(format!(
                    "queue '{}' is model '{}' version '{}''s; give each version a queue of its own",
                    config.queue, other.config.name, other.config.version
                )));
            }
        }
        let (name, version) = (config.name.clone(), config.version.clone());
        let previous = self.default_version(&name);
        let deployed = Arc::new(Deployed::new(config.clone(), Arc::clone(&metrics)));
        self.versions
            .write()
            .expect("versions lock")
            .push(Arc::clone(&deployed));
        self.events
            .publish("loading", &name, &version, json!({"queue": config.queue}));
        let started = start_model(
            &config,
            &metrics,
            &runner.broker_url,
            runner.shutdown.clone(),
        )
        .await;
        let consuming = match started {
            Ok(running) => {
                deployed.started(running);
                wait_for_consumer(&runner.hub, &config.queue).await
            }
            Err(error) => Err(error.to_string()),
        };
        if let Err(reason) = consuming {
            self.versions
                .write()
                .expect("versions lock")
                .retain(|other| !Arc::ptr_eq(other, &deployed));
            let running = deployed.running.lock().expect("running lock").take();
            if let Some(running) = running {
                running.stop().await;
            }
            self.events
                .publish("load_failed", &name, &version, json!({"reason": reason}));
            return Err(DirectoryError::Failed(format!(
                "model '{name}' version '{version}': {reason}"
            )));
        }
        deployed.set_lifecycle(Lifecycle::Serving);
        self.events
            .publish("loaded", &name, &version, json!({"queue": config.queue}));
        if self.default_version(&name).as_deref() == Some(version.as_str())
            && previous.as_deref() != Some(version.as_str())
        {
            self.events
                .publish("switched", &name, &version, json!({"from": previous}));
        }
        Ok(status_of(&deployed))
    }
}

/// Until a worker consumes `queue`, for at most [`CONSUMING_TIMEOUT`].
async fn wait_for_consumer(hub: &SharedHub, queue: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + CONSUMING_TIMEOUT;
    loop {
        let consumers = hub
            .read()
            .broker()
            .queue_info("/", queue)
            .map_or(0, |queue| queue.consumers);
        if consumers > 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no worker consumed queue '{queue}' within {CONSUMING_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(CONSUMING_POLL).await;
    }
}

fn spec(info: &TensorInfo) -> TensorSpec {
    TensorSpec {
        name: info.name.clone(),
        datatype: info.data_type.map(|datatype| datatype.name().to_owned()),
        shape: info
            .shape
            .iter()
            .map(|dimension| dimension.map_or(-1, |size| size as i64))
            .collect(),
    }
}

fn view(histogram: HistogramSnapshot) -> HistogramView {
    HistogramView {
        buckets: histogram.buckets,
        count: histogram.count,
        sum: histogram.sum,
    }
}

/// The directory the HTTP side is given: the registry behind an `Arc`,
/// since a load outlives the request that started it only as long as the
/// registry does.
pub struct Directory(pub Arc<DeployedModels>);

fn status_of(deployed: &Deployed) -> ModelStatus {
    let (config, metrics) = (&deployed.config, &deployed.metrics);
    let snapshot = metrics.snapshot();
    ModelStatus {
        name: config.name.clone(),
        version: config.version.clone(),
        queue: config.queue.clone(),
        task: match config.task {
            TaskKind::Embedding => "embedding",
            TaskKind::Classification => "classification",
            TaskKind::Tensor => "tensor",
        }
        .to_owned(),
        batch_size_max: config.batch_size_max,
        batch_delay_max_ms: config.batch_delay_max_ms,
        instances: config.instances,
        max_queued_tokens: config.max_queued_tokens,
        backend: metrics.backend.get().map(|backend| (*backend).to_owned()),
        onnxruntime: loaded_library()
            .map(|library| (library.path.display().to_string(), library.version.clone())),
        tensors: metrics.tensors.get().map(|(inputs, outputs)| {
            (
                inputs.iter().map(spec).collect(),
                outputs.iter().map(spec).collect(),
            )
        }),
        lifecycle: deployed.lifecycle(),
        stats: ModelStats {
            requests: snapshot.requests,
            replies: snapshot.replies,
            poison: snapshot.poison,
            expired: snapshot.expired,
            failed_batches: snapshot.failed_batches,
            batch_size: view(snapshot.batch_size),
            batch_wait_us: view(snapshot.batch_wait_us),
            queue_wait_us: view(snapshot.queue_wait_us),
            inference_us: view(snapshot.inference_us),
            last_reply_unix_ms: snapshot.last_reply_unix_ms,
        },
    }
}

impl ModelDirectory for Directory {
    fn models(&self) -> Vec<ModelStatus> {
        self.0
            .versions
            .read()
            .expect("versions lock")
            .iter()
            .map(|deployed| status_of(deployed))
            .collect()
    }

    fn lifecycle(&self, name: &str, version: &str) -> Option<Lifecycle> {
        self.0
            .find(name, version)
            .map(|deployed| deployed.lifecycle())
    }

    fn request_cost(
        &self,
        name: &str,
        version: &str,
        body: &[u8],
        content_type: &str,
    ) -> Option<usize> {
        let task = Arc::clone(self.0.find(name, version)?.task.get()?);
        task.body_cost(body, Some(content_type))
    }

    fn load(&self, entry: serde_json::Value) -> Loading {
        Box::pin(Arc::clone(&self.0).load_version(entry))
    }

    fn begin_unload(&self, name: &str, version: &str) -> Result<(), DirectoryError> {
        let deployed = self.0.find(name, version).ok_or_else(|| {
            DirectoryError::NotFound(format!("model '{name}' has no version '{version}'"))
        })?;
        match deployed.lifecycle() {
            Lifecycle::Draining => return Ok(()),
            Lifecycle::Loading => {
                return Err(DirectoryError::Invalid(format!(
                    "model '{name}' version '{version}' is still loading"
                )));
            }
            Lifecycle::Serving => {}
        }
        let was_default = self.0.default_version(name).as_deref() == Some(version);
        deployed.set_lifecycle(Lifecycle::Draining);
        self.0.events.publish(
            "unloading",
            name,
            version,
            json!({"queue": deployed.config.queue}),
        );
        if was_default {
            let now = self.0.default_version(name);
            self.0.events.publish(
                "switched",
                name,
                now.as_deref().unwrap_or(""),
                json!({"from": version}),
            );
        }
        Ok(())
    }

    fn finish_unload(&self, name: &str, version: &str) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let registry = Arc::clone(&self.0);
        let (name, version) = (name.to_owned(), version.to_owned());
        Box::pin(async move {
            let Some(deployed) = registry.find(&name, &version) else {
                return;
            };
            let running = deployed.running.lock().expect("running lock").take();
            if let Some(running) = running {
                running.stop().await;
            }
            registry
                .versions
                .write()
                .expect("versions lock")
                .retain(|other| !Arc::ptr_eq(other, &deployed));
            deployed.metrics.snapshot().log_summary();
            registry.events.publish(
                "unloaded",
                &name,
                &version,
                json!({"queue": deployed.config.queue}),
            );
        })
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.0.events.recent()
    }
}
