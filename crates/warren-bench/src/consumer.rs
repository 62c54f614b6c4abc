//! A consumer: one connection and channel consuming one bench queue, recording
//! end-to-end latency from the stamp in each body.
//!
//! With manual acks, acks are pipelined like publishes: each is handed to
//! lapin at once (in delivery order, which `multiple` acks need) and the
//! consumer goes on receiving while lapin writes them.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use crate::cli::AckMode;
use crate::client::{self, SETUP_TIMEOUT_S, start_now, within};
use crate::error::BenchError;
use crate::stamp::{Stamp, now_unix_ns};
use crate::stats::{self, Counters};
use crate::stop::Stop;

/// Acks handed to lapin but not yet written, per consumer. Bounds memory if
/// the socket stalls; far above what a healthy connection ever holds.
const ACKS_IN_FLIGHT_MAX: usize = 4096;

/// How long a stopping consumer waits for its last acks to be written.
const ACK_DRAIN_TIMEOUT_S: u64 = 10;

/// What one consumer consumes and how.
#[derive(Clone, Debug)]
pub struct ConsumerPlan {
    /// Names the connection in errors and in the broker's connection list.
    pub role: String,
    /// Makes the consumer tag, `warren-bench-INDEX`.
    pub index: usize,
    pub queue: String,
    pub ack: AckMode,
    /// basic.qos prefetch_count with manual acks; 0 is unlimited.
    pub prefetch: u16,
    /// Ack every N-th delivery with multiple=true (1: each on its own).
    pub ack_every: u32,
}

/// When the drain phase is over: the run-wide consumed total to reach, and
/// the signal to raise when it is reached.
#[derive(Clone, Debug)]
pub struct DrainTarget {
    pub expected: u64,
    pub done: Arc<Stop>,
}

/// What one consumer did.
#[derive(Debug)]
pub struct ConsumerOutcome {
    pub role: String,
    /// Deliveries received.
    pub consumed: u64,
    /// Deliveries flagged as redelivered (requeued by the broker).
    pub redelivered: u64,
    /// Deliveries without a latency stamp: not published by this tool.
    pub unstamped: u64,
    /// Send-to-receive latency of stamped deliveries.
    pub latency: Histogram<u64>,
    /// The first error, if the consumer did not finish cleanly.
    pub error: Option<BenchError>,
}

/// A connected consumer, not yet subscribed.
pub struct Consumer {
    role: String,
    connection: Connection,
    channel: Channel,
    plan: ConsumerPlan,
}

/// A consumer subscribed to its queue; deliveries are flowing.
pub struct Subscribed {
    consumer: Consumer,
    deliveries: lapin::Consumer,
}

impl Consumer {
    /// Connects, opens the channel and sets the prefetch; does not subscribe,
    /// so a phase can start the clock after every connection is up.
    pub async fn connect(url: &str, plan: ConsumerPlan) -> Result<Self, BenchError> {
        let role = plan.role.clone();
        let connection = client::connect(url, &role).await?;
        let channel = within(
            &role,
            "channel.open",
            SETUP_TIMEOUT_S,
            connection.create_channel(),
        )
        .await?;
        // With no_ack the broker ignores prefetch, so only set it when it counts.
        if plan.ack == AckMode::Manual {
            within(
                &role,
                "basic.qos",
                SETUP_TIMEOUT_S,
                channel.basic_qos(plan.prefetch, BasicQosOptions::default()),
            )
            .await?;
        }
        Ok(Self {
            role,
            connection,
            channel,
            plan,
        })
    }

