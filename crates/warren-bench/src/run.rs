//! Runs a benchmark end to end: topology, connections, the measured phases,
//! and the gathering of every task's outcome into a [`Report`].
//!
//! Every phase is bounded in time (the duration, or the prefill phase limit),
//! every task stops on a shared [`Stop`], and every connection is closed
//! before the report is built, so a run always ends by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{join_all, try_join_all};
use tokio::task::JoinHandle;

use crate::cli::{Config, FANOUT_EXCHANGE, Mode, queue_name};
use crate::client::redact_url;
use crate::consumer::{Consumer, ConsumerOutcome, ConsumerPlan, DrainTarget};
use crate::error::BenchError;
use crate::idle;
use crate::producer::{Producer, ProducerOutcome, ProducerPlan};
use crate::progress::{self, Progress, Track};
use crate::rate::Schedule;
use crate::report::{BrokerMemory, ConsumeTotals, PublishTotals, Report, Throughput};
use crate::rss::{self, RssGauge};
use crate::stall;
use crate::stats::{self, Counters, LatencySummary};
use crate::stop::Stop;
use crate::topology;

/// Runs the benchmark `config` describes and reports what it measured;
/// stall mode runs its probe on `probe_threads`.
pub async fn run(
    config: &Config,
    probe_threads: Option<&stall::ProbeThreads>,
) -> Result<Report, BenchError> {
    // Idle mode declares nothing and sends nothing, and stall mode runs a
    // probe and a disruption of its own: none of what follows.
    if let Mode::Idle {
        connections,
        hold_s,
    } = config.mode
    {
        return idle::run(config, connections, hold_s).await;
    }
    if let Mode::Stall {
        disruption,
        count,
        probe_rate_per_s,
        timeout_s,
    } = config.mode
    {
        let plan = stall::StallPlan {
            disruption,
            count,
            probe_rate_per_s,
            timeout_s,
        };
        let probe_threads =
            probe_threads.expect("stall mode starts the probe's threads before it runs");
        return stall::run(config, plan, probe_threads.handle()).await;
    }
    let progress = Progress::new(config.quiet);
    // Fail on a wrong PID before any load is generated, not after.
    if let Some(pid) = config.broker_pid {
        rss::read_rss_bytes(pid)?;
    }
    let setup = topology::declare_fresh(config).await?;

    let gauge = Arc::new(RssGauge::default());
    let sampler_stop = Arc::new(Stop::default());
    let sampler = config.broker_pid.map(|pid| {
        tokio::spawn(rss::sample(
            pid,
            Arc::clone(&gauge),
            Arc::clone(&sampler_stop),
        ))
    });

    // Ctrl-C ends the current phase early; the partial results still print.
    let interrupt = Arc::new(Stop::default());
    let interrupt_watch = tokio::spawn({
        let interrupt = Arc::clone(&interrupt);
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupt.trigger();
            }
        }
    });

    let counters = Arc::new(Counters::default());
    let measured = match config.mode {
        Mode::Duration { duration_s } => {
            run_duration(config, duration_s, &progress, &counters, &interrupt).await
        }
        Mode::Idle { .. } | Mode::Stall { .. } => unreachable!("returned above"),
        Mode::Prefill {
            count,
            phase_timeout_s,
        } => {
            run_prefill(
                config,
                count,
                phase_timeout_s,
                &progress,
                &counters,
                &interrupt,
                &gauge,
            )
            .await
        }
    };
    interrupt_watch.abort();
    sampler_stop.trigger();
    let failed_samples = match sampler {
        Some(handle) => handle.await.unwrap_or(0),
        None => 0,
    };
    let measured = measured?;

    let mut errors = Vec::new();
    let mut publish_totals = PublishTotals::default();
    let mut confirm_latency = stats::latency_histogram();
    for outcome in &measured.producers {
        publish_totals.published += outcome.published;
        publish_totals.confirmed += outcome.confirmed;
        publish_totals.nacked += outcome.nacked;
        publish_totals.unsettled += outcome.unsettled;
        stats::merge(&mut confirm_latency, &outcome.confirm_latency);
        if let Some(error) = &outcome.error {
            errors.push(error.with_causes());
        }
    }
    let mut consume_totals = ConsumeTotals::default();
    let mut latency = stats::latency_histogram();
    for outcome in &measured.consumers {
        consume_totals.consumed += outcome.consumed;
        consume_totals.redelivered += outcome.redelivered;
        consume_totals.unstamped += outcome.unstamped;
        stats::merge(&mut latency, &outcome.latency);
        if let Some(error) = &outcome.error {
            errors.push(error.with_causes());
        }
    }
    errors.extend(measured.task_errors.iter().map(BenchError::with_causes));

    Ok(Report {
        tool: "warren-bench",
        version: env!("CARGO_PKG_VERSION"),
        url: redact_url(&config.url),
        config: config.clone(),
        stale_messages_deleted: setup.stale_messages,
        publish: Throughput::new(
            publish_totals.published,
            measured.publish_elapsed.as_secs_f64(),
        ),
        publish_totals,
        consume: Throughput::new(
            consume_totals.consumed,
            measured.consume_elapsed.as_secs_f64(),
        ),
        consume_totals,
        drain_expected: measured.drain_expected,
        drain_complete: measured.drain_complete,
        end_to_end_latency: LatencySummary::of(&latency),
        confirm_latency: LatencySummary::of(&confirm_latency),
        broker_memory: config.broker_pid.map(|pid| BrokerMemory {
            pid,
            peak_rss_bytes: gauge.peak_bytes(),
            end_rss_bytes: gauge.current_bytes(),
            after_prefill_rss_bytes: measured.after_prefill_rss_bytes,
            failed_samples,
        }),
        idle: None,
        stall: None,
        interrupted: interrupt.is_triggered(),
        errors,
    })
}

