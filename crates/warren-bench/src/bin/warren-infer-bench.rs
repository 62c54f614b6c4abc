//! `warren-infer-bench`: embedding requests through a model's queue,
//! beside the same model called directly in-process.
//!
//! 1. Direct: the model of the `[[model]]` entry in `--config` is loaded
//!    here and fed batches back to back, of 1, 8 and `batch_size_max`
//!    texts: the best of these is the throughput the hardware gives
//!    without any broker.
//! 2. Saturated: requesters keep `--in-flight` requests outstanding on the
//!    model's queue (direct reply-to) for `--duration` seconds.
//! 3. Half load: requests at half the saturated rate, for the latency a
//!    service sees when it is not overloaded.
//!
//! Run the broker with the same `[[model]]` (`warren serve --config FILE`)
//! and nothing else on the machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Deserialize;
use tokio::sync::Mutex;
use warren_infer::deploy::ModelConfig;
use warren_infer::task::Decoded;

#[derive(Debug, Parser)]
#[command(name = "warren-infer-bench", version)]
struct Args {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Configuration file whose first `[[model]]` the broker serves.
    #[arg(long)]
    config: PathBuf,
    /// Seconds each phase runs.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Requests kept outstanding in the saturated phase.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(rename = "model")]
    models: Vec<ModelConfig>,
}

/// Sentences of 6 to 40 words, like the short texts embedding services see.
fn corpus() -> Vec<String> {
    let words = [
        "model",
        "queue",
        "request",
        "the",
        "a",
        "fast",
        "broker",
        "reply",
        "batch",
        "worker",
        "vector",
        "text",
        "sentence",
        "embedding",
        "search",
        "query",
        "document",
        "index",
        "retrieval",
        "answer",
        "question",
        "about",
        "with",
        "for",
        "and",
        "of",
    ];
    (0..512)
        .map(|index| {
            let length = 6 + (index * 7) % 35;
            (0..length)
                .map(|word| words[(index * 31 + word * 17) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

struct Measured {
    requests: u64,
    seconds: f64,
    latency: Histogram<u64>,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn print(&self, phase: &str) {
        let ms = |quantile: f64| self.latency.value_at_quantile(quantile) as f64 / 1000.0;
        println!(
            "  {phase:<12} {:>9.1} requests/s  ({} in {:.1} s)  latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            self.rate(),
            self.requests,
            self.seconds,
            ms(0.5),
            ms(0.99),
            self.latency.max() as f64 / 1000.0
        );
    }
}

fn direct(
    task: &dyn warren_infer::task::Task,
    batch: usize,
    texts: &[String],
    duration: Duration,
) -> anyhow::Result<Measured> {
    let mut latency = Histogram::new(3)?;
    let started = Instant::now();
    let mut requests = 0u64;
    let mut offset = 0;
    while started.elapsed() < duration {
        let inputs: Vec<Decoded> = (0..batch)
            .map(|index| Decoded::Text(texts[(offset + index) % texts.len()].clone()))
            .collect();
        offset += batch;
        let call = Instant::now();
        task.infer(inputs).context("direct inference")?;
        latency.record(call.elapsed().as_micros() as u64)?;
        requests += batch as u64;
    }
    Ok(Measured {
        requests,
        seconds: started.elapsed().as_secs_f64(),
        latency,
    })
}

/// Sends requests through the queue for `duration`: `in_flight` outstanding
/// at most, and no faster than `rate` per second when given.
async fn through_queue(
    url: &str,
    queue: &str,
    texts: &[String],
    duration: Duration,
    in_flight: usize,
    rate: Option<f64>,
) -> anyhow::Result<Measured> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut replies = channel
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let receiver = {
        let sent = Arc::clone(&sent);
        let permits = Arc::clone(&permits);
        tokio::spawn(async move {
            let mut latency = Histogram::<u64>::new(3).expect("histogram");
            let mut received = 0u64;
            while let Some(Ok(reply)) = replies.next().await {
                let id: u64 = reply
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse().ok())
                    .unwrap_or(u64::MAX);
                if let Some(at) = sent.lock().await.remove(&id) {
                    latency
                        .record(at.elapsed().as_micros() as u64)
                        .expect("in range");
                    received += 1;
                    permits.add_permits(1);
                }
            }
            (received, latency)
        })
    };
    let started = Instant::now();
    let mut next = 0u64;
    while started.elapsed() < duration {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(next as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        permits.acquire().await?.forget();
        sent.lock().await.insert(next, Instant::now());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                texts[next as usize % texts.len()].as_bytes(),
                BasicProperties::default()
                    .with_reply_to("amq.rabbitmq.reply-to".into())
                    .with_correlation_id(next.to_string().into()),
            )
            .await?;
        next += 1;
    }
    // Let what is outstanding come back, so every request is counted once.
    let drain_until = Instant::now() + Duration::from_secs(30);
    while !sent.lock().await.is_empty() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    connection.close(200, "OK".into()).await?;
    let (requests, latency) = receiver.await?;
    Ok(Measured {
        requests,
        seconds,
        latency,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let file: File = toml::from_str(&text).context("parsing the [[model]] entry")?;
    let model = file
        .models
        .into_iter()
        .next()
        .context("the configuration has no [[model]]")?;
    let texts = corpus();
    let duration = Duration::from_secs(args.duration);
    println!(
        "warren-infer-bench: model '{}' on queue '{}', batch_size_max {}, batch_delay_max_ms {}",
        model.name, model.queue, model.batch_size_max, model.batch_delay_max_ms
    );
    let runs = {
        let model = model.clone();
        let texts = texts.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(usize, Measured)>> {
            let task = model
                .load()
                .context("loading the model for the direct run")?;
            let mut sizes = vec![1, 8, model.batch_size_max];
            sizes.dedup();
            sizes
                .into_iter()
                .map(|batch| Ok((batch, direct(task.as_ref(), batch, &texts, duration)?)))
                .collect()
        })
        .await??
    };
    for (batch, measured) in &runs {
        measured.print(&format!("direct x{batch}"));
    }
    let (_, direct) = runs
        .iter()
        .max_by(|a, b| a.1.rate().total_cmp(&b.1.rate()))
        .expect("at least one direct run");
    // The inference time of a full batch, for the latency budget.
    let batch_ms = runs.last().expect("runs").1.latency.mean() / 1000.0;
    let saturated = through_queue(
        &args.url,
        &model.queue,
        &texts,
        duration,
        args.in_flight,
        None,
    )
    .await?;
    saturated.print("saturated");
    let half = saturated.rate() / 2.0;
    let relaxed = through_queue(
        &args.url,
        &model.queue,
        &texts,
        duration,
        args.in_flight,
        Some(half),
    )
    .await?;
    relaxed.print("half load");
    let budget_ms = model.batch_delay_max_ms as f64 + 2.0 * batch_ms;
    let p99_ms = relaxed.latency.value_at_quantile(0.99) as f64 / 1000.0;
    println!(
        "  through the queue: {:.1}% of the best direct rate; at half load p99 {:.2} ms against a budget of {:.2} ms (batch_delay_max_ms {} + 2 x {:.2} ms per batch)",
        100.0 * saturated.rate() / direct.rate(),
        p99_ms,
        budget_ms,
        model.batch_delay_max_ms,
        batch_ms
    );
    Ok(())
}
