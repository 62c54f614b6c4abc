//! RabbitMQ's extensions driven through the broker state machine with a
//! hand-moved clock: TTLs, queue expiry, dead-lettering, length limits,
//! priorities, single active consumer, consumer priorities, the quorum
//! delivery limit, consumer timeouts, alternate exchanges and direct
//! reply-to. The integration tests check the same behaviours through real
//! clients; these pin down the timing without waiting for it.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use warren_core::{
    Broker, ConnectionId, Consume, Delivery, EXPIRY_ROUND_MAX, Effect, ErrorCode, ExchangeDeclare,
    Limits, Message, Outbox, Published, QueueDeclare,
};

const A: ConnectionId = ConnectionId(1);
const B: ConnectionId = ConnectionId(2);
/// An arbitrary start time, ms since the epoch.
const T0: u64 = 1_800_000_000_000;

fn broker() -> Broker {
    let mut broker = Broker::new(&[], Limits::default(), 7);
    broker.advance_clock(T0);
    for connection in [A, B] {
        broker.open_connection(connection, "/", true);
        broker.open_channel(connection, 1);
    }
    broker
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn declare_with(broker: &mut Broker, name: &str, arguments: FieldTable) {
    broker
        .declare_queue(
            A,
            QueueDeclare {
                name: name.into(),
                arguments,
                ..Default::default()
            },
        )
        .unwrap();
}

fn declare_dlx(broker: &mut Broker) {
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "dlx".into(),
                kind: "fanout".into(),
                ..Default::default()
            },
        )
        .unwrap();
    declare_with(broker, "dead", FieldTable::default());
    broker
        .bind_queue(A, "dead", "dlx", "".into(), FieldTable::default(), true)
        .unwrap();
}

fn publish_with(
    broker: &mut Broker,
    queue: &str,
    body: &str,
    properties: BasicProperties,
    out: &mut Outbox,
) -> Published {
    broker
        .publish(
            A,
            1,
            Arc::new(Message {
                exchange: "".into(),
                routing_key: queue.into(),
                properties,
                body: Bytes::copy_from_slice(body.as_bytes()),
            }),
            out,
        )
        .unwrap()
}

fn publish(broker: &mut Broker, queue: &str, body: &str) -> Published {
    publish_with(
        broker,
        queue,
        body,
        BasicProperties::default(),
        &mut Outbox::default(),
    )
}

fn get_all(broker: &mut Broker, queue: &str) -> Vec<Arc<Message>> {
    let mut taken = Vec::new();
    while let Some(got) = broker
        .get(A, 1, queue, true, &mut Outbox::default())
        .unwrap()
    {
        taken.push(got.message);
    }
    taken
}

fn bodies(messages: &[Arc<Message>]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.body).into_owned())
        .collect()
}

fn consume(
    broker: &mut Broker,
    connection: ConnectionId,
    queue: &str,
    tag: &str,
    arguments: FieldTable,
    out: &mut Outbox,
) {
    broker
        .consume(
            connection,
            1,
            Consume {
                queue: queue.into(),
                consumer_tag: tag.into(),
                arguments,
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
            _ => None,
        })
        .collect()
}

fn header<'a>(message: &'a Message, key: &str) -> Option<&'a AMQPValue> {
    message
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(key))
}

fn death_field(message: &Message, index: usize, key: &str) -> AMQPValue {
    let Some(AMQPValue::FieldArray(deaths)) = header(message, "x-death") else {
        panic!("no x-death header");
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[index] else {
        panic!("x-death entry is not a table");
    };
    death.inner()[key].clone()
}

fn advance(broker: &mut Broker, ms: u64) -> Outbox {
    let now = broker.now_ms();
    broker.advance_clock(now + ms);
    let mut out = Outbox::default();
    broker.tick(&mut out);
    out
}

/// A broker with the dead-letter setup and a queue "work" whose messages
/// live 1,000 ms and then go to "dlx".
fn broker_with_expiring_work_queue() -> Broker {
    let mut broker = broker();
    declare_dlx(&mut broker);
    declare_with(
        &mut broker,
        "work",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(1_000)),
            ("x-dead-letter-exchange", text("dlx")),
        ]),
    );
    broker
}

