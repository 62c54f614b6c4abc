//! A model as it is declared (`[[model]]` in the configuration file) and
//! deployed: loaded once per instance and served by a worker per instance.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::ModelMetrics;
use crate::runtime::{self, RuntimeConfig};
use crate::task::Task;
use crate::task::classification::{ClassificationModel, Preprocessing};
use crate::task::embedding::{EmbeddingModel, Pooling};
use crate::task::tensor::TensorModel;
use crate::worker::{self, DELIVERY_LIMIT_DEFAULT, WorkerConfig};

/// Requests one batch may hold; beyond this a batch costs more memory than
/// it saves in per-call overhead.
pub const BATCH_SIZE_MAX_LIMIT: usize = 1_024;
/// The longest a worker may hold a request waiting for its batch to fill.
pub const BATCH_DELAY_MAX_LIMIT_MS: u64 = 10_000;
/// Instances (each a loaded copy of the model) one model may run.
pub const INSTANCES_MAX: usize = 64;

/// How long a worker whose broker connection failed waits before
/// connecting again.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Embedding,
    Classification,
    /// Any model, with KServe v2 JSON tensors in and out.
    Tensor,
}

/// One `[[model]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Reported in reply headers (`x-warren-model-version`).
    #[serde(default = "default_version")]
    pub version: String,
    /// The ONNX file; or a Triton-style model directory, whose numbered
    /// subdirectories (`<n>/model.onnx`) are its versions.
    pub path: PathBuf,
    /// With a model directory: how many of its newest versions to serve
    /// (Triton's `latest` version policy; 1 by default, as Triton's).
    pub versions: Option<usize>,
    pub task: TaskKind,
    /// The queue requests arrive on; declared (durable, quorum) if missing.
    pub queue: String,
    /// Where poison requests and those past the delivery limit go; default
    /// `<queue>.dead-letter`.
    pub dead_letter_queue: Option<String>,
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Requests the queue may hold (declared as `x-max-length` with
    /// `x-overflow = reject-publish`): a publisher past it is nacked and an
    /// HTTP client gets 429, instead of a backlog no one will wait for.
    pub queue_length_max: Option<u32>,
    #[serde(default = "default_batch_size_max")]
    pub batch_size_max: usize,
    #[serde(default = "default_batch_delay_max_ms")]
    pub batch_delay_max_ms: u64,
    /// `embedding`: the most tokens one batch may hold in all (TEI's
    /// `max-batch-tokens`), so that one long text does not make a batch
    /// of short ones pad to its length; a text over it runs alone.
    pub max_batch_tokens: Option<usize>,
    /// `embedding`: the most tokens HTTP requests to this version may have
    /// waiting or running at once (vLLM's `max-num-queued-tokens`); a
    /// request past it is refused with 429 and a `Retry-After` instead of
    /// queued behind work it would wait long for.
    pub max_queued_tokens: Option<usize>,
    #[serde(default = "default_instances")]
    pub instances: usize,
    /// Publish every result here too (the "result queue"), besides replying
    /// to `reply_to`.
    pub result_exchange: Option<String>,
    pub result_routing_key: Option<String>,
    /// Where the results of jobs go (requests with a `message_id` and no
    /// `reply_to`); Warren's job store reads `warren.jobs`.
    #[serde(default = "default_job_queue")]
    pub job_queue: String,
    /// `embedding`: the HuggingFace tokenizer.json.
    pub tokenizer: Option<PathBuf>,
    /// `embedding`: tokens a text is cut to (default: the tokenizer's own
    /// truncation, else 512).
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "default_true")]
    pub normalize: bool,
    /// `classification`: one label per line, in the model's class order.
    pub labels: Option<PathBuf>,
    /// `classification`: labels in a reply.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// `classification`: how an image becomes the model's input.
    pub preprocessing: Option<Preprocessing>,
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

fn default_version() -> String {
    "1".to_owned()
}
fn default_job_queue() -> String {
    worker::JOB_QUEUE_DEFAULT.to_owned()
}
fn default_delivery_limit() -> u32 {
    DELIVERY_LIMIT_DEFAULT
}
fn default_batch_size_max() -> usize {
    32
}
fn default_batch_delay_max_ms() -> u64 {
    5
}
fn default_instances() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_top_k() -> usize {
    5
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("model '{model}': {reason}")]
    Invalid { model: String, reason: String },
    #[error("model '{model}': {source}")]
    Runtime {
        model: String,
        #[source]
        source: runtime::RuntimeError,
    },
    #[error("model '{model}': {source}")]
    Embedding {
        model: String,
        #[source]
        source: crate::task::embedding::EmbeddingError,
    },
}

