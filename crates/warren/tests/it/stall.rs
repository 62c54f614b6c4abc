//! One client must not stall another. A probe publishes to a queue of its
//! own every 2 ms and consumes from it while a second client does something
//! heavy: closes a channel holding 100,000 unacked deliveries, declares
//! 10,000 durable queues, drains a backlog paged to disk, or opens and
//! closes 1,000 connections. The probe's longest silence (the largest gap
//! between two of its deliveries that overlaps the disruption) must stay
//! under a bound, and the disruption must really have happened.
//!
//! The tests run one at a time: each measures time on what may be a
//! two-core machine, and four brokers under heavy load at once would
//! measure each other.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_lite::StreamExt;
use lapin::{BasicProperties, Confirmation, options::*, types::FieldTable};
use tokio::task::JoinHandle;

/// The longest silence these tests accept from the probe during a
/// disruption. Generous, so that a loaded CI machine does not fail them;
/// the real target, a worst latency of at most 10 ms, is measured by
/// `warren-bench --stall` (benchmarks/compare.sh, scenario 7).
const SILENCE_MAX: Duration = Duration::from_millis(500);

/// How often the probe publishes.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);

/// The probe's queue.
const PROBE_QUEUE: &str = "stall.probe";

/// Longest a disruption may take before the test gives up on it.
const DISRUPTION_MAX: Duration = Duration::from_secs(120);

/// How often a wait for a condition looks again.
const POLL: Duration = Duration::from_millis(2);

/// One test at a time (see the module comment).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client that publishes to its own queue every [`PROBE_INTERVAL`] and
/// notes when each delivery arrives.
struct Probe {
    _conn: lapin::Connection,
    publisher: JoinHandle<()>,
    consumer: JoinHandle<()>,
    deliveries: Arc<Mutex<Vec<Instant>>>,
}

impl Probe {
    /// Starts the probe and returns once its first message has come back.
    async fn start(broker: &Broker) -> Probe {
        let conn = broker.connect().await;
        let publish_ch = new_channel(&conn).await;
        let consume_ch = new_channel(&conn).await;
        declare(&consume_ch, PROBE_QUEUE).await;
        let mut consumer = within(
            "probe basic_consume",
            consume_ch.basic_consume(
                PROBE_QUEUE.into(),
                "probe".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .expect("probe basic_consume");
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let consumer = tokio::spawn({
            let deliveries = Arc::clone(&deliveries);
            async move {
                // The channel lives as long as its consumer.
                let _channel = consume_ch;
                while let Some(Ok(_delivery)) = consumer.next().await {
                    deliveries.lock().unwrap().push(Instant::now());
                }
            }
        });
        let publisher = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PROBE_INTERVAL);
            // A probe that falls behind sends once, not a burst: the
            // deliveries' spacing is what is measured.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for sequence in 0u64.. {
                ticks.tick().await;
                let published = publish_ch
                    .basic_publish(
                        "".into(),
                        PROBE_QUEUE.into(),
                        BasicPublishOptions::default(),
                        &sequence.to_be_bytes(),
                        BasicProperties::default(),
                    )
                    .await;
                if published.is_err() {
                    return;
                }
            }
        });
        let probe = Probe {
            _conn: conn,
            publisher,
            consumer,
            deliveries,
        };
        wait_until("the probe's first delivery", || async {
            !probe.deliveries.lock().unwrap().is_empty()
        })
        .await;
        probe
    }

    /// Stops the probe and returns its longest silence that overlaps the
    /// time from `start` to `end`. A silence still going on when the probe
    /// stops lasts until then.
    fn stop(self, start: Instant, end: Instant) -> Duration {
        let stopped = Instant::now();
        self.publisher.abort();
        self.consumer.abort();
        let mut deliveries = self.deliveries.lock().unwrap().clone();
        deliveries.push(stopped);
        deliveries
            .windows(2)
            .filter(|gap| gap[1] > start && gap[0] < end)
            .map(|gap| gap[1] - gap[0])
            .max()
            .unwrap_or_default()
    }
}