#[test]
fn queue_ttl_expires_messages_into_the_dead_letter_exchange() {
    let mut broker = broker_with_expiring_work_queue();
    publish(&mut broker, "work", "old");
    advance(&mut broker, 600);
    publish(&mut broker, "work", "new");
    advance(&mut broker, 400);
    assert_eq!(
        broker.queue_counts("/", "work"),
        Some((1, 0)),
        "the first expired at 1000 ms"
    );
    let dead = get_all(&mut broker, "dead");
    assert_eq!(bodies(&dead), vec!["old"]);
    assert_eq!(death_field(&dead[0], 0, "reason"), text("expired"));
    assert_eq!(death_field(&dead[0], 0, "queue"), text("work"));
    assert_eq!(death_field(&dead[0], 0, "count"), AMQPValue::LongLongInt(1));
    assert_eq!(
        header(&dead[0], "x-first-death-reason"),
        Some(&text("expired"))
    );
    assert_eq!(bodies(&get_all(&mut broker, "work")), vec!["new"]);
}

/// However many messages are due, one tick expires at most
/// `EXPIRY_ROUND_MAX` of a queue's, so the exclusive tick stays short; the
/// next ticks expire the rest, in order, into the dead-letter exchange.
#[test]
fn a_tick_expires_a_bounded_round_and_the_next_ticks_the_rest() {
    let mut broker = broker_with_expiring_work_queue();
    let total = 2 * EXPIRY_ROUND_MAX + 5;
    for index in 0..total {
        publish(&mut broker, "work", &index.to_string());
    }
    advance(&mut broker, 1_000);
    assert_eq!(
        broker.queue_counts("/", "work"),
        Some((total - EXPIRY_ROUND_MAX, 0)),
        "one tick expires one round"
    );
    assert!(broker.tick_due(), "the rest is due at the next tick");
    let mut ticks = 1;
    while broker.queue_counts("/", "work") != Some((0, 0)) {
        assert!(broker.tick_due());
        advance(&mut broker, 10);
        ticks += 1;
    }
    assert_eq!(ticks, 3);
    assert!(!broker.tick_due());
    let expected: Vec<String> = (0..total).map(|index| index.to_string()).collect();
    assert_eq!(bodies(&get_all(&mut broker, "dead")), expected);
}

#[test]
fn the_lower_of_queue_and_message_ttl_applies_and_expired_messages_are_never_delivered() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "work",
        table(&[("x-message-ttl", AMQPValue::LongInt(10_000))]),
    );
    let short = BasicProperties::default().with_expiration("100".into());
    publish_with(&mut broker, "work", "short", short, &mut Outbox::default());
    publish(&mut broker, "work", "long");
    broker.advance_clock(T0 + 100);
    // No tick ran: the expired head is skipped when the queue is read.
    assert_eq!(bodies(&get_all(&mut broker, "work")), vec!["long"]);
}

#[test]
fn ttl_zero_reaches_a_waiting_consumer_and_nobody_else() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "now",
        table(&[("x-message-ttl", AMQPValue::LongInt(0))]),
    );
    publish(&mut broker, "now", "unseen");
    assert_eq!(broker.queue_counts("/", "now"), Some((0, 0)));
    let mut out = Outbox::default();
    consume(&mut broker, B, "now", "c", FieldTable::default(), &mut out);
    publish_with(
        &mut broker,
        "now",
        "seen",
        BasicProperties::default(),
        &mut out,
    );
    assert_eq!(
        deliveries(&mut out)
            .iter()
            .map(|delivery| delivery.message.body.clone())
            .collect::<Vec<_>>(),
        vec![Bytes::from_static(b"seen")]
    );
}

#[test]
fn an_invalid_expiration_is_refused() {
    let mut broker = broker();
    declare_with(&mut broker, "q", FieldTable::default());
    let error = broker
        .publish(
            A,
            1,
            Arc::new(Message {
                exchange: "".into(),
                routing_key: "q".into(),
                properties: BasicProperties::default().with_expiration("soon".into()),
                body: Bytes::new(),
            }),
            &mut Outbox::default(),
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::PreconditionFailed);
    assert!(error.to_string().contains("soon"), "{error}");
}

