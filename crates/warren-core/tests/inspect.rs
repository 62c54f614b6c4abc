//! The read-only inspection views and the message counters behind them,
//! driven through the broker state machine: what the management API and the
//! metrics exporter would show after publishes, deliveries, gets, acks,
//! requeues, channel closes and queue deletions.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use warren_core::{
    Broker, ChannelMode, ConnectionId, Consume, Delivery, DestinationKind, Effect, ExchangeCounts,
    ExchangeDeclare, LifecycleCounts, Limits, Message, MessageCounts, Outbox, QueueDeclare,
    QueueInfo,
};

const A: ConnectionId = ConnectionId(1);
const B: ConnectionId = ConnectionId(2);

fn broker() -> Broker {
    let mut broker = Broker::new(&[], Limits::default(), 3);
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

fn declare(broker: &mut Broker, name: &str) {
    declare_with(broker, name, FieldTable::default());
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

fn declare_exchange(broker: &mut Broker, name: &str, kind: &str) {
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: name.into(),
                kind: kind.into(),
                ..Default::default()
            },
        )
        .unwrap();
}

fn message(exchange: &str, routing_key: &str, body: &str) -> Arc<Message> {
    Arc::new(Message {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        properties: BasicProperties::default(),
        body: Bytes::copy_from_slice(body.as_bytes()),
    })
}

/// Publishes on connection B's channel 1; returns how many queues it reached.
fn publish(
    broker: &mut Broker,
    exchange: &str,
    routing_key: &str,
    body: &str,
    out: &mut Outbox,
) -> usize {
    broker
        .publish(B, 1, message(exchange, routing_key, body), out)
        .unwrap()
        .routed
}

fn consume(
    broker: &mut Broker,
    connection: ConnectionId,
    queue: &str,
    tag: &str,
    out: &mut Outbox,
) {
    consume_with(
        broker,
        connection,
        queue,
        tag,
        false,
        FieldTable::default(),
        out,
    );
}

fn consume_with(
    broker: &mut Broker,
    connection: ConnectionId,
    queue: &str,
    tag: &str,
    no_ack: bool,
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
                no_ack,
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
            Effect::CancelConsumer { .. }
            | Effect::CloseChannel { .. }
            | Effect::ReadAhead(_)
            | Effect::Discard(_) => None,
        })
        .collect()
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8(delivery.message.body.to_vec()).unwrap()
}

fn info(broker: &Broker, queue: &str) -> QueueInfo {
    broker
        .queue_info("/", queue)
        .unwrap_or_else(|| panic!("queue '{queue}' should exist"))
}

/// The counts these tests follow, without the splits by acknowledgement
/// mode and the empty gets (`counts_by_acknowledgement_mode` checks those).
fn main_counts(counts: MessageCounts) -> MessageCounts {
    MessageCounts {
        delivered_no_ack: 0,
        got_no_ack: 0,
        got_empty: 0,
        ..counts
    }
}

fn counts(published: u64, delivered: u64, got: u64, acked: u64, redelivered: u64) -> MessageCounts {
    MessageCounts {
        published,
        delivered,
        got,
        acked,
        redelivered,
        ..MessageCounts::default()
    }
}

fn exchange_counts_of(broker: &Broker, name: &str) -> ExchangeCounts {
    let from_infos = broker
        .exchange_infos(Some("/"))
        .into_iter()
        .find(|exchange| exchange.name == name)
        .unwrap_or_else(|| panic!("exchange '{name}' should exist"))
        .counts;
    let from_sampler = broker
        .exchange_counts()
        .into_iter()
        .find(|(vhost, exchange, _)| vhost == "/" && exchange == name)
        .unwrap()
        .2;
    assert_eq!(from_infos, from_sampler, "the two views of '{name}' agree");
    from_infos
}

// ----- publishing ----------------------------------------------------------

#[test]
fn publishing_counts_on_the_queue_the_broker_and_the_exchange() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    for body in ["a", "bb", "ccc"] {
        assert_eq!(publish(&mut broker, "", "q", body, &mut out), 1);
    }
    let q = info(&broker, "q");
    assert_eq!(q.ready, 3);
    assert_eq!(q.ready_bytes, 6);
    assert_eq!(q.unacked, 0);
    assert_eq!(q.consumers, 0);
    assert_eq!(main_counts(q.counts), counts(3, 0, 0, 0, 0));
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 3);
    assert_eq!(totals.counts.unroutable, 0);
    assert_eq!(totals.ready, 3);
    assert_eq!(totals.unacked, 0);
    assert_eq!(totals.queues, 1);
    assert_eq!(totals.connections, 2);
    assert_eq!(totals.channels, 2);
    // The default exchange counts what passed through it.
    assert_eq!(
        exchange_counts_of(&broker, ""),
        ExchangeCounts {
            published_in: 3,
            published_out: 3
        }
    );
    let sampled = broker.queue_message_counts();
    assert_eq!(sampled, vec![("/".to_owned(), "q".to_owned(), q.counts)]);
}

