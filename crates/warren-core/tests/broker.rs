//! The broker state machine driven directly, without sockets: routing,
//! delivery order, prefetch, requeue and lifetimes, checked against what
//! RabbitMQ documents.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::Bytes;
use warren_core::{
    Broker, BrokerError, ConnectionId, Consume, DELIVERY_ROUND_MAX, Delivery, Effect, ErrorCode,
    ExchangeDeclare, Limits, Message, Outbox, QueueDeclare,
};

const A: ConnectionId = ConnectionId(1);
const B: ConnectionId = ConnectionId(2);

fn broker() -> Broker {
    let mut broker = Broker::new(&[], Limits::default(), 42);
    for connection in [A, B] {
        broker.open_connection(connection, "/", true);
        broker.open_channel(connection, 1);
    }
    broker
}

fn declare(broker: &mut Broker, connection: ConnectionId, name: &str) -> ShortString {
    broker
        .declare_queue(
            connection,
            QueueDeclare {
                name: name.into(),
                ..Default::default()
            },
        )
        .unwrap()
        .name
}

fn message(exchange: &str, routing_key: &str, body: &str) -> Arc<Message> {
    Arc::new(Message {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        properties: BasicProperties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    })
}

fn publish(broker: &mut Broker, exchange: &str, routing_key: &str, body: &str) -> usize {
    let mut out = Outbox::default();
    let routed = broker
        .publish(A, 1, message(exchange, routing_key, body), &mut out)
        .unwrap()
        .routed;
    assert!(out.effects.is_empty(), "no consumer expected");
    routed
}

fn consume(
    broker: &mut Broker,
    connection: ConnectionId,
    queue: &str,
    tag: &str,
    out: &mut Outbox,
) {
    broker
        .consume(
            connection,
            1,
            Consume {
                queue: queue.into(),
                consumer_tag: tag.into(),
                ..Default::default()
            },
            out,
        )
        .unwrap();
}

fn deliveries(out: &mut Outbox) -> Vec<Delivery> {
    out.take()
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::Deliver(delivery) => Some(delivery),
            Effect::CancelConsumer { .. }
            | Effect::CloseChannel { .. }
            | Effect::ReadAhead(_)
            | Effect::Discard(_) => None,
        })
        .collect()
}

fn bodies(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|delivery| String::from_utf8(delivery.message.body.to_vec()).unwrap())
        .collect()
}

fn code(result: Result<impl std::fmt::Debug, BrokerError>) -> ErrorCode {
    result.expect_err("expected a refusal").code()
}

#[test]
fn default_exchange_routes_by_queue_name() {
    let mut broker = broker();
    declare(&mut broker, A, "jobs");
    assert_eq!(publish(&mut broker, "", "jobs", "x"), 1);
    assert_eq!(publish(&mut broker, "", "missing", "x"), 0);
    assert_eq!(broker.queue_counts("/", "jobs"), Some((1, 0)));
}

#[test]
fn topic_exchange_routes_like_the_tutorial() {
    let mut broker = broker();
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "topic_logs".into(),
                kind: "topic".into(),
                ..Default::default()
            },
        )
        .unwrap();
    declare(&mut broker, A, "q1");
    declare(&mut broker, A, "q2");
    for (queue, key) in [("q1", "*.orange.*"), ("q2", "*.*.rabbit"), ("q2", "lazy.#")] {
        broker
            .bind_queue(
                A,
                queue,
                "topic_logs",
                key.into(),
                FieldTable::default(),
                true,
            )
            .unwrap();
    }
    assert_eq!(
        publish(&mut broker, "topic_logs", "quick.orange.rabbit", "1"),
        2
    );
    assert_eq!(
        publish(&mut broker, "topic_logs", "lazy.pink.rabbit", "2"),
        1
    );
    assert_eq!(
        publish(&mut broker, "topic_logs", "quick.brown.fox", "3"),
        0
    );
    assert_eq!(publish(&mut broker, "topic_logs", "lazy", "4"), 1);
    assert_eq!(broker.queue_counts("/", "q1"), Some((1, 0)));
    assert_eq!(broker.queue_counts("/", "q2"), Some((3, 0)));
}