#[test]
fn an_unused_queue_expires_and_a_consumed_one_does_not() {
    let mut broker = broker();
    let expires = table(&[("x-expires", AMQPValue::LongInt(500))]);
    declare_with(&mut broker, "idle", expires.clone());
    declare_with(&mut broker, "busy", expires);
    consume(
        &mut broker,
        B,
        "busy",
        "c",
        FieldTable::default(),
        &mut Outbox::default(),
    );
    advance(&mut broker, 499);
    assert!(broker.queue_counts("/", "idle").is_some());
    advance(&mut broker, 1);
    assert!(
        broker.queue_counts("/", "idle").is_none(),
        "idle queue deleted"
    );
    assert!(broker.queue_counts("/", "busy").is_some());
    // Once its consumer goes, the busy queue's clock starts.
    broker.cancel(B, 1, "c", &mut Outbox::default());
    advance(&mut broker, 499);
    assert!(broker.queue_counts("/", "busy").is_some());
    advance(&mut broker, 1);
    assert!(broker.queue_counts("/", "busy").is_none());
}

#[test]
fn drop_head_dead_letters_the_oldest_with_reason_maxlen() {
    let mut broker = broker();
    declare_dlx(&mut broker);
    declare_with(
        &mut broker,
        "bounded",
        table(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text("dlx")),
        ]),
    );
    for body in ["1", "2", "3"] {
        assert!(!publish(&mut broker, "bounded", body).rejected);
    }
    let dead = get_all(&mut broker, "dead");
    assert_eq!(bodies(&dead), vec!["1"]);
    assert_eq!(death_field(&dead[0], 0, "reason"), text("maxlen"));
    assert_eq!(bodies(&get_all(&mut broker, "bounded")), vec!["2", "3"]);
}

#[test]
fn max_length_bytes_counts_bodies() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "bytes",
        table(&[("x-max-length-bytes", AMQPValue::LongInt(10))]),
    );
    for body in ["aaaa", "bbbb", "cccc"] {
        publish(&mut broker, "bytes", body);
    }
    assert_eq!(bodies(&get_all(&mut broker, "bytes")), vec!["bbbb", "cccc"]);
}

#[test]
fn reject_publish_refuses_and_reject_publish_dlx_also_dead_letters() {
    let mut broker = broker();
    declare_dlx(&mut broker);
    for (name, overflow) in [
        ("strict", "reject-publish"),
        ("strict-dlx", "reject-publish-dlx"),
    ] {
        declare_with(
            &mut broker,
            name,
            table(&[
                ("x-max-length", AMQPValue::LongInt(1)),
                ("x-overflow", text(overflow)),
                ("x-dead-letter-exchange", text("dlx")),
            ]),
        );
        assert!(!publish(&mut broker, name, "kept").rejected);
        assert!(publish(&mut broker, name, "refused").rejected);
        assert_eq!(bodies(&get_all(&mut broker, name)), vec!["kept"]);
    }
    let dead = get_all(&mut broker, "dead");
    assert_eq!(
        bodies(&dead),
        vec!["refused"],
        "only reject-publish-dlx dead-letters"
    );
    assert_eq!(death_field(&dead[0], 0, "queue"), text("strict-dlx"));
}

#[test]
fn priorities_order_delivery_and_are_capped_at_the_maximum() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "urgent",
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(5))]),
    );
    for (body, priority) in [
        ("low", None),
        ("mid", Some(3)),
        ("over", Some(9)),
        ("top", Some(5)),
    ] {
        let mut properties = BasicProperties::default();
        if let Some(priority) = priority {
            properties = properties.with_priority(priority);
        }
        publish_with(
            &mut broker,
            "urgent",
            body,
            properties,
            &mut Outbox::default(),
        );
    }
    // 9 counts as 5 and arrived before "top", so it goes first.
    assert_eq!(
        bodies(&get_all(&mut broker, "urgent")),
        vec!["over", "top", "mid", "low"]
    );
}

