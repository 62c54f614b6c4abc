//! Asynchronous inference jobs: submitted now, answered later, kept on
//! disk.
//!
//! A job is one or more requests on a model's queue that carry the job's
//! id as their `message_id` and have no `reply_to`. The model's workers
//! publish each result (or the reason an input was refused) to the job
//! queue, persistent, under that id; this module consumes the job queue
//! and appends each result to the job's file before acknowledging it, so a
//! result is either still in the queue (durable) or on disk when the
//! broker dies. `POST /v2/models/{m}/infer` with `Prefer: respond-async`
//! (see `inference.rs`) submits a job; any AMQP client submits one by
//! publishing a request with a `message_id` and no `reply_to`.
//! `GET /v2/jobs/{id}` says where it is: queued (with its position and
//! expected wait), running, done (with the result) or failed (with the
//! reason).
//!
//! Each job is one file, `<hex of the id>.jsonl`, of JSON lines: the
//! submission (for jobs submitted over HTTP) and one line per result
//! part. A line is written whole and fsynced before what it records is
//! acknowledged; a torn last line (a crash mid-write) is cut off when the
//! file is read back, and the message it came from, never acknowledged,
//! is delivered again. Jobs are forgotten, file and all, `retention`
//! after they end (or after they were submitted, if they never end).

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::{AMQPValue, FieldTable};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use futures_util::FutureExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, watch};
use warren_amqp::{DirectLogin, DirectSession, Event};

use crate::auth::Credentials;
use crate::backlog;
use crate::error::{ApiError, ApiResult};
use crate::inference::{self, Reply};
use crate::state::AppState;
use crate::tensor_wire::OutputChoice;

/// The longest job id kept, in bytes: the id names the job's file (as
/// hex, two characters a byte, under the usual 255-character limit).
pub const JOB_ID_MAX_BYTES: usize = 120;
/// Results the job store takes from the job queue at once: its prefetch,
/// and the most written before one round of fsyncs and one ack.
const RESULTS_PER_ROUND_MAX: u16 = 256;
/// How long the job store waits before consuming again after its session
/// failed (the queue was deleted, say).
const RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// How often ended jobs past their retention are forgotten, at most.
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// The request headers that carry a part's index and the number of parts
/// (`warren_infer::worker::JOB_PART_HEADER` and `JOB_PARTS_HEADER`, which
/// workers copy onto each result).
pub const PART_HEADER: &str = "x-warren-job-part";
pub const PARTS_HEADER: &str = "x-warren-job-parts";

/// Where jobs are kept and for how long.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// One file per job.
    pub dir: PathBuf,
    /// The queue workers publish jobs' results to.
    pub queue: String,
    /// How long a job is kept after it ends.
    pub retention: Duration,
    /// Jobs kept at once; past this a submission over HTTP is refused
    /// with 429 (results of jobs submitted over AMQP are always kept).
    pub jobs_max: usize,
}

/// A job as its file records it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Submitted(Submission),
    Part(Part),
}

/// What an HTTP submission knew: the model version, how many requests it
/// made, and what the caller asked to have back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Submission {
    pub model: String,
    pub version: String,
    pub queue: String,
    pub parts: usize,
    pub submitted_ms: u64,
    /// When the requests expire in the queue (the KServe `timeout`).
    pub deadline_ms: Option<u64>,
    /// The KServe request's own `id`, returned with the result.
    pub request_id: Option<Value>,
    pub outputs: OutputChoice,
}

/// One result: the reply to one of the job's requests.
#[derive(Debug, Serialize, Deserialize)]
struct Part {
    index: usize,
    parts: usize,
    model: Option<String>,
    version: Option<String>,
    /// The model's reason for refusing the input (`x-warren-error`).
    error: Option<String>,
    /// The reply's body (the workers' replies are text: JSON or labels).
    body: String,
    stored_ms: u64,
}

/// A job in memory: what its file says, without the results' bodies.
#[derive(Debug, Clone)]
struct Job {
    submission: Option<Submission>,
    /// From the results, for a job submitted over AMQP.
    model: Option<String>,
    version: Option<String>,
    parts: usize,
    done: BTreeSet<usize>,
    error: Option<String>,
    first_seen_ms: u64,
    completed_ms: Option<u64>,
    /// Where the job stood in its queue when first looked at since the
    /// broker started.
    baseline: Option<Baseline>,
}