#[test]
fn exchange_to_exchange_bindings_deliver_once_and_survive_cycles() {
    let mut broker = broker();
    for name in ["e1", "e2"] {
        broker
            .declare_exchange(
                A,
                ExchangeDeclare {
                    name: name.into(),
                    kind: "fanout".into(),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    declare(&mut broker, A, "q");
    broker
        .bind_exchange(A, "e2", "e1", "".into(), FieldTable::default(), true)
        .unwrap();
    broker
        .bind_exchange(A, "e1", "e2", "".into(), FieldTable::default(), true)
        .unwrap();
    broker
        .bind_queue(A, "q", "e1", "".into(), FieldTable::default(), true)
        .unwrap();
    broker
        .bind_queue(A, "q", "e2", "".into(), FieldTable::default(), true)
        .unwrap();
    assert_eq!(publish(&mut broker, "e1", "", "x"), 1);
    assert_eq!(broker.queue_counts("/", "q"), Some((1, 0)));
}

#[test]
fn consumers_share_a_queue_round_robin() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    let mut out = Outbox::default();
    consume(&mut broker, A, "q", "a", &mut out);
    consume(&mut broker, B, "q", "b", &mut out);
    for index in 0..4 {
        broker
            .publish(A, 1, message("", "q", &index.to_string()), &mut out)
            .unwrap();
    }
    let tags: Vec<String> = deliveries(&mut out)
        .iter()
        .map(|delivery| delivery.consumer_tag.to_string())
        .collect();
    assert_eq!(tags, ["a", "b", "a", "b"]);
}

#[test]
fn prefetch_limits_unacked_deliveries_and_acks_release_more() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 2, false, &mut out);
    consume(&mut broker, A, "q", "c", &mut out);
    for index in 0..5 {
        broker
            .publish(A, 1, message("", "q", &index.to_string()), &mut out)
            .unwrap();
    }
    let first = deliveries(&mut out);
    assert_eq!(bodies(&first), ["0", "1"]);
    assert_eq!(broker.queue_counts("/", "q"), Some((3, 1)));
    broker
        .ack(A, 1, first[1].delivery_tag, true, &mut out)
        .unwrap();
    assert_eq!(bodies(&deliveries(&mut out)), ["2", "3"]);
}

#[test]
fn closing_a_channel_requeues_in_original_order_marked_redelivered() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    let mut out = Outbox::default();
    consume(&mut broker, A, "q", "c", &mut out);
    for index in 1..=5 {
        broker
            .publish(B, 1, message("", "q", &index.to_string()), &mut out)
            .unwrap();
    }
    let delivered = deliveries(&mut out);
    // Ack the middle one; the rest come back in order.
    broker
        .ack(A, 1, delivered[2].delivery_tag, false, &mut out)
        .unwrap();
    broker.close_channel(A, 1, &mut out);
    assert!(deliveries(&mut out).is_empty());
    broker.open_channel(A, 2);
    let mut redelivered = Vec::new();
    while let Some(got) = broker.get(A, 2, "q", true, &mut Outbox::default()).unwrap() {
        assert!(got.redelivered);
        redelivered.push(String::from_utf8(got.message.body.to_vec()).unwrap());
    }
    assert_eq!(redelivered, ["1", "2", "4", "5"]);
}

#[test]
fn nack_with_requeue_returns_message_to_the_head() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    publish(&mut broker, "", "q", "first");
    publish(&mut broker, "", "q", "second");
    let got = broker
        .get(A, 1, "q", false, &mut Outbox::default())
        .unwrap()
        .unwrap();
    assert!(!got.redelivered);
    let mut out = Outbox::default();
    broker
        .reject(A, 1, got.delivery_tag, false, true, &mut out)
        .unwrap();
    let again = broker
        .get(A, 1, "q", false, &mut Outbox::default())
        .unwrap()
        .unwrap();
    assert_eq!(&again.message.body[..], b"first");
    assert!(again.redelivered);
}

