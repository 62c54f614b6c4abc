//! The second client of stall mode: what it does to the broker while the
//! probe runs, one phase after another, marking on the timeline where each
//! phase begins.
//!
//! Everything a disruption needs (connections, channels, its queue) is made
//! in [`Disruptor::prepare`], before the probe's baseline, so that the
//! measured window holds the disruption and nothing of its setup. Every
//! phase watches a cancel signal (the time limit, Ctrl-C), and the deletion
//! of what it declared happens in [`clean_up`], after the probe has stopped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection};

use crate::cli::{AckMode, Disruption};
use crate::client::{self, CLOSE_TIMEOUT_S, SETUP_TIMEOUT_S, within};
use crate::consumer::{Consumer, ConsumerPlan, DrainTarget};
use crate::error::BenchError;
use crate::idle;
use crate::producer::{Producer, ProducerOutcome, ProducerPlan};
use crate::progress::{self, Progress, Track};
use crate::stall::probe::Timeline;
use crate::stamp::STAMP_SIZE_BYTES;
use crate::stats::Counters;
use crate::stop::Stop;

const ROLE: &str = "stall disruptor";

/// The disruptor's own queue (unacked-close, paged-drain).
const STALL_QUEUE: &str = "warren-bench-stall";

/// Body of unacked-close's messages: small, so what the broker handles is
/// the number of deliveries, not their bytes.
const UNACKED_BODY_BYTES: usize = STAMP_SIZE_BYTES;

/// Body of paged-drain's messages. 200,000 of 1 KiB are 200 MiB, far past
/// what a broker keeps in memory per queue (Warren: 2,048 messages or
/// 8 MiB), so nearly all of them wait on disk and the drain reads them back.
const PAGED_BODY_BYTES: usize = 1024;

/// paged-drain's publisher confirm window: the fill goes as fast as the
/// broker confirms, as in benchmark scenario 5.
const PAGED_CONFIRM_WINDOW: usize = 256;

/// paged-drain's consumer prefetch, as a typical worker sets it.
const PAGED_PREFETCH: u16 = 100;

/// Connections connection-churn has opening or closing at once: a few, as
/// from several restarting clients, and far under any listen backlog.
const CHURN_CONCURRENCY: usize = 4;

/// How often unacked-close asks for its queue's ready count while it waits
/// for the requeue to show. RabbitMQ may answer channel.close-ok before its
/// queue process has requeued everything, so the close alone does not say
/// when the requeue ended; a passive declare every 2 ms is a light load and
/// puts the end within 2 ms.
const REQUEUE_POLL_MS: u64 = 2;

/// The phases of a disruption, in order, as the report names them.
pub fn phases(disruption: Disruption) -> &'static [&'static str] {
    match disruption {
        Disruption::UnackedClose => &["publish", "deliver", "requeue"],
        Disruption::Declare => &["declare"],
        Disruption::PagedDrain => &["fill", "drain"],
        Disruption::ConnectionChurn => &["churn"],
    }
}

/// Name of the `index`-th queue of the declare disruption.
fn declared_queue_name(index: u64) -> String {
    format!("{STALL_QUEUE}-{index}")
}

/// How far a disruption got.
#[derive(Debug, Default)]
pub struct DisruptionOutcome {
    /// Messages requeued or drained, queues declared, connections opened and
    /// closed.
    pub completed: u64,
    /// What went wrong, one line each.
    pub errors: Vec<String>,
}

impl DisruptionOutcome {
    fn failed(completed: u64, error: &BenchError) -> Self {
        Self {
            completed,
            errors: vec![error.with_causes()],
        }
    }
}

/// What is prepared for each disruption. The clients are boxed: they are
/// large, and the other variants hold little.
enum Work {
    UnackedClose {
        producer: Box<Producer>,
        /// The channel that takes the deliveries and is closed with them
        /// unacked; on the disruptor's connection.
        holder: Channel,
    },
    Declare,
    PagedDrain {
        producer: Box<Producer>,
        consumer: Box<Consumer>,
    },
    ConnectionChurn {
        uri: AMQPUri,
    },
    /// Run already.
    Spent,
}