/// What the phases of one run produced, before aggregation.
struct Measured {
    producers: Vec<ProducerOutcome>,
    consumers: Vec<ConsumerOutcome>,
    /// Tasks that panicked (their outcome is lost).
    task_errors: Vec<BenchError>,
    publish_elapsed: Duration,
    consume_elapsed: Duration,
    drain_expected: Option<u64>,
    drain_complete: Option<bool>,
    after_prefill_rss_bytes: Option<u64>,
}

/// Fixed-duration run: consumers subscribe first, producers publish until the
/// deadline, and both stop together.
async fn run_duration(
    config: &Config,
    duration_s: u64,
    progress: &Progress,
    counters: &Arc<Counters>,
    interrupt: &Arc<Stop>,
) -> Result<Measured, BenchError> {
    let consumers = try_join_all(
        consumer_plans(config)
            .into_iter()
            .map(|plan| Consumer::connect(&config.url, plan)),
    )
    .await?;
    let producers = try_join_all(
        producer_plans(config, None)
            .into_iter()
            .map(|plan| Producer::connect(&config.url, plan)),
    )
    .await?;
    let subscribed = try_join_all(consumers.into_iter().map(Consumer::subscribe)).await?;

    let stop = Arc::new(Stop::default());
    let start = Instant::now();
    let consumer_tasks: Vec<_> = subscribed
        .into_iter()
        .map(|consumer| tokio::spawn(consumer.run(Arc::clone(&stop), Arc::clone(counters), None)))
        .collect();
    let producer_tasks: Vec<_> = producers
        .into_iter()
        .map(|producer| tokio::spawn(producer.run(Arc::clone(&stop), Arc::clone(counters))))
        .collect();
    let bar = progress.bar("run", duration_s * 1000);
    let display = tokio::spawn(progress::follow(
        bar,
        Track::ElapsedMs,
        Arc::clone(counters),
        Arc::clone(&stop),
    ));

    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(duration_s)) => {}
        () = interrupt.triggered() => {}
    }
    stop.trigger();
    let elapsed = start.elapsed();
    let _ = display.await;

    let mut task_errors = Vec::new();
    let producers = join_tasks(producer_tasks, "producer", &mut task_errors).await;
    let consumers = join_tasks(consumer_tasks, "consumer", &mut task_errors).await;
    Ok(Measured {
        producers,
        consumers,
        task_errors,
        publish_elapsed: elapsed,
        consume_elapsed: elapsed,
        drain_expected: None,
        drain_complete: None,
        after_prefill_rss_bytes: None,
    })
}

