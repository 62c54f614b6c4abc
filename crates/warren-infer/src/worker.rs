//! The model worker: consumes a model's queue over AMQP 0-9-1, batches
//! requests dynamically, runs one inference per batch, replies, and only
//! then acknowledges. It talks to any AMQP broker (Warren in-process, or
//! RabbitMQ) and knows nothing of Warren's internals.
//!
//! Delivery guarantees:
//! * A request is acked only after its reply (or its dead letter) has been
//!   confirmed by the broker, so a worker killed mid-batch loses nothing:
//!   its unacked requests are redelivered to another worker.
//! * A body the task cannot decode is poison: it is published to the
//!   dead-letter queue with an `x-warren-error` header and acked, never
//!   retried.
//! * A batch whose inference fails is nacked with requeue; the queue's
//!   delivery limit (a quorum queue's `x-delivery-limit`) dead-letters a
//!   request that keeps failing.
//!
//! Where an answer goes: to the request's `reply_to`; or, for a request
//! with a `message_id` and no `reply_to` (a job, whose caller fetches the
//! result later), to the job queue as a persistent message under that id,
//! which Warren's job store keeps (and which any other consumer can read
//! from RabbitMQ); and to the result exchange when one is configured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::watch;

use crate::metrics::{ModelMetrics, add};
use crate::schedule::HeldRequests;
use crate::task::{Decoded, Task};

/// Requests one worker instance may hold unacked beyond the batch it is
/// running: one more batch, so the next batch is ready when this one ends.
const PREFETCH_BATCHES: u16 = 2;

/// Redeliveries a request whose inference keeps failing gets before the
/// queue dead-letters it (`x-delivery-limit` of the model's queue).
pub const DELIVERY_LIMIT_DEFAULT: u32 = 5;

/// Where the results of jobs go unless configured otherwise: the queue
/// Warren's job store consumes.
pub const JOB_QUEUE_DEFAULT: &str = "warren.jobs";

/// Request headers a job's parts carry (a job of several inputs is one
/// message per input), copied to each result so that the job store can
/// tell when a job is complete.
pub const JOB_PART_HEADER: &str = "x-warren-job-part";
pub const JOB_PARTS_HEADER: &str = "x-warren-job-parts";

/// What one worker serves and how it batches.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub broker_url: String,
    pub model: String,
    pub model_version: String,
    pub queue: String,
    /// Where poison inputs and requests past the delivery limit go.
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    /// `x-max-length` of the model's queue, with `x-overflow =
    /// reject-publish`.
    pub queue_length_max: Option<u32>,
    pub batch_size_max: usize,
    pub batch_delay_max: Duration,
    /// The most a batch may cost in all (tokens, for a text model).
    pub batch_cost_max: Option<usize>,
    /// Also (or instead of replying) publish every result here.
    pub result_exchange: Option<String>,
    pub result_routing_key: Option<String>,
    /// Where the results of jobs (requests with a `message_id` and no
    /// `reply_to`) go, as persistent messages; declared durable.
    pub job_queue: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("AMQP {operation} failed: {source}")]
    Amqp {
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("the broker refused a {0}")]
    Refused(&'static str),
}

fn amqp(operation: &'static str) -> impl FnOnce(lapin::Error) -> WorkerError {
    move |source| WorkerError::Amqp { operation, source }
}

/// Declares the model's queue and its dead-letter queue if they do not
/// exist. The model queue is a quorum queue so that the broker counts
/// redeliveries and dead-letters a request that keeps failing.
pub async fn declare_queues(
    connection: &Connection,
    config: &WorkerConfig,
) -> Result<(), WorkerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    if let Some(exchange) = &config.result_exchange {
        // Results go to an exchange the operator set up; a missing one is a
        // configuration error, reported here rather than on the first reply.
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("exchange.declare (result exchange)"))?;
    }
    channel
        .queue_declare(
            config.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp("queue.declare (dead-letter queue)"))?;
    channel
        .queue_declare(
            config.job_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(amqp("queue.declare (job queue)"))?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(config.delivery_limit as i32),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(config.dead_letter_queue.as_str().into()),
    );
    if let Some(length) = config.queue_length_max {
        arguments.insert("x-max-length".into(), AMQPValue::LongInt(length as i32));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
    let declared = channel
        .queue_declare(
            config.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(())
        }
        // The operator declared the queue beforehand with other arguments:
        // it is used as it is, once a passive declare (on a new channel:
        // the refusal closed this one) shows it is there.
        Err(_) => {
            let channel = connection
                .create_channel()
                .await
                .map_err(amqp("channel.open"))?;
            channel
                .queue_declare(
                    config.queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("queue.declare (model queue)"))?;
            let _ = channel.close(200, "OK".into()).await;
            Ok(())
        }
    }
}