    /// Subscribes to the queue (basic.consume).
    pub async fn subscribe(self) -> Result<Subscribed, BenchError> {
        let options = BasicConsumeOptions {
            no_ack: self.plan.ack == AckMode::Auto,
            ..BasicConsumeOptions::default()
        };
        let tag = format!("warren-bench-{}", self.plan.index);
        let deliveries = within(
            &self.role,
            "basic.consume",
            SETUP_TIMEOUT_S,
            self.channel.basic_consume(
                self.plan.queue.as_str().into(),
                tag.into(),
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Subscribed {
            consumer: self,
            deliveries,
        })
    }
}

impl Subscribed {
    /// Receives until `stop` (or, with a drain target, until the run has
    /// consumed everything), acks what is outstanding, and closes.
    pub async fn run(
        self,
        stop: Arc<Stop>,
        counters: Arc<Counters>,
        drain: Option<DrainTarget>,
    ) -> ConsumerOutcome {
        let Self {
            consumer:
                Consumer {
                    role,
                    connection,
                    channel,
                    plan,
                },
            mut deliveries,
        } = self;
        let mut outcome = ConsumerOutcome {
            role,
            consumed: 0,
            redelivered: 0,
            unstamped: 0,
            latency: stats::latency_histogram(),
            error: None,
        };
        let manual = plan.ack == AckMode::Manual;
        let multiple = plan.ack_every > 1;
        let mut acks = FuturesUnordered::new();
        // Deliveries received but not yet covered by an ack, and the newest tag.
        let mut unacked: u32 = 0;
        let mut last_tag = 0u64;
        let stopped = stop.triggered();
        tokio::pin!(stopped);

        let receiving: Result<(), BenchError> = async {
            loop {
                tokio::select! {
                    // Stop first: a fast stream must not keep a stopped
                    // consumer running.
                    biased;
                    () = &mut stopped => return Ok(()),
                    Some(written) = acks.next(), if !acks.is_empty() => {
                        let written: lapin::Result<()> = written;
                        written.map_err(|e| BenchError::amqp(&outcome.role, "basic.ack", e))?;
                    }
                    next = deliveries.next() => {
                        let delivery = match next {
                            Some(Ok(delivery)) => delivery,
                            Some(Err(source)) => {
                                return Err(BenchError::amqp(&outcome.role, "basic.deliver", source));
                            }
                            // The broker cancelled the consumer (queue deleted).
                            None => return Ok(()),
                        };
                        let received_unix_ns = now_unix_ns();
                        match Stamp::decode(&delivery.data) {
                            Some(stamp) => stats::record_latency_ns(
                                &mut outcome.latency,
                                stamp.latency_ns(received_unix_ns),
                            ),
                            None => outcome.unstamped += 1,
                        }
                        outcome.consumed += 1;
                        if delivery.redelivered {
                            outcome.redelivered += 1;
                        }
                        let total = counters.consumed.fetch_add(1, Ordering::Relaxed) + 1;
                        if let Some(drain) = &drain
                            && total >= drain.expected
                        {
                            drain.done.trigger();
                        }
                        if manual {
                            unacked += 1;
                            last_tag = delivery.delivery_tag;
                            if unacked >= plan.ack_every {
                                unacked = 0;
                                if let Err(pending) = start_now(ack(&channel, last_tag, multiple)) {
                                    acks.push(pending);
                                }
                                while acks.len() >= ACKS_IN_FLIGHT_MAX {
                                    if let Some(written) = acks.next().await {
                                        written.map_err(|e| {
                                            BenchError::amqp(&outcome.role, "basic.ack", e)
                                        })?;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        .await;

        // Ack the tail that did not fill a batch, so the broker does not
        // redeliver consumed messages to the next run's consumers.
        let acking = match receiving {
            Err(error) => Err(error),
            Ok(()) => {
                if manual && unacked > 0 {
                    acks.push(Box::pin(ack(&channel, last_tag, true)));
                }
                let drain = async {
                    while let Some(written) = acks.next().await {
                        written.map_err(|e| BenchError::amqp(&outcome.role, "basic.ack", e))?;
                    }
                    Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(ACK_DRAIN_TIMEOUT_S), drain).await {
                    Ok(result) => result,
                    Err(_elapsed) => Err(BenchError::Timeout {
                        role: outcome.role.clone(),
                        operation: "writing the last acks",
                        limit_s: ACK_DRAIN_TIMEOUT_S,
                    }),
                }
            }
        };
        drop(acks);
        drop(deliveries);
        let closing = client::close(&connection, &outcome.role).await;
        outcome.error = acking.err().or(closing.err());
        outcome
    }
}

/// Acknowledges `delivery_tag` (and, with `multiple`, everything before it).
fn ack(
    channel: &Channel,
    delivery_tag: u64,
    multiple: bool,
) -> impl Future<Output = lapin::Result<()>> + '_ {
    channel.basic_ack(delivery_tag, BasicAckOptions { multiple })
}
