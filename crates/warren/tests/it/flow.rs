//! Consumer-paced flow control through real clients: a held-back publisher
//! loses nothing and gets every confirm, and a publisher to a queue with a
//! slow consumer is not held back at all.

use crate::common::*;
use futures_lite::StreamExt;
use lapin::{BasicProperties, Confirmation, options::*, types::FieldTable};

const MESSAGES: u32 = 20_000;

/// A limit far under the backlog a pipelined publisher builds, so that the
/// publisher is held back many times over the run.
const CONFIG: &str = "[amqp]\nflow_ready_max = 5\n";

async fn consume(ch: &lapin::Channel, queue: &str, no_ack: bool) -> lapin::Consumer {
    within(
        "basic_consume",
        ch.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("basic_consume")
}

/// A channel in confirm mode on a connection of its own.
async fn confirming_channel(broker: &Broker) -> (lapin::Connection, lapin::Channel) {
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    within("confirm_select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_publisher_gets_every_confirm_and_loses_nothing() {
    let broker = Broker::start_with_config(CONFIG).await;
    let consumer_conn = broker.connect().await;
    let consumer_ch = new_channel(&consumer_conn).await;
    declare(&consumer_ch, "q.flow").await;
    let mut consumer = consume(&consumer_ch, "q.flow", true).await;

    let (_publisher_conn, ch) = confirming_channel(&broker).await;
    let mut confirms = Vec::with_capacity(MESSAGES as usize);
    for sequence in 0..MESSAGES {
        let confirm = within(
            "basic_publish",
            ch.basic_publish(
                "".into(),
                "q.flow".into(),
                BasicPublishOptions::default(),
                &sequence.to_be_bytes(),
                BasicProperties::default(),
            ),
        )
        .await
        .expect("basic_publish");
        confirms.push(confirm);
    }

    let mut received = Vec::with_capacity(MESSAGES as usize);
    while received.len() < MESSAGES as usize {
        let delivery = within("delivery", consumer.next())
            .await
            .expect("the consumer is open")
            .expect("a delivery");
        received.push(u32::from_be_bytes(delivery.data[..4].try_into().unwrap()));
    }
    assert_eq!(received, (0..MESSAGES).collect::<Vec<_>>());
    for (sequence, confirm) in confirms.into_iter().enumerate() {
        let confirmation = within("confirm", confirm).await.expect("confirm");
        assert_eq!(confirmation, Confirmation::Ack(None), "publish #{sequence}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_to_a_queue_with_a_slow_consumer_is_not_held_back() {
    let broker = Broker::start_with_config(CONFIG).await;
    let consumer_conn = broker.connect().await;
    let consumer_ch = new_channel(&consumer_conn).await;
    declare(&consumer_ch, "q.slow").await;
    within("basic_qos", consumer_ch.basic_qos(1, Default::default()))
        .await
        .expect("basic.qos");
    // Takes one message and never acks it.
    let mut consumer = consume(&consumer_ch, "q.slow", false).await;

    let (_publisher_conn, ch) = confirming_channel(&broker).await;
    // Each publish waits for its confirm, as a synchronous client does.
    // Were this publisher held back, each confirm would wait out the
    // longest hold (100 ms) and the whole would take over 3 minutes,
    // far past the limit `within` puts on it.
    let publishing = async {
        for sequence in 0..2_000u32 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    "q.slow".into(),
                    BasicPublishOptions::default(),
                    &sequence.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await
                .expect("basic_publish");
            assert_eq!(confirm.await.expect("confirm"), Confirmation::Ack(None));
        }
    };
    within("2,000 synchronous publishes", publishing).await;
    let first = next_delivery(&mut consumer, "the one message the consumer takes").await;
    assert_eq!(first.data, 0u32.to_be_bytes());
}