/// Serves the model's queue until `shutdown` turns true or the connection
/// fails.
pub async fn run(
    config: WorkerConfig,
    task: Arc<dyn Task>,
    metrics: Arc<ModelMetrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let connection = Connection::connect(&config.broker_url, ConnectionProperties::default())
        .await
        .map_err(amqp("connect"))?;
    declare_queues(&connection, &config).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("channel.open"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp("confirm.select"))?;
    let prefetch = (config.batch_size_max as u16).saturating_mul(PREFETCH_BATCHES);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("basic.qos"))?;
    let mut deliveries = channel
        .basic_consume(
            config.queue.as_str().into(),
            format!("warren-worker-{}", config.model).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("basic.consume"))?;
    tracing::info!(model = %config.model, queue = %config.queue, backend = task.backend(),
        batch_size_max = config.batch_size_max, "model worker consuming");
    let mut held: HeldRequests<HeldRequest> = HeldRequests::default();
    loop {
        // Wait for a first request, unless some are held already.
        if held.is_empty() {
            let first = tokio::select! {
                next = deliveries.next() => next,
                _ = shutdown.changed() => break,
            };
            let Some(first) = first else { break };
            let first = first.map_err(amqp("basic.deliver"))?;
            accept(&channel, &config, &task, &metrics, &mut held, first).await?;
            continue;
        }
        // Take more until the batch is full or the oldest request held has
        // waited the batch delay...
        let oldest = held
            .iter()
            .map(|held| held.item.arrived)
            .min()
            .expect("requests are held");
        let deadline = oldest + config.batch_delay_max;
        while held.len() < config.batch_size_max {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(delivery)) => {
                    let delivery = delivery.map_err(amqp("basic.deliver"))?;
                    accept(&channel, &config, &task, &metrics, &mut held, delivery).await?;
                }
                Ok(None) | Err(_) => break,
            }
        }
        // ...and whatever has arrived meanwhile joins the choice, so that a
        // request of higher priority does not wait for the next batch.
        while let Some(Some(delivery)) = deliveries.next().now_or_never() {
            let delivery = delivery.map_err(amqp("basic.deliver"))?;
            accept(&channel, &config, &task, &metrics, &mut held, delivery).await?;
        }
        for expired in held.take_expired(unix_ms()) {
            add(&metrics.expired, 1);
            dead_letter(
                &channel,
                &config,
                expired.delivery,
                "the request expired before the model ran it",
            )
            .await?;
        }
        let batch = held.take_batch(config.batch_size_max, config.batch_cost_max);
        if batch.is_empty() {
            continue;
        }
        let now_ms = unix_ms();
        for request in &batch {
            if let Some(published_ms) = published_at_ms(&request.delivery) {
                metrics
                    .queue_wait_us
                    .observe(now_ms.saturating_sub(published_ms) * 1_000);
            }
        }
        if let Some(first_arrived) = batch.iter().map(|request| request.arrived).min() {
            metrics
                .batch_wait_us
                .observe(first_arrived.elapsed().as_micros() as u64);
        }
        serve_batch(&channel, &config, &task, &metrics, batch).await?;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

/// A request the worker holds: decoded, waiting for a batch.
struct HeldRequest {
    delivery: Delivery,
    input: Decoded,
    arrived: tokio::time::Instant,
}

/// Takes a delivery into the held requests, decoded; a body the task cannot
/// decode is dead-lettered at once.
async fn accept(
    channel: &Channel,
    config: &WorkerConfig,
    task: &Arc<dyn Task>,
    metrics: &ModelMetrics,
    held: &mut HeldRequests<HeldRequest>,
    delivery: Delivery,
) -> Result<(), WorkerError> {
    add(&metrics.requests, 1);
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|kind| kind.as_str().to_owned());
    match task.decode(&delivery.data, content_type.as_deref()) {
        Ok(input) => {
            // Counting tokens costs a tokenization: only for a budget.
            let cost = match config.batch_cost_max {
                Some(_) => task.cost(&input),
                None => 1,
            };
            let priority = delivery.properties.priority().unwrap_or(0);
            let expires_at_ms = expires_at_ms(&delivery);
            let request = HeldRequest {
                delivery,
                input,
                arrived: tokio::time::Instant::now(),
            };
            held.push(request, priority, expires_at_ms, cost);
            Ok(())
        }
        Err(reason) => {
            add(&metrics.poison, 1);
            dead_letter(channel, config, delivery, &reason).await
        }
    }
}