#[test]
fn an_unroutable_message_counts_once_broker_wide_and_in_but_not_out() {
    let mut broker = broker();
    declare_exchange(&mut broker, "lonely", "direct");
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    assert_eq!(publish(&mut broker, "lonely", "anything", "x", &mut out), 0);
    assert_eq!(
        exchange_counts_of(&broker, "lonely"),
        ExchangeCounts {
            published_in: 1,
            published_out: 0
        }
    );
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 1);
    assert_eq!(totals.counts.unroutable, 1);
    assert_eq!(info(&broker, "q").counts, MessageCounts::default());
    // The default exchange with no queue by that name: unroutable too.
    assert_eq!(publish(&mut broker, "", "missing", "x", &mut out), 0);
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 2);
    assert_eq!(totals.counts.unroutable, 2);
    assert_eq!(
        exchange_counts_of(&broker, ""),
        ExchangeCounts {
            published_in: 1,
            published_out: 0
        }
    );
    // Untouched exchanges stay at zero.
    assert_eq!(
        exchange_counts_of(&broker, "amq.topic"),
        ExchangeCounts::default()
    );
}

#[test]
fn a_fanout_to_two_queues_is_one_publish_broker_wide() {
    let mut broker = broker();
    declare_exchange(&mut broker, "fan", "fanout");
    for queue in ["q1", "q2"] {
        declare(&mut broker, queue);
        broker
            .bind_queue(A, queue, "fan", "".into(), FieldTable::default(), true)
            .unwrap();
    }
    let mut out = Outbox::default();
    assert_eq!(publish(&mut broker, "fan", "", "x", &mut out), 2);
    assert_eq!(info(&broker, "q1").counts.published, 1);
    assert_eq!(info(&broker, "q2").counts.published, 1);
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 1, "one message from the client");
    assert_eq!(totals.counts.unroutable, 0);
    assert_eq!(totals.ready, 2);
    assert_eq!(
        exchange_counts_of(&broker, "fan"),
        ExchangeCounts {
            published_in: 1,
            published_out: 1
        }
    );
}

#[test]
fn an_exchange_to_exchange_route_counts_out_at_the_source() {
    let mut broker = broker();
    declare_exchange(&mut broker, "src", "fanout");
    declare_exchange(&mut broker, "dst", "fanout");
    declare(&mut broker, "q");
    broker
        .bind_exchange(A, "dst", "src", "".into(), FieldTable::default(), true)
        .unwrap();
    broker
        .bind_queue(A, "q", "dst", "".into(), FieldTable::default(), true)
        .unwrap();
    let mut out = Outbox::default();
    assert_eq!(publish(&mut broker, "src", "", "x", &mut out), 1);
    assert_eq!(
        exchange_counts_of(&broker, "src"),
        ExchangeCounts {
            published_in: 1,
            published_out: 1
        }
    );
    assert_eq!(info(&broker, "q").counts.published, 1);
    assert_eq!(broker.totals().counts.unroutable, 0);
}

// ----- consuming, acks, gets, requeues ---------------------------------------

