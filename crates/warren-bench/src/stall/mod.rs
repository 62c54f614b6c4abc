//! Stall mode (`--stall DISRUPTION`): does one client stall another?
//!
//! A probe publishes small stamped messages at a fixed rate to a queue of
//! its own and consumes them with automatic acks. Once it hears its first
//! message, it runs for a settle (its baseline); then a second client, the
//! disruptor, does one heavy thing to the broker (requeue 100,000 unacked
//! deliveries, declare 10,000 durable queues, drain a backlog paged to disk,
//! churn through 1,000 connections); then another settle, so that a stall
//! the disruption's end set off still shows. A broker that serves clients
//! independently keeps the probe's latency and the gaps between its
//! deliveries at what they were before; one that makes everybody wait for
//! the heavy client shows the wait in both.
//!
//! The report gives, for the whole disruption and for each of its phases,
//! the probe's end-to-end latency and its longest silence (see `probe.rs`
//! for how each is attributed), the same for the settles before and after,
//! and how long the disruption took.
//!
//! The probe, the disruptor and this process share the machine with the
//! broker when run on one host: on two cores, a busy client steals time
//! from the broker, and part of what the probe sees is that. Within this
//! process the probe goes first: it has threads of its own, and the
//! disruptor's run at a lower priority (`threads.rs`).

mod disrupt;
mod probe;
mod threads;

pub use threads::ProbeThreads;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::runtime::Handle;

use crate::cli::{Config, Disruption};
use crate::client::{SETUP_TIMEOUT_S, redact_url};
use crate::error::BenchError;
use crate::producer::{Producer, ProducerOutcome, ProducerPlan};
use crate::progress::Progress;
use crate::rate::Schedule;
use crate::report::{BrokerMemory, ConsumeTotals, PublishTotals, Report, Throughput};
use crate::rss::{self, RssGauge};
use crate::stamp::{STAMP_SIZE_BYTES, now_unix_ns};
use crate::stats::Counters;
use crate::stop::Stop;

use disrupt::phases;
use disrupt::{DisruptionOutcome, Disruptor};
pub use probe::StretchReport;
use probe::{ProbeConsumer, ProbeOutcome, ProbeTally, Stretch, Timeline};

/// The probe's queue.
const PROBE_QUEUE: &str = "warren-bench-probe";

/// The probe's message body: the stamp and nothing more.
const PROBE_BODY_BYTES: usize = STAMP_SIZE_BYTES;

/// The settle before the disruption (the probe's baseline) and after it.
pub const SETTLE_MS: u64 = 1_000;

/// How long the probe's consumer may take, once its publisher has stopped,
/// to receive what is still on its way; what has not arrived by then is
/// reported as lost.
const PROBE_DRAIN_TIMEOUT_S: u64 = 10;

/// How often the wait for the probe's last messages looks at the counters.
const PROBE_DRAIN_POLL_MS: u64 = 5;

/// Marks of the timeline: the baseline begins when the probe hears its
/// first message, the disruption's phases follow one another, and the
/// settle after ends when the probe stops publishing.
const MARK_BASELINE: usize = 0;
const MARK_DISRUPTION: usize = 1;

/// What `--stall` asked for.
#[derive(Clone, Copy, Debug)]
pub struct StallPlan {
    pub disruption: Disruption,
    pub count: u64,
    pub probe_rate_per_s: u64,
    pub timeout_s: u64,
}

/// The probe's own counts over the whole run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeTotals {
    pub rate_per_s: u64,
    pub published: u64,
    pub received: u64,
}

/// The stall measurement, in the report's `stall` object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StallReport {
    pub disruption: Disruption,
    /// What the disruption was asked to involve, in `unit`.
    pub count: u64,
    pub unit: &'static str,
    /// How many it got through: messages requeued (unacked-close) or
    /// drained (paged-drain), queues declared, connections opened and closed.
    pub completed: u64,
    /// Whether it got through all of them, without error or time limit.
    pub complete: bool,
    /// From the disruption's start to its end, seconds.
    pub disruption_s: f64,
    /// The settle before and after, seconds each.
    pub settle_s: f64,
    pub probe: ProbeTotals,
    /// The probe during the whole disruption.
    pub window: StretchReport,
    /// The probe during the settle before: what it sees undisturbed.
    pub before: StretchReport,
    /// The probe during each phase of the disruption, in order.
    pub phases: Vec<StretchReport>,
    /// The probe during the settle after.
    pub after: StretchReport,
}