/// When a request with an `expiration` stops being worth answering: that
/// many milliseconds after it was published (its `timestamp_in_ms`
/// header, or its `timestamp` property), or, when it does not say, after
/// it reached this worker (the broker delivered it unexpired, so it had at
/// most that long left then).
fn expires_at_ms(delivery: &Delivery) -> Option<u64> {
    let expiration: u64 = delivery
        .properties
        .expiration()
        .as_ref()?
        .as_str()
        .parse()
        .ok()?;
    let published_ms = published_at_ms(delivery)
        .or_else(|| {
            delivery
                .properties
                .timestamp()
                .map(|seconds| seconds.saturating_mul(1_000))
        })
        .unwrap_or_else(unix_ms);
    Some(published_ms.saturating_add(expiration))
}

/// Infers, replies and acks one batch.
async fn serve_batch(
    channel: &Channel,
    config: &WorkerConfig,
    task: &Arc<dyn Task>,
    metrics: &ModelMetrics,
    batch: Vec<HeldRequest>,
) -> Result<(), WorkerError> {
    let (accepted, inputs): (Vec<Delivery>, Vec<Decoded>) = batch
        .into_iter()
        .map(|request| (request.delivery, request.input))
        .unzip();
    let batch_size = accepted.len();
    let started = Instant::now();
    let task = Arc::clone(task);
    let outcome = tokio::task::spawn_blocking(move || task.infer(inputs))
        .await
        .unwrap_or_else(|panic| {
            Err(crate::task::TaskError::Failed(format!(
                "the inference panicked: {panic}"
            )))
        });
    let inference_us = started.elapsed().as_micros() as i64;
    let replies = match outcome {
        Ok(replies) => {
            metrics.batch_size.observe(batch_size as u64);
            metrics.inference_us.observe(inference_us as u64);
            replies
        }
        Err(error) => {
            add(&metrics.failed_batches, 1);
            tracing::warn!(model = %config.model, %error, batch_size,
                "inference failed; the batch is requeued");
            for delivery in accepted {
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map_err(amqp("basic.nack"))?;
            }
            return Ok(());
        }
    };
    let mut confirms = Vec::with_capacity(batch_size * 2);
    for (delivery, reply) in accepted.iter().zip(replies) {
        let mut headers = FieldTable::default();
        headers.insert("x-warren-model".into(), text(&config.model));
        headers.insert("x-warren-model-version".into(), text(&config.model_version));
        headers.insert(
            "x-warren-batch-size".into(),
            AMQPValue::LongInt(batch_size as i32),
        );
        headers.insert(
            "x-warren-inference-us".into(),
            AMQPValue::LongLongInt(inference_us),
        );
        let mut properties = BasicProperties::default()
            .with_content_type(reply.content_type.into())
            .with_headers(headers);
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        if let Some(reply_to) = delivery.properties.reply_to() {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        reply_to.clone(),
                        BasicPublishOptions::default(),
                        &reply.body,
                        properties.clone(),
                    )
                    .await
                    .map_err(amqp("basic.publish (reply)"))?,
            );
        } else if let Some(job) = job_result_properties(delivery, properties.clone()) {
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        config.job_queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &reply.body,
                        job,
                    )
                    .await
                    .map_err(amqp("basic.publish (job result)"))?,
            );
        }
        if let Some(exchange) = &config.result_exchange {
            let routing_key = config.result_routing_key.as_deref().unwrap_or("");
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        &reply.body,
                        properties.with_delivery_mode(2),
                    )
                    .await
                    .map_err(amqp("basic.publish (result)"))?,
            );
        }
    }
    for confirm in confirms {
        match confirm.await.map_err(amqp("publisher confirm"))? {
            Confirmation::Nack(_) => return Err(WorkerError::Refused("reply")),
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
        }
    }
    add(&metrics.replies, batch_size as u64);
    metrics
        .last_reply_unix_ms
        .store(unix_ms(), std::sync::atomic::Ordering::Relaxed);
    for delivery in accepted {
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(amqp("basic.ack"))?;
    }
    Ok(())
}