#[test]
fn manual_ack_consumer_moves_messages_from_ready_to_unacked_to_acked() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 2, false, &mut out);
    consume(&mut broker, A, "q", "c", &mut out);
    for body in ["1", "2", "3"] {
        publish(&mut broker, "", "q", body, &mut out);
    }
    let first = deliveries(&mut out);
    assert_eq!(first.iter().map(body).collect::<Vec<_>>(), ["1", "2"]);

    let q = info(&broker, "q");
    assert_eq!(q.ready, 1);
    assert_eq!(q.ready_bytes, 1);
    assert_eq!(q.unacked, 2);
    assert_eq!(q.consumers, 1);
    assert_eq!(main_counts(q.counts), counts(3, 2, 0, 0, 0));
    let totals = broker.totals();
    assert_eq!((totals.ready, totals.unacked, totals.consumers), (1, 2, 1));
    assert_eq!(totals.counts.delivered, 2);
    let channel = broker
        .channel_infos()
        .into_iter()
        .find(|channel| channel.connection == A && channel.number == 1)
        .unwrap();
    assert_eq!(channel.unacked, 2);
    assert_eq!(channel.consumers, 1);

    broker
        .ack(A, 1, first[0].delivery_tag, false, &mut out)
        .unwrap();
    let third = deliveries(&mut out);
    assert_eq!(third.iter().map(body).collect::<Vec<_>>(), ["3"]);
    let q = info(&broker, "q");
    assert_eq!(q.ready, 0);
    assert_eq!(q.unacked, 2);
    assert_eq!(main_counts(q.counts), counts(3, 3, 0, 1, 0));

    // Acking the rest with `multiple` settles both.
    broker
        .ack(A, 1, third[0].delivery_tag, true, &mut out)
        .unwrap();
    let q = info(&broker, "q");
    assert_eq!(q.unacked, 0);
    assert_eq!(main_counts(q.counts), counts(3, 3, 0, 3, 0));
    let totals = broker.totals();
    assert_eq!(totals.unacked, 0);
    assert_eq!(main_counts(totals.counts), counts(3, 3, 0, 3, 0));
}

#[test]
fn no_ack_consumers_count_deliveries_but_leave_nothing_unacked() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    consume_with(
        &mut broker,
        A,
        "q",
        "auto",
        true,
        FieldTable::default(),
        &mut out,
    );
    for body in ["1", "2"] {
        publish(&mut broker, "", "q", body, &mut out);
    }
    assert_eq!(deliveries(&mut out).len(), 2);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (0, 0));
    assert_eq!(main_counts(q.counts), counts(2, 2, 0, 0, 0));
    let consumer = &broker.consumers_of("/", "q")[0];
    assert!(!consumer.ack_required);
}

#[test]
fn basic_get_counts_got_and_a_requeued_message_counts_redelivered() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    publish(&mut broker, "", "q", "m", &mut out);
    publish(&mut broker, "", "q", "n", &mut out);

    let got = broker.get(A, 1, "q", false, &mut out).unwrap().unwrap();
    assert!(!got.redelivered);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (1, 1));
    assert_eq!(main_counts(q.counts), counts(2, 0, 1, 0, 0));

    // Rejected with requeue: back to ready, no longer unacked, not acked.
    broker
        .reject(A, 1, got.delivery_tag, false, true, &mut out)
        .unwrap();
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (2, 0));
    assert_eq!(main_counts(q.counts), counts(2, 0, 1, 0, 0));

    // Got again: a redelivery.
    let again = broker.get(A, 1, "q", false, &mut out).unwrap().unwrap();
    assert!(again.redelivered);
    let q = info(&broker, "q");
    assert_eq!(main_counts(q.counts), counts(2, 0, 2, 0, 1));
    broker
        .ack(A, 1, again.delivery_tag, false, &mut out)
        .unwrap();

    // A no-ack get counts got but never unacked.
    let last = broker.get(A, 1, "q", true, &mut out).unwrap().unwrap();
    assert!(!last.redelivered);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (0, 0));
    assert_eq!(main_counts(q.counts), counts(2, 0, 3, 1, 1));

    // An empty queue: nothing counted but the empty get. Of the three
    // gets, one was in automatic acknowledgement mode.
    assert!(broker.get(A, 1, "q", false, &mut out).unwrap().is_none());
    assert_eq!(
        info(&broker, "q").counts,
        MessageCounts {
            got_no_ack: 1,
            got_empty: 1,
            ..counts(2, 0, 3, 1, 1)
        }
    );
    assert_eq!(main_counts(broker.totals().counts), counts(2, 0, 3, 1, 1));
}

#[test]
fn a_consumer_redelivery_after_reject_counts_delivered_and_redelivered() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 1, false, &mut out);
    consume(&mut broker, A, "q", "c", &mut out);
    publish(&mut broker, "", "q", "x", &mut out);
    let first = deliveries(&mut out);
    assert_eq!(first.len(), 1);
    assert!(!first[0].redelivered);
    broker
        .reject(A, 1, first[0].delivery_tag, false, true, &mut out)
        .unwrap();
    let second = deliveries(&mut out);
    assert_eq!(second.len(), 1);
    assert!(second[0].redelivered);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (0, 1));
    assert_eq!(main_counts(q.counts), counts(1, 2, 0, 0, 1));
    broker
        .ack(A, 1, second[0].delivery_tag, false, &mut out)
        .unwrap();
    let q = info(&broker, "q");
    assert_eq!(q.unacked, 0);
    assert_eq!(main_counts(q.counts), counts(1, 2, 0, 1, 1));
}