#[test]
fn a_single_active_consumer_gets_everything_until_it_leaves() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "sac",
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    );
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 1, false, &mut out);
    consume(
        &mut broker,
        A,
        "sac",
        "first",
        FieldTable::default(),
        &mut out,
    );
    consume(
        &mut broker,
        B,
        "sac",
        "second",
        FieldTable::default(),
        &mut out,
    );
    for body in ["1", "2", "3"] {
        publish_with(
            &mut broker,
            "sac",
            body,
            BasicProperties::default(),
            &mut out,
        );
    }
    // The active consumer's prefetch is full; the other waits all the same.
    let tags: Vec<String> = deliveries(&mut out)
        .iter()
        .map(|delivery| delivery.consumer_tag.to_string())
        .collect();
    assert_eq!(tags, vec!["first"]);
    // It leaves with a delivery unacked; the next takes over at once.
    broker.cancel(A, 1, "first", &mut out);
    let after: Vec<String> = deliveries(&mut out)
        .iter()
        .map(|delivery| {
            format!(
                "{}:{}",
                delivery.consumer_tag,
                String::from_utf8_lossy(&delivery.message.body)
            )
        })
        .collect();
    assert_eq!(after, vec!["second:2", "second:3"]);
    let refused = broker.consume(
        A,
        1,
        Consume {
            queue: "sac".into(),
            exclusive: true,
            ..Default::default()
        },
        &mut out,
    );
    assert_eq!(refused.unwrap_err().code(), ErrorCode::AccessRefused);
}

#[test]
fn higher_priority_consumers_are_served_first_while_they_have_room() {
    let mut broker = broker();
    declare_with(&mut broker, "q", FieldTable::default());
    let mut out = Outbox::default();
    consume(&mut broker, A, "q", "low", FieldTable::default(), &mut out);
    broker.set_prefetch(B, 1, 2, false, &mut out);
    consume(
        &mut broker,
        B,
        "q",
        "high",
        table(&[("x-priority", AMQPValue::LongInt(10))]),
        &mut out,
    );
    for body in ["1", "2", "3", "4"] {
        publish_with(&mut broker, "q", body, BasicProperties::default(), &mut out);
    }
    let tags: Vec<String> = deliveries(&mut out)
        .iter()
        .map(|delivery| delivery.consumer_tag.to_string())
        .collect();
    assert_eq!(tags, vec!["high", "high", "low", "low"]);
}

#[test]
fn a_quorum_queue_counts_returns_and_dead_letters_past_the_delivery_limit() {
    let mut broker = broker();
    declare_dlx(&mut broker);
    broker
        .declare_queue(
            A,
            QueueDeclare {
                name: "jobs".into(),
                durable: true,
                arguments: table(&[
                    ("x-queue-type", text("quorum")),
                    ("x-delivery-limit", AMQPValue::LongInt(1)),
                    ("x-dead-letter-exchange", text("dlx")),
                ]),
                ..Default::default()
            },
        )
        .unwrap();
    publish(&mut broker, "jobs", "poison");
    let mut out = Outbox::default();
    let first = broker
        .get(A, 1, "jobs", false, &mut out)
        .unwrap()
        .expect("first delivery");
    assert_eq!(header(&first.message, "x-delivery-count"), None);
    broker
        .reject(A, 1, first.delivery_tag, false, true, &mut out)
        .unwrap();
    let second = broker
        .get(A, 1, "jobs", false, &mut out)
        .unwrap()
        .expect("redelivered once");
    assert!(second.redelivered);
    assert_eq!(
        header(&second.message, "x-delivery-count"),
        Some(&AMQPValue::LongLongInt(1))
    );
    broker
        .reject(A, 1, second.delivery_tag, false, true, &mut out)
        .unwrap();
    assert_eq!(broker.queue_counts("/", "jobs"), Some((0, 0)));
    let dead = get_all(&mut broker, "dead");
    assert_eq!(death_field(&dead[0], 0, "reason"), text("delivery_limit"));
}

