//! The basic class: publish/consume/get, acknowledgements, prefetch, recover,
//! requeue ordering, exclusive consumers and consumer tags.

use std::time::Duration;

use crate::common::*;
use amq_protocol::protocol::{AMQPClass, basic, queue as pqueue};
use futures_lite::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::*,
    types::{AMQPValue, FieldArray, FieldTable},
};

const QUIET: Duration = Duration::from_millis(300);

async fn publish(ch: &Channel, queue: &str, body: &[u8]) {
    within(
        "basic_publish",
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic_publish");
}

async fn consume(
    ch: &Channel,
    queue: &str,
    tag: &str,
    options: BasicConsumeOptions,
) -> lapin::Consumer {
    within(
        "basic_consume",
        ch.basic_consume(queue.into(), tag.into(), options, FieldTable::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("basic_consume on {queue}: {e}"))
}

async fn get(ch: &Channel, queue: &str, no_ack: bool) -> Option<lapin::message::BasicGetMessage> {
    within(
        "basic_get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack }),
    )
    .await
    .expect("basic_get")
}

fn full_properties() -> BasicProperties {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("v".into()));
    let array: FieldArray = vec![AMQPValue::LongInt(1), AMQPValue::LongString("two".into())].into();
    let headers = table(&[
        ("str", AMQPValue::LongString("hello".into())),
        ("int", AMQPValue::LongInt(-42)),
        ("long", AMQPValue::LongLongInt(1 << 40)),
        ("bool", AMQPValue::Boolean(true)),
        ("double", AMQPValue::Double(2.5)),
        ("table", AMQPValue::FieldTable(nested)),
        ("array", AMQPValue::FieldArray(array)),
        ("ts", AMQPValue::Timestamp(1_700_000_000)),
        ("void", AMQPValue::Void),
    ]);
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_700_000_001)
        .with_type("test.type".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_consume_round_trip_preserves_properties() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.props").await;
    let props = full_properties();
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            "q.props".into(),
            Default::default(),
            b"{\"k\":1}",
            props.clone(),
        ),
    )
    .await
    .expect("publish");
    // Also one with no properties at all.
    publish(&ch, "q.props", b"").await;

    let cch = new_channel(&conn).await;
    let mut consumer = consume(&cch, "q.props", "props-consumer", Default::default()).await;
    let d = next_delivery(&mut consumer, "first delivery").await;
    assert_eq!(d.data, b"{\"k\":1}");
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), "q.props");
    assert!(!d.redelivered, "first delivery is not redelivered");
    assert_eq!(d.delivery_tag, 1, "first delivery tag on a channel is 1");
    assert_eq!(d.properties, props, "properties must round-trip unchanged");
    within("ack", d.ack(Default::default())).await.expect("ack");

    let d = next_delivery(&mut consumer, "second delivery").await;
    assert_eq!(d.delivery_tag, 2);
    assert!(d.data.is_empty(), "empty body");
    assert_eq!(
        d.properties,
        BasicProperties::default(),
        "no properties stay no properties"
    );
    within("ack", d.ack(Default::default())).await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_round_trips() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.large").await;
    assert_eq!(conn.configuration().frame_max(), 131072);
    let body: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 31 % 253) as u8).collect();
    publish(&ch, "q.large", &body).await;
    publish(&ch, "q.large", &body[..131072 - 8]).await; // exactly one max-size body frame
    publish(&ch, "q.large", &body[..131072 - 7]).await; // one byte more

    let cch = new_channel(&conn).await;
    let mut consumer = consume(
        &cch,
        "q.large",
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let d = next_delivery(&mut consumer, "1 MiB delivery").await;
    assert_eq!(d.data.len(), body.len(), "1 MiB body length");
    assert!(d.data == body, "1 MiB body content corrupted");
    let d = next_delivery(&mut consumer, "frame_max-8 delivery").await;
    assert!(d.data == body[..131072 - 8], "frame_max-8 body");
    let d = next_delivery(&mut consumer, "frame_max-7 delivery").await;
    assert!(d.data == body[..131072 - 7], "frame_max-7 body");

    // And through basic.get.
    declare(&ch, "q.large2").await;
    publish(&ch, "q.large2", &body).await;
    let m = get(&ch, "q.large2", true)
        .await
        .expect("large message via get");
    assert!(m.delivery.data == body, "1 MiB body via basic.get");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_is_returned_with_312() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    within("confirm_select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm_select");
    declare(&ch, "q.routable").await;

    let confirm = within(
        "publish mandatory unroutable",
        ch.basic_publish(
            "".into(),
            "q.no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default().with_message_id("m-1".into()),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within("confirm", confirm).await.expect("confirmation");
    match confirmation {
        Confirmation::Ack(Some(ret)) => {
            assert_eq!(
                ret.reply_code, NO_ROUTE,
                "basic.return reply code (text {:?})",
                ret.reply_text
            );
            assert_eq!(ret.delivery.data, b"lost", "returned body");
            assert_eq!(ret.delivery.routing_key.as_str(), "q.no-such-queue");
            assert_eq!(
                ret.delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str()),
                Some("m-1")
            );
        }
        other => panic!("expected Ack(Some(returned message)), got {other:?}"),
    }

    // Routable mandatory message: plain ack, nothing returned.
    let confirmation = within(
        "confirm routable",
        within(
            "publish",
            ch.basic_publish(
                "".into(),
                "q.routable".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"ok",
                BasicProperties::default(),
            ),
        )
        .await
        .expect("publish"),
    )
    .await
    .expect("confirmation");
    assert_eq!(confirmation, Confirmation::Ack(None));

    // Unroutable but not mandatory: silently dropped, acked, not returned.
    let confirmation = within(
        "confirm non-mandatory",
        within(
            "publish",
            ch.basic_publish(
                "amq.direct".into(),
                "nobody".into(),
                BasicPublishOptions::default(),
                b"dropped",
                BasicProperties::default(),
            ),
        )
        .await
        .expect("publish"),
    )
    .await
    .expect("confirmation");
    assert_eq!(confirmation, Confirmation::Ack(None));
    assert_eq!(ready_count(&ch, "q.routable").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_and_get_empty() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.get").await;
    assert!(
        get(&ch, "q.get", true).await.is_none(),
        "get on an empty queue -> get-empty"
    );
    publish(&ch, "q.get", b"a").await;
    publish(&ch, "q.get", b"b").await;
    let m = get(&ch, "q.get", true).await.expect("first get");
    assert_eq!(m.delivery.data, b"a");
    assert_eq!(
        m.message_count, 1,
        "get-ok message_count = messages remaining"
    );
    assert!(!m.delivery.redelivered);
    assert_eq!(m.delivery.routing_key.as_str(), "q.get");
    let m = get(&ch, "q.get", true).await.expect("second get");
    assert_eq!(m.delivery.data, b"b");
    assert_eq!(m.message_count, 0);
    assert!(
        get(&ch, "q.get", true).await.is_none(),
        "drained -> get-empty"
    );

    let res = within(
        "get missing",
        ch.basic_get("q.get-missing".into(), Default::default()),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "basic.get on a missing queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_reject_with_requeue_set_redelivered() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.requeue").await;
    publish(&ch, "q.requeue", b"m").await;

    let m = get(&ch, "q.requeue", false).await.expect("get");
    assert!(!m.delivery.redelivered);
    within(
        "nack",
        m.delivery.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        }),
    )
    .await
    .expect("nack");
    let m = get(&ch, "q.requeue", false)
        .await
        .expect("message requeued by nack");
    assert_eq!(m.delivery.data, b"m");
    assert!(
        m.delivery.redelivered,
        "requeued message must be flagged redelivered"
    );

    within(
        "reject",
        m.delivery.reject(BasicRejectOptions { requeue: true }),
    )
    .await
    .expect("reject");
    let m = get(&ch, "q.requeue", false)
        .await
        .expect("message requeued by reject");
    assert!(m.delivery.redelivered);

    // Reject without requeue discards it.
    within(
        "reject",
        m.delivery.reject(BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject");
    assert!(
        get(&ch, "q.requeue", false).await.is_none(),
        "rejected without requeue -> gone"
    );

    // Nack multiple with requeue returns all unacked up to the tag.
    for b in [b"1", b"2", b"3"] {
        publish(&ch, "q.requeue", b).await;
    }
    let mut tags = Vec::new();
    for _ in 0..3 {
        tags.push(
            get(&ch, "q.requeue", false)
                .await
                .expect("get")
                .delivery
                .delivery_tag,
        );
    }
    within(
        "nack multiple",
        ch.basic_nack(
            tags[1],
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        ),
    )
    .await
    .expect("nack multiple");
    assert_eq!(
        ready_count(&ch, "q.requeue").await,
        2,
        "nack multiple requeued two messages"
    );
    let m = get(&ch, "q.requeue", true).await.expect("get");
    assert_eq!(
        m.delivery.data, b"1",
        "requeued messages keep their original order"
    );
    assert!(m.delivery.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_ack() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.multi-ack").await;
    for b in [b"1", b"2", b"3"] {
        publish(&ch, "q.multi-ack", b).await;
    }
    let cch = new_channel(&conn).await;
    let mut consumer = consume(&cch, "q.multi-ack", "", Default::default()).await;
    let mut deliveries = Vec::new();
    for i in 0..3 {
        deliveries.push(next_delivery(&mut consumer, &format!("delivery {i}")).await);
    }
    let tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
    assert_eq!(
        tags,
        vec![1, 2, 3],
        "delivery tags are sequential per channel"
    );
    let bodies: Vec<&[u8]> = deliveries.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(bodies, vec![b"1".as_slice(), b"2", b"3"], "FIFO delivery");

    // Ack 1 and 2 in one go.
    within(
        "ack multiple",
        cch.basic_ack(2, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack multiple");
    // Recover requeues only what is still unacknowledged: message 3.
    within(
        "recover",
        cch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await
    .expect("recover");
    let d = next_delivery(&mut consumer, "redelivery after recover").await;
    assert_eq!(d.data, b"3", "only the unacked message is redelivered");
    assert!(d.redelivered);
    within("ack", d.ack(Default::default())).await.expect("ack");
    assert_no_delivery(&mut consumer, QUIET, "messages 1 and 2 were acked").await;
    assert_eq!(ready_count(&ch, "q.multi-ack").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_with_unknown_delivery_tag_closes_channel_406() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let mut ev = events(&conn);
    within("ack", ch.basic_ack(42, Default::default()))
        .await
        .expect("ack sent");
    expect_error_event(
        &mut ev,
        PRECONDITION_FAILED,
        "ack of unknown delivery tag 42",
    )
    .await;
    assert!(conn.status().connected(), "406 is a channel-level error");
    let ch2 = new_channel(&conn).await;
    declare(&ch2, "q.after-406").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_ack_closes_channel_406() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.double-ack").await;
    publish(&ch, "q.double-ack", b"x").await;
    let m = get(&ch, "q.double-ack", false).await.expect("get");
    let tag = m.delivery.delivery_tag;
    let mut ev = events(&conn);
    within("ack", ch.basic_ack(tag, Default::default()))
        .await
        .expect("first ack");
    within("ack", ch.basic_ack(tag, Default::default()))
        .await
        .expect("second ack sent");
    expect_error_event(
        &mut ev,
        PRECONDITION_FAILED,
        "second ack of the same delivery tag",
    )
    .await;
    // The first ack counted: the message is gone, not requeued by the channel close.
    let ch2 = new_channel(&conn).await;
    assert_eq!(ready_count(&ch2, "q.double-ack").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_consumer_prefetch_limits_unacked() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let pch = new_channel(&conn).await;
    declare(&pch, "q.prefetch").await;
    for b in [b"1", b"2", b"3"] {
        publish(&pch, "q.prefetch", b).await;
    }
    let cch = new_channel(&conn).await;
    within("qos", cch.basic_qos(2, BasicQosOptions::default()))
        .await
        .expect("basic.qos prefetch_count=2");
    let mut consumer = consume(&cch, "q.prefetch", "", Default::default()).await;
    let d1 = next_delivery(&mut consumer, "delivery 1").await;
    let d2 = next_delivery(&mut consumer, "delivery 2").await;
    assert_eq!(
        (d1.data.as_slice(), d2.data.as_slice()),
        (b"1".as_slice(), b"2".as_slice())
    );
    assert_no_delivery(&mut consumer, QUIET, "third message while 2 are unacked").await;
    assert_eq!(
        ready_count(&pch, "q.prefetch").await,
        1,
        "the third message stays ready in the queue while the consumer holds 2 unacked"
    );

    within("ack 1", d1.ack(Default::default()))
        .await
        .expect("ack");
    let d3 = next_delivery(&mut consumer, "delivery 3 after an ack").await;
    assert_eq!(d3.data, b"3");
    assert_eq!(ready_count(&pch, "q.prefetch").await, 0);

    // basic.get is not limited by the consumer prefetch.
    publish(&pch, "q.prefetch", b"4").await;
    publish(&pch, "q.prefetch", b"5").await;
    assert_no_delivery(&mut consumer, QUIET, "consumer still holds 2 unacked").await;
    let m = get(&cch, "q.prefetch", true)
        .await
        .expect("get bypasses prefetch");
    assert_eq!(m.delivery.data, b"4");
    within("ack 2", d2.ack(Default::default()))
        .await
        .expect("ack");
    let d5 = next_delivery(&mut consumer, "delivery 5").await;
    assert_eq!(d5.data, b"5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_recover_requeues_unacked() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.recover").await;
    publish(&ch, "q.recover", b"a").await;
    publish(&ch, "q.recover", b"b").await;
    let cch = new_channel(&conn).await;
    let mut consumer = consume(&cch, "q.recover", "", Default::default()).await;
    let a = next_delivery(&mut consumer, "a").await;
    let b = next_delivery(&mut consumer, "b").await;
    assert!(!a.redelivered && !b.redelivered);

    within(
        "recover",
        cch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await
    .expect("basic.recover");
    let a2 = next_delivery(&mut consumer, "a redelivered").await;
    let b2 = next_delivery(&mut consumer, "b redelivered").await;
    assert_eq!(
        (a2.data.as_slice(), b2.data.as_slice()),
        (b"a".as_slice(), b"b".as_slice())
    );
    assert!(
        a2.redelivered && b2.redelivered,
        "recovered messages are flagged redelivered"
    );
    assert!(
        a2.delivery_tag > b.delivery_tag,
        "redeliveries get new delivery tags ({} after {})",
        a2.delivery_tag,
        b.delivery_tag
    );
    within(
        "ack",
        cch.basic_ack(b2.delivery_tag, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack");
    assert_no_delivery(&mut consumer, QUIET, "all acked").await;
    assert_eq!(ready_count(&ch, "q.recover").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_requeued_in_order_when_channel_closes() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.order").await;
    for i in 1..=5u8 {
        publish(&ch, "q.order", &[b'0' + i]).await;
    }
    let c1 = new_channel(&conn).await;
    let mut consumer = consume(&c1, "q.order", "first", Default::default()).await;
    for i in 1..=5u8 {
        let d = next_delivery(&mut consumer, "first pass").await;
        assert_eq!(d.data, vec![b'0' + i], "first pass order");
        assert!(!d.redelivered);
    }
    within("close consuming channel", c1.close(200, "bye".into()))
        .await
        .expect("close");

    let c2 = new_channel(&conn).await;
    let mut consumer = consume(&c2, "q.order", "second", Default::default()).await;
    for i in 1..=5u8 {
        let d = next_delivery(&mut consumer, "second pass").await;
        assert_eq!(
            d.data,
            vec![b'0' + i],
            "requeued messages keep their original order"
        );
        assert!(
            d.redelivered,
            "requeued message {i} must be flagged redelivered"
        );
    }
    assert_no_delivery(&mut consumer, QUIET, "exactly 5 messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_requeued_when_connection_closes() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.conn-requeue").await;
    publish(&ch, "q.conn-requeue", b"x").await;
    let conn2 = broker.connect().await;
    let c = new_channel(&conn2).await;
    let mut consumer = consume(&c, "q.conn-requeue", "", Default::default()).await;
    let d = next_delivery(&mut consumer, "delivery").await;
    assert!(!d.redelivered);
    within("close conn2", conn2.close(200, "bye".into()))
        .await
        .expect("close");

    let c3 = new_channel(&conn).await;
    let mut consumer = consume(&c3, "q.conn-requeue", "", Default::default()).await;
    let d = next_delivery(&mut consumer, "redelivery after connection close").await;
    assert_eq!(d.data, b"x");
    assert!(d.redelivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumer_and_cancel() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.noack").await;
    publish(&ch, "q.noack", b"1").await;
    let cch = new_channel(&conn).await;
    let mut consumer = consume(
        &cch,
        "q.noack",
        "noack",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let d = next_delivery(&mut consumer, "no-ack delivery").await;
    assert_eq!(d.data, b"1");
    within(
        "cancel",
        cch.basic_cancel("noack".into(), Default::default()),
    )
    .await
    .expect("cancel");
    // After cancel, new messages stay in the queue.
    publish(&ch, "q.noack", b"2").await;
    assert_eq!(
        ready_count(&ch, "q.noack").await,
        1,
        "no consumer after cancel"
    );
    // Closing the channel does not requeue no-ack deliveries.
    within("close", cch.close(200, "".into()))
        .await
        .expect("close");
    assert_eq!(ready_count(&ch, "q.noack").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consumer_conflicts_are_403() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.xc").await;
    declare(&ch, "q.xc2").await;

    // Exclusive consumer present -> any other consumer refused.
    let c1 = new_channel(&conn).await;
    let _x = consume(
        &c1,
        "q.xc",
        "exclusive-one",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let c2 = new_channel(&conn).await;
    let res = within(
        "second consumer",
        c2.basic_consume(
            "q.xc".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        ACCESS_REFUSED,
        "consume on a queue with an exclusive consumer",
    );

    // Existing consumer present -> exclusive consume refused.
    let c3 = new_channel(&conn).await;
    let _plain = consume(&c3, "q.xc2", "plain", Default::default()).await;
    let c4 = new_channel(&conn).await;
    let res = within(
        "exclusive consumer",
        c4.basic_consume(
            "q.xc2".into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        ACCESS_REFUSED,
        "exclusive consume on a queue with a consumer",
    );
    assert!(
        conn.status().connected(),
        "403 on consume is a channel-level error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_generated_consumer_tags() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.tags").await;
    let a = consume(&ch, "q.tags", "", Default::default()).await;
    let b = consume(&ch, "q.tags", "", Default::default()).await;
    let (ta, tb) = (a.tag(), b.tag());
    assert!(!ta.as_str().is_empty(), "server must generate a tag");
    assert!(
        ta.as_str().starts_with("amq.ctag-"),
        "RabbitMQ-style tag expected, got {ta:?}"
    );
    assert_ne!(ta, tb, "generated tags are unique");
    let explicit = consume(&ch, "q.tags", "my-tag", Default::default()).await;
    assert_eq!(
        explicit.tag().as_str(),
        "my-tag",
        "an explicit tag is echoed back"
    );
    // The same explicit tag on another channel is fine.
    let ch2 = new_channel(&conn).await;
    let other = consume(&ch2, "q.tags", "my-tag", Default::default()).await;
    assert_eq!(other.tag().as_str(), "my-tag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_consumer_tag_on_channel_is_530() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.dup").await;
    let _first = consume(&ch, "q.dup", "dup", Default::default()).await;
    let res = within(
        "duplicate consume",
        ch.basic_consume(
            "q.dup".into(),
            "dup".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let err = res
        .map(|_| ())
        .expect_err("reusing a consumer tag on a channel must fail");
    if let Some(code) = amqp_code(&err) {
        assert_eq!(code, NOT_ALLOWED, "reused consumer tag: {err}");
    }
    // RabbitMQ treats it as a connection error: the whole connection closes.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    while conn.status().connected() {
        assert!(
            std::time::Instant::now() < deadline,
            "connection still open after a reused consumer tag"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_consumer_tag_raw_connection_close_530() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Queue(pqueue::AMQPMethod::Declare(pqueue::Declare {
            queue: "q.dup-raw".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    match raw.expect_method("queue.declare-ok").await {
        (1, AMQPClass::Queue(pqueue::AMQPMethod::DeclareOk(_))) => {}
        other => panic!("expected declare-ok, got {other:?}"),
    }
    let consume = || {
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "q.dup-raw".into(),
            consumer_tag: "dup".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        }))
    };
    raw.send_method(1, consume()).await;
    match raw.expect_method("basic.consume-ok").await {
        (1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok))) => {
            assert_eq!(ok.consumer_tag.as_str(), "dup")
        }
        other => panic!("expected consume-ok, got {other:?}"),
    }
    raw.send_method(1, consume()).await;
    raw.expect_connection_close(NOT_ALLOWED, "reused consumer tag")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_from_missing_queue_is_404() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = within(
        "consume missing",
        ch.basic_consume(
            "q.not-there".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res.map(|_| ()), NOT_FOUND, "consume from a missing queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_between_consumers() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.rr").await;
    let c1 = new_channel(&conn).await;
    let c2 = new_channel(&conn).await;
    let mut a = consume(
        &c1,
        "q.rr",
        "a",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let mut b = consume(
        &c2,
        "q.rr",
        "b",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    for i in 0..4u8 {
        publish(&ch, "q.rr", &[i]).await;
    }
    let a1 = next_delivery(&mut a, "a 1").await;
    let a2 = next_delivery(&mut a, "a 2").await;
    let b1 = next_delivery(&mut b, "b 1").await;
    let b2 = next_delivery(&mut b, "b 2").await;
    let mut all: Vec<u8> = [a1, a2, b1, b2].iter().map(|d| d.data[0]).collect();
    all.sort();
    assert_eq!(all, vec![0, 1, 2, 3], "each message delivered exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_tag_zero_multiple_acks_everything() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.ack-all").await;
    for b in [b"1", b"2", b"3"] {
        publish(&ch, "q.ack-all", b).await;
    }
    for _ in 0..3 {
        get(&ch, "q.ack-all", false).await.expect("get");
    }
    // delivery_tag 0 with multiple=true acknowledges all outstanding deliveries.
    within(
        "ack all",
        ch.basic_ack(0, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack 0 multiple");
    // Nothing left unacked to requeue.
    within(
        "recover",
        ch.basic_recover(BasicRecoverOptions { requeue: true }),
    )
    .await
    .expect("recover");
    assert!(
        get(&ch, "q.ack-all", true).await.is_none(),
        "all three were acked"
    );
    assert!(
        ch.status().connected(),
        "ack(0, multiple) is valid and must not close the channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_unknown_consumer_tag_is_ok() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    within(
        "cancel unknown",
        ch.basic_cancel("no-such-consumer".into(), Default::default()),
    )
    .await
    .expect("RabbitMQ answers cancel-ok for an unknown consumer tag");
    declare(&ch, "q.after-cancel-unknown").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_keep_fifo_order() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.fifo").await;
    const N: u32 = 2000;
    for i in 0..N {
        publish(&ch, "q.fifo", &i.to_be_bytes()).await;
    }
    assert_eq!(ready_count(&ch, "q.fifo").await, N);
    let cch = new_channel(&conn).await;
    within("qos", cch.basic_qos(50, Default::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&cch, "q.fifo", "", Default::default()).await;
    for i in 0..N {
        let d = next_delivery(&mut consumer, "fifo delivery").await;
        assert_eq!(d.data, i.to_be_bytes(), "message {i} out of order");
        assert_eq!(d.delivery_tag, u64::from(i) + 1);
        if i % 10 == 9 {
            within(
                "ack",
                cch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true }),
            )
            .await
            .expect("ack");
        }
    }
    assert_eq!(ready_count(&ch, "q.fifo").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_all_delivered_once() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.concurrent").await;
    const PUBLISHERS: u32 = 4;
    const PER: u32 = 250;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let url = broker.amqp_url();
        tasks.push(tokio::spawn(async move {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                .await
                .expect("publisher connect");
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(Default::default())
                .await
                .expect("confirm.select");
            for i in 0..PER {
                let id = p * PER + i;
                ch.basic_publish(
                    "".into(),
                    "q.concurrent".into(),
                    Default::default(),
                    &id.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await
                .expect("publish");
            }
            let returned = ch.wait_for_confirms().await.expect("confirms");
            assert!(returned.is_empty());
            conn.close(200, "done".into()).await.expect("close");
        }));
    }
    for t in tasks {
        within("publisher task", t)
            .await
            .expect("publisher task panicked");
    }
    assert_eq!(
        ready_count(&ch, "q.concurrent").await,
        PUBLISHERS * PER,
        "every confirmed message is enqueued"
    );
    let cch = new_channel(&conn).await;
    let mut consumer = consume(
        &cch,
        "q.concurrent",
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let mut seen = vec![false; (PUBLISHERS * PER) as usize];
    let mut last_per_publisher = vec![None::<u32>; PUBLISHERS as usize];
    for _ in 0..PUBLISHERS * PER {
        let d = next_delivery(&mut consumer, "concurrent delivery").await;
        let id = u32::from_be_bytes(d.data.as_slice().try_into().expect("4-byte body"));
        assert!(!seen[id as usize], "message {id} delivered twice");
        seen[id as usize] = true;
        // Messages from one publisher (one channel) keep their order.
        let p = (id / PER) as usize;
        if let Some(prev) = last_per_publisher[p] {
            assert!(id > prev, "publisher {p}: {id} delivered after {prev}");
        }
        last_per_publisher[p] = Some(id);
    }
    assert_no_delivery(&mut consumer, QUIET, "no extra messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_larger_than_message_size_max_is_406() {
    let broker = Broker::start_with_config("[amqp]\nmessage_size_max_bytes = 1000\n").await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.size").await;
    publish(&ch, "q.size", &[1u8; 1000]).await;
    assert_eq!(
        ready_count(&ch, "q.size").await,
        1,
        "a message of exactly the maximum is accepted"
    );
    let mut ev = events(&conn);
    publish(&ch, "q.size", &[1u8; 1001]).await;
    expect_error_event(
        &mut ev,
        PRECONDITION_FAILED,
        "message over message_size_max_bytes",
    )
    .await;
    let ch2 = new_channel(&conn).await;
    assert_eq!(
        ready_count(&ch2, "q.size").await,
        1,
        "the oversized message was not enqueued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_qos_limits_the_whole_channel() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let pch = new_channel(&conn).await;
    declare(&pch, "q.gqos1").await;
    declare(&pch, "q.gqos2").await;
    for i in 0..3u8 {
        publish(&pch, "q.gqos1", &[i]).await;
        publish(&pch, "q.gqos2", &[i]).await;
    }
    let cch = new_channel(&conn).await;
    within(
        "qos global",
        cch.basic_qos(2, BasicQosOptions { global: true }),
    )
    .await
    .expect("qos global");
    let mut c1 = consume(&cch, "q.gqos1", "g1", Default::default()).await;
    let mut c2 = consume(&cch, "q.gqos2", "g2", Default::default()).await;
    // Two unacked in total across both consumers of the channel.
    let mut got = Vec::new();
    while got.len() < 2 {
        tokio::select! {
            d = c1.next() => got.push(d.expect("c1 open").expect("c1 delivery")),
            d = c2.next() => got.push(d.expect("c2 open").expect("c2 delivery")),
            _ = tokio::time::sleep(EVENT_TIMEOUT) => panic!("fewer than 2 deliveries with global prefetch 2"),
        }
    }
    assert_no_delivery(&mut c1, QUIET, "channel-wide limit reached (c1)").await;
    assert_no_delivery(&mut c2, QUIET, "channel-wide limit reached (c2)").await;
    let ready = ready_count(&pch, "q.gqos1").await + ready_count(&pch, "q.gqos2").await;
    assert_eq!(ready, 4, "6 published, 2 in flight");
    within("ack", got[0].ack(Default::default()))
        .await
        .expect("ack");
    let mut more = 0;
    tokio::select! {
        d = c1.next() => { d.expect("c1 open").expect("c1 delivery"); more += 1; }
        d = c2.next() => { d.expect("c2 open").expect("c2 delivery"); more += 1; }
        _ = tokio::time::sleep(EVENT_TIMEOUT) => panic!("no delivery after an ack freed a slot"),
    }
    assert_eq!(more, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_message_goes_back_to_its_original_position() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.position").await;
    for b in [b"a", b"b", b"c"] {
        publish(&ch, "q.position", b).await;
    }
    let a = get(&ch, "q.position", false).await.expect("get a");
    assert_eq!(a.delivery.data, b"a");
    within(
        "nack a",
        ch.basic_nack(
            a.delivery.delivery_tag,
            BasicNackOptions {
                requeue: true,
                multiple: false,
            },
        ),
    )
    .await
    .expect("nack");
    // RabbitMQ puts a requeued message back at its original place: the head.
    let next = get(&ch, "q.position", true)
        .await
        .expect("get after requeue");
    assert_eq!(
        String::from_utf8_lossy(&next.delivery.data),
        "a",
        "requeued message must be redelivered before b and c"
    );
    assert!(next.delivery.redelivered);
    let b = get(&ch, "q.position", true).await.expect("get b");
    assert_eq!(b.delivery.data, b"b");
    assert!(!b.delivery.redelivered, "b was never delivered before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_error_does_not_disturb_other_channels() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.isolation").await;
    let cch = new_channel(&conn).await;
    let mut consumer = consume(
        &cch,
        "q.isolation",
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    publish(&ch, "q.isolation", b"1").await;
    assert_eq!(
        next_delivery(&mut consumer, "before error").await.data,
        b"1"
    );

    let bad = new_channel(&conn).await;
    let res = within(
        "passive missing",
        bad.queue_declare(
            "q.missing".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "passive declare of a missing queue");

    publish(&ch, "q.isolation", b"2").await;
    assert_eq!(
        next_delivery(&mut consumer, "after another channel's error")
            .await
            .data,
        b"2"
    );
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_immediate_flag_is_540() {
    // RabbitMQ 3.0+ dropped `immediate`: connection.close 540 NOT_IMPLEMENTED.
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: true,
        })),
    )
    .await;
    raw.send_frame(&header_frame(1, 1)).await;
    raw.send_frame(&amq_protocol::frame::AMQPFrame::Body(1, b"x".to_vec()))
        .await;
    raw.expect_connection_close(NOT_IMPLEMENTED, "basic.publish immediate=true")
        .await;
    assert_broker_alive(&broker).await;
}
