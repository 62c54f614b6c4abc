//! Models on queues, end to end: `warren serve` with a `[[model]]` serving
//! all-MiniLM-L6-v2, and `warren worker` as a separate process, driven by a
//! real client. The model comes from `scripts/fetch-models.sh`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Broker, next_delivery, within};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

const QUEUE: &str = "embed";
const DEAD_LETTER_QUEUE: &str = "embed.dead-letter";
const FOOD: &str = "A man is eating food.";
const BREAD: &str = "A man is eating a piece of bread.";
const MARKET: &str = "The stock market fell today.";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    let dir = repository().join("models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.onnx").exists(),
        "{} has no model; run `bash scripts/fetch-models.sh`",
        dir.display()
    );
    dir.canonicalize().expect("model directory")
}

/// ONNX Runtime: ORT_DYLIB_PATH, or the library `scripts/fetch-models.sh`
/// put in the repository's virtualenv.
fn onnxruntime_library() -> PathBuf {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(path);
    }
    let venv = repository().join(".venv/lib");
    std::fs::read_dir(&venv)
        .ok()
        .and_then(|pythons| {
            pythons.flatten().find_map(|python| {
                let capi = python.path().join("site-packages/onnxruntime/capi");
                std::fs::read_dir(capi).ok()?.flatten().find_map(|entry| {
                    let path = entry.path();
                    let name = path.file_name()?.to_str()?.to_owned();
                    name.starts_with("libonnxruntime.so.").then_some(path)
                })
            })
        })
        .expect("ONNX Runtime in .venv; run `bash scripts/fetch-models.sh`")
}

fn model_config(batch_size_max: usize, batch_delay_max_ms: u64) -> String {
    model_config_with(batch_size_max, batch_delay_max_ms, "")
}

/// The model entry with `extra` keys added to it.
fn model_config_with(batch_size_max: usize, batch_delay_max_ms: u64, extra: &str) -> String {
    let dir = model_dir();
    format!(
        r#"
[[model]]
name = "minilm"
version = "test-1"
path = "{model}"
tokenizer = "{tokenizer}"
task = "embedding"
queue = "{QUEUE}"
max_tokens = 256
batch_size_max = {batch_size_max}
batch_delay_max_ms = {batch_delay_max_ms}
{extra}

[model.runtime]
backend = "onnxruntime"
onnxruntime_library = "{library}"
"#,
        model = dir.join("model.onnx").display(),
        tokenizer = dir.join("tokenizer.json").display(),
        library = onnxruntime_library().display(),
    )
}

