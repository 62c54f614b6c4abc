//! Declares the benchmark's queues (and fanout exchange) afresh before a run.
//!
//! Queues are deleted and declared again rather than purged: a purge would
//! keep a queue declared by an earlier run with other durability, and leftover
//! messages or unacked deliveries from that run would distort the results.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

use crate::cli::{Config, FANOUT_EXCHANGE, queue_name};
use crate::client::{self, CLOSE_TIMEOUT_S, SETUP_TIMEOUT_S, within};
use crate::error::BenchError;

const ROLE: &str = "setup";

/// What the setup found and removed from earlier runs.
#[derive(Debug, Default)]
pub struct SetupReport {
    /// Messages that were still in the queues and were deleted with them.
    pub stale_messages: u64,
}

/// Deletes and declares every bench queue, and the fanout exchange with its
/// bindings when asked for. Uses its own connection, closed before returning.
pub async fn declare_fresh(config: &Config) -> Result<SetupReport, BenchError> {
    let connection = client::connect(&config.url, ROLE).await?;
    let result = declare_on(&connection, config).await;
    // Close even when a declare failed, so the broker is left tidy; the
    // declare error is the one worth reporting.
    let closed = client::close(&connection, ROLE).await;
    let report = result?;
    closed?;
    Ok(report)
}

async fn declare_on(connection: &Connection, config: &Config) -> Result<SetupReport, BenchError> {
    let mut report = SetupReport::default();
    let mut channel = open_channel(connection).await?;
    for index in 0..config.queues {
        let name = queue_name(index);
        match within(
            ROLE,
            "queue.delete",
            SETUP_TIMEOUT_S,
            channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        {
            Ok(message_count) => report.stale_messages += u64::from(message_count),
            // Brokers before RabbitMQ 3.x made delete idempotent answer a
            // missing queue with a channel error; the channel is then gone.
            Err(BenchError::Amqp { .. }) => channel = open_channel(connection).await?,
            Err(other) => return Err(other),
        }
        let options = QueueDeclareOptions {
            durable: config.persistent,
            ..QueueDeclareOptions::default()
        };
        within(
            ROLE,
            "queue.declare",
            SETUP_TIMEOUT_S,
            channel.queue_declare(name.as_str().into(), options, FieldTable::default()),
        )
        .await?;
    }
    if config.exchange_fanout {
        // Deleted first because a declare with other durability than an
        // earlier run's would fail with PRECONDITION_FAILED.
        match within(
            ROLE,
            "exchange.delete",
            SETUP_TIMEOUT_S,
            channel.exchange_delete(FANOUT_EXCHANGE.into(), ExchangeDeleteOptions::default()),
        )
        .await
        {
            Ok(()) => {}
            Err(BenchError::Amqp { .. }) => channel = open_channel(connection).await?,
            Err(other) => return Err(other),
        }
        let options = ExchangeDeclareOptions {
            durable: config.persistent,
            ..ExchangeDeclareOptions::default()
        };
        within(
            ROLE,
            "exchange.declare",
            SETUP_TIMEOUT_S,
            channel.exchange_declare(
                FANOUT_EXCHANGE.into(),
                ExchangeKind::Fanout,
                options,
                FieldTable::default(),
            ),
        )
        .await?;
        for index in 0..config.queues {
            within(
                ROLE,
                "queue.bind",
                SETUP_TIMEOUT_S,
                channel.queue_bind(
                    queue_name(index).into(),
                    FANOUT_EXCHANGE.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
    }
    // Close the channel explicitly: lapin closes a dropped channel on its
    // own, and a connection.close racing that implicit channel.close fails
    // with "invalid channel state: Closing".
    within(
        ROLE,
        "channel.close",
        CLOSE_TIMEOUT_S,
        channel.close(200, "setup done".into()),
    )
    .await?;
    Ok(report)
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