#[test]
fn closing_a_channel_returns_its_unacked_messages_to_ready() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 2, false, &mut out);
    consume(&mut broker, A, "q", "c", &mut out);
    for body in ["1", "2", "3"] {
        publish(&mut broker, "", "q", body, &mut out);
    }
    let delivered = deliveries(&mut out);
    assert_eq!(delivered.len(), 2);
    // A basic.get on another channel holds one more.
    broker.open_channel(A, 2);
    let got = broker.get(A, 2, "q", false, &mut out).unwrap().unwrap();
    assert_eq!(&got.message.body[..], b"3");
    assert_eq!(info(&broker, "q").unacked, 3);

    broker.close_channel(A, 1, &mut out);
    assert!(deliveries(&mut out).is_empty());
    let q = info(&broker, "q");
    assert_eq!(q.ready, 2);
    assert_eq!(q.unacked, 1, "the get on channel 2 is still out");
    assert_eq!(q.consumers, 0);
    assert_eq!(main_counts(q.counts), counts(3, 2, 1, 0, 0));
    assert!(broker.consumer_infos(None).is_empty());
    assert!(
        !broker
            .channel_infos()
            .iter()
            .any(|channel| channel.connection == A && channel.number == 1)
    );

    // Closing the whole connection releases the last one.
    broker.close_connection(A, &mut out);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (3, 0));
    let totals = broker.totals();
    assert_eq!((totals.ready, totals.unacked), (3, 0));
    assert_eq!(totals.connections, 1);
    assert_eq!(totals.channels, 1);

    // Taken again, the requeued ones count as redeliveries.
    broker.open_connection(A, "/", true);
    broker.open_channel(A, 1);
    for _ in 0..3 {
        let got = broker.get(A, 1, "q", true, &mut out).unwrap().unwrap();
        assert!(got.redelivered);
    }
    assert_eq!(
        main_counts(info(&broker, "q").counts),
        counts(3, 2, 4, 0, 3)
    );
}

#[test]
fn recover_requeues_and_clears_unacked() {
    let mut broker = broker();
    declare(&mut broker, "q");
    let mut out = Outbox::default();
    publish(&mut broker, "", "q", "x", &mut out);
    broker.get(A, 1, "q", false, &mut out).unwrap().unwrap();
    assert_eq!(info(&broker, "q").unacked, 1);
    broker.recover(A, 1, &mut out);
    let q = info(&broker, "q");
    assert_eq!((q.ready, q.unacked), (1, 0));
    assert_eq!(q.counts.acked, 0);
}

#[test]
fn rejecting_to_a_dead_letter_exchange_counts_on_the_target_not_broker_wide() {
    let mut broker = broker();
    declare_exchange(&mut broker, "dlx", "fanout");
    declare(&mut broker, "dead");
    broker
        .bind_queue(A, "dead", "dlx", "".into(), FieldTable::default(), true)
        .unwrap();
    declare_with(
        &mut broker,
        "work",
        table(&[(
            "x-dead-letter-exchange",
            AMQPValue::LongString("dlx".into()),
        )]),
    );
    let mut out = Outbox::default();
    publish(&mut broker, "", "work", "x", &mut out);
    let got = broker.get(A, 1, "work", false, &mut out).unwrap().unwrap();
    broker
        .reject(A, 1, got.delivery_tag, false, false, &mut out)
        .unwrap();
    let work = info(&broker, "work");
    assert_eq!((work.ready, work.unacked), (0, 0));
    assert_eq!(main_counts(work.counts), counts(1, 0, 1, 0, 0));
    let dead = info(&broker, "dead");
    assert_eq!(dead.ready, 1);
    assert_eq!(dead.counts.published, 1);
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 1, "only the client's publish");
    assert_eq!(totals.ready, 1);
}

// ----- deleting queues -------------------------------------------------------