/// Waits until a worker consumes from the model's queue (models load after
/// the broker announces itself). A passive declare of a queue not declared
/// yet closes its channel, so each attempt gets a channel of its own.
async fn wait_for_worker(connection: &lapin::Connection) {
    within("a model worker consuming", async {
        loop {
            let probe = connection.create_channel().await.expect("channel");
            let declared = probe
                .queue_declare(
                    QUEUE.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let _ = probe.close(200, "OK".into()).await;
            if declared.is_ok_and(|queue| queue.consumer_count() > 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn open(broker: &Broker) -> (lapin::Connection, Channel) {
    let connection = broker.connect().await;
    wait_for_worker(&connection).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    (connection, channel)
}

/// An exclusive, server-named reply queue and a no-ack consumer on it.
async fn reply_queue(channel: &Channel) -> (lapin::types::ShortString, lapin::Consumer) {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    (queue.name().clone(), consumer)
}

/// Polls `queue` with `basic.get` until a message is there.
async fn next_message(
    channel: &Channel,
    queue: &str,
    what: &str,
) -> lapin::message::BasicGetMessage {
    within(what, async {
        loop {
            if let Some(message) = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn request(channel: &Channel, body: &[u8], reply_to: &str, correlation_id: &str) {
    channel
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_reply_to(reply_to.into())
                .with_correlation_id(correlation_id.into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

fn vector(body: &[u8]) -> Vec<f32> {
    serde_json::from_slice(body).expect("a JSON array of floats")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn header(properties: &BasicProperties, key: &str) -> Option<AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(key).cloned())
}

fn as_integer(value: &AMQPValue) -> i64 {
    match value {
        AMQPValue::LongInt(v) => *v as i64,
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::ShortInt(v) => *v as i64,
        other => panic!("not an integer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedding_requests_get_replies_matching_onnx_runtime() {
    let broker = Broker::start_with_config(&model_config(8, 20)).await;
    let (_connection, channel) = open(&broker).await;
    let (reply_queue, mut consumer) = reply_queue(&channel).await;
    for (id, text) in [("food", FOOD), ("bread", BREAD), ("market", MARKET)] {
        request(&channel, text.as_bytes(), reply_queue.as_str(), id).await;
    }
    let mut vectors = HashMap::new();
    for _ in 0..3 {
        let reply = next_delivery(&mut consumer, "an embedding reply").await;
        let properties = &reply.properties;
        assert_eq!(
            properties.content_type().as_ref().map(|t| t.as_str()),
            Some("application/json")
        );
        assert_eq!(
            header(properties, "x-warren-model"),
            Some(AMQPValue::LongString("minilm".into()))
        );
        assert_eq!(
            header(properties, "x-warren-model-version"),
            Some(AMQPValue::LongString("test-1".into()))
        );
        let batch = as_integer(&header(properties, "x-warren-batch-size").expect("batch size"));
        assert!((1..=3).contains(&batch), "batch size {batch}");
        assert!(header(properties, "x-warren-inference-us").is_some());
        let id = properties
            .correlation_id()
            .as_ref()
            .expect("correlation id kept")
            .to_string();
        vectors.insert(id, vector(&reply.data));
    }
    assert_eq!(vectors["food"].len(), 384);
    let food_bread = cosine(&vectors["food"], &vectors["bread"]);
    let food_market = cosine(&vectors["food"], &vectors["market"]);
    assert!((food_bread - 0.7535).abs() < 1e-3, "{food_bread}");
    assert!((food_market - -0.012).abs() < 1e-3, "{food_market}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_batched_and_each_request_answered_once_through_direct_reply_to() {
    let broker = Broker::start_with_config(&model_config(16, 200)).await;
    let (_connection, channel) = open(&broker).await;
    let mut consumer = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume direct replies");
    const REQUESTS: usize = 48;
    let mut confirms = Vec::new();
    for index in 0..REQUESTS {
        confirms.push(
            channel
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    format!("request number {index}").as_bytes(),
                    BasicProperties::default()
                        .with_reply_to("amq.rabbitmq.reply-to".into())
                        .with_correlation_id(index.to_string().into()),
                )
                .await
                .expect("publish"),
        );
    }
    for confirm in confirms {
        confirm.await.expect("confirm");
    }
    let mut answered: HashMap<String, usize> = HashMap::new();
    let mut largest_batch = 0;
    for _ in 0..REQUESTS {
        let reply = next_delivery(&mut consumer, "a direct reply").await;
        let id = reply
            .properties
            .correlation_id()
            .clone()
            .expect("id")
            .to_string();
        *answered.entry(id).or_default() += 1;
        largest_batch = largest_batch.max(as_integer(
            &header(&reply.properties, "x-warren-batch-size").expect("batch size"),
        ));
    }
    assert_eq!(answered.len(), REQUESTS, "every request answered");
    assert!(answered.values().all(|count| *count == 1));
    assert!(
        largest_batch > 1 && largest_batch <= 16,
        "a burst is batched, within batch_size_max: {largest_batch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inputs_are_dead_lettered_with_a_reason_and_not_retried() {
    let broker = Broker::start_with_config(&model_config(8, 5)).await;
    let (_connection, channel) = open(&broker).await;
    let (reply_queue, mut consumer) = reply_queue(&channel).await;
    let reply_to = reply_queue.as_str();
    request(&channel, b"\xff\xfe not text", reply_to, "poison").await;
    request(&channel, FOOD.as_bytes(), reply_to, "fine").await;
    // Both get a reply: the poison request its reason (JSON with the
    // x-warren-error header), the good one behind it its embedding.
    let mut replies = std::collections::HashMap::new();
    for _ in 0..2 {
        let reply = next_delivery(&mut consumer, "a reply").await;
        let id = reply
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.to_string())
            .expect("replies carry the request's correlation id");
        assert!(replies.insert(id, reply).is_none(), "one reply per request");
    }
    let refusal = &replies["poison"];
    match header(&refusal.properties, "x-warren-error") {
        Some(AMQPValue::LongString(reason)) => {
            assert!(String::from_utf8_lossy(reason.as_bytes()).contains("UTF-8"))
        }
        other => panic!("the poison reply has no x-warren-error header: {other:?}"),
    }
    let body: serde_json::Value = serde_json::from_slice(&refusal.data).expect("JSON");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|reason| reason.contains("UTF-8"))
    );
    let answer: Vec<f32> = serde_json::from_slice(&replies["fine"].data).expect("an embedding");
    assert_eq!(answer.len(), 384);
    let dead = next_message(
        &channel,
        DEAD_LETTER_QUEUE,
        "the poison request dead-lettered",
    )
    .await;
    assert_eq!(dead.data, b"\xff\xfe not text");
    match header(&dead.properties, "x-warren-error") {
        Some(AMQPValue::LongString(reason)) => {
            let reason = String::from_utf8_lossy(reason.as_bytes()).into_owned();
            assert!(reason.contains("UTF-8"), "{reason}");
        }
        other => panic!("no x-warren-error header: {other:?}"),
    }
    assert_eq!(
        dead.properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("poison")
    );
    // Only the poison request is there, once: it was acked, not requeued.
    let queue = channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("model queue");
    assert_eq!(queue.message_count(), 0);
    assert!(
        channel
            .basic_get(DEAD_LETTER_QUEUE.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .is_none()
    );
    // The model's metrics counted both, and say so when the broker stops.
    broker.terminate_and_assert_clean_exit().await;
    let summary = broker
        .log()
        .lines()
        .find(|line| line.contains("model served"))
        .map(str::to_owned)
        .expect("a model summary at shutdown");
    assert!(summary.contains("requests=2"), "{summary}");
    assert!(summary.contains("poison=1"), "{summary}");
    assert!(summary.contains("replies=1"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_also_published_to_the_result_exchange() {
    let broker = Broker::start_with_config(&model_config_with(
        8,
        5,
        "result_exchange = \"results\"\nresult_routing_key = \"embeddings\"",
    ))
    .await;
    // The worker waits (retrying) until the operator's exchange exists.
    let setup = broker.connect().await;
    let channel = setup.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "results".into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("result exchange");
    channel
        .queue_declare(
            "stored-results".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("result queue");
    channel
        .queue_bind(
            "stored-results".into(),
            "results".into(),
            "embeddings".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let (_connection, requests) = open(&broker).await;
    // No reply_to: the result goes only to the result exchange.
    requests
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            FOOD.as_bytes(),
            BasicProperties::default().with_correlation_id("stored".into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let result = next_message(&channel, "stored-results", "the result in the result queue").await;
    assert_eq!(vector(&result.data).len(), 384);
    assert_eq!(
        *result.properties.delivery_mode(),
        Some(2),
        "results are persistent"
    );
    assert_eq!(
        result
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("stored")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_inference_keeps_failing_is_retried_then_dead_lettered() {
    let model = repository()
        .join("tests/models/reshape-2x2.onnx")
        .canonicalize()
        .expect("model");
    let config = format!(
        r#"
[[model]]
name = "reshape"
path = "{model}"
task = "tensor"
queue = "{QUEUE}"
delivery_limit = 2
batch_size_max = 1
"#,
        model = model.display()
    );
    let broker = Broker::start_with_config(&config).await;
    let (_connection, channel) = open(&broker).await;
    let failing = serde_json::json!({"inputs": [
        {"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}
    ]});
    let working = serde_json::json!({"inputs": [
        {"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    ]});
    request(
        &channel,
        &serde_json::to_vec(&failing).expect("JSON"),
        "nobody",
        "fails",
    )
    .await;
    let dead = next_message(
        &channel,
        DEAD_LETTER_QUEUE,
        "the failing request dead-lettered",
    )
    .await;
    // The broker dead-lettered it past the queue's delivery limit, after
    // the worker had requeued it each time.
    assert_eq!(
        header(&dead.properties, "x-first-death-reason"),
        Some(AMQPValue::LongString("delivery_limit".into()))
    );
    assert_eq!(
        dead.properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("fails")
    );
    // The worker carries on with the next request.
    let (reply_queue, mut consumer) = reply_queue(&channel).await;
    request(
        &channel,
        &serde_json::to_vec(&working).expect("JSON"),
        reply_queue.as_str(),
        "works",
    )
    .await;
    let reply = next_delivery(&mut consumer, "the working request's reply").await;
    let body: serde_json::Value = serde_json::from_slice(&reply.data).expect("JSON");
    assert_eq!(body["outputs"][0]["shape"], serde_json::json!([2, 2]));
}

/// A `warren worker` process serving the broker at `url`.
struct WorkerProcess {
    child: Child,
    _config: tempfile_path::TempConfig,
}

mod tempfile_path {
    use std::path::PathBuf;

    /// A config file removed on drop.
    pub struct TempConfig(pub PathBuf);

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

impl WorkerProcess {
    fn start(url: &str, config: &str, name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("warren-worker-{}-{name}.toml", std::process::id()));
        std::fs::write(&path, config).expect("worker config");
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("worker")
            .arg("--broker")
            .arg(url)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn warren worker");
        Self {
            child,
            _config: tempfile_path::TempConfig(path),
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_loses_no_request() {
    let broker = Broker::start().await;
    let config = model_config(8, 50);
    let mut first = WorkerProcess::start(&broker.amqp_url(), &config, "first");
    let (_connection, channel) = open(&broker).await;
    let (reply_queue, mut consumer) = reply_queue(&channel).await;
    const REQUESTS: usize = 200;
    // Long texts (about 200 tokens) keep the worker busy for a while.
    let filler = "the quick brown fox jumps over the lazy dog ".repeat(20);
    for index in 0..REQUESTS {
        request(
            &channel,
            format!("text number {index}: {filler}").as_bytes(),
            reply_queue.as_str(),
            &index.to_string(),
        )
        .await;
    }
    // Kill the worker once it has answered some, while it holds others.
    let mut answered: HashMap<String, usize> = HashMap::new();
    while answered.len() < 20 {
        let reply = next_delivery(&mut consumer, "a reply before the kill").await;
        let id = reply
            .properties
            .correlation_id()
            .clone()
            .expect("id")
            .to_string();
        *answered.entry(id).or_default() += 1;
    }
    first.kill9();
    // Work was left: requests still wait (or came back) in the queue.
    let probe = channel.clone();
    let waiting = probe
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("model queue")
        .message_count();
    assert!(
        waiting > 0,
        "the first worker finished everything before the kill"
    );
    let _second = WorkerProcess::start(&broker.amqp_url(), &config, "second");
    while answered.len() < REQUESTS {
        let reply = next_delivery(&mut consumer, "a reply after the restart").await;
        let id = reply
            .properties
            .correlation_id()
            .clone()
            .expect("id")
            .to_string();
        *answered.entry(id).or_default() += 1;
    }
    // Every request is answered; one answered twice can only be one whose
    // reply went out just before the kill, before its ack.
    let duplicates = answered.values().filter(|count| **count > 1).count();
    assert!(duplicates <= 16, "{duplicates} requests answered twice");
}

/// The in-process workers log in as the broker's own identity, not as
/// guest: an operator deleting guest (which closes guest's connections)
/// leaves the model answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_workers_survive_guest_being_deleted() {
    let config = format!(
        r#"
[[users]]
name = "operator"
password = "operator-password"
tags = ["administrator"]

[[permissions]]
user = "operator"
configure = ".*"
write = ".*"
read = ".*"
{}"#,
        model_config(8, 20)
    );
    let broker = Broker::start_with_config(&config).await;
    let operator_url = broker.url_for("operator", "operator-password", "%2f");
    let connection = broker.connect_url(&operator_url).await;
    wait_for_worker(&connection).await;

    let deleted = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["ctl", "--url"])
        .arg(format!("http://{}", broker.http_addr()))
        .args(["--user", "operator", "--password", "operator-password"])
        .args(["delete-user", "guest"])
        .output()
        .expect("run warren ctl");
    assert!(
        deleted.status.success(),
        "warren ctl delete-user guest: {}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    assert!(
        broker.try_connect_url(&broker.amqp_url()).await.is_err(),
        "guest is gone"
    );

    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let (reply_queue, mut consumer) = reply_queue(&channel).await;
    request(&channel, FOOD.as_bytes(), reply_queue.as_str(), "food").await;
    let reply = next_delivery(&mut consumer, "a reply after guest was deleted").await;
    assert_eq!(vector(&reply.data).len(), 384);
    let log = broker.log();
    assert!(
        log.contains("user deleted user=guest connections_closed=0"),
        "guest had no connection to close, the workers' included:\n{log}"
    );
    assert!(
        log.contains("user=warren-internal vhost=/"),
        "the workers logged in as the broker's own identity:\n{log}"
    );
}