/// The stretches the probe reports on, over a timeline of `phases + 3`
/// marks: baseline start, one per phase start, disruption end, settle end.
fn stretches(phase_names: &[&'static str]) -> Vec<Stretch> {
    let end = MARK_DISRUPTION + phase_names.len();
    let mut stretches = vec![
        Stretch {
            name: "before",
            start: MARK_BASELINE,
            end: MARK_DISRUPTION,
        },
        Stretch {
            name: "window",
            start: MARK_DISRUPTION,
            end,
        },
        Stretch {
            name: "after",
            start: end,
            end: end + 1,
        },
    ];
    stretches.extend(
        phase_names
            .iter()
            .enumerate()
            .map(|(index, &name)| Stretch {
                name,
                start: MARK_DISRUPTION + index,
                end: MARK_DISRUPTION + index + 1,
            }),
    );
    stretches
}

/// Runs stall mode.
pub async fn run(config: &Config, plan: StallPlan, probe: &Handle) -> Result<Report, BenchError> {
    let progress = Progress::new(config.quiet);
    // Fail on a wrong PID before anything is declared, not after.
    if let Some(pid) = config.broker_pid {
        rss::read_rss_bytes(pid)?;
    }
    let phase_names = phases(plan.disruption);
    let mark_end = MARK_DISRUPTION + phase_names.len();
    let mark_settled = mark_end + 1;
    let timeline = Arc::new(Timeline::new(mark_settled + 1));

    let mut disruptor = Disruptor::prepare(&config.url, plan.disruption, plan.count).await?;
    if let Err(error) = disruptor.reset_probe_queue(PROBE_QUEUE).await {
        disrupt::clean_up(disruptor, &config.url, PROBE_QUEUE).await;
        return Err(error);
    }

    let gauge = Arc::new(RssGauge::default());
    let sampler_stop = Arc::new(Stop::default());
    let sampler = config.broker_pid.map(|pid| {
        tokio::spawn(rss::sample(
            pid,
            Arc::clone(&gauge),
            Arc::clone(&sampler_stop),
        ))
    });
    // Ctrl-C cuts the disruption short; the partial results still print.
    let interrupt = Arc::new(Stop::default());
    let interrupt_watch = tokio::spawn({
        let interrupt = Arc::clone(&interrupt);
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupt.trigger();
            }
        }
    });

    let measured = measure(
        ProbeSite {
            url: &config.url,
            threads: probe,
        },
        plan,
        &mut disruptor,
        &timeline,
        phase_names,
        &progress,
        &interrupt,
    )
    .await;
    let mut errors = disrupt::clean_up(disruptor, &config.url, PROBE_QUEUE).await;
    interrupt_watch.abort();
    sampler_stop.trigger();
    let failed_samples = match sampler {
        Some(handle) => handle.await.unwrap_or(0),
        None => 0,
    };
    let measured = measured?;

    errors.splice(0..0, measured.errors);
    let tally = &measured.probe.tally;
    if let Some(error) = &measured.probe.error {
        errors.push(error.with_causes());
    }
    if let Some(error) = &measured.publisher.error {
        errors.push(error.with_causes());
    }
    let published = measured.publisher.published;
    let received = measured.received;
    if received < published {
        errors.push(format!(
            "the probe received {received} of the {published} messages it published"
        ));
    }
    if tally.unstamped() > 0 {
        errors.push(format!(
            "the probe's queue delivered {} messages without a stamp",
            tally.unstamped()
        ));
    }
    let complete = measured.disruption.completed >= plan.count
        && measured.disruption.errors.is_empty()
        && !measured.timed_out
        && !interrupt.is_triggered();
    errors.extend(measured.disruption.errors.iter().cloned());
    if measured.timed_out {
        errors.push(format!(
            "the {} disruption did not finish within --stall-timeout {} s ({} of {} {})",
            plan.disruption.name(),
            plan.timeout_s,
            measured.disruption.completed,
            plan.count,
            plan.disruption.unit()
        ));
    }
    let stall = StallReport {
        disruption: plan.disruption,
        count: plan.count,
        unit: plan.disruption.unit(),
        completed: measured.disruption.completed,
        complete,
        disruption_s: timeline.seconds(MARK_DISRUPTION, mark_end),
        settle_s: SETTLE_MS as f64 / 1e3,
        probe: ProbeTotals {
            rate_per_s: plan.probe_rate_per_s,
            published,
            received,
        },
        window: tally.report(&timeline, "window"),
        before: tally.report(&timeline, "before"),
        phases: phase_names
            .iter()
            .map(|name| tally.report(&timeline, name))
            .collect(),
        after: tally.report(&timeline, "after"),
    };
    let run_s = timeline.seconds(MARK_BASELINE, mark_settled);
    Ok(Report {
        tool: "warren-bench",
        version: env!("CARGO_PKG_VERSION"),
        url: redact_url(&config.url),
        config: config.clone(),
        stale_messages_deleted: 0,
        publish: Throughput::new(published, run_s),
        publish_totals: PublishTotals {
            published,
            ..PublishTotals::default()
        },
        consume: Throughput::new(received, run_s),
        consume_totals: ConsumeTotals {
            consumed: received,
            ..ConsumeTotals::default()
        },
        drain_expected: None,
        drain_complete: None,
        end_to_end_latency: stall.window.latency.clone(),
        confirm_latency: None,
        broker_memory: config.broker_pid.map(|pid| BrokerMemory {
            pid,
            peak_rss_bytes: gauge.peak_bytes(),
            end_rss_bytes: gauge.current_bytes(),
            after_prefill_rss_bytes: None,
            failed_samples,
        }),
        idle: None,
        stall: Some(stall),
        interrupted: interrupt.is_triggered(),
        errors,
    })
}