#[test]
fn deleting_a_queue_keeps_the_broker_totals_and_drops_it_from_the_views() {
    let mut broker = broker();
    declare(&mut broker, "gone");
    declare(&mut broker, "kept");
    declare_exchange(&mut broker, "ex", "direct");
    broker
        .bind_queue(A, "gone", "ex", "k".into(), FieldTable::default(), true)
        .unwrap();
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 10, false, &mut out);
    consume(&mut broker, A, "gone", "c", &mut out);
    for body in ["1", "2", "3"] {
        publish(&mut broker, "", "gone", body, &mut out);
    }
    publish(&mut broker, "", "kept", "k", &mut out);
    let delivered = deliveries(&mut out);
    assert_eq!(delivered.len(), 3);
    broker
        .ack(A, 1, delivered[0].delivery_tag, false, &mut out)
        .unwrap();
    let kept = broker.get(B, 1, "kept", false, &mut out).unwrap().unwrap();
    broker
        .ack(B, 1, kept.delivery_tag, false, &mut out)
        .unwrap();

    let before = broker.totals();
    assert_eq!(
        main_counts(before.counts),
        MessageCounts {
            published: 4,
            delivered: 3,
            got: 1,
            acked: 2,
            redelivered: 0,
            ..MessageCounts::default()
        }
    );
    assert_eq!(before.unacked, 2);
    assert_eq!(before.queues, 2);

    broker
        .delete_queue(B, "gone", false, false, &mut out)
        .unwrap();

    let after = broker.totals();
    assert_eq!(after.counts, before.counts, "totals must not go backwards");
    assert_eq!(after.queues, 1);
    assert_eq!(after.unacked, 0);
    assert_eq!(after.consumers, 0);
    assert_eq!(after.ready, 0);
    assert!(broker.queue_info("/", "gone").is_none());
    let names: Vec<String> = broker
        .queue_infos(None)
        .into_iter()
        .map(|queue| queue.name)
        .collect();
    assert_eq!(names, ["kept"]);
    assert!(
        broker
            .queue_message_counts()
            .iter()
            .all(|(_, name, _)| name != "gone")
    );
    assert!(
        broker
            .binding_infos(None)
            .iter()
            .all(|binding| binding.destination != "gone")
    );
    assert!(broker.consumers_of("/", "gone").is_empty());
    assert!(broker.consumer_infos(None).is_empty());

    // Settling deliveries of the deleted queue neither fails nor takes the
    // totals backwards.
    broker
        .ack(A, 1, delivered[2].delivery_tag, true, &mut out)
        .unwrap();
    let settled = broker.totals();
    assert!(settled.counts.acked >= before.counts.acked);
    assert_eq!(settled.counts.delivered, before.counts.delivered);
    assert_eq!(settled.unacked, 0);

    // A new queue of the same name starts from zero; the totals keep the old.
    declare(&mut broker, "gone");
    assert_eq!(info(&broker, "gone").counts, MessageCounts::default());
    assert_eq!(broker.totals().counts.delivered, 3);
    publish(&mut broker, "", "gone", "again", &mut out);
    broker.get(B, 1, "gone", true, &mut out).unwrap().unwrap();
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 5);
    assert_eq!(totals.counts.got, 2);
    assert_eq!(totals.counts.delivered, 3);
}

#[test]
fn an_exclusive_queue_deleted_with_its_connection_keeps_its_counts() {
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
    let mut out = Outbox::default();
    consume(&mut broker, A, name.as_str(), "c", &mut out);
    broker
        .publish(A, 1, message("", name.as_str(), "x"), &mut out)
        .unwrap();
    let delivered = deliveries(&mut out);
    assert_eq!(delivered.len(), 1);
    assert!(info(&broker, name.as_str()).exclusive);
    broker.close_connection(A, &mut out);
    assert!(broker.queue_info("/", name.as_str()).is_none());
    let totals = broker.totals();
    assert_eq!(totals.counts.published, 1);
    assert_eq!(totals.counts.delivered, 1);
    assert_eq!(totals.queues, 0);
    assert_eq!(totals.unacked, 0);
}

// ----- queue, exchange and binding listings ---------------------------------