/// The disruptor: its connection, a channel for declares and queries, and
/// what its disruption needs.
pub struct Disruptor {
    disruption: Disruption,
    count: u64,
    connection: Connection,
    control: Channel,
    work: Work,
    /// Queues of the declare disruption asked for so far, so that clean-up
    /// deletes each one that may exist.
    declares_sent: u64,
}

impl Disruptor {
    /// Connects, declares the disruptor's queue afresh where it has one, and
    /// connects what the disruption needs.
    pub async fn prepare(
        url: &str,
        disruption: Disruption,
        count: u64,
    ) -> Result<Self, BenchError> {
        let connection = client::connect(url, ROLE).await?;
        let mut control = open_channel(&connection).await?;
        let work = match disruption {
            Disruption::UnackedClose => {
                reset_queue(&connection, &mut control, STALL_QUEUE, false).await?;
                let producer = Producer::connect(
                    url,
                    ProducerPlan {
                        role: "stall publisher".to_owned(),
                        exchange: String::new(),
                        routing_key: STALL_QUEUE.to_owned(),
                        size_bytes: UNACKED_BODY_BYTES,
                        persistent: false,
                        confirm_window: 0,
                        schedule: None,
                        quota: Some(count),
                    },
                )
                .await?;
                let holder = open_channel(&connection).await?;
                Work::UnackedClose {
                    producer: Box::new(producer),
                    holder,
                }
            }
            Disruption::Declare => Work::Declare,
            Disruption::PagedDrain => {
                reset_queue(&connection, &mut control, STALL_QUEUE, true).await?;
                let producer = Producer::connect(
                    url,
                    ProducerPlan {
                        role: "stall publisher".to_owned(),
                        exchange: String::new(),
                        routing_key: STALL_QUEUE.to_owned(),
                        size_bytes: PAGED_BODY_BYTES,
                        persistent: true,
                        confirm_window: PAGED_CONFIRM_WINDOW,
                        schedule: None,
                        quota: Some(count),
                    },
                )
                .await?;
                let consumer = Consumer::connect(
                    url,
                    ConsumerPlan {
                        role: "stall consumer".to_owned(),
                        index: 0,
                        queue: STALL_QUEUE.to_owned(),
                        ack: AckMode::Manual,
                        prefetch: PAGED_PREFETCH,
                        ack_every: 1,
                    },
                )
                .await?;
                Work::PagedDrain {
                    producer: Box::new(producer),
                    consumer: Box::new(consumer),
                }
            }
            Disruption::ConnectionChurn => Work::ConnectionChurn {
                uri: idle::idle_uri(url)?,
            },
        };
        Ok(Self {
            disruption,
            count,
            connection,
            control,
            work,
            declares_sent: 0,
        })
    }

    /// Deletes `queue` if it exists and declares it afresh, non-durable, for
    /// the probe.
    pub async fn reset_probe_queue(&mut self, queue: &str) -> Result<(), BenchError> {
        reset_queue(&self.connection, &mut self.control, queue, false).await
    }

    /// Runs the disruption. Phase `i` begins at mark `first_mark + i` of the
    /// timeline; the caller marks the first phase's start and the last
    /// one's end. Ends early, with what it got through, once `cancel` is
    /// triggered.
    pub async fn run(
        &mut self,
        timeline: &Timeline,
        first_mark: usize,
        cancel: &Arc<Stop>,
        progress: &Progress,
    ) -> DisruptionOutcome {
        let count = self.count;
        match std::mem::replace(&mut self.work, Work::Spent) {
            Work::UnackedClose { producer, holder } => {
                unacked_close(
                    *producer,
                    holder,
                    &self.control,
                    count,
                    timeline,
                    first_mark,
                    cancel,
                    progress,
                )
                .await
            }
            Work::Declare => {
                let bar = progress.bar("declare", count);
                let mut outcome = DisruptionOutcome::default();
                for index in 0..count {
                    if cancel.is_triggered() {
                        break;
                    }
                    self.declares_sent = index + 1;
                    let declared = within(
                        ROLE,
                        "queue.declare",
                        SETUP_TIMEOUT_S,
                        self.control.queue_declare(
                            declared_queue_name(index).into(),
                            durable(),
                            FieldTable::default(),
                        ),
                    )
                    .await;
                    if let Err(error) = declared {
                        outcome.errors.push(error.with_causes());
                        break;
                    }
                    outcome.completed += 1;
                    bar.inc(1);
                }
                bar.finish_and_clear();
                outcome
            }
            Work::PagedDrain { producer, consumer } => {
                paged_drain(
                    *producer, *consumer, count, timeline, first_mark, cancel, progress,
                )
                .await
            }
            Work::ConnectionChurn { uri } => churn(&uri, count, cancel, progress).await,
            Work::Spent => panic!("a disruptor runs once"),
        }
    }
}

