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

use futures_util::StreamExt;
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
    loop {
        // Wait for the first request of a batch, then take more until the
        // batch is full or the delay since that first request runs out.
        let first = tokio::select! {
            next = deliveries.next() => next,
            _ = shutdown.changed() => break,
        };
        let Some(first) = first else { break };
        let mut batch = vec![first.map_err(amqp("basic.deliver"))?];
        let first_arrived = tokio::time::Instant::now();
        let deadline = first_arrived + config.batch_delay_max;
        while batch.len() < config.batch_size_max {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(Some(delivery)) => batch.push(delivery.map_err(amqp("basic.deliver"))?),
                Ok(None) | Err(_) => break,
            }
        }
        add(&metrics.requests, batch.len() as u64);
        let now_ms = unix_ms();
        for delivery in &batch {
            if let Some(published_ms) = published_at_ms(delivery) {
                metrics
                    .queue_wait_us
                    .observe(now_ms.saturating_sub(published_ms) * 1_000);
            }
        }
        metrics
            .batch_wait_us
            .observe(first_arrived.elapsed().as_micros() as u64);
        serve_batch(&channel, &config, &task, &metrics, batch).await?;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

/// Decodes, infers, replies and acks one batch.
async fn serve_batch(
    channel: &Channel,
    config: &WorkerConfig,
    task: &Arc<dyn Task>,
    metrics: &ModelMetrics,
    batch: Vec<Delivery>,
) -> Result<(), WorkerError> {
    let mut accepted: Vec<Delivery> = Vec::with_capacity(batch.len());
    let mut inputs: Vec<Decoded> = Vec::with_capacity(batch.len());
    for delivery in batch {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|kind| kind.as_str().to_owned());
        match task.decode(&delivery.data, content_type.as_deref()) {
            Ok(decoded) => {
                inputs.push(decoded);
                accepted.push(delivery);
            }
            Err(reason) => {
                add(&metrics.poison, 1);
                dead_letter(channel, config, delivery, &reason).await?
            }
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }
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

/// Sends a poison request to the dead-letter queue with the reason, then
/// acks it: retrying an input that cannot be decoded would never succeed.
/// A requester waiting on `reply_to` gets the reason as its reply (JSON
/// `{"error": ...}` with the `x-warren-error` header), as an inference
/// server answers a bad request, instead of waiting for nothing.
async fn dead_letter(
    channel: &Channel,
    config: &WorkerConfig,
    delivery: Delivery,
    reason: &str,
) -> Result<(), WorkerError> {
    tracing::info!(model = %config.model, reason, "dead-lettering a poison request");
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
