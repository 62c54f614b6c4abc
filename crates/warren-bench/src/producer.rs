//! A producer: one connection and channel publishing stamped messages, with up
//! to a window of publishes in flight.
//!
//! Publishes are pipelined: the producer keeps sending while earlier messages
//! wait for their confirm, and only waits when the window is full. Without
//! confirms the same window bounds messages handed to lapin but not yet
//! written to the socket, so a slow broker pushes back through TCP instead of
//! through this process's memory.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::client::{self, SETUP_TIMEOUT_S, start_now, within};
use crate::error::BenchError;
use crate::rate::Schedule;
use crate::stamp::{Stamp, now_unix_ns};
use crate::stats::{self, Counters};
use crate::stop::Stop;

/// Messages handed to lapin but not yet written, per producer, when confirms
/// are off. Large enough that the socket never waits on this loop, small
/// enough that a stalled broker costs at most this many bodies of memory.
const SEND_WINDOW_UNCONFIRMED: usize = 1024;

/// How long a producer waits for the confirms still outstanding when it stops
/// publishing. A persistent message the broker has not confirmed after this
/// long is lost or stuck, which the report must say rather than wait for.
const CONFIRM_DRAIN_TIMEOUT_S: u64 = 30;

/// AMQP delivery modes (basic properties).
const DELIVERY_MODE_TRANSIENT: u8 = 1;
const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// What one producer publishes and how.
#[derive(Clone, Debug)]
pub struct ProducerPlan {
    /// Names the connection in errors and in the broker's connection list.
    pub role: String,
    /// "" for the default exchange.
    pub exchange: String,
    /// The queue name with the default exchange; "" with fanout.
    pub routing_key: String,
    pub size_bytes: usize,
    pub persistent: bool,
    /// Most unconfirmed publishes at once; 0 turns confirms off.
    pub confirm_window: usize,
    /// Fixed-rate schedule, or `None` for as fast as possible.
    pub schedule: Option<Schedule>,
    /// Stop after this many messages (prefill); `None` runs until stopped.
    pub quota: Option<u64>,
}

/// What one producer did.
#[derive(Debug)]
pub struct ProducerOutcome {
    pub role: String,
    /// Messages handed to lapin.
    pub published: u64,
    /// Messages the broker acked.
    pub confirmed: u64,
    /// Messages the broker nacked.
    pub nacked: u64,
    /// Messages still awaiting a confirm (or the socket) when the producer
    /// gave up: the channel failed or the drain limit ran out.
    pub unsettled: u64,
    /// Publish-to-confirm latency of acked messages.
    pub confirm_latency: Histogram<u64>,
    /// The first error, if the producer did not finish cleanly.
    pub error: Option<BenchError>,
}

/// A connected producer, ready to run.
pub struct Producer {
    role: String,
    connection: Connection,
    channel: Channel,
    plan: ProducerPlan,
}

/// Result of one publish: its confirmation and how long it took to arrive.
type Settled = lapin::Result<(Confirmation, Duration)>;