#[test]
fn queue_infos_are_sorted_and_filtered_by_vhost() {
    let mut broker = Broker::new(&["other".to_owned()], Limits::default(), 3);
    broker.open_connection(A, "/", true);
    broker.open_channel(A, 1);
    let c = ConnectionId(3);
    broker.open_connection(c, "other", true);
    broker.open_channel(c, 1);
    for name in ["zeta", "alpha"] {
        declare(&mut broker, name);
    }
    broker
        .declare_queue(
            c,
            QueueDeclare {
                name: "middle".into(),
                durable: false,
                auto_delete: true,
                arguments: table(&[("x-max-length", AMQPValue::LongInt(5))]),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(broker.vhost_names(), ["/", "other"]);
    let all: Vec<(String, String)> = broker
        .queue_infos(None)
        .into_iter()
        .map(|queue| (queue.vhost, queue.name))
        .collect();
    assert_eq!(
        all,
        [
            ("/".to_owned(), "alpha".to_owned()),
            ("/".to_owned(), "zeta".to_owned()),
            ("other".to_owned(), "middle".to_owned()),
        ]
    );
    let other = broker.queue_infos(Some("other"));
    assert_eq!(other.len(), 1);
    assert!(other[0].auto_delete);
    assert!(!other[0].durable);
    assert!(!other[0].quorum);
    assert_eq!(
        other[0].arguments.inner().get("x-max-length"),
        Some(&AMQPValue::LongInt(5))
    );
    assert!(broker.queue_info("/", "middle").is_none());
    assert!(broker.queue_info("nowhere", "middle").is_none());
    assert!(broker.queue_infos(Some("nowhere")).is_empty());
}

#[test]
fn exchange_infos_list_the_builtins_and_declared_ones_sorted() {
    let mut broker = broker();
    broker
        .declare_exchange(
            A,
            ExchangeDeclare {
                name: "events".into(),
                kind: "topic".into(),
                durable: true,
                internal: true,
                ..Default::default()
            },
        )
        .unwrap();
    let infos = broker.exchange_infos(Some("/"));
    let names: Vec<(&str, &str)> = infos
        .iter()
        .map(|exchange| (exchange.name.as_str(), exchange.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("", "direct"),
            ("amq.direct", "direct"),
            ("amq.fanout", "fanout"),
            ("amq.headers", "headers"),
            ("amq.match", "headers"),
            ("amq.topic", "topic"),
            ("amq.warren.model-events", "topic"),
            ("events", "topic"),
        ]
    );
    let events = infos
        .iter()
        .find(|exchange| exchange.name == "events")
        .unwrap();
    assert!(events.durable && events.internal && !events.auto_delete);
    assert_eq!(broker.totals().exchanges, 8);
    assert_eq!(broker.exchange_counts().len(), 8);
}

#[test]
fn binding_infos_put_the_default_exchange_first_then_explicit_bindings() {
    let mut broker = broker();
    declare(&mut broker, "q2");
    declare(&mut broker, "q1");
    declare_exchange(&mut broker, "direct-ex", "direct");
    declare_exchange(&mut broker, "headers-ex", "headers");
    declare_exchange(&mut broker, "b-dest", "fanout");
    broker
        .bind_queue(
            A,
            "q1",
            "direct-ex",
            "red".into(),
            FieldTable::default(),
            true,
        )
        .unwrap();
    broker
        .bind_queue(
            A,
            "q2",
            "direct-ex",
            "blue".into(),
            FieldTable::default(),
            true,
        )
        .unwrap();
    let match_all = table(&[
        ("x-match", AMQPValue::LongString("all".into())),
        ("format", AMQPValue::LongString("pdf".into())),
    ]);
    broker
        .bind_queue(A, "q2", "headers-ex", "".into(), match_all.clone(), true)
        .unwrap();
    broker
        .bind_exchange(
            A,
            "b-dest",
            "direct-ex",
            "green".into(),
            FieldTable::default(),
            true,
        )
        .unwrap();

    let rows: Vec<(String, String, DestinationKind, String)> = broker
        .binding_infos(Some("/"))
        .into_iter()
        .map(|binding| {
            assert_eq!(binding.vhost, "/");
            (
                binding.source,
                binding.destination,
                binding.destination_kind,
                binding.routing_key,
            )
        })
        .collect();
    let row = |source: &str, destination: &str, kind, key: &str| {
        (
            source.to_owned(),
            destination.to_owned(),
            kind,
            key.to_owned(),
        )
    };
    assert_eq!(
        rows,
        [
            row("", "q1", DestinationKind::Queue, "q1"),
            row("", "q2", DestinationKind::Queue, "q2"),
            row("direct-ex", "q1", DestinationKind::Queue, "red"),
            row("direct-ex", "q2", DestinationKind::Queue, "blue"),
            row("direct-ex", "b-dest", DestinationKind::Exchange, "green"),
            row("headers-ex", "q2", DestinationKind::Queue, ""),
        ]
    );
    let infos = broker.binding_infos(None);
    let headers = infos
        .iter()
        .find(|binding| binding.source == "headers-ex")
        .unwrap();
    assert_eq!(headers.arguments, match_all);
    assert!(
        infos
            .iter()
            .filter(|binding| binding.source.is_empty())
            .all(|binding| binding.arguments.inner().is_empty())
    );

    // Unbinding removes just that row.
    broker
        .bind_queue(
            A,
            "q1",
            "direct-ex",
            "red".into(),
            FieldTable::default(),
            false,
        )
        .unwrap();
    assert!(
        !broker
            .binding_infos(None)
            .iter()
            .any(|binding| binding.source == "direct-ex" && binding.routing_key == "red")
    );
    // Deleting the destination exchange removes the exchange binding.
    broker.delete_exchange(A, "b-dest", false).unwrap();
    assert!(
        !broker
            .binding_infos(None)
            .iter()
            .any(|binding| binding.destination_kind == DestinationKind::Exchange)
    );
    assert!(broker.binding_infos(Some("nowhere")).is_empty());
}

// ----- consumers and channels -------------------------------------------------

#[test]
fn consumer_infos_show_tags_acks_prefetch_and_priority() {
    let mut broker = broker();
    declare(&mut broker, "a");
    declare(&mut broker, "b");
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 5, false, &mut out);
    consume(&mut broker, A, "b", "manual", &mut out);
    consume_with(
        &mut broker,
        B,
        "b",
        "auto",
        true,
        table(&[("x-priority", AMQPValue::LongInt(7))]),
        &mut out,
    );
    broker
        .consume(
            B,
            1,
            Consume {
                queue: "a".into(),
                consumer_tag: "only".into(),
                exclusive: true,
                ..Default::default()
            },
            &mut out,
        )
        .unwrap();

    /// queue, tag, connection, channel, ack_required, exclusive,
    /// prefetch_count, priority, active
    type Row = (
        String,
        String,
        ConnectionId,
        u16,
        bool,
        bool,
        u16,
        i32,
        bool,
    );
    let rows: Vec<Row> = broker
        .consumer_infos(None)
        .into_iter()
        .map(|consumer| {
            assert_eq!(consumer.vhost, "/");
            (
                consumer.queue,
                consumer.tag,
                consumer.connection,
                consumer.channel,
                consumer.ack_required,
                consumer.exclusive,
                consumer.prefetch_count,
                consumer.priority,
                consumer.active,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("a".into(), "only".into(), B, 1, true, true, 0, 0, true),
            ("b".into(), "manual".into(), A, 1, true, false, 5, 0, true),
            ("b".into(), "auto".into(), B, 1, false, false, 0, 7, true),
        ]
    );
    assert_eq!(broker.consumers_of("/", "b").len(), 2);
    assert!(broker.consumers_of("/", "missing").is_empty());
    assert_eq!(info(&broker, "b").consumers, 2);
    assert_eq!(broker.totals().consumers, 3);

    // A later basic.qos does not change an existing consumer's prefetch.
    broker.set_prefetch(A, 1, 9, false, &mut out);
    assert_eq!(broker.consumers_of("/", "b")[0].prefetch_count, 5);

    assert!(broker.cancel(A, 1, "manual", &mut out));
    let tags: Vec<String> = broker
        .consumers_of("/", "b")
        .into_iter()
        .map(|consumer| consumer.tag)
        .collect();
    assert_eq!(tags, ["auto"]);
}

#[test]
fn a_single_active_consumer_queue_shows_only_the_first_consumer_active() {
    let mut broker = broker();
    declare_with(
        &mut broker,
        "sac",
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    );
    declare(&mut broker, "plain");
    let mut out = Outbox::default();
    consume(&mut broker, A, "sac", "first", &mut out);
    consume(&mut broker, B, "sac", "second", &mut out);
    consume(&mut broker, A, "plain", "p1", &mut out);
    consume(&mut broker, B, "plain", "p2", &mut out);

    let active = |broker: &Broker, queue: &str| -> Vec<(String, bool)> {
        broker
            .consumers_of("/", queue)
            .into_iter()
            .map(|consumer| (consumer.tag, consumer.active))
            .collect()
    };
    assert_eq!(
        active(&broker, "sac"),
        [("first".to_owned(), true), ("second".to_owned(), false)]
    );
    assert_eq!(
        active(&broker, "plain"),
        [("p1".to_owned(), true), ("p2".to_owned(), true)]
    );

    // The one that gets the messages is the one shown active.
    publish(&mut broker, "", "sac", "x", &mut out);
    let delivered = deliveries(&mut out);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].consumer_tag.as_str(), "first");

    // When it leaves, the next takes over and is shown active.
    assert!(broker.cancel(A, 1, "first", &mut out));
    assert_eq!(active(&broker, "sac"), [("second".to_owned(), true)]);
}