impl ModelConfig {
    /// Checks the limits, so a bad entry stops the start with a message
    /// that names it.
    pub fn validate(&self) -> Result<(), DeployError> {
        let invalid = |reason: String| DeployError::Invalid {
            model: self.name.clone(),
            reason,
        };
        if !(1..=BATCH_SIZE_MAX_LIMIT).contains(&self.batch_size_max) {
            return Err(invalid(format!(
                "batch_size_max must be 1 to {BATCH_SIZE_MAX_LIMIT}"
            )));
        }
        if self.batch_delay_max_ms > BATCH_DELAY_MAX_LIMIT_MS {
            return Err(invalid(format!(
                "batch_delay_max_ms must be at most {BATCH_DELAY_MAX_LIMIT_MS}"
            )));
        }
        if self.max_batch_tokens == Some(0) {
            return Err(invalid("max_batch_tokens must be at least 1".to_owned()));
        }
        match self.max_queued_tokens {
            // The HTTP side counts the budget in a semaphore's permits, of
            // which it takes at most u32::MAX at once.
            Some(tokens) if tokens == 0 || tokens > MAX_QUEUED_TOKENS_LIMIT => {
                return Err(invalid(format!(
                    "max_queued_tokens must be 1 to {MAX_QUEUED_TOKENS_LIMIT}"
                )));
            }
            Some(_) if self.task != TaskKind::Embedding => {
                return Err(invalid(
                    "max_queued_tokens counts tokens, so only an embedding model takes it"
                        .to_owned(),
                ));
            }
            _ => {}
        }
        if !(1..=INSTANCES_MAX).contains(&self.instances) {
            return Err(invalid(format!("instances must be 1 to {INSTANCES_MAX}")));
        }
        if self.task == TaskKind::Embedding && self.tokenizer.is_none() {
            return Err(invalid("an embedding model needs `tokenizer`".to_owned()));
        }
        if self.task == TaskKind::Classification
            && (self.labels.is_none() || self.preprocessing.is_none())
        {
            return Err(invalid(
                "a classification model needs `labels` and `[model.preprocessing]`".to_owned(),
            ));
        }
        if self.queue.is_empty() || self.queue.len() > 255 {
            return Err(invalid("queue must be 1 to 255 bytes".to_owned()));
        }
        if self.job_queue.is_empty() || self.job_queue.len() > 255 {
            return Err(invalid("job_queue must be 1 to 255 bytes".to_owned()));
        }
        Ok(())
    }

    fn worker_config(&self, broker_url: &str) -> WorkerConfig {
        WorkerConfig {
            broker_url: broker_url.to_owned(),
            model: self.name.clone(),
            model_version: self.version.clone(),
            queue: self.queue.clone(),
            dead_letter_queue: self
                .dead_letter_queue
                .clone()
                .unwrap_or_else(|| format!("{}.dead-letter", self.queue)),
            delivery_limit: self.delivery_limit,
            queue_length_max: self.queue_length_max,
            batch_size_max: self.batch_size_max,
            batch_delay_max: Duration::from_millis(self.batch_delay_max_ms),
            batch_cost_max: self.max_batch_tokens,
            result_exchange: self.result_exchange.clone(),
            result_routing_key: self.result_routing_key.clone(),
            job_queue: self.job_queue.clone(),
        }
    }

    /// Threads one inference of one instance uses: as configured, else
    /// the cores this process may use (its CPU affinity and cgroup quota)
    /// shared evenly between the instances, so that instances busy at once
    /// fill the machine without more runnable threads than cores, which
    /// would leave each inference waiting on the others'.
    pub fn threads(&self) -> usize {
        match self.runtime.threads {
            Some(threads) if threads > 0 => threads,
            _ => {
                let cores = std::thread::available_parallelism().map_or(1, usize::from);
                (cores / self.instances.max(1)).max(1)
            }
        }
    }