/// Prefill run: publish `count` messages with nobody consuming, then start
/// the consumers and time how long they take to drain everything.
async fn run_prefill(
    config: &Config,
    count: u64,
    phase_timeout_s: u64,
    progress: &Progress,
    counters: &Arc<Counters>,
    interrupt: &Arc<Stop>,
    gauge: &Arc<RssGauge>,
) -> Result<Measured, BenchError> {
    let phase_limit = Duration::from_secs(phase_timeout_s);
    let mut task_errors = Vec::new();

    // Phase 1: prefill.
    let producers = try_join_all(
        producer_plans(config, Some(count))
            .into_iter()
            .map(|plan| Producer::connect(&config.url, plan)),
    )
    .await?;
    let producer_stop = Arc::new(Stop::default());
    let prefill_start = Instant::now();
    let mut producer_tasks: Vec<_> = producers
        .into_iter()
        .map(|producer| {
            tokio::spawn(producer.run(Arc::clone(&producer_stop), Arc::clone(counters)))
        })
        .collect();
    let display_stop = Arc::new(Stop::default());
    let display = tokio::spawn(progress::follow(
        progress.bar("prefill", count),
        Track::Published,
        Arc::clone(counters),
        Arc::clone(&display_stop),
    ));
    // Producers end by themselves at their quota; the limit and Ctrl-C only
    // make them end sooner.
    let all_published = join_all(producer_tasks.iter_mut());
    tokio::pin!(all_published);
    let joined = tokio::select! {
        joined = &mut all_published => Some(joined),
        () = tokio::time::sleep(phase_limit) => None,
        () = interrupt.triggered() => None,
    };
    let joined = match joined {
        Some(joined) => joined,
        None => {
            producer_stop.trigger();
            all_published.await
        }
    };
    let prefill_elapsed = prefill_start.elapsed();
    display_stop.trigger();
    let _ = display.await;
    let producers = collect_joined(joined, "producer", &mut task_errors);
    let after_prefill_rss_bytes = config.broker_pid.map(|pid| {
        // A fresh read, not the sampler's last value, which may be 100 ms old.
        rss::read_rss_bytes(pid)
            .inspect(|&rss_bytes| gauge.record(rss_bytes))
            .unwrap_or_else(|_| gauge.current_bytes())
    });

    let enqueued: u64 = producers
        .iter()
        .map(|outcome| outcome.published - outcome.nacked)
        .sum();
    let expected = enqueued * config.copies_per_message();
    if interrupt.is_triggered() {
        return Ok(Measured {
            producers,
            consumers: Vec::new(),
            task_errors,
            publish_elapsed: prefill_elapsed,
            consume_elapsed: Duration::ZERO,
            drain_expected: Some(expected),
            drain_complete: Some(false),
            after_prefill_rss_bytes,
        });
    }

    // Phase 2: drain.
    let consumers = try_join_all(
        consumer_plans(config)
            .into_iter()
            .map(|plan| Consumer::connect(&config.url, plan)),
    )
    .await?;
    let drained = Arc::new(Stop::default());
    if expected == 0 {
        drained.trigger();
    }
    let drain_start = Instant::now();
    let subscribed = try_join_all(consumers.into_iter().map(Consumer::subscribe)).await?;
    let target = DrainTarget {
        expected,
        done: Arc::clone(&drained),
    };
    let consumer_tasks: Vec<_> = subscribed
        .into_iter()
        .map(|consumer| {
            tokio::spawn(consumer.run(
                Arc::clone(&drained),
                Arc::clone(counters),
                Some(target.clone()),
            ))
        })
        .collect();
    let display = tokio::spawn(progress::follow(
        progress.bar("drain", expected),
        Track::Consumed,
        Arc::clone(counters),
        Arc::clone(&drained),
    ));
    tokio::select! {
        () = drained.triggered() => {}
        () = tokio::time::sleep(phase_limit) => {}
        () = interrupt.triggered() => {}
    }
    let drain_elapsed = drain_start.elapsed();
    drained.trigger();
    let _ = display.await;
    let consumers = join_tasks(consumer_tasks, "consumer", &mut task_errors).await;
    let consumed: u64 = consumers.iter().map(|outcome| outcome.consumed).sum();
    Ok(Measured {
        producers,
        consumers,
        task_errors,
        publish_elapsed: prefill_elapsed,
        consume_elapsed: drain_elapsed,
        drain_expected: Some(expected),
        drain_complete: Some(consumed >= expected),
        after_prefill_rss_bytes,
    })
}