impl Job {
    fn complete(&self) -> bool {
        self.error.is_some() || self.done.len() >= self.parts
    }

    /// When the job is forgotten.
    fn forget_at_ms(&self, retention: Duration) -> u64 {
        self.completed_ms
            .unwrap_or(self.first_seen_ms)
            .saturating_add(retention.as_millis() as u64)
    }

    fn apply(&mut self, record: Record) {
        match record {
            Record::Submitted(submission) => {
                self.parts = submission.parts;
                self.first_seen_ms = self.first_seen_ms.min(submission.submitted_ms);
                self.submission = Some(submission);
            }
            Record::Part(part) => {
                self.parts = self.parts.max(part.parts);
                if self.model.is_none() {
                    self.model = part.model;
                    self.version = part.version;
                }
                if self.error.is_none() {
                    self.error = part.error;
                }
                self.done.insert(part.index);
                if self.complete() && self.completed_ms.is_none() {
                    self.completed_ms = Some(part.stored_ms);
                }
            }
        }
    }

    fn empty(now_ms: u64) -> Self {
        Self {
            submission: None,
            model: None,
            version: None,
            parts: 1,
            done: BTreeSet::new(),
            error: None,
            first_seen_ms: now_ms,
            completed_ms: None,
            baseline: None,
        }
    }
}

/// The job's queue when it was first looked at: the requests ahead of it
/// and the queue's deliveries so far, from which its position now follows.
#[derive(Debug, Clone, Copy)]
struct Baseline {
    ahead: u64,
    delivered: u64,
}

