//! Queues: declaration (server-named, passive, equivalence), exclusivity,
//! auto-delete, purge, delete conditions and consumer cancel notifications.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_lite::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, Queue,
    options::*,
    types::{AMQPValue, FieldTable},
};

async fn declare(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<Queue> {
    within(
        "queue_declare",
        ch.queue_declare(name.into(), options, args),
    )
    .await
}

async fn passive(ch: &Channel, name: &str) -> lapin::Result<Queue> {
    declare(
        ch,
        name,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

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

async fn consume(ch: &Channel, queue: &str, tag: &str) -> lapin::Consumer {
    within(
        "basic_consume",
        ch.basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("basic_consume on {queue}: {e}"))
}

/// Poll (on fresh channels) until a passive declare of `name` fails with 404.
/// Deletion triggered by another connection's close or a cancel may complete
/// asynchronously, so this waits up to EVENT_TIMEOUT rather than sleeping.
async fn wait_until_queue_gone(conn: &Connection, name: &str, what: &str) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let ch = new_channel(conn).await;
        match passive(&ch, name).await {
            Err(e) if amqp_code(&e) == Some(NOT_FOUND) => return,
            Err(e) => panic!("{what}: passive declare of {name} failed unexpectedly: {e}"),
            Ok(q) => {
                let _ = ch.close(200, "".into()).await;
                if Instant::now() >= deadline {
                    panic!(
                        "{what}: queue {name} still exists after {EVENT_TIMEOUT:?} (consumers={})",
                        q.consumer_count()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_server_named_and_counts() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;

    let q1 = declare(&ch, "", Default::default(), FieldTable::default())
        .await
        .expect("declare ''");
    let q2 = declare(&ch, "", Default::default(), FieldTable::default())
        .await
        .expect("declare ''");
    assert!(
        q1.name().as_str().starts_with("amq.gen-"),
        "server-named queue should start with amq.gen-, got {:?}",
        q1.name()
    );
    assert!(q1.name().as_str().len() > "amq.gen-".len());
    assert_ne!(
        q1.name(),
        q2.name(),
        "server-generated names must be unique"
    );
    assert_eq!(q1.message_count(), 0);
    assert_eq!(q1.consumer_count(), 0);

    // The server-named queue is usable by name.
    publish(&ch, q1.name().as_str(), b"x").await;
    assert_eq!(
        passive(&ch, q1.name().as_str())
            .await
            .expect("passive")
            .message_count(),
        1
    );

    declare(&ch, "q.counts", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    for i in 0..3u8 {
        publish(&ch, "q.counts", &[i]).await;
    }
    let q = declare(&ch, "q.counts", Default::default(), FieldTable::default())
        .await
        .expect("redeclare");
    assert_eq!(q.name().as_str(), "q.counts");
    assert_eq!(q.message_count(), 3, "declare-ok message_count");
    assert_eq!(q.consumer_count(), 0, "declare-ok consumer_count");

    declare(&ch, "q.consumed", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let ch2 = new_channel(&conn).await;
    let _c1 = consume(&ch2, "q.consumed", "c1").await;
    let _c2 = consume(&ch2, "q.consumed", "c2").await;
    let q = passive(&ch, "q.consumed").await.expect("passive");
    assert_eq!(
        q.consumer_count(),
        2,
        "declare-ok consumer_count with two consumers"
    );
    assert_eq!(q.message_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare_of_missing_queue_is_404() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = passive(&ch, "q.missing").await;
    assert_amqp_error(res, NOT_FOUND, "passive declare of a missing queue");
    assert!(conn.status().connected(), "404 is a channel-level error");
    // The failed passive declare did not create it.
    let ch = new_channel(&conn).await;
    assert_amqp_error(passive(&ch, "q.missing").await, NOT_FOUND, "still missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amq_prefixed_queue_name_is_refused() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = declare(
        &ch,
        "amq.my-queue",
        Default::default(),
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "declaring a queue named amq.*");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclare_with_different_properties_is_406() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;

    let ch = new_channel(&conn).await;
    declare(
        &ch,
        "q.transient",
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let res = declare(
        &ch,
        "q.transient",
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "redeclare transient queue as durable",
    );

    let ch = new_channel(&conn).await;
    let res = declare(
        &ch,
        "q.transient",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "redeclare with different auto_delete",
    );

    let ch = new_channel(&conn).await;
    let ttl = table(&[("x-message-ttl", AMQPValue::LongInt(60_000))]);
    declare(&ch, "q.args", Default::default(), ttl.clone())
        .await
        .expect("declare with ttl");
    // Same arguments: fine.
    declare(&ch, "q.args", Default::default(), ttl)
        .await
        .expect("equivalent redeclare");
    let res = declare(
        &ch,
        "q.args",
        Default::default(),
        table(&[("x-message-ttl", AMQPValue::LongInt(1_000))]),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "redeclare with a different x-message-ttl",
    );

    // A passive declare ignores the other properties.
    let ch = new_channel(&conn).await;
    passive(&ch, "q.args")
        .await
        .expect("passive declare ignores arguments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_is_locked_to_its_connection() {
    let broker = Broker::start().await;
    let owner = broker.connect().await;
    let other = broker.connect().await;
    let och = new_channel(&owner).await;
    declare(
        &och,
        "q.excl",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exclusive");

    // The owner can use it from any of its channels.
    let och2 = new_channel(&owner).await;
    publish(&och2, "q.excl", b"mine").await;
    assert_eq!(
        passive(&och2, "q.excl")
            .await
            .expect("owner passive")
            .message_count(),
        1
    );
    let _c = consume(&och2, "q.excl", "owner-consumer").await;

    let ch = new_channel(&other).await;
    assert_amqp_error(
        declare(&ch, "q.excl", Default::default(), FieldTable::default()).await,
        RESOURCE_LOCKED,
        "declare of another connection's exclusive queue",
    );
    let ch = new_channel(&other).await;
    assert_amqp_error(
        passive(&ch, "q.excl").await,
        RESOURCE_LOCKED,
        "passive declare of another connection's exclusive queue",
    );
    let ch = new_channel(&other).await;
    let res = within(
        "consume other",
        ch.basic_consume(
            "q.excl".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        RESOURCE_LOCKED,
        "consume from another connection's exclusive queue",
    );
    let ch = new_channel(&other).await;
    let res = within(
        "delete other",
        ch.queue_delete("q.excl".into(), Default::default()),
    )
    .await;
    assert_amqp_error(
        res,
        RESOURCE_LOCKED,
        "delete of another connection's exclusive queue",
    );

    assert!(other.status().connected(), "405 is a channel-level error");
    // The refused delete left it in place.
    assert_eq!(
        passive(&och, "q.excl")
            .await
            .expect("owner passive")
            .consumer_count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_deleted_when_connection_closes() {
    let broker = Broker::start().await;
    let owner = broker.connect().await;
    let observer = broker.connect().await;
    let och = new_channel(&owner).await;
    declare(
        &och,
        "q.excl-gone",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exclusive");
    publish(&och, "q.excl-gone", b"x").await;
    within("owner close", owner.close(200, "bye".into()))
        .await
        .expect("owner close");
    wait_until_queue_gone(
        &observer,
        "q.excl-gone",
        "exclusive queue after owner closed",
    )
    .await;

    // The name is free again: another connection may declare it.
    let ch = new_channel(&observer).await;
    let q = declare(
        &ch,
        "q.excl-gone",
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("re-declare freed name");
    assert_eq!(q.message_count(), 0, "a fresh queue, not the old one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_queue_deleted_after_last_consumer_cancels() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let ad = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };

    // Never consumed: not deleted.
    declare(&ch, "q.ad-idle", ad, FieldTable::default())
        .await
        .expect("declare");

    declare(&ch, "q.ad", ad, FieldTable::default())
        .await
        .expect("declare");
    let cch = new_channel(&conn).await;
    let c1 = consume(&cch, "q.ad", "ad-1").await;
    let c2 = consume(&cch, "q.ad", "ad-2").await;
    within("cancel c1", cch.basic_cancel(c1.tag(), Default::default()))
        .await
        .expect("cancel c1");
    let q = passive(&ch, "q.ad")
        .await
        .expect("queue survives while a consumer remains");
    assert_eq!(q.consumer_count(), 1);

    within("cancel c2", cch.basic_cancel(c2.tag(), Default::default()))
        .await
        .expect("cancel c2");
    wait_until_queue_gone(&conn, "q.ad", "auto-delete queue after last cancel").await;

    let ch = new_channel(&conn).await;
    passive(&ch, "q.ad-idle")
        .await
        .expect("auto-delete queue that never had consumers stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_queue_deleted_when_consumer_channel_closes() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(
        &ch,
        "q.ad-close",
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let cch = new_channel(&conn).await;
    let _c = consume(&cch, "q.ad-close", "").await;
    within("close consumer channel", cch.close(200, "".into()))
        .await
        .expect("close");
    wait_until_queue_gone(
        &conn,
        "q.ad-close",
        "auto-delete queue after consumer channel closed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_returns_message_count() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.purge", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    for i in 0..4u8 {
        publish(&ch, "q.purge", &[i]).await;
    }
    let n = within(
        "purge",
        ch.queue_purge("q.purge".into(), Default::default()),
    )
    .await
    .expect("purge");
    assert_eq!(n, 4, "purge-ok message_count");
    assert_eq!(
        passive(&ch, "q.purge")
            .await
            .expect("passive")
            .message_count(),
        0
    );
    let n = within(
        "purge empty",
        ch.queue_purge("q.purge".into(), Default::default()),
    )
    .await
    .expect("purge");
    assert_eq!(n, 0);
    // The queue still works after a purge.
    publish(&ch, "q.purge", b"after").await;
    let m = within(
        "get",
        ch.basic_get("q.purge".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message after purge");
    assert_eq!(m.delivery.data, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_missing_queue_is_404() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = within(
        "purge missing",
        ch.queue_purge("q.nope".into(), Default::default()),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "purge of a missing queue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_conditions_and_count() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;

    // if-empty with messages -> 406
    declare(&ch, "q.del", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    publish(&ch, "q.del", b"1").await;
    publish(&ch, "q.del", b"2").await;
    let res = within(
        "delete if_empty",
        ch.queue_delete(
            "q.del".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "queue.delete if-empty on a non-empty queue",
    );

    // if-unused with a consumer -> 406
    let ch = new_channel(&conn).await;
    declare(&ch, "q.del-used", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let cch = new_channel(&conn).await;
    let _c = consume(&cch, "q.del-used", "user").await;
    let res = within(
        "delete if_unused",
        ch.queue_delete(
            "q.del-used".into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "queue.delete if-unused on a queue with a consumer",
    );

    // Both refused deletes left the queues alone.
    let ch = new_channel(&conn).await;
    assert_eq!(
        passive(&ch, "q.del").await.expect("q.del").message_count(),
        2
    );
    assert_eq!(
        passive(&ch, "q.del-used")
            .await
            .expect("q.del-used")
            .consumer_count(),
        1
    );

    // Plain delete returns the number of messages deleted.
    let n = within(
        "delete",
        ch.queue_delete("q.del".into(), Default::default()),
    )
    .await
    .expect("delete");
    assert_eq!(n, 2, "delete-ok message_count");
    assert_amqp_error(
        passive(&ch, "q.del").await,
        NOT_FOUND,
        "deleted queue is gone",
    );

    // if-empty / if-unused succeed when the condition holds.
    let ch = new_channel(&conn).await;
    declare(
        &ch,
        "q.del-empty",
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let n = within(
        "delete if_empty+if_unused",
        ch.queue_delete(
            "q.del-empty".into(),
            QueueDeleteOptions {
                if_empty: true,
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("conditional delete of an empty unused queue");
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_queue_cancels_its_consumers() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(
        &ch,
        "q.cancel-notify",
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let cch = new_channel(&conn).await;
    let mut consumer = consume(&cch, "q.cancel-notify", "to-be-cancelled").await;

    // A message first, to prove the consumer works.
    publish(&ch, "q.cancel-notify", b"before").await;
    let d = next_delivery(&mut consumer, "delivery before delete").await;
    assert_eq!(d.data, b"before");
    within("ack", d.ack(Default::default())).await.expect("ack");

    // Delete from another connection.
    let other = broker.connect().await;
    let och = new_channel(&other).await;
    within(
        "delete",
        och.queue_delete("q.cancel-notify".into(), Default::default()),
    )
    .await
    .expect("delete");

    // consumer_cancel_notify: the server sends basic.cancel, lapin ends the stream.
    match tokio::time::timeout(EVENT_TIMEOUT, consumer.next()).await {
        Ok(None) => {}
        Ok(Some(Ok(d))) => panic!("unexpected delivery {:?}", d.data),
        Ok(Some(Err(e))) => panic!("consumer got an error instead of a cancel: {e}"),
        Err(_) => {
            panic!("consumer was not cancelled within {EVENT_TIMEOUT:?} of its queue's deletion")
        }
    }
    // The consumer's channel stays open and usable.
    assert!(
        cch.status().connected(),
        "basic.cancel must not close the channel"
    );
    declare(
        &cch,
        "q.after-cancel",
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("channel usable after server cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_missing_queue_or_exchange_is_404() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = within(
        "bind missing queue",
        ch.queue_bind(
            "q.absent".into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "bind of a missing queue");

    let ch = new_channel(&conn).await;
    declare(&ch, "q.present", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let res = within(
        "bind missing exchange",
        ch.queue_bind(
            "q.present".into(),
            "ex.absent".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "bind to a missing exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_missing_queue_is_ok() {
    // RabbitMQ made queue.delete idempotent: a missing queue gives delete-ok 0.
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let n = within(
        "delete missing",
        ch.queue_delete("q.never-existed".into(), Default::default()),
    )
    .await
    .expect("delete of a missing queue");
    assert_eq!(n, 0);
    assert!(ch.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbind_of_missing_binding_is_ok() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.unbind", Default::default(), FieldTable::default())
        .await
        .expect("declare");
    within(
        "unbind never bound",
        ch.queue_unbind(
            "q.unbind".into(),
            "amq.direct".into(),
            "nope".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbinding a binding that does not exist is a no-op");
    // Binding, unbinding twice.
    within(
        "bind",
        ch.queue_bind(
            "q.unbind".into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    for _ in 0..2 {
        within(
            "unbind",
            ch.queue_unbind(
                "q.unbind".into(),
                "amq.direct".into(),
                "k".into(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("unbind");
    }
    within(
        "publish",
        ch.basic_publish(
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    assert_eq!(
        passive(&ch, "q.unbind")
            .await
            .expect("passive")
            .message_count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_connections_may_publish_to_an_exclusive_queue() {
    let broker = Broker::start().await;
    let owner = broker.connect().await;
    let other = broker.connect().await;
    let och = new_channel(&owner).await;
    declare(
        &och,
        "q.excl-pub",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exclusive");
    let ch = new_channel(&other).await;
    publish(&ch, "q.excl-pub", b"from-other").await;
    // Same-channel ordering: a sync command after the publish on `ch` proves
    // the publish was handled; then read it as the owner.
    within("qos", ch.basic_qos(0, Default::default()))
        .await
        .expect("qos");
    let m = within(
        "get",
        och.basic_get("q.excl-pub".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("message published by another connection");
    assert_eq!(m.delivery.data, b"from-other");
    assert!(other.status().connected());
}