    /// Loads one instance of the model with its task.
    pub fn load(&self) -> Result<Arc<dyn Task>, DeployError> {
        let runtime_config = runtime::RuntimeConfig {
            threads: Some(self.threads()),
            ..self.runtime.clone()
        };
        let runtime =
            runtime::load(&self.path, &runtime_config).map_err(|source| DeployError::Runtime {
                model: self.name.clone(),
                source,
            })?;
        match self.task {
            TaskKind::Embedding => {
                let tokenizer = self.tokenizer.as_ref().expect("validated");
                let model = EmbeddingModel::new(
                    runtime,
                    tokenizer,
                    self.pooling,
                    self.normalize,
                    self.max_tokens,
                )
                .map_err(|source| DeployError::Embedding {
                    model: self.name.clone(),
                    source,
                })?;
                Ok(Arc::new(model))
            }
            TaskKind::Tensor => Ok(Arc::new(TensorModel::new(self.name.clone(), runtime))),
            TaskKind::Classification => {
                let model = ClassificationModel::new(
                    runtime,
                    self.labels.as_ref().expect("validated"),
                    self.preprocessing.clone().expect("validated"),
                    self.top_k,
                )
                .map_err(|error| DeployError::Invalid {
                    model: self.name.clone(),
                    reason: error.to_string(),
                })?;
                Ok(Arc::new(model))
            }
        }
    }
}

/// One model version's running workers, and the switch that stops them.
pub struct RunningModel {
    workers: JoinSet<()>,
    stop: Arc<watch::Sender<bool>>,
    /// The first instance's task, which the HTTP side asks what a request
    /// costs (its tokens) before admitting it.
    task: Arc<dyn Task>,
}

impl RunningModel {
    pub fn task(&self) -> &Arc<dyn Task> {
        &self.task
    }

    /// Tells the workers to stop after the batch each is running (their
    /// unacknowledged requests go back to the queue when they close), and
    /// waits until they have.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.workers.join_next().await.is_some() {}
    }
}

/// The running workers of every model, and each model's metrics.
#[derive(Default)]
pub struct Deployment {
    pub running: Vec<RunningModel>,
    pub metrics: Vec<Arc<ModelMetrics>>,
    /// The entries served, in the order of `metrics`.
    pub models: Vec<ModelConfig>,
}

impl Deployment {
    /// Waits for the workers to stop (after `shutdown` turned true) and logs
    /// what each model served.
    pub async fn finish(self) {
        for running in self.running {
            running.stop().await;
        }
        for metrics in &self.metrics {
            metrics.snapshot().log_summary();
        }
    }
}

/// The largest `max_queued_tokens`.
pub const MAX_QUEUED_TOKENS_LIMIT: usize = u32::MAX as usize;

/// The file a version of a Triton-style model directory keeps its model
/// in.
pub const REPOSITORY_MODEL_FILE: &str = "model.onnx";

/// Entries whose `path` is a model directory become one entry per version
/// served: the newest `versions` (1 by default) of its numbered
/// subdirectories that hold a `model.onnx`, each on the queue
/// `<queue>.<version>`. Other entries are kept as they are.
pub fn expand_repositories(models: Vec<ModelConfig>) -> Result<Vec<ModelConfig>, DeployError> {
    let mut expanded = Vec::with_capacity(models.len());
    for model in models {
        if !model.path.is_dir() {
            if model.versions.is_some() {
                return Err(DeployError::Invalid {
                    model: model.name.clone(),
                    reason: "`versions` applies to a model directory, and path is a file"
                        .to_owned(),
                });
            }
            expanded.push(model);
            continue;
        }
        let invalid = |reason: String| DeployError::Invalid {
            model: model.name.clone(),
            reason,
        };
        if model.version != default_version() {
            return Err(invalid(
                "a model directory's versions are its numbered subdirectories; remove `version`"
                    .to_owned(),
            ));
        }
        let entries = std::fs::read_dir(&model.path)
            .map_err(|error| invalid(format!("reading {}: {error}", model.path.display())))?;
        let mut numbers: Vec<u64> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().join(REPOSITORY_MODEL_FILE).is_file())
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u64>().ok())
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            return Err(invalid(format!(
                "{} has no numbered version directory holding {REPOSITORY_MODEL_FILE}",
                model.path.display()
            )));
        }
        let keep = model.versions.unwrap_or(1);
        if keep == 0 {
            return Err(invalid("versions must be at least 1".to_owned()));
        }
        for number in &numbers[numbers.len().saturating_sub(keep)..] {
            let mut version = model.clone();
            version.version = number.to_string();
            version.path = model
                .path
                .join(number.to_string())
                .join(REPOSITORY_MODEL_FILE);
            version.queue = format!("{}.{number}", model.queue);
            version.versions = None;
            expanded.push(version);
        }
    }
    Ok(expanded)
}