#[test]
fn channel_infos_show_prefetch_mode_consumers_and_unacked() {
    let mut broker = broker();
    declare(&mut broker, "q");
    broker.open_channel(A, 2);
    broker.open_channel(A, 3);
    let mut out = Outbox::default();
    broker.set_prefetch(A, 1, 10, false, &mut out);
    broker.set_prefetch(A, 1, 50, true, &mut out);
    broker.set_channel_mode(A, 2, ChannelMode::Confirm);
    broker.set_channel_mode(A, 3, ChannelMode::Transactional);
    consume(&mut broker, A, "q", "c", &mut out);
    publish(&mut broker, "", "q", "x", &mut out);
    assert_eq!(deliveries(&mut out).len(), 1);

    let infos = broker.channel_infos();
    let keys: Vec<(ConnectionId, u16)> = infos
        .iter()
        .map(|channel| (channel.connection, channel.number))
        .collect();
    assert_eq!(keys, [(A, 1), (A, 2), (A, 3), (B, 1)]);
    let one = &infos[0];
    assert_eq!(one.vhost, "/");
    assert_eq!(one.prefetch_count, 10);
    assert_eq!(one.global_prefetch_count, 50);
    assert_eq!(one.consumers, 1);
    assert_eq!(one.unacked, 1);
    assert_eq!(one.mode, ChannelMode::Plain);
    assert_eq!(infos[1].mode, ChannelMode::Confirm);
    assert_eq!(infos[1].prefetch_count, 0);
    assert_eq!(infos[1].consumers, 0);
    assert_eq!(infos[2].mode, ChannelMode::Transactional);
    assert_eq!(infos[3].mode, ChannelMode::Plain);
    assert_eq!(broker.channel_count(A), 3);
    assert_eq!(broker.channel_count(ConnectionId(99)), 0);
    assert_eq!(broker.totals().channels, 4);

    // Confirm mode on channel 1 after the fact.
    broker.set_channel_mode(A, 1, ChannelMode::Confirm);
    assert_eq!(broker.channel_infos()[0].mode, ChannelMode::Confirm);
    // A reopened channel starts over.
    broker.close_channel(A, 2, &mut out);
    broker.open_channel(A, 2);
    let reopened = broker
        .channel_infos()
        .into_iter()
        .find(|channel| channel.connection == A && channel.number == 2)
        .unwrap();
    assert_eq!(reopened.mode, ChannelMode::Plain);
}