impl Producer {
    /// Connects and opens the channel, in confirm mode when asked for.
    pub async fn connect(url: &str, plan: ProducerPlan) -> Result<Self, BenchError> {
        let role = plan.role.clone();
        let connection = client::connect(url, &role).await?;
        let channel = within(
            &role,
            "channel.open",
            SETUP_TIMEOUT_S,
            connection.create_channel(),
        )
        .await?;
        if plan.confirm_window > 0 {
            within(
                &role,
                "confirm.select",
                SETUP_TIMEOUT_S,
                channel.confirm_select(ConfirmSelectOptions::default()),
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

    /// Publishes until `stop` or the quota, waits for outstanding confirms,
    /// and closes the connection.
    pub async fn run(self, stop: Arc<Stop>, counters: Arc<Counters>) -> ProducerOutcome {
        let Self {
            role,
            connection,
            channel,
            plan,
        } = self;
        let mut outcome = ProducerOutcome {
            role,
            published: 0,
            confirmed: 0,
            nacked: 0,
            unsettled: 0,
            confirm_latency: stats::latency_histogram(),
            error: None,
        };
        let window = if plan.confirm_window > 0 {
            plan.confirm_window
        } else {
            SEND_WINDOW_UNCONFIRMED
        };
        let properties = BasicProperties::default().with_delivery_mode(if plan.persistent {
            DELIVERY_MODE_PERSISTENT
        } else {
            DELIVERY_MODE_TRANSIENT
        });
        let exchange = ShortString::from(plan.exchange.as_str());
        let routing_key = ShortString::from(plan.routing_key.as_str());
        let mut body = vec![0u8; plan.size_bytes];
        let mut in_flight = FuturesUnordered::new();
        let start = Instant::now();

        let publishing: Result<(), BenchError> = async {
            loop {
                if stop.is_triggered() || plan.quota.is_some_and(|quota| outcome.published >= quota)
                {
                    return Ok(());
                }
                if in_flight.len() >= window {
                    if let Some(settled) = in_flight.next().await {
                        settle(settled, &mut outcome, &counters)?;
                    }
                    continue;
                }
                if let Some(schedule) = plan.schedule {
                    let due = start + schedule.due_after(outcome.published);
                    if due > Instant::now() {
                        // Keep settling confirms while waiting, so their
                        // latency is measured when they arrive.
                        tokio::select! {
                            () = tokio::time::sleep_until(due.into()) => {}
                            Some(settled) = in_flight.next(), if !in_flight.is_empty() => {
                                settle(settled, &mut outcome, &counters)?;
                                continue;
                            }
                            () = stop.triggered() => return Ok(()),
                        }
                    }
                }
                Stamp {
                    sent_unix_ns: now_unix_ns(),
                    sequence: outcome.published,
                }
                .encode_into(&mut body);
                let publish = publish_one(
                    &channel,
                    exchange.clone(),
                    routing_key.clone(),
                    body.clone(),
                    properties.clone(),
                );
                outcome.published += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
                match start_now(publish) {
                    Ok(settled) => settle(settled, &mut outcome, &counters)?,
                    Err(pending) => in_flight.push(pending),
                }
            }
        }
        .await;

        let settling = match publishing {
            // The channel is gone; its confirms will never come.
            Err(error) => Err(error),
            Ok(()) => {
                let drain = async {
                    while let Some(settled) = in_flight.next().await {
                        settle(settled, &mut outcome, &counters)?;
                    }
                    Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(CONFIRM_DRAIN_TIMEOUT_S), drain)
                    .await
                {
                    Ok(result) => result,
                    Err(_elapsed) => Err(BenchError::Timeout {
                        role: outcome.role.clone(),
                        operation: "waiting for publisher confirms",
                        limit_s: CONFIRM_DRAIN_TIMEOUT_S,
                    }),
                }
            }
        };
        outcome.unsettled = in_flight.len() as u64;
        drop(in_flight);
        let closing = client::close(&connection, &outcome.role).await;
        outcome.error = settling.err().or(closing.err());
        outcome
    }
}

/// Sends one message and waits for its confirm (or, without confirms, for
/// its frames to be written), returning the time from call to confirmation.
fn publish_one(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
) -> impl Future<Output = Settled> + '_ {
    let sent_at = Instant::now();
    async move {
        let confirm = channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        let confirmation = confirm.await?;
        Ok((confirmation, sent_at.elapsed()))
    }
}

/// Books one finished publish into the outcome and the live counters.
fn settle(
    settled: Settled,
    outcome: &mut ProducerOutcome,
    counters: &Counters,
) -> Result<(), BenchError> {
    match settled {
        Ok((Confirmation::Ack(_), latency)) => {
            outcome.confirmed += 1;
            counters.confirmed.fetch_add(1, Ordering::Relaxed);
            let latency_ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
            stats::record_latency_ns(&mut outcome.confirm_latency, latency_ns);
        }
        Ok((Confirmation::Nack(_), _)) => outcome.nacked += 1,
        Ok((Confirmation::NotRequested, _)) => {}
        Err(source) => return Err(BenchError::amqp(&outcome.role, "basic.publish", source)),
    }
    Ok(())
}