/// The job store.
pub struct Jobs {
    config: JobsConfig,
    index: Mutex<HashMap<String, Job>>,
    /// The queued tokens each unfinished HTTP job holds of its model's
    /// budget (`max_queued_tokens`): given back when the job completes,
    /// passes its deadline or is forgotten.
    held_tokens: Mutex<HashMap<String, OwnedSemaphorePermit>>,
    /// Appends to one file at a time, so that lines never interleave.
    writing: std::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("job store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Jobs {
    /// Opens the store in `config.dir`, reading back every job kept and
    /// forgetting those past their retention.
    pub fn open(config: JobsConfig) -> Result<Self, JobsError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| JobsError::Io { path, source }
        };
        std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
        let now = warren_amqp::wall_clock_ms();
        let mut index = HashMap::new();
        for entry in std::fs::read_dir(&config.dir).map_err(io(&config.dir))? {
            let path = entry.map_err(io(&config.dir))?.path();
            let Some(id) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".jsonl"))
                .and_then(id_of_file_stem)
            else {
                continue;
            };
            let job = read_job(&path, now).map_err(io(&path))?;
            if job.forget_at_ms(config.retention) <= now {
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            index.insert(id, job);
        }
        if !index.is_empty() {
            tracing::info!(jobs = index.len(), dir = %config.dir.display(), "jobs recovered");
        }
        Ok(Self {
            config,
            index: Mutex::new(index),
            held_tokens: Mutex::new(HashMap::new()),
            writing: std::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.index.lock().len()
    }

    fn path(&self, id: &str) -> PathBuf {
        self.config
            .dir
            .join(format!("{}.jsonl", hex(id.as_bytes())))
    }

    /// Appends records to jobs' files and makes them durable; blocking.
    fn append(&self, records: &[(String, Record)]) -> std::io::Result<()> {
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut created = false;
        let mut files: HashMap<String, File> = HashMap::new();
        for (id, record) in records {
            let file = match files.get_mut(id) {
                Some(file) => file,
                None => {
                    let path = self.path(id);
                    created |= !path.exists();
                    let file = OpenOptions::new().create(true).append(true).open(&path)?;
                    files.entry(id.clone()).or_insert(file)
                }
            };
            let mut line = serde_json::to_vec(record).expect("a job record serialises");
            line.push(b'\n');
            file.write_all(&line)?;
        }
        for file in files.values() {
            file.sync_data()?;
        }
        if created {
            File::open(&self.config.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Records an HTTP submission durably; its requests are already in
    /// the model's queue. `tokens` is what it holds of the model's queued
    /// tokens until it finishes.
    pub async fn submitted(
        self: &std::sync::Arc<Self>,
        id: String,
        submission: Submission,
        baseline: (u64, u64),
        tokens: Option<OwnedSemaphorePermit>,
    ) -> ApiResult<()> {
        let store = std::sync::Arc::clone(self);
        let record = Record::Submitted(submission.clone());
        let key = id.clone();
        tokio::task::spawn_blocking(move || store.append(&[(key, record)]))
            .await
            .expect("writing a job does not panic")
            .map_err(|error| ApiError::Internal(format!("keeping the job failed: {error}")))?;
        let mut index = self.index.lock();
        let job = index
            .entry(id.clone())
            .or_insert_with(|| Job::empty(submission.submitted_ms));
        job.baseline = Some(Baseline {
            ahead: baseline.0,
            delivered: baseline.1,
        });
        job.apply(Record::Submitted(submission));
        let complete = job.complete();
        drop(index);
        if let Some(tokens) = tokens
            && !complete
        {
            self.held_tokens.lock().insert(id, tokens);
        }
        Ok(())
    }

    /// Stores a round of results, durably, before they are acknowledged.
    fn store_results(&self, results: Vec<(String, Part)>) -> std::io::Result<()> {
        let records: Vec<(String, Record)> = results
            .into_iter()
            .map(|(id, part)| (id, Record::Part(part)))
            .collect();
        self.append(&records)?;
        let now = warren_amqp::wall_clock_ms();
        let mut index = self.index.lock();
        let mut held_tokens = self.held_tokens.lock();
        for (id, record) in records {
            let job = index.entry(id.clone()).or_insert_with(|| Job::empty(now));
            job.apply(record);
            if job.complete() {
                held_tokens.remove(&id);
            }
        }
        Ok(())
    }

    /// Forgets the jobs past their retention, and gives back the queued
    /// tokens of those past their deadline; blocking.
    fn sweep(&self) {
        let now = warren_amqp::wall_clock_ms();
        let expired: Vec<String> = {
            let mut index = self.index.lock();

            let expired: Vec<String> = index
                .iter()
                .filter(|(_, job)| job.forget_at_ms(self.config.retention) <= now)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                index.remove(id);
            }
            self.held_tokens.lock().retain(|id, _| {
                index.get(id).is_some_and(|job| {
                    let deadline = job.submission.as_ref().and_then(|s| s.deadline_ms);
                    deadline.is_none_or(|deadline| now < deadline)
                })
            });
            expired
        };
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        for id in expired {
            let path = self.path(&id);
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "could not remove an expired job");
            }
        }
    }

    /// Forgets a job now; false when there was none.
    fn forget(&self, id: &str) -> std::io::Result<bool> {
        self.held_tokens.lock().remove(id);
        if self.index.lock().remove(id).is_none() {
            return Ok(false);
        }
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match std::fs::remove_file(self.path(id)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(true),
        }
    }
}

/// Reads a job's file, cutting a torn last line off.
fn read_job(path: &Path, now_ms: u64) -> std::io::Result<Job> {
    let text = std::fs::read(path)?;
    let whole = text
        .iter()
        .rposition(|byte| *byte == b'\n')
        .map_or(0, |end| end + 1);
    if whole < text.len() {
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(whole as u64)?;
    }
    let mut job = Job::empty(now_ms);
    for line in text[..whole].split(|byte| *byte == b'\n') {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Record>(line) {
            Ok(record) => job.apply(record),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "skipping an unreadable job record");
            }
        }
    }
    Ok(job)
}