/// Producer `index`'s share of `total` messages: an even split, with the
/// remainder going one each to the first producers.
pub fn quota_share(total: u64, producers: usize, index: usize) -> u64 {
    let producers = producers as u64;
    let index = index as u64;
    total / producers + u64::from(index < total % producers)
}

/// One plan per producer; producer i publishes to queue i mod queues.
fn producer_plans(config: &Config, total: Option<u64>) -> Vec<ProducerPlan> {
    (0..config.producers)
        .map(|index| {
            let queue = queue_index(index, config.queues);
            let (exchange, routing_key) = if config.exchange_fanout {
                (FANOUT_EXCHANGE.to_owned(), String::new())
            } else {
                (String::new(), queue_name(queue))
            };
            ProducerPlan {
                role: format!("producer {index}"),
                exchange,
                routing_key,
                size_bytes: config.size_bytes,
                persistent: config.persistent,
                confirm_window: config.confirm_window,
                schedule: Schedule::for_producer(config.rate_per_s, config.producers),
                quota: total.map(|total| quota_share(total, config.producers, index)),
            }
        })
        .collect()
}

/// One plan per consumer; consumer i consumes queue i mod queues.
fn consumer_plans(config: &Config) -> Vec<ConsumerPlan> {
    (0..config.consumers)
        .map(|index| ConsumerPlan {
            role: format!("consumer {index}"),
            index,
            queue: queue_name(queue_index(index, config.queues)),
            ack: config.ack,
            prefetch: config.prefetch,
            ack_every: config.ack_every,
        })
        .collect()
}

/// Round-robin assignment of connection `index` to a queue.
fn queue_index(index: usize, queues: u32) -> u32 {
    (index % queues as usize) as u32
}

async fn join_tasks<T>(
    tasks: Vec<JoinHandle<T>>,
    kind: &str,
    task_errors: &mut Vec<BenchError>,
) -> Vec<T> {
    let joined = join_all(tasks).await;
    collect_joined(joined, kind, task_errors)
}

fn collect_joined<T>(
    joined: Vec<Result<T, tokio::task::JoinError>>,
    kind: &str,
    task_errors: &mut Vec<BenchError>,
) -> Vec<T> {
    let mut outcomes = Vec::with_capacity(joined.len());
    for (index, result) in joined.into_iter().enumerate() {
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(source) => task_errors.push(BenchError::TaskPanicked {
                role: format!("{kind} {index}"),
                source,
            }),
        }
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_shares_add_up_to_the_total() {
        for (total, producers) in [(200_000u64, 4usize), (10, 3), (2, 5), (0, 2)] {
            let shares: Vec<u64> = (0..producers)
                .map(|index| quota_share(total, producers, index))
                .collect();
            assert_eq!(
                shares.iter().sum::<u64>(),
                total,
                "{total} over {producers}"
            );
            let spread = shares.iter().max().unwrap() - shares.iter().min().unwrap();
            assert!(spread <= 1, "{shares:?}");
        }
    }

    #[test]
    fn connections_spread_round_robin() {
        let queues: Vec<u32> = (0..5).map(|index| queue_index(index, 2)).collect();
        assert_eq!(queues, [0, 1, 0, 1, 0]);
    }
}