#[test]
fn unknown_and_double_acks_are_precondition_failed() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    publish(&mut broker, "", "q", "x");
    let got = broker
        .get(A, 1, "q", false, &mut Outbox::default())
        .unwrap()
        .unwrap();
    let mut out = Outbox::default();
    assert_eq!(
        code(broker.ack(A, 1, 99, false, &mut out)),
        ErrorCode::PreconditionFailed
    );
    broker.ack(A, 1, got.delivery_tag, false, &mut out).unwrap();
    assert_eq!(
        code(broker.ack(A, 1, got.delivery_tag, false, &mut out)),
        ErrorCode::PreconditionFailed
    );
}

#[test]
fn exclusive_queues_are_locked_to_their_connection_and_deleted_with_it() {
    let mut broker = broker();
    let name = broker
        .declare_queue(
            A,
            QueueDeclare {
                exclusive: true,
                ..Default::default()
            },
        )
        .unwrap()
        .name;
    assert!(name.as_str().starts_with("amq.gen-"));
    assert_eq!(
        code(broker.declare_queue(
            B,
            QueueDeclare {
                name: name.clone(),
                passive: true,
                ..Default::default()
            }
        )),
        ErrorCode::ResourceLocked
    );
    let mut out = Outbox::default();
    broker.close_connection(A, &mut out);
    assert_eq!(broker.queue_counts("/", name.as_str()), None);
}

#[test]
fn redeclaring_with_different_properties_is_refused() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    let durable = QueueDeclare {
        name: "q".into(),
        durable: true,
        ..Default::default()
    };
    let error = broker.declare_queue(A, durable).unwrap_err();
    assert_eq!(error.code(), ErrorCode::PreconditionFailed);
    assert!(
        error.to_string().contains("inequivalent arg 'durable'"),
        "{error}"
    );
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10));
    let with_arguments = QueueDeclare {
        name: "q".into(),
        arguments,
        ..Default::default()
    };
    assert_eq!(
        code(broker.declare_queue(A, with_arguments)),
        ErrorCode::PreconditionFailed
    );
}

#[test]
fn reserved_names_and_the_default_exchange_are_protected() {
    let mut broker = broker();
    let amq = ExchangeDeclare {
        name: "amq.custom".into(),
        kind: "direct".into(),
        ..Default::default()
    };
    assert_eq!(
        code(broker.declare_exchange(A, amq)),
        ErrorCode::AccessRefused
    );
    declare(&mut broker, A, "q");
    assert_eq!(
        code(broker.bind_queue(A, "q", "", "q".into(), FieldTable::default(), true)),
        ErrorCode::AccessRefused
    );
    let unknown_type = ExchangeDeclare {
        name: "e".into(),
        kind: "nonsense".into(),
        ..Default::default()
    };
    // The current RabbitMQ's 406 (a channel error), not 3.x's 503.
    assert_eq!(
        code(broker.declare_exchange(A, unknown_type)),
        ErrorCode::PreconditionFailed
    );
}

#[test]
fn deleting_a_queue_cancels_its_consumers() {
    let mut broker = broker();
    declare(&mut broker, A, "q");
    let mut out = Outbox::default();
    consume(&mut broker, B, "q", "watcher", &mut out);
    assert_eq!(
        broker.delete_queue(A, "q", false, false, &mut out).unwrap(),
        0
    );
    let cancelled: Vec<_> = out
        .take()
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::CancelConsumer {
                connection,
                consumer_tag,
                ..
            } => Some((connection, consumer_tag)),
            Effect::Deliver(_)
            | Effect::CloseChannel { .. }
            | Effect::ReadAhead(_)
            | Effect::Discard(_) => None,
        })
        .collect();
    assert_eq!(cancelled, [(B, ShortString::from("watcher"))]);
}