/// What the probe and the disruption did.
struct Measured {
    probe: ProbeOutcome,
    publisher: ProducerOutcome,
    /// Probe messages received by the time the consumer stopped.
    received: u64,
    disruption: DisruptionOutcome,
    timed_out: bool,
    /// Problems of the run itself, one line each.
    errors: Vec<String>,
}

/// Where the probe connects, and the threads it runs on.
struct ProbeSite<'a> {
    url: &'a str,
    threads: &'a Handle,
}

/// Starts the probe, waits for its first message, and runs the settle, the
/// disruption and the settle after, marking each on the timeline; then
/// stops the probe once it has received what it published.
async fn measure(
    site: ProbeSite<'_>,
    plan: StallPlan,
    disruptor: &mut Disruptor,
    timeline: &Arc<Timeline>,
    phase_names: &[&'static str],
    progress: &Progress,
    interrupt: &Arc<Stop>,
) -> Result<Measured, BenchError> {
    let mark_end = MARK_DISRUPTION + phase_names.len();
    let mark_settled = mark_end + 1;
    let counters = Arc::new(Counters::default());
    // Connected from the probe's threads, so that lapin's I/O threads for
    // them keep the probe's priority.
    let probe = site.threads;
    let url = site.url.to_owned();
    let consumer = on_probe_threads(probe, "probe consumer", async move {
        ProbeConsumer::subscribe(&url, PROBE_QUEUE).await
    })
    .await?;
    let url = site.url.to_owned();
    let publisher_plan = ProducerPlan {
        role: "probe publisher".to_owned(),
        exchange: String::new(),
        routing_key: PROBE_QUEUE.to_owned(),
        size_bytes: PROBE_BODY_BYTES,
        persistent: false,
        confirm_window: 0,
        schedule: Schedule::for_producer(plan.probe_rate_per_s, 1),
        quota: None,
    };
    let publisher = on_probe_threads(probe, "probe publisher", async move {
        Producer::connect(&url, publisher_plan).await
    })
    .await?;
    let first = Arc::new(Stop::default());
    let consumer_stop = Arc::new(Stop::default());
    let publisher_stop = Arc::new(Stop::default());
    let consumer_task = probe.spawn(consumer.run(
        Arc::clone(timeline),
        ProbeTally::new(stretches(phase_names), now_unix_ns()),
        Arc::clone(&first),
        Arc::clone(&counters),
        Arc::clone(&consumer_stop),
    ));
    let publisher_task =
        probe.spawn(publisher.run(Arc::clone(&publisher_stop), Arc::clone(&counters)));

    let mut errors = Vec::new();
    let mut disruption = DisruptionOutcome::default();
    let mut timed_out = false;
    // Nothing is measured until the probe is known to work.
    let heard = tokio::select! {
        () = first.triggered() => true,
        () = tokio::time::sleep(Duration::from_secs(SETUP_TIMEOUT_S)) => {
            errors.push(
                BenchError::Timeout {
                    role: "probe consumer".to_owned(),
                    operation: "the first probe delivery",
                    limit_s: SETUP_TIMEOUT_S,
                }
                .with_causes(),
            );
            false
        }
        () = interrupt.triggered() => false,
    };
    if heard {
        timeline.mark(MARK_BASELINE);
        settle(interrupt).await;
        if !interrupt.is_triggered() {
            timeline.mark(MARK_DISRUPTION);
            let cancel = Arc::new(Stop::default());
            let deadline = tokio::time::sleep(Duration::from_secs(plan.timeout_s));
            tokio::pin!(deadline);
            let running = disruptor.run(timeline, MARK_DISRUPTION, &cancel, progress);
            tokio::pin!(running);
            disruption = loop {
                tokio::select! {
                    outcome = &mut running => break outcome,
                    () = &mut deadline, if !cancel.is_triggered() => {
                        timed_out = true;
                        cancel.trigger();
                    }
                    () = interrupt.triggered(), if !cancel.is_triggered() => cancel.trigger(),
                }
            };
            // Phases a cut-short disruption never reached end where it did.
            for mark in MARK_DISRUPTION + 1..=mark_end {
                timeline.mark(mark);
            }
            settle(interrupt).await;
        }
    }
    // Marks not reached (the probe never heard, or Ctrl-C) end here, so no
    // stretch stays open.
    for mark in MARK_BASELINE..=mark_settled {
        timeline.mark(mark);
    }

    publisher_stop.trigger();
    let publisher = match publisher_task.await {
        Ok(outcome) => outcome,
        Err(source) => {
            consumer_stop.trigger();
            let _ = consumer_task.await;
            return Err(BenchError::TaskPanicked {
                role: "probe publisher".to_owned(),
                source,
            });
        }
    };
    // The probe's last messages are still on their way; wait for them so a
    // message lost in the disruption shows as lost, not as late.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(PROBE_DRAIN_TIMEOUT_S);
    while counters.consumed.load(Ordering::Relaxed) < publisher.published
        && tokio::time::Instant::now() < deadline
        && !consumer_task.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(PROBE_DRAIN_POLL_MS)).await;
    }
    consumer_stop.trigger();
    let probe = consumer_task
        .await
        .map_err(|source| BenchError::TaskPanicked {
            role: "probe consumer".to_owned(),
            source,
        })?;
    Ok(Measured {
        probe,
        publisher,
        received: counters.consumed.load(Ordering::Relaxed),
        disruption,
        timed_out,
        errors,
    })
}

/// Runs `connect` on the probe's threads and waits for it.
async fn on_probe_threads<T: Send + 'static>(
    probe: &Handle,
    role: &str,
    connect: impl Future<Output = Result<T, BenchError>> + Send + 'static,
) -> Result<T, BenchError> {
    probe
        .spawn(connect)
        .await
        .map_err(|source| BenchError::TaskPanicked {
            role: role.to_owned(),
            source,
        })?
}

/// Waits [`SETTLE_MS`], or until Ctrl-C.
async fn settle(interrupt: &Stop) {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(SETTLE_MS)) => {}
        () = interrupt.triggered() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stretches_cover_the_settles_the_window_and_each_phase() {
        let stretches = stretches(&["publish", "deliver", "requeue"]);
        let find = |name: &str| {
            *stretches
                .iter()
                .find(|stretch| stretch.name == name)
                .expect(name)
        };
        assert_eq!((find("before").start, find("before").end), (0, 1));
        assert_eq!((find("window").start, find("window").end), (1, 4));
        assert_eq!((find("publish").start, find("publish").end), (1, 2));
        assert_eq!((find("requeue").start, find("requeue").end), (3, 4));
        assert_eq!((find("after").start, find("after").end), (4, 5));
    }
}