/// Checks one entry and makes its (empty) metrics.
pub fn prepare_one(model: &ModelConfig) -> Result<Arc<ModelMetrics>, DeployError> {
    model.validate()?;
    Ok(Arc::new(ModelMetrics::new(&model.name, &model.queue)))
}

/// Checks every entry and makes each model's (empty) metrics, before
/// anything loads: a bad entry stops the start at once, and the metrics
/// can be shown while large models are still loading.
pub fn prepare(models: &[ModelConfig]) -> Result<Vec<Arc<ModelMetrics>>, DeployError> {
    // Versions of a model are told apart by their version alone.
    for (index, model) in models.iter().enumerate() {
        if models[..index]
            .iter()
            .any(|earlier| earlier.name == model.name && earlier.version == model.version)
        {
            return Err(DeployError::Invalid {
                model: model.name.clone(),
                reason: format!(
                    "version '{}' is configured twice; give each [[model]] of the same \
                     name its own version",
                    model.version
                ),
            });
        }
    }
    models.iter().map(prepare_one).collect()
}

/// Loads every instance of `model`, runs one inference on each (so that
/// the first request does not pay for the model's first run), and starts
/// a worker per instance against `broker_url`. The workers stop when
/// `shutdown` turns true or the returned handle is stopped.
pub async fn start_model(
    model: &ModelConfig,
    metrics: &Arc<ModelMetrics>,
    broker_url: &str,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunningModel, DeployError> {
    let mut tasks = Vec::with_capacity(model.instances);
    for instance in 0..model.instances {
        let loading = model.clone();
        let task = tokio::task::spawn_blocking(move || {
            let task = loading.load()?;
            warm_up(&loading, task.as_ref());
            Ok::<_, DeployError>(task)
        })
        .await
        .expect("loading a model does not panic")?;
        tracing::info!(model = %model.name, version = %model.version, instance,
            backend = task.backend(), threads = model.threads(), queue = %model.queue,
            "model loaded");
        let _ = metrics.backend.set(task.backend());
        if let Some(tensors) = task.tensors() {
            let _ = metrics.tensors.set(tensors);
        }
        tasks.push(task);
    }
    let (stop, stopped) = watch::channel(false);
    let stop = Arc::new(stop);
    let mut workers = JoinSet::new();
    // The broker's shutdown stops this model's workers too.
    let forward = Arc::clone(&stop);
    workers.spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => { let _ = forward.send(true); }
            _ = forward.closed() => {}
        }
    });
    let first = Arc::clone(tasks.first().expect("a model has at least one instance"));
    for task in tasks {
        let config = model.worker_config(broker_url);
        workers.spawn(serve_forever(
            config,
            task,
            Arc::clone(metrics),
            stopped.clone(),
        ));
    }
    Ok(RunningModel {
        workers,
        stop,
        task: first,
    })
}

/// One inference of the task's warm-up request, on the loading thread. A
/// failure is logged and the model served all the same: the request is
/// made up (zeros, a dimension that varies taken as 1), and a model may
/// refuse it and still take every real request.
fn warm_up(model: &ModelConfig, task: &dyn Task) {
    let Some(body) = task.warm_up_request() else {
        return;
    };
    let outcome = task
        .decode(&body, None)
        .and_then(|decoded| task.infer(vec![decoded]).map_err(|error| error.to_string()));
    if let Err(reason) = outcome {
        tracing::warn!(model = %model.name, version = %model.version, %reason,
            "the warm-up inference failed; the first request pays for the model's first run");
    }
}

/// Loads every model and runs its workers against `broker_url` until
/// `shutdown`, updating `metrics` (from [`prepare`], in the order of
/// `models`). A worker whose connection fails connects again; a model
/// that cannot be loaded stops the start.
pub async fn run_models(
    models: Vec<ModelConfig>,
    metrics: Vec<Arc<ModelMetrics>>,
    broker_url: String,
    shutdown: watch::Receiver<bool>,
) -> Result<Deployment, DeployError> {
    let mut running = Vec::with_capacity(models.len());
    for (model, metrics) in models.iter().zip(&metrics) {
        running.push(start_model(model, metrics, &broker_url, shutdown.clone()).await?);
    }
    Ok(Deployment {
        running,
        metrics,
        models,
    })
}