#[test]
fn a_delivery_not_acked_within_the_consumer_timeout_closes_its_channel() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "slow",
        table(&[("x-consumer-timeout", AMQPValue::LongInt(1_000))]),
    );
    let mut out = Outbox::default();
    consume(&mut broker, B, "slow", "c", FieldTable::default(), &mut out);
    publish_with(
        &mut broker,
        "slow",
        "job",
        BasicProperties::default(),
        &mut out,
    );
    assert_eq!(deliveries(&mut out).len(), 1);
    assert!(advance(&mut broker, 999).effects.is_empty());
    let closes: Vec<Effect> = advance(&mut broker, 1).take();
    match closes.as_slice() {
        [
            Effect::CloseChannel {
                connection,
                channel,
                error,
            },
        ] => {
            assert_eq!((*connection, *channel), (B, 1));
            assert_eq!(error.code(), ErrorCode::PreconditionFailed);
        }
        other => panic!("expected one channel close, got {other:?}"),
    }
    // Asked once only; the connection closes the channel and the message
    // goes back.
    assert!(advance(&mut broker, 1_000).effects.is_empty());
    broker.close_channel(B, 1, &mut out);
    assert_eq!(broker.queue_counts("/", "slow"), Some((1, 0)));
}

#[test]
fn an_alternate_exchange_takes_what_its_exchange_cannot_route() {
    let mut broker = broker();
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "unrouted".into(),
                kind: "fanout".into(),
                ..Default::default()
            },
        )
        .unwrap();
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "main".into(),
                kind: "direct".into(),
                arguments: table(&[("alternate-exchange", text("unrouted"))]),
                ..Default::default()
            },
        )
        .unwrap();
    declare_with(&mut broker, "routed", FieldTable::default());
    declare_with(&mut broker, "leftovers", FieldTable::default());
    broker
        .bind_queue(
            A,
            "routed",
            "main",
            "known".into(),
            FieldTable::default(),
            true,
        )
        .unwrap();
    broker
        .bind_queue(
            A,
            "leftovers",
            "unrouted",
            "".into(),
            FieldTable::default(),
            true,
        )
        .unwrap();
    for key in ["known", "unknown"] {
        let published = broker
            .publish(
                A,
                1,
                Arc::new(Message {
                    exchange: "main".into(),
                    routing_key: key.into(),
                    properties: BasicProperties::default(),
                    body: Bytes::copy_from_slice(key.as_bytes()),
                }),
                &mut Outbox::default(),
            )
            .unwrap();
        assert_eq!(published.routed, 1, "{key} is routed somewhere");
    }
    assert_eq!(bodies(&get_all(&mut broker, "routed")), vec!["known"]);
    assert_eq!(bodies(&get_all(&mut broker, "leftovers")), vec!["unknown"]);
}

#[test]
fn direct_reply_to_sends_replies_straight_to_the_requesting_channel() {
    let mut broker = broker();
    declare_with(&mut broker, "rpc", FieldTable::default());
    let mut out = Outbox::default();
    let refused = broker.consume(
        A,
        1,
        Consume {
            queue: "amq.rabbitmq.reply-to".into(),
            ..Default::default()
        },
        &mut out,
    );
    assert_eq!(
        refused.unwrap_err().code(),
        ErrorCode::PreconditionFailed,
        "must be no-ack"
    );
    let request = BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into());
    let no_consumer = broker.publish(
        A,
        1,
        Arc::new(Message {
            exchange: "".into(),
            routing_key: "rpc".into(),
            properties: request.clone(),
            body: Bytes::new(),
        }),
        &mut out,
    );
    assert_eq!(
        no_consumer.unwrap_err().code(),
        ErrorCode::PreconditionFailed
    );
    broker
        .consume(
            A,
            1,
            Consume {
                queue: "amq.rabbitmq.reply-to".into(),
                consumer_tag: "replies".into(),
                no_ack: true,
                ..Default::default()
            },
            &mut out,
        )
        .unwrap();
    publish_with(&mut broker, "rpc", "question", request, &mut out);
    let received = get_all(&mut broker, "rpc");
    let address = received[0].properties.reply_to().clone().unwrap();
    assert!(
        address.as_str().starts_with("amq.rabbitmq.reply-to."),
        "{address}"
    );
    let reply = broker
        .publish(
            B,
            1,
            Arc::new(Message {
                exchange: "".into(),
                routing_key: address.clone(),
                properties: BasicProperties::default(),
                body: Bytes::from_static(b"answer"),
            }),
            &mut out,
        )
        .unwrap();
    assert_eq!(reply.routed, 1);
    let replies = deliveries(&mut out);
    assert_eq!(replies.len(), 1);
    assert_eq!(
        (replies[0].connection, replies[0].consumer_tag.as_str()),
        (A, "replies")
    );
    assert_eq!(replies[0].message.body, Bytes::from_static(b"answer"));
    // Once the requester's channel is gone, a reply is dropped (and still
    // counts as routed, so a mandatory reply is not returned).
    broker.close_channel(A, 1, &mut out);
    let late = broker
        .publish(
            B,
            1,
            Arc::new(Message {
                exchange: "".into(),
                routing_key: address,
                properties: BasicProperties::default(),
                body: Bytes::new(),
            }),
            &mut out,
        )
        .unwrap();
    assert_eq!(late.routed, 1);
    assert!(deliveries(&mut out).is_empty());
}