/// The properties of a job's result: the request's `message_id` (the
/// job's id) and part headers added to the reply's, persistent. None when
/// the request is not a job (it has no `message_id`).
fn job_result_properties(
    request: &Delivery,
    properties: BasicProperties,
) -> Option<BasicProperties> {
    let message_id = request.properties.message_id().clone()?;
    let mut headers = properties.headers().clone().unwrap_or_default();
    if let Some(request_headers) = request.properties.headers() {
        for name in [JOB_PART_HEADER, JOB_PARTS_HEADER] {
            if let Some(value) = request_headers.inner().get(name) {
                headers.insert(name.into(), value.clone());
            }
        }
    }
    Some(
        properties
            .with_message_id(message_id)
            .with_headers(headers)
            .with_delivery_mode(2),
    )
}

/// When the request was published, from the `timestamp_in_ms` header that
/// RabbitMQ's message interceptor and Warren's HTTP gateway add (ms since
/// the epoch; across machines it is only as good as their clocks).
fn published_at_ms(delivery: &Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("timestamp_in_ms")? {
        AMQPValue::LongLongInt(ms) => u64::try_from(*ms).ok(),
        AMQPValue::Timestamp(ms) => Some(*ms),
        AMQPValue::LongUInt(ms) => Some(*ms as u64),
        AMQPValue::LongInt(ms) => u64::try_from(*ms).ok(),
        _ => None,
    }
}

/// Sends a request to the dead-letter queue with the reason, then acks
/// it: a poison input (retrying an input that cannot be decoded would
/// never succeed) or an expired one.
/// A requester waiting on `reply_to` gets the reason as its reply (JSON
/// `{"error": ...}` with the `x-warren-error` header), as an inference
/// server answers a bad request, instead of waiting for nothing.
async fn dead_letter(
    channel: &Channel,
    config: &WorkerConfig,
    delivery: Delivery,
    reason: &str,
) -> Result<(), WorkerError> {
    tracing::info!(model = %config.model, reason, "dead-lettering a request");
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert("x-warren-error".into(), text(reason));
    headers.insert("x-warren-model".into(), text(&config.model));
    headers.insert("x-warren-queue".into(), text(&config.queue));
    let properties = delivery.properties.clone().with_headers(headers);
    let confirm = channel
        .basic_publish(
            "".into(),
            config.dead_letter_queue.as_str().into(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .await
        .map_err(amqp("basic.publish (dead letter)"))?
        .await
        .map_err(amqp("publisher confirm"))?;
    if let Confirmation::Nack(_) = confirm {
        return Err(WorkerError::Refused("dead letter"));
    }
    if let Some(reply_to) = delivery.properties.reply_to() {
        let mut properties = failure_properties(config, reason);
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        let body = failure_body(reason);
        // The reply is best effort: a requester that went away has no
        // address any more, and the dead letter already holds the request.
        let _ = channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await;
    } else if let Some(job) = job_result_properties(&delivery, failure_properties(config, reason)) {
        // A job's failure is its result: the caller asks for it later.
        let confirm = channel
            .basic_publish(
                "".into(),
                config.job_queue.as_str().into(),
                BasicPublishOptions::default(),
                &failure_body(reason),
                job,
            )
            .await
            .map_err(amqp("basic.publish (job result)"))?
            .await
            .map_err(amqp("publisher confirm"))?;
        if let Confirmation::Nack(_) = confirm {
            return Err(WorkerError::Refused("job result"));
        }
    }
    delivery
        .ack(BasicAckOptions::default())
        .await
        .map_err(amqp("basic.ack"))?;
    Ok(())
}

/// The properties of the answer to a request the model refused.
fn failure_properties(config: &WorkerConfig, reason: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-warren-error".into(), text(reason));
    headers.insert("x-warren-model".into(), text(&config.model));
    headers.insert("x-warren-model-version".into(), text(&config.model_version));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// The body of the answer to a request the model refused.
fn failure_body(reason: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": reason })).expect("a JSON object serialises")
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Milliseconds since the Unix epoch, by the wall clock (0 before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