#[test]
fn deliveries_count_their_acknowledgement_mode_and_lifecycles_are_counted() {
    let mut broker = broker();
    let opened = broker.totals().lifecycle;
    assert_eq!(
        (opened.connections_opened, opened.channels_opened),
        (2, 2),
        "{opened:?}"
    );
    let mut out = Outbox::default();
    declare(&mut broker, "auto");
    declare(&mut broker, "auto");
    declare(&mut broker, "manual");
    for queue in ["auto", "auto", "manual"] {
        publish(&mut broker, "", queue, "m", &mut out);
    }
    consume_with(
        &mut broker,
        A,
        "auto",
        "a",
        true,
        FieldTable::default(),
        &mut out,
    );
    consume(&mut broker, B, "manual", "m", &mut out);
    let totals = broker.totals();
    assert_eq!(totals.counts.delivered, 3, "{:?}", totals.counts);
    assert_eq!(totals.counts.delivered_no_ack, 2, "{:?}", totals.counts);

    broker.close_channel(B, 1, &mut out);
    broker.close_connection(B, &mut out);
    broker
        .delete_queue(A, "manual", false, false, &mut out)
        .unwrap();
    let lifecycle = broker.totals().lifecycle;
    assert_eq!(
        lifecycle,
        LifecycleCounts {
            connections_opened: 2,
            connections_closed: 1,
            channels_opened: 2,
            channels_closed: 1,
            queues_declared: 3,
            queues_created: 2,
            queues_deleted: 1,
        }
    );
    // The deleted queue's deliveries stay in the totals.
    assert_eq!(broker.totals().counts.delivered_no_ack, 2);
    assert_eq!(broker.totals().counts.delivered, 3);
}