/// The results' bodies in a job's file, in part order.
fn read_parts(path: &Path) -> std::io::Result<Vec<Part>> {
    let text = std::fs::read(path)?;
    let mut parts: Vec<Part> = text
        .split(|byte| *byte == b'\n')
        .filter_map(|line| match serde_json::from_slice::<Record>(line) {
            Ok(Record::Part(part)) => Some(part),
            _ => None,
        })
        .collect();
    parts.sort_by_key(|part| part.index);
    parts.dedup_by_key(|part| part.index);
    Ok(parts)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn id_of_file_stem(stem: &str) -> Option<String> {
    if !stem.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..stem.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(stem.get(at..at + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// A new job id: 128 random bits, in hex.
pub fn new_job_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    hex(&bytes)
}

/// Whether the `Prefer` header asks for an asynchronous answer (RFC 7240).
pub fn prefers_async(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|preference| {
            preference
                .split(';')
                .next()
                .is_some_and(|token| token.trim().eq_ignore_ascii_case("respond-async"))
        })
}

/// Consumes the job queue and stores each result before acknowledging it,
/// until `shutdown`; reconsumes after a failure.
pub async fn collect_results(state: AppState, mut shutdown: watch::Receiver<bool>) {
    let Some(jobs) = state.jobs.clone() else {
        return;
    };
    let mut sweep = tokio::time::interval(
        (jobs.config.retention / 4).clamp(Duration::from_millis(100), SWEEP_INTERVAL_MAX),
    );
    loop {
        // The queue is the workers' to declare (they publish to it): a
        // broker without models has none, and no session waits on it.
        let queue_exists = || {
            state
                .hub
                .read()
                .broker()
                .queue_info("/", &jobs.config.queue)
                .is_some()
        };
        while !queue_exists() {
            if *shutdown.borrow() {
                return;
            }
            let mut sweep_due = false;
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                _ = sweep.tick() => sweep_due = true,
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            if sweep_due {
                let store = std::sync::Arc::clone(&jobs);
                let _ = tokio::task::spawn_blocking(move || store.sweep()).await;
            }
        }
        let consumed = async {
            let mut session = consume_job_queue(&state, &jobs.config.queue).await?;
            loop {
                tokio::select! {
                    event = session.next_event() => {
                        let first = event.map_err(|error| error.reply_text())?;
                        store_round(&jobs, &mut session, first).await?;
                    }
                    _ = sweep.tick() => {
                        let store = std::sync::Arc::clone(&jobs);
                        let _ = tokio::task::spawn_blocking(move || store.sweep()).await;
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        };
        tokio::select! {
            result = consumed => {
                if let Err(reason) = result {
                    tracing::warn!(queue = %jobs.config.queue, %reason,
                        "the job store stopped consuming its queue; consuming again");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// A session as the broker's own identity, consuming the job queue.
async fn consume_job_queue(state: &AppState, queue_name: &str) -> Result<DirectSession, String> {
    let mut session = state
        .direct
        .open(DirectLogin {
            user: warren_access::INTERNAL_USER,
            vhost: "/",
            peer: state.node.http_address,
            local: state.node.http_address,
            name: "job store",
        })
        .map_err(|error| error.to_string())?;
    session
        .qos(RESULTS_PER_ROUND_MAX)
        .await
        .map_err(|error| error.reply_text())?;
    let consume = basic::Consume {
        queue: queue_name.into(),
        consumer_tag: "warren-job-store".into(),
        ..basic::Consume::default()
    };
    session
        .call(AMQPClass::Basic(basic::AMQPMethod::Consume(consume)))
        .await
        .map_err(|error| error.reply_text())?;
    Ok(session)
}

/// Stores `first` and every result already waiting behind it, then acks
/// them all with one multiple ack.
async fn store_round(
    jobs: &std::sync::Arc<Jobs>,
    session: &mut DirectSession,
    first: Event,
) -> Result<(), String> {
    let mut events = vec![first];
    while events.len() < usize::from(RESULTS_PER_ROUND_MAX) {
        match session.next_event().now_or_never() {
            Some(event) => events.push(event.map_err(|error| error.reply_text())?),
            None => break,
        }
    }
    let mut last_tag = None;
    let mut results = Vec::with_capacity(events.len());
    for event in events {
        let Event::Delivery(delivery) = event else {
            return Err("the broker cancelled the job store's consumer".to_owned());
        };
        last_tag = Some(delivery.delivery_tag);
        match result_of(&delivery.message) {
            Some(result) => results.push(result),
            None => tracing::warn!(
                "dropping a message on the job queue with no usable message_id \
                 (1 to {JOB_ID_MAX_BYTES} bytes of text)"
            ),
        }
    }
    let store = std::sync::Arc::clone(jobs);
    tokio::task::spawn_blocking(move || store.store_results(results))
        .await
        .expect("storing results does not panic")
        .map_err(|error| format!("writing results failed: {error}"))?;
    if let Some(delivery_tag) = last_tag {
        let ack = basic::Ack {
            delivery_tag,
            multiple: true,
        };
        session
            .send(AMQPClass::Basic(basic::AMQPMethod::Ack(ack)))
            .map_err(|error| error.reply_text())?;
    }
    Ok(())
}

/// A result message as a job's part: its id, index and count from the
/// message, its model and error from the worker's headers.
fn result_of(message: &warren_core::Message) -> Option<(String, Part)> {
    let properties = &message.properties;
    let id = properties.message_id().as_ref()?.as_str().to_owned();
    if id.is_empty() || id.len() > JOB_ID_MAX_BYTES {
        return None;
    }
    let headers = properties.headers().clone().unwrap_or_default();
    let header = |name: &str| headers.inner().get(name).cloned();
    let text = |value: Option<AMQPValue>| match value? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    };
    let number = |value: Option<AMQPValue>| -> Option<usize> {
        match value? {
            AMQPValue::LongInt(n) => usize::try_from(n).ok(),
            AMQPValue::LongLongInt(n) => usize::try_from(n).ok(),
            AMQPValue::LongUInt(n) => Some(n as usize),
            AMQPValue::ShortInt(n) => usize::try_from(n).ok(),
            AMQPValue::ShortShortInt(n) => usize::try_from(n).ok(),
            _ => None,
        }
    };
    let parts = number(header(PARTS_HEADER)).unwrap_or(1).max(1);
    let index = number(header(PART_HEADER)).unwrap_or(0);
    Some((
        id,
        Part {
            index,
            parts,
            model: text(header("x-warren-model")),
            version: text(header("x-warren-model-version")),
            error: text(header("x-warren-error")),
            body: String::from_utf8_lossy(&message.body).into_owned(),
            stored_ms: warren_amqp::wall_clock_ms(),
        },
    ))
}

/// Headers that make a request part of a job.
pub fn part_headers(headers: &mut FieldTable, index: usize, parts: usize) {
    headers.insert(PART_HEADER.into(), AMQPValue::LongInt(index as i32));
    headers.insert(PARTS_HEADER.into(), AMQPValue::LongInt(parts as i32));
}

fn store_of(state: &AppState) -> ApiResult<&std::sync::Arc<Jobs>> {
    state.jobs.as_ref().ok_or_else(|| {
        ApiError::NotFound("this broker keeps no jobs (it has no data directory)".into())
    })
}

/// `GET /v2/jobs/{id}`.
pub async fn status(
    State(state): State<AppState>,
    _user: Credentials,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(describe(&state, &id).await?))
}

/// `DELETE /v2/jobs/{id}`: forgets the job and its result.
pub async fn forget(
    State(state): State<AppState>,
    _user: Credentials,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<StatusCode> {
    let jobs = std::sync::Arc::clone(store_of(&state)?);
    let key = id.clone();
    let forgotten = tokio::task::spawn_blocking(move || jobs.forget(&key))
        .await
        .expect("forgetting a job does not panic")
        .map_err(|error| ApiError::Internal(format!("removing job '{id}': {error}")))?;
    if forgotten {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no job '{id}'")))
    }
}

/// A job's status as JSON: where it is, and its result once it has one.
pub async fn describe(state: &AppState, id: &str) -> ApiResult<Value> {
    let jobs = store_of(state)?;
    let unknown = || ApiError::NotFound(format!("no job '{id}' (or it has expired)"));
    let job = jobs.index.lock().get(id).cloned().ok_or_else(unknown)?;
    let now = warren_amqp::wall_clock_ms();
    let (model_name, model_version) = match &job.submission {
        Some(submission) => (
            Some(submission.model.clone()),
            Some(submission.version.clone()),
        ),
        None => (job.model.clone(), job.version.clone()),
    };
    let mut answer = json!({
        "id": id,
        "model_name": model_name,
        "model_version": model_version,
        "parts": job.parts,
        "parts_done": job.done.len(),
        "submitted_ms": job.submission.as_ref().map(|submission| submission.submitted_ms),
        "completed_ms": job.completed_ms,
        "expires_ms": job.forget_at_ms(jobs.config.retention),
    });
    if let Some(reason) = &job.error {
        answer["status"] = json!("failed");
        answer["error"] = json!(reason);
        return Ok(answer);
    }
    if job.complete() {
        answer["status"] = json!("done");
        answer["result"] = result(state, jobs, id, &job).await?;
        return Ok(answer);
    }
    if let Some(deadline) = job
        .submission
        .as_ref()
        .and_then(|submission| submission.deadline_ms)
        && deadline <= now
    {
        answer["status"] = json!("failed");
        answer["error"] = json!("the request expired before the model answered it");
        return Ok(answer);
    }
    let Some(submission) = &job.submission else {
        answer["status"] = json!("running");
        return Ok(answer);
    };
    // Where the job stands: the requests ahead of it when it was queued,
    // less the deliveries from its queue since. An estimate: priorities
    // and redeliveries reorder a queue.
    let queue = state.hub.read().broker().queue_info("/", &submission.queue);
    let Some(queue) = queue else {
        answer["status"] = json!("queued");
        answer["position"] = Value::Null;
        answer["expected_wait_seconds"] = Value::Null;
        return Ok(answer);
    };
    let delivered = queue.counts.delivered + queue.counts.got;
    let baseline = {
        let mut index = jobs.index.lock();
        let entry = index.get_mut(id).ok_or_else(unknown)?;
        *entry.baseline.get_or_insert(Baseline {
            // Looked at first since a restart: everything waiting may be
            // ahead of it.
            ahead: (queue.ready as u64).saturating_sub(job.parts as u64),
            delivered,
        })
    };
    let since = delivered.saturating_sub(baseline.delivered);
    let service_rate = backlog::of_queue(state, &queue).service_rate;
    if since <= baseline.ahead && job.done.is_empty() {
        let position = baseline.ahead - since;
        answer["status"] = json!("queued");
        answer["position"] = json!(position);
        answer["expected_wait_seconds"] = wait(position + job.parts as u64, service_rate);
    } else {
        answer["status"] = json!("running");
        answer["expected_wait_seconds"] = wait((job.parts - job.done.len()) as u64, service_rate);
    }
    Ok(answer)
}

fn wait(requests: u64, service_rate: f64) -> Value {
    if service_rate > 0.0 {
        json!(requests as f64 / service_rate)
    } else {
        Value::Null
    }
}

/// A finished job's result: the KServe response the synchronous call
/// would have given, read from the job's file.
async fn result(state: &AppState, jobs: &Jobs, id: &str, job: &Job) -> ApiResult<Value> {
    let path = jobs.path(id);
    let parts = tokio::task::spawn_blocking(move || read_parts(&path))
        .await
        .expect("reading a job does not panic")
        .map_err(|error| ApiError::Internal(format!("reading job '{id}': {error}")))?;
    let replies: Vec<Reply> = parts
        .into_iter()
        .map(|part| Reply {
            body: part.body.into_bytes(),
            error: part.error,
        })
        .collect();
    let (name, version) = match &job.submission {
        Some(submission) => (submission.model.clone(), Some(submission.version.clone())),
        None => (job.model.clone().unwrap_or_default(), job.version.clone()),
    };
    // The task decides how replies make a response; a version no longer
    // served is read as the model's newest.
    let model = inference::find_model(state, &name, version.as_deref())
        .or_else(|_| inference::find_model(state, &name, None));
    let Ok(model) = model else {
        // No such model here (a job a remote worker answered): the
        // replies as they came.
        let bodies: Vec<Value> = replies
            .iter()
            .map(|reply| {
                serde_json::from_slice(&reply.body)
                    .unwrap_or_else(|_| json!(String::from_utf8_lossy(&reply.body)))
            })
            .collect();
        return Ok(json!({ "replies": bodies }));
    };
    let mut response = inference::response_for(&model, replies)?;
    response["model_name"] = json!(name);
    response["model_version"] = json!(version.unwrap_or(model.version));
    if let Some(submission) = &job.submission {
        if let Some(request_id) = &submission.request_id {
            response["id"] = request_id.clone();
        }
        response = submission.outputs.select(response)?;
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, retention: Duration) -> Jobs {
        Jobs::open(JobsConfig {
            dir: dir.to_owned(),
            queue: "warren.jobs".to_owned(),
            retention,
            jobs_max: 10,
        })
        .expect("the store opens")
    }

    fn part(index: usize, parts: usize, error: Option<&str>) -> Part {
        Part {
            index,
            parts,
            model: Some("m".to_owned()),
            version: Some("1".to_owned()),
            error: error.map(str::to_owned),
            body: format!("[{index}]"),
            stored_ms: warren_amqp::wall_clock_ms(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("warren-jobs-{name}-{}", new_job_id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_job_is_complete_when_every_part_is_stored_and_survives_reopening() {
        let dir = temp_dir("complete");
        let jobs = store(&dir, Duration::from_secs(3600));
        jobs.store_results(vec![("job-1".into(), part(1, 2, None))])
            .unwrap();
        assert!(!jobs.index.lock()["job-1"].complete());
        // A redelivered part is stored twice and counted once.
        jobs.store_results(vec![("job-1".into(), part(1, 2, None))])
            .unwrap();
        assert!(!jobs.index.lock()["job-1"].complete());
        jobs.store_results(vec![("job-1".into(), part(0, 2, None))])
            .unwrap();
        assert!(jobs.index.lock()["job-1"].complete());
        drop(jobs);

        let reopened = store(&dir, Duration::from_secs(3600));
        let job = reopened.index.lock()["job-1"].clone();
        assert!(job.complete() && job.completed_ms.is_some(), "{job:?}");
        let bodies: Vec<String> = read_parts(&reopened.path("job-1"))
            .unwrap()
            .into_iter()
            .map(|part| part.body)
            .collect();
        assert_eq!(bodies, ["[0]", "[1]"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_appends_continue_after_it() {
        let dir = temp_dir("torn");
        let jobs = store(&dir, Duration::from_secs(3600));
        jobs.store_results(vec![("j".into(), part(0, 2, None))])
            .unwrap();
        let path = jobs.path("j");
        drop(jobs);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"part\":{\"index\":1,").unwrap();
        drop(file);

        let reopened = store(&dir, Duration::from_secs(3600));
        assert_eq!(reopened.index.lock()["j"].done.len(), 1);
        reopened
            .store_results(vec![("j".into(), part(1, 2, None))])
            .unwrap();
        drop(reopened);
        let again = store(&dir, Duration::from_secs(3600));
        assert!(again.index.lock()["j"].complete());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_refused_part_fails_the_job_and_ended_jobs_are_forgotten_after_retention() {
        let dir = temp_dir("retention");
        let jobs = store(&dir, Duration::ZERO);
        jobs.store_results(vec![("bad".into(), part(0, 3, Some("not UTF-8")))])
            .unwrap();
        let job = jobs.index.lock()["bad"].clone();
        assert!(job.complete() && job.error.as_deref() == Some("not UTF-8"));
        assert!(jobs.path("bad").exists());
        jobs.sweep();
        assert!(jobs.index.lock().is_empty());
        assert!(!jobs.path("bad").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ids_name_files_and_read_back() {
        for id in ["a", "0f2c-ÿ", "job/../../etc"] {
            let stem = hex(id.as_bytes());
            assert!(stem.bytes().all(|byte| byte.is_ascii_hexdigit()));
            assert_eq!(id_of_file_stem(&stem).as_deref(), Some(id));
        }
        assert_eq!(id_of_file_stem("abc"), None);
        assert_eq!(id_of_file_stem("zz"), None);
    }

    #[test]
    fn respond_async_is_read_from_the_prefer_header() {
        let mut headers = axum::http::HeaderMap::new();
        assert!(!prefers_async(&headers));
        headers.insert("prefer", "wait=5, Respond-Async".parse().unwrap());
        assert!(prefers_async(&headers));
        headers.insert("prefer", "return=minimal".parse().unwrap());
        assert!(!prefers_async(&headers));
    }
}
