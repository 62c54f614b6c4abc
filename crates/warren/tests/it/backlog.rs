//! A durable queue filled far past what a queue keeps in memory (4,096
//! index entries): the broker's resident memory stays under a bound while
//! it fills, and every message is still there, in order.

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};

use crate::common::*;

const MESSAGES: u32 = 600_000;
/// Publishes between two looks at the broker's memory.
const WINDOW: u32 = 20_000;
/// When every queued message kept its index entry in memory, each cost
/// about 79 bytes: 600,000 of them, 45 MiB. The bound leaves room for
/// allocator slack and connection buffers, and still fails on that cost.
const GROWTH_MAX_BYTES: u64 = 24 * 1024 * 1024;

fn body(index: u32) -> Vec<u8> {
    let mut body = vec![0u8; 16];
    body[..4].copy_from_slice(&index.to_be_bytes());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_far_past_the_resident_window_keeps_memory_bounded() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    ch.queue_declare(
        "deep".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(Default::default())
        .await
        .expect("confirm.select");
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let mut baseline = 0;
    let mut peak = 0;
    for window in 0..MESSAGES / WINDOW {
        for index in window * WINDOW..(window + 1) * WINDOW {
            ch.basic_publish(
                "".into(),
                "deep".into(),
                BasicPublishOptions::default(),
                &body(index),
                persistent.clone(),
            )
            .await
            .expect("publish");
        }
        let returned = within("confirms", ch.wait_for_confirms())
            .await
            .expect("confirms");
        assert!(returned.is_empty());
        let resident = resident_bytes(broker.pid());
        // The first window already fills the queue's memory: what comes
        // after should cost disk only.
        if window == 0 {
            baseline = resident;
        }
        peak = peak.max(resident);
    }
    assert!(
        peak - baseline < GROWTH_MAX_BYTES,
        "resident memory grew from {baseline} to {peak} bytes while {MESSAGES} messages queued"
    );
    assert_eq!(ready_count(&ch, "deep").await, MESSAGES);
    for expected in 0..3 {
        let message = ch
            .basic_get("deep".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(message.delivery.data, body(expected));
    }
}