/// Deletes what the disruption declared, and `probe_queue`, on a connection
/// of its own (the disruptor's may have been closed by an error), and closes
/// the disruptor's connection. Returns one line per failure.
pub async fn clean_up(disruptor: Disruptor, url: &str, probe_queue: &str) -> Vec<String> {
    const CLEANUP: &str = "stall clean-up";
    let mut errors = Vec::new();
    let Disruptor {
        disruption,
        connection,
        control,
        declares_sent,
        work,
        ..
    } = disruptor;
    // Connections still held by a disruption that never ran (the probe
    // failed first) close when dropped; drop them before the queues go.
    drop(work);
    if connection.status().connected() {
        // Closed explicitly: a dropped channel's implicit close races the
        // connection's.
        let _ = within(
            ROLE,
            "channel.close",
            CLOSE_TIMEOUT_S,
            control.close(200, "stall done".into()),
        )
        .await;
    }
    if let Err(error) = client::close(&connection, ROLE).await {
        errors.push(error.with_causes());
    }
    let mut queues = vec![probe_queue.to_owned()];
    match disruption {
        Disruption::UnackedClose | Disruption::PagedDrain => queues.push(STALL_QUEUE.to_owned()),
        Disruption::Declare => queues.extend((0..declares_sent).map(declared_queue_name)),
        Disruption::ConnectionChurn => {}
    }
    let deleting = async {
        let connection = client::connect(url, CLEANUP).await?;
        let mut channel = within(
            CLEANUP,
            "channel.open",
            SETUP_TIMEOUT_S,
            connection.create_channel(),
        )
        .await?;
        for queue in &queues {
            delete_queue(&connection, &mut channel, CLEANUP, queue).await?;
        }
        let _ = within(
            CLEANUP,
            "channel.close",
            CLOSE_TIMEOUT_S,
            channel.close(200, "stall clean-up done".into()),
        )
        .await;
        client::close(&connection, CLEANUP).await
    };
    if let Err(error) = deleting.await {
        errors.push(format!(
            "deleting the run's queues failed, some may be left: {}",
            error.with_causes()
        ));
    }
    errors
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

async fn open_channel(connection: &Connection) -> Result<Channel, BenchError> {
    within(
        ROLE,
        "channel.open",
        SETUP_TIMEOUT_S,
        connection.create_channel(),
    )
    .await
}

/// Deletes `queue` if it exists. Brokers before RabbitMQ 3.x answer a
/// missing queue with a channel error, which closes the channel; a new one
/// takes its place.
async fn delete_queue(
    connection: &Connection,
    channel: &mut Channel,
    role: &str,
    queue: &str,
) -> Result<(), BenchError> {
    match within(
        role,
        "queue.delete",
        SETUP_TIMEOUT_S,
        channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(BenchError::Amqp { .. }) => {
            *channel = within(
                role,
                "channel.open",
                SETUP_TIMEOUT_S,
                connection.create_channel(),
            )
            .await?;
            Ok(())
        }
        Err(other) => Err(other),
    }
}

/// Deletes and declares `queue`, so that nothing an earlier run left in it
/// (or a declaration with other durability) is measured.
async fn reset_queue(
    connection: &Connection,
    channel: &mut Channel,
    queue: &str,
    is_durable: bool,
) -> Result<(), BenchError> {
    delete_queue(connection, channel, ROLE, queue).await?;
    let options = if is_durable {
        durable()
    } else {
        QueueDeclareOptions::default()
    };
    within(
        ROLE,
        "queue.declare",
        SETUP_TIMEOUT_S,
        channel.queue_declare(queue.into(), options, FieldTable::default()),
    )
    .await?;
    Ok(())
}

/// Publishes `count` messages, takes them all as deliveries without a
/// prefetch limit and without acking, closes the channel that holds them,
/// and waits until the queue has them all ready again.
#[allow(clippy::too_many_arguments)]
async fn unacked_close(
    producer: Producer,
    holder: Channel,
    control: &Channel,
    count: u64,
    timeline: &Timeline,
    first_mark: usize,
    cancel: &Arc<Stop>,
    progress: &Progress,
) -> DisruptionOutcome {
    // Phase "publish".
    let published = publish_showing_progress(producer, "publish", count, cancel, progress).await;
    if let Some(error) = &published.error {
        return DisruptionOutcome::failed(0, error);
    }
    if cancel.is_triggered() {
        return DisruptionOutcome::default();
    }

    // Phase "deliver": no basic.qos, so the broker sends everything at once.
    timeline.mark(first_mark + 1);
    let options = BasicConsumeOptions {
        no_ack: false,
        ..BasicConsumeOptions::default()
    };
    let subscribed = within(
        ROLE,
        "basic.consume",
        SETUP_TIMEOUT_S,
        holder.basic_consume(
            STALL_QUEUE.into(),
            "warren-bench-stall".into(),
            options,
            FieldTable::default(),
        ),
    )
    .await;
    let mut deliveries = match subscribed {
        Ok(deliveries) => deliveries,
        Err(error) => return DisruptionOutcome::failed(0, &error),
    };
    let bar = progress.bar("deliver", count);
    let mut held = 0u64;
    while held < count {
        tokio::select! {
            biased;
            () = cancel.triggered() => {
                bar.finish_and_clear();
                return DisruptionOutcome::default();
            }
            next = deliveries.next() => match next {
                // Dropping a delivery leaves it unacked.
                Some(Ok(_delivery)) => {
                    held += 1;
                    bar.inc(1);
                }
                Some(Err(source)) => {
                    bar.finish_and_clear();
                    return DisruptionOutcome::failed(
                        0,
                        &BenchError::amqp(ROLE, "basic.deliver", source),
                    );
                }
                None => {
                    bar.finish_and_clear();
                    return DisruptionOutcome::failed(
                        0,
                        &BenchError::Cancelled { role: ROLE.to_owned() },
                    );
                }
            },
        }
    }
    bar.finish_and_clear();

    // Phase "requeue": the channel closes with every delivery unacked.
    timeline.mark(first_mark + 2);
    let closed = within(
        ROLE,
        "channel.close",
        SETUP_TIMEOUT_S,
        holder.close(200, "stall: requeue everything".into()),
    )
    .await;
    drop(deliveries);
    if let Err(error) = closed {
        return DisruptionOutcome::failed(0, &error);
    }
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        let declared = within(
            ROLE,
            "queue.declare (passive)",
            SETUP_TIMEOUT_S,
            control.queue_declare(STALL_QUEUE.into(), passive, FieldTable::default()),
        )
        .await;
        let ready = match declared {
            Ok(queue) => u64::from(queue.message_count()),
            Err(error) => return DisruptionOutcome::failed(0, &error),
        };
        if ready >= count {
            return DisruptionOutcome {
                completed: ready,
                errors: Vec::new(),
            };
        }
        tokio::select! {
            () = cancel.triggered() => {
                return DisruptionOutcome {
                    completed: ready,
                    errors: Vec::new(),
                };
            }
            () = tokio::time::sleep(Duration::from_millis(REQUEUE_POLL_MS)) => {}
        }
    }
}