#[test]
fn a_queue_expiring_into_itself_drops_the_message_instead_of_looping() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "loop",
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(10)),
            ("x-dead-letter-exchange", text("")),
        ]),
    );
    publish(&mut broker, "loop", "once");
    advance(&mut broker, 10);
    assert_eq!(broker.queue_counts("/", "loop"), Some((0, 0)));
}

#[test]
fn rejected_messages_cycle_through_dead_letter_queues_counting_deaths() {
    let mut broker = broker();
    for (name, other) in [("a", "b"), ("b", "a")] {
        declare_with(
            &mut broker,
            name,
            table(&[
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(other)),
            ]),
        );
    }
    publish(&mut broker, "a", "bounce");
    let mut out = Outbox::default();
    for queue in ["a", "b", "a"] {
        let got = broker
            .get(A, 1, queue, false, &mut out)
            .unwrap()
            .unwrap_or_else(|| panic!("message in {queue}"));
        broker
            .reject(A, 1, got.delivery_tag, false, false, &mut out)
            .unwrap();
    }
    let last = get_all(&mut broker, "b");
    assert_eq!(death_field(&last[0], 0, "queue"), text("a"));
    assert_eq!(death_field(&last[0], 0, "count"), AMQPValue::LongLongInt(2));
    assert_eq!(death_field(&last[0], 1, "queue"), text("b"));
    assert_eq!(header(&last[0], "x-first-death-queue"), Some(&text("a")));
}

#[test]
fn redeclaring_with_different_arguments_is_refused_naming_the_argument() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "q",
        table(&[("x-max-length", AMQPValue::LongInt(10))]),
    );
    let error = broker
        .declare_queue(
            A,
            QueueDeclare {
                name: "q".into(),
                arguments: table(&[("x-max-length", AMQPValue::LongInt(20))]),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::PreconditionFailed);
    assert!(error.to_string().contains("x-max-length"), "{error}");
    let invalid = broker
        .declare_queue(
            A,
            QueueDeclare {
                name: "other".into(),
                arguments: table(&[("x-max-length", AMQPValue::LongInt(-1))]),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        invalid.to_string().contains("x-max-length"),
        "{}",
        invalid.to_string()
    );
}

#[test]
fn a_queue_declared_classic_matches_one_declared_without_a_type() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "typed",
        table(&[("x-queue-type", text("classic"))]),
    );
    declare_with(&mut broker, "typed", FieldTable::default());
    declare_with(&mut broker, "untyped", FieldTable::default());
    declare_with(
        &mut broker,
        "untyped",
        table(&[("x-queue-type", text("classic"))]),
    );
}

#[test]
fn an_alternate_exchange_must_be_named_by_a_string() {
    let mut broker = broker();
    let error = broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "main".into(),
                kind: "direct".into(),
                arguments: table(&[("alternate-exchange", AMQPValue::LongInt(5))]),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(error.code(), ErrorCode::PreconditionFailed);
    assert!(error.to_string().contains("alternate-exchange"), "{error}");
}