/// Polls `condition` every [`POLL`] until it holds; panics after
/// [`DISRUPTION_MAX`].
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DISRUPTION_MAX;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {DISRUPTION_MAX:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Checks the probe's silence and prints it (visible with --nocapture).
fn assert_probe_kept_going(disruption: &str, silence: Duration, took: Duration) {
    eprintln!("{disruption}: took {took:?}; the probe's longest silence {silence:?}");
    assert!(
        silence < SILENCE_MAX,
        "{disruption} (took {took:?}) silenced the probe for {silence:?}, over {SILENCE_MAX:?}"
    );
}

const HELD: u32 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_with_100_000_unacked_deliveries_does_not_stall_others() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let control = new_channel(&conn).await;
    declare(&control, "stall.held").await;
    let publisher = new_channel(&conn).await;
    for sequence in 0..HELD {
        within(
            "basic_publish",
            publisher.basic_publish(
                "".into(),
                "stall.held".into(),
                BasicPublishOptions::default(),
                &sequence.to_be_bytes(),
                BasicProperties::default(),
            ),
        )
        .await
        .expect("basic_publish");
    }
    wait_until("all published messages queued", || async {
        ready_count(&control, "stall.held").await == HELD
    })
    .await;

    // No basic.qos: the broker hands over everything at once.
    let holder = new_channel(&conn).await;
    let mut held = within(
        "basic_consume",
        holder.basic_consume(
            "stall.held".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic_consume");
    for _ in 0..HELD {
        next_delivery(&mut held, "a held delivery").await;
    }
    assert_eq!(ready_count(&control, "stall.held").await, 0);

    let probe = Probe::start(&broker).await;
    let start = Instant::now();
    within("channel.close", holder.close(200, "requeue all".into()))
        .await
        .expect("channel.close");
    wait_until("every delivery requeued", || async {
        ready_count(&control, "stall.held").await == HELD
    })
    .await;
    let end = Instant::now();
    let silence = probe.stop(start, end);
    assert_probe_kept_going("requeueing 100,000 deliveries", silence, end - start);
}

const QUEUES: u32 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_10_000_durable_queues_does_not_stall_others() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    let probe = Probe::start(&broker).await;
    let start = Instant::now();
    for index in 0..QUEUES {
        within(
            "queue_declare",
            ch.queue_declare(
                format!("stall.durable.{index}").into(),
                durable,
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue {index}: {e}"));
    }
    let end = Instant::now();
    let silence = probe.stop(start, end);

    for index in 0..QUEUES {
        ready_count(&ch, &format!("stall.durable.{index}")).await;
    }
    assert_probe_kept_going("declaring 10,000 durable queues", silence, end - start);
}

/// Far more than the 2,048 messages (or 8 MiB) a queue keeps in memory, so
/// the drain reads most of them back from disk.
const BACKLOG: u32 = 50_000;
const BACKLOG_BODY_BYTES: usize = 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_backlog_paged_to_disk_does_not_stall_others() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    within(
        "queue_declare",
        ch.queue_declare(
            "stall.backlog".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare the backlog queue");
    within("confirm_select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let mut body = vec![0u8; BACKLOG_BODY_BYTES];
    let mut confirms = Vec::with_capacity(BACKLOG as usize);
    for sequence in 0..BACKLOG {
        body[..4].copy_from_slice(&sequence.to_be_bytes());
        let confirm = within(
            "basic_publish",
            ch.basic_publish(
                "".into(),
                "stall.backlog".into(),
                BasicPublishOptions::default(),
                &body,
                persistent.clone(),
            ),
        )
        .await
        .expect("basic_publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert_eq!(
            within("confirm", confirm).await.expect("confirm"),
            Confirmation::Ack(None)
        );
    }
    assert_eq!(ready_count(&ch, "stall.backlog").await, BACKLOG);

    let drainer = new_channel(&conn).await;
    within("basic_qos", drainer.basic_qos(100, Default::default()))
        .await
        .expect("basic.qos");
    let probe = Probe::start(&broker).await;
    let start = Instant::now();
    let mut backlog = within(
        "basic_consume",
        drainer.basic_consume(
            "stall.backlog".into(),
            "drainer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic_consume");
    let mut seen = vec![false; BACKLOG as usize];
    for _ in 0..BACKLOG {
        let delivery = next_delivery(&mut backlog, "a backlog message").await;
        let sequence = u32::from_be_bytes(delivery.data[..4].try_into().expect("4 bytes"));
        seen[sequence as usize] = true;
        within("basic_ack", delivery.ack(BasicAckOptions::default()))
            .await
            .expect("basic.ack");
    }
    let end = Instant::now();
    let silence = probe.stop(start, end);
    assert!(seen.iter().all(|&got| got), "some messages never came back");
    assert_eq!(ready_count(&ch, "stall.backlog").await, 0);
    assert_probe_kept_going("draining 50,000 paged messages", silence, end - start);
}

const CONNECTIONS: u32 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_and_closing_1_000_connections_does_not_stall_others() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let probe = Probe::start(&broker).await;
    let start = Instant::now();
    let mut opened = 0;
    for _ in 0..CONNECTIONS {
        let conn = broker.connect().await;
        let ch = new_channel(&conn).await;
        within("connection.close", conn.close(200, "churn".into()))
            .await
            .expect("connection.close");
        drop(ch);
        opened += 1;
    }
    let end = Instant::now();
    let silence = probe.stop(start, end);
    assert_eq!(opened, CONNECTIONS);
    assert_probe_kept_going(
        "opening and closing 1,000 connections",
        silence,
        end - start,
    );
}