/// Runs a phase's producer with a progress bar that follows it.
async fn publish_showing_progress(
    producer: Producer,
    phase: &'static str,
    count: u64,
    cancel: &Arc<Stop>,
    progress: &Progress,
) -> ProducerOutcome {
    let counters = Arc::new(Counters::default());
    let display_stop = Arc::new(Stop::default());
    let display = tokio::spawn(progress::follow(
        progress.bar(phase, count),
        Track::Published,
        Arc::clone(&counters),
        Arc::clone(&display_stop),
    ));
    let published = producer.run(Arc::clone(cancel), counters).await;
    display_stop.trigger();
    let _ = display.await;
    published
}

/// Fills the durable queue with `count` persistent messages (confirmed),
/// then drains it with a manual-ack consumer.
async fn paged_drain(
    producer: Producer,
    consumer: Consumer,
    count: u64,
    timeline: &Timeline,
    first_mark: usize,
    cancel: &Arc<Stop>,
    progress: &Progress,
) -> DisruptionOutcome {
    // Phase "fill".
    let filled = publish_showing_progress(producer, "fill", count, cancel, progress).await;
    let mut outcome = DisruptionOutcome::default();
    if let Some(error) = &filled.error {
        outcome.errors.push(error.with_causes());
    }
    if filled.nacked > 0 || filled.unsettled > 0 {
        outcome.errors.push(format!(
            "stall publisher: of {} messages, {} were nacked and {} never confirmed",
            filled.published, filled.nacked, filled.unsettled
        ));
    }
    if !outcome.errors.is_empty() || cancel.is_triggered() {
        return outcome;
    }

    // Phase "drain": every confirmed message comes back.
    timeline.mark(first_mark + 1);
    let expected = filled.confirmed;
    let subscribed = match consumer.subscribe().await {
        Ok(subscribed) => subscribed,
        Err(error) => return DisruptionOutcome::failed(0, &error),
    };
    let drained = Arc::new(Stop::default());
    if expected == 0 {
        drained.trigger();
    }
    let counters = Arc::new(Counters::default());
    let task = tokio::spawn(subscribed.run(
        Arc::clone(&drained),
        Arc::clone(&counters),
        Some(DrainTarget {
            expected,
            done: Arc::clone(&drained),
        }),
    ));
    let display = tokio::spawn(progress::follow(
        progress.bar("drain", expected),
        Track::Consumed,
        Arc::clone(&counters),
        Arc::clone(&drained),
    ));
    tokio::select! {
        () = drained.triggered() => {}
        () = cancel.triggered() => drained.trigger(),
    }
    let _ = display.await;
    match task.await {
        Ok(consumed) => {
            outcome.completed = consumed.consumed;
            if let Some(error) = &consumed.error {
                outcome.errors.push(error.with_causes());
            }
        }
        Err(source) => outcome.errors.push(
            BenchError::TaskPanicked {
                role: "stall consumer".to_owned(),
                source,
            }
            .with_causes(),
        ),
    }
    outcome
}