async fn serve_forever(
    config: WorkerConfig,
    task: Arc<dyn Task>,
    metrics: Arc<ModelMetrics>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let result = worker::run(
            config.clone(),
            Arc::clone(&task),
            Arc::clone(&metrics),
            shutdown.clone(),
        )
        .await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(error) = result {
            tracing::warn!(model = %config.model, %error, "model worker lost its broker; reconnecting");
        }
        let mut shutdown = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(instances: usize, threads: Option<usize>) -> ModelConfig {
        let mut entry = serde_json::json!({
            "name": "m", "path": "m.onnx", "task": "tensor", "queue": "q",
            "instances": instances,
        });
        if let Some(threads) = threads {
            entry["runtime"] = serde_json::json!({"threads": threads});
        }
        serde_json::from_value(entry).expect("a model entry")
    }

    #[test]
    fn instances_share_the_cores_unless_threads_are_configured() {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(model(1, None).threads(), cores);
        assert_eq!(model(2, None).threads(), (cores / 2).max(1));
        assert_eq!(model(cores * 4, None).threads(), 1, "never below one");
        assert_eq!(model(1, Some(0)).threads(), cores, "0 is the default");
        assert_eq!(model(3, Some(5)).threads(), 5);
    }

    #[test]
    fn a_model_directory_serves_its_newest_numbered_versions() {
        let repository = std::env::temp_dir().join(format!(
            "warren-repository-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        for version in ["1", "2", "10"] {
            std::fs::create_dir_all(repository.join(version)).unwrap();
            std::fs::write(repository.join(version).join(REPOSITORY_MODEL_FILE), b"").unwrap();
        }
        // Neither a number nor holding a model: not versions.
        std::fs::create_dir_all(repository.join("notes")).unwrap();
        std::fs::create_dir_all(repository.join("3")).unwrap();
        let mut entry = model(1, None);
        entry.path = repository.clone();
        let newest = expand_repositories(vec![entry.clone()]).unwrap();
        assert_eq!(newest.len(), 1);
        assert_eq!(
            (newest[0].version.as_str(), newest[0].queue.as_str()),
            ("10", "q.10")
        );
        assert_eq!(
            newest[0].path,
            repository.join("10").join(REPOSITORY_MODEL_FILE)
        );

        entry.versions = Some(2);
        let two: Vec<String> = expand_repositories(vec![entry.clone()])
            .unwrap()
            .into_iter()
            .map(|model| model.version)
            .collect();
        assert_eq!(two, ["2", "10"]);

        entry.version = "7".to_owned();
        assert!(expand_repositories(vec![entry]).is_err());
        let mut file = model(1, None);
        file.versions = Some(2);
        assert!(expand_repositories(vec![file]).is_err());
        std::fs::remove_dir_all(repository).unwrap();
    }

    #[test]
    fn a_version_configured_twice_is_refused() {
        let versioned = |version: &str| {
            let mut config = model(1, None);
            config.version = version.to_owned();
            config
        };
        assert!(prepare(&[versioned("1"), versioned("2")]).is_ok());
        let error = prepare(&[versioned("1"), versioned("1")]).unwrap_err();
        assert!(error.to_string().contains("configured twice"), "{error}");
    }

    #[test]
    fn only_a_text_model_takes_a_queued_token_budget() {
        let mut tensor = model(1, None);
        tensor.max_queued_tokens = Some(100);
        let error = tensor.validate().unwrap_err();
        assert!(
            error.to_string().contains("only an embedding model"),
            "{error}"
        );

        let mut embedding = model(1, None);
        embedding.task = TaskKind::Embedding;
        embedding.tokenizer = Some(PathBuf::from("tokenizer.json"));
        for (budget, valid) in [
            (Some(0), false),
            (Some(1), true),
            (Some(MAX_QUEUED_TOKENS_LIMIT), true),
            (Some(MAX_QUEUED_TOKENS_LIMIT + 1), false),
            (None, true),
        ] {
            embedding.max_queued_tokens = budget;
            assert_eq!(embedding.validate().is_ok(), valid, "{budget:?}");
        }
    }
}