#[test]
fn auto_delete_queue_goes_with_its_last_consumer() {
    let mut broker = broker();
    broker
        .declare_queue(
            A,
            QueueDeclare {
                name: "temp".into(),
                auto_delete: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut out = Outbox::default();
    consume(&mut broker, A, "temp", "c", &mut out);
    assert!(broker.cancel(A, 1, "c", &mut out));
    assert_eq!(broker.queue_counts("/", "temp"), None);
}

#[test]
fn a_channel_that_does_not_drain_stops_receiving() {
    let limits = Limits {
        deliveries_unwritten_per_channel_max: 3,
        ..Limits::default()
    };
    let mut broker = Broker::new(&[], limits, 1);
    broker.open_connection(A, "/", true);
    broker.open_channel(A, 1);
    declare(&mut broker, A, "q");
    let mut out = Outbox::default();
    broker
        .consume(
            A,
            1,
            Consume {
                queue: "q".into(),
                consumer_tag: "c".into(),
                no_ack: true,
                ..Default::default()
            },
            &mut out,
        )
        .unwrap();
    for index in 0..10 {
        broker
            .publish(A, 1, message("", "q", &index.to_string()), &mut out)
            .unwrap();
    }
    assert_eq!(deliveries(&mut out).len(), 3);
    broker.deliveries_written(A, 1, 3, &mut out);
    assert_eq!(bodies(&deliveries(&mut out)), ["3", "4", "5"]);
}

/// A consumer that arrives at a long backlog gets it in rounds of at most
/// `DELIVERY_ROUND_MAX` deliveries, so that no single call holds the
/// broker for the whole backlog; the rounds the server runs afterwards
/// bring the rest, in queue order, and round-robin among consumers holds
/// across rounds.
#[test]
fn a_backlog_is_delivered_in_bounded_rounds_in_order() {
    let mut broker = broker();
    let queue = declare(&mut broker, A, "backlog");
    let count = 3 * DELIVERY_ROUND_MAX + 10;
    for index in 0..count {
        publish(&mut broker, "", queue.as_str(), &format!("m{index}"));
    }
    let mut out = Outbox::default();
    consume(&mut broker, A, "backlog", "first", &mut out);
    let first = deliveries(&mut out);
    assert_eq!(first.len(), DELIVERY_ROUND_MAX);
    assert!(broker.has_rounds(), "the rest waits for further rounds");

    let mut all = first;
    let mut rounds = 1;
    loop {
        let more = broker.continue_rounds(&mut out);
        rounds += 1;
        let round = deliveries(&mut out);
        assert!(round.len() <= DELIVERY_ROUND_MAX);
        all.extend(round);
        if !more {
            break;
        }
    }
    assert_eq!(rounds, 4, "three full rounds and one of 10");
    assert!(!broker.has_rounds());
    let expected: Vec<String> = (0..count).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies(&all), expected);
}

#[test]
fn rounds_alternate_between_consumers_of_one_queue() {
    let mut broker = broker();
    let queue = declare(&mut broker, A, "shared");
    let mut out = Outbox::default();
    consume(&mut broker, A, "shared", "a", &mut out);
    consume(&mut broker, B, "shared", "b", &mut out);
    // Consumers with no prefetch take what is published as it comes; a
    // nack of many with requeue brings back a backlog at once.
    let count = 2 * DELIVERY_ROUND_MAX;
    for index in 0..count {
        broker
            .publish(
                A,
                1,
                message("", queue.as_str(), &format!("m{index}")),
                &mut out,
            )
            .unwrap();
    }
    let delivered = deliveries(&mut out);
    assert_eq!(delivered.len(), count);
    let to_a = delivered.iter().filter(|d| d.connection == A).count();
    assert_eq!(to_a, count / 2, "round-robin while publishing");
    let last_of_a = delivered
        .iter()
        .filter(|d| d.connection == A)
        .map(|d| d.delivery_tag)
        .max()
        .unwrap();
    broker
        .reject(A, 1, last_of_a, true, true, &mut out)
        .unwrap();
    let mut back = deliveries(&mut out);
    while broker.continue_rounds(&mut out) {
        back.extend(deliveries(&mut out));
    }
    back.extend(deliveries(&mut out));
    // A's unacked deliveries went back and were handed out again: B, whose
    // turn it was, has room as well, so both get some.
    assert_eq!(back.len(), count / 2);
    assert!(back.iter().any(|d| d.connection == A));
    assert!(back.iter().any(|d| d.connection == B));
}