/// Opens and closes `count` connections with a channel each,
/// [`CHURN_CONCURRENCY`] at a time; stops at the first failure.
async fn churn(
    uri: &AMQPUri,
    count: u64,
    cancel: &Arc<Stop>,
    progress: &Progress,
) -> DisruptionOutcome {
    let bar = progress.bar("churn", count);
    let mut outcome = DisruptionOutcome::default();
    let mut churning = stream::iter(0..count)
        .map(|index| churn_one(uri, index))
        .buffer_unordered(CHURN_CONCURRENCY);
    loop {
        tokio::select! {
            biased;
            () = cancel.triggered() => break,
            next = churning.next() => match next {
                Some(Ok(())) => {
                    outcome.completed += 1;
                    bar.inc(1);
                }
                Some(Err(error)) => {
                    outcome.errors.push(error.with_causes());
                    break;
                }
                None => break,
            },
        }
    }
    bar.finish_and_clear();
    outcome
}

/// Connects, opens a channel and closes the connection.
async fn churn_one(uri: &AMQPUri, index: u64) -> Result<(), BenchError> {
    let role = format!("churn {index}");
    let connection = client::connect_uri(uri, &role).await?;
    let channel = within(
        &role,
        "channel.open",
        SETUP_TIMEOUT_S,
        connection.create_channel(),
    )
    .await;
    // The channel stays alive until the connection has closed: a dropped
    // channel's implicit close would race the connection's.
    let closed = client::close(&connection, &role).await;
    drop(channel?);
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_disruption_has_phases() {
        for disruption in [
            Disruption::UnackedClose,
            Disruption::Declare,
            Disruption::PagedDrain,
            Disruption::ConnectionChurn,
        ] {
            assert!(!phases(disruption).is_empty(), "{disruption:?}");
        }
        assert_eq!(
            phases(Disruption::UnackedClose),
            ["publish", "deliver", "requeue"]
        );
    }

    #[test]
    fn declared_queues_are_named_after_the_stall_queue() {
        assert_eq!(declared_queue_name(0), "warren-bench-stall-0");
        assert_eq!(declared_queue_name(9_999), "warren-bench-stall-9999");
    }
}
