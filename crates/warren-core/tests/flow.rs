//! Consumer-paced flow control, driven through the broker state machine:
//! which publishes are told to hold back, and when the hold ends.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use warren_core::{
    Broker, ConnectionId, Consume, Effect, Limits, Message, Outbox, QueueDeclare, QueueId,
};

const PUBLISHER: ConnectionId = ConnectionId(1);
const CONSUMER: ConnectionId = ConnectionId(2);
const READY_MAX: usize = 10;

fn broker(flow_ready_max: usize) -> Broker {
    let limits = Limits {
        flow_ready_max,
        ..Limits::default()
    };
    let mut broker = Broker::new(&[], limits, 7);
    broker.advance_clock(1_000_000);
    for connection in [PUBLISHER, CONSUMER] {
        broker.open_connection(connection, "/", true);
        broker.open_channel(connection, 1);
    }
    broker
        .declare_queue(
            PUBLISHER,
            QueueDeclare {
                name: "q".into(),
                ..Default::default()
            },
        )
        .unwrap();
    broker
}

/// Starts a manual-ack consumer on CONSUMER with this prefetch.
fn consume(broker: &mut Broker, prefetch: u16, out: &mut Outbox) {
    broker.set_prefetch(CONSUMER, 1, prefetch, false, out);
    broker
        .consume(
            CONSUMER,
            1,
            Consume {
                queue: "q".into(),
                consumer_tag: "c".into(),
                ..Default::default()
            },
            out,
        )
        .unwrap();
}

/// Publishes one message to "q" from `connection`; returns the queue the
/// broker says should hold the publisher back.
fn publish(broker: &mut Broker, connection: ConnectionId, out: &mut Outbox) -> Option<QueueId> {
    let message = Arc::new(Message {
        exchange: "".into(),
        routing_key: "q".into(),
        properties: BasicProperties::default(),
        body: Bytes::from_static(b"m"),
    });
    broker.publish(connection, 1, message, out).unwrap().flow
}

/// Writes and acks everything delivered to CONSUMER so far.
fn ack_delivered(broker: &mut Broker, out: &mut Outbox) {
    let tags: Vec<u64> = out
        .effects
        .drain(..)
        .filter_map(|effect| match effect {
            Effect::Deliver(delivery) => Some(delivery.delivery_tag),
            _ => None,
        })
        .collect();
    if let Some(&last) = tags.iter().max() {
        broker.deliveries_written(CONSUMER, 1, tags.len() as u32, out);
        broker.ack(CONSUMER, 1, last, true, out).unwrap();
    }
}

/// Every millisecond for `ms` ms: `per_ms` publishes from `publisher`,
/// then the consumer acks what it was given (20 at a time with prefetch
/// 20, 20,000 msg/s: a fast consumer). Returns the flow verdicts.
fn run(
    broker: &mut Broker,
    publisher: ConnectionId,
    ms: u64,
    per_ms: usize,
    out: &mut Outbox,
) -> Vec<QueueId> {
    let mut held = Vec::new();
    for _ in 0..ms {
        broker.advance_clock(broker.now_ms() + 1);
        for _ in 0..per_ms {
            held.extend(publish(broker, publisher, out));
        }
        ack_delivered(broker, out);
    }
    held
}

#[test]
fn a_queue_without_consumers_never_holds_publishers_back() {
    let mut broker = broker(READY_MAX);
    let mut out = Outbox::default();
    assert!(run(&mut broker, PUBLISHER, 100, 30, &mut out).is_empty());
    assert_eq!(broker.queue_info("/", "q").unwrap().ready, 3_000);
}

#[test]
fn fast_consumers_that_fall_behind_hold_publishers_back_until_they_catch_up() {
    let mut broker = broker(READY_MAX);
    let mut out = Outbox::default();
    consume(&mut broker, 20, &mut out);
    // 30 published and 20 delivered each millisecond: the backlog grows.
    let held = run(&mut broker, PUBLISHER, 100, 30, &mut out);
    let queue = *held.last().expect("the publisher is held back");
    assert!(broker.flow_holds(queue));
    assert_eq!(broker.flow_room(queue), Some(0));

    // With no more publishes the consumer drains the backlog: the hold
    // ends at half the limit, and the room grows as it drains.
    for _ in 0..1_000 {
        if !broker.flow_holds(queue) {
            break;
        }
        broker.advance_clock(broker.now_ms() + 1);
        ack_delivered(&mut broker, &mut out);
    }
    let ready = broker.queue_info("/", "q").unwrap().ready;
    assert!(ready <= READY_MAX / 2, "{ready} ready when the hold ended");
    assert_eq!(broker.flow_room(queue), Some(READY_MAX - ready));
}

#[test]
fn slow_consumers_do_not_hold_publishers_back() {
    let mut broker = broker(READY_MAX);
    let mut out = Outbox::default();
    // One delivery and never an ack: far under 1,000 msg/s.
    consume(&mut broker, 1, &mut out);
    let mut held = Vec::new();
    for _ in 0..100 {
        broker.advance_clock(broker.now_ms() + 1);
        held.extend(publish(&mut broker, PUBLISHER, &mut out));
    }
    assert!(held.is_empty());
    assert_eq!(broker.queue_info("/", "q").unwrap().ready, 99);
}

#[test]
fn a_connection_that_consumes_is_not_held_back() {
    let mut broker = broker(READY_MAX);
    let mut out = Outbox::default();
    consume(&mut broker, 20, &mut out);
    // Its own acks drain the queue: holding its reads would stall them.
    assert!(run(&mut broker, CONSUMER, 100, 30, &mut out).is_empty());
    assert!(broker.queue_info("/", "q").unwrap().ready > READY_MAX);
}

#[test]
fn a_limit_of_zero_turns_flow_control_off() {
    let mut broker = broker(0);
    let mut out = Outbox::default();
    consume(&mut broker, 20, &mut out);
    assert!(run(&mut broker, PUBLISHER, 100, 30, &mut out).is_empty());
}
