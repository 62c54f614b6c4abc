//! Exchanges: declaration rules, deletion, routing semantics of the four
//! standard exchange types, and exchange-to-exchange bindings.

use crate::common::*;
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::*,
    types::{AMQPValue, FieldTable},
};

async fn open(broker: &Broker) -> (Connection, Channel) {
    let conn = broker.connect().await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    (conn, ch)
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange_declare",
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

async fn declare_queue(ch: &Channel, name: &str) {
    within(
        "queue_declare",
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(
        "queue_bind",
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("bind {queue} to {exchange} with {key:?}: {e}"));
}

async fn publish(ch: &Channel, exchange: &str, key: &str, headers: Option<FieldTable>) {
    let mut props = BasicProperties::default();
    if let Some(h) = headers {
        props = props.with_headers(h);
    }
    within(
        "basic_publish",
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"m",
            props,
        ),
    )
    .await
    .expect("basic_publish");
}

/// Ready-message count via passive declare on the same channel as the
/// publishes (the broker handles one channel's commands in order).
async fn count(ch: &Channel, queue: &str) -> u32 {
    within(
        "passive declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("passive declare {queue}: {e}"))
    .message_count()
}

async fn purge(ch: &Channel, queue: &str) {
    within(
        "purge",
        ch.queue_purge(queue.into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_passive_and_delete() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;

    declare_exchange(&ch, "ex.basic", ExchangeKind::Direct).await;
    // Redeclare with identical properties is fine.
    declare_exchange(&ch, "ex.basic", ExchangeKind::Direct).await;
    within(
        "passive",
        ch.exchange_declare(
            "ex.basic".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive declare of an existing exchange");

    // Pre-declared exchanges exist.
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        within(
            "passive amq.*",
            ch.exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("pre-declared exchange {name} must exist: {e}"));
    }

    within(
        "delete",
        ch.exchange_delete("ex.basic".into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("delete exchange");

    let res = within(
        "passive after delete",
        ch.exchange_declare(
            "ex.basic".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "passive declare of a deleted exchange");

    let ch2 = new_channel(&conn).await;
    let res = within(
        "passive missing",
        ch2.exchange_declare(
            "ex.never-declared".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "passive declare of a missing exchange");
    assert!(
        conn.status().connected(),
        "404 is a channel error; the connection must stay open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_unused_refused_when_bound() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.used", ExchangeKind::Fanout).await;
    declare_queue(&ch, "q.used").await;
    bind(&ch, "q.used", "ex.used", "", FieldTable::default()).await;

    let res = within(
        "delete if_unused",
        ch.exchange_delete(
            "ex.used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "exchange.delete if-unused on a bound exchange",
    );

    // Still there, still routing.
    let ch = new_channel(&conn).await;
    publish(&ch, "ex.used", "", None).await;
    assert_eq!(
        count(&ch, "q.used").await,
        1,
        "exchange must survive a refused delete"
    );

    // After unbinding, if-unused delete succeeds.
    within(
        "unbind",
        ch.queue_unbind(
            "q.used".into(),
            "ex.used".into(),
            "".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    within(
        "delete if_unused",
        ch.exchange_delete(
            "ex.used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("if-unused delete of an unbound exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_amq_prefixed_exchange_is_refused() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    let res = within(
        "declare amq.foo",
        ch.exchange_declare(
            "amq.foo".into(),
            ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "declaring an exchange named amq.foo");
    assert!(conn.status().connected(), "403 here is a channel error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclare_with_different_type_fails() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.typed", ExchangeKind::Direct).await;
    let res = within(
        "redeclare as fanout",
        ch.exchange_declare(
            "ex.typed".into(),
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "redeclare direct exchange as fanout",
    );

    // Different durability is also an inequivalent declaration.
    let ch = new_channel(&conn).await;
    let res = within(
        "redeclare durable",
        ch.exchange_declare(
            "ex.typed".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "redeclare transient exchange as durable",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_to_default_exchange_is_refused() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_queue(&ch, "q.default-bind").await;
    let res = within(
        "bind to default",
        ch.queue_bind(
            "q.default-bind".into(),
            "".into(),
            "x".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "queue.bind to the default exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_missing_exchange_closes_channel_404() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    let mut ev = events(&conn);
    publish(&ch, "ex.does-not-exist", "k", None).await;
    expect_error_event(&mut ev, NOT_FOUND, "publish to a missing exchange").await;

    // The channel is closed: further commands on it fail.
    let res = within(
        "declare on closed channel",
        ch.queue_declare("".into(), Default::default(), FieldTable::default()),
    )
    .await;
    assert!(
        res.is_err(),
        "channel must be closed after 404, got {res:?}"
    );
    // The connection survives.
    let ch2 = new_channel(&conn).await;
    declare_queue(&ch2, "q.after-404").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_internal_exchange_is_refused() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    within(
        "declare internal",
        ch.exchange_declare(
            "ex.internal".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare internal exchange");
    let mut ev = events(&conn);
    publish(&ch, "ex.internal", "", None).await;
    expect_error_event(&mut ev, ACCESS_REFUSED, "publish to an internal exchange").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exchange_routes_by_queue_name() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_queue(&ch, "q.by-name").await;
    publish(&ch, "", "q.by-name", None).await;
    publish(&ch, "", "q.other-name", None).await; // unroutable, dropped
    assert_eq!(count(&ch, "q.by-name").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_routing() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.direct", ExchangeKind::Direct).await;
    for q in ["q.d1", "q.d2", "q.d3"] {
        declare_queue(&ch, q).await;
    }
    bind(&ch, "q.d1", "ex.direct", "red", FieldTable::default()).await;
    bind(&ch, "q.d2", "ex.direct", "red", FieldTable::default()).await;
    bind(&ch, "q.d2", "ex.direct", "green", FieldTable::default()).await;
    bind(&ch, "q.d3", "ex.direct", "blue", FieldTable::default()).await;
    // Duplicate binding is idempotent (no double delivery).
    bind(&ch, "q.d1", "ex.direct", "red", FieldTable::default()).await;

    publish(&ch, "ex.direct", "red", None).await;
    assert_eq!(count(&ch, "q.d1").await, 1, "red -> q.d1 exactly once");
    assert_eq!(count(&ch, "q.d2").await, 1, "red -> q.d2");
    assert_eq!(count(&ch, "q.d3").await, 0, "red must not reach q.d3");

    publish(&ch, "ex.direct", "green", None).await;
    assert_eq!(count(&ch, "q.d1").await, 1);
    assert_eq!(count(&ch, "q.d2").await, 2);
    assert_eq!(count(&ch, "q.d3").await, 0);

    publish(&ch, "ex.direct", "RED", None).await; // case-sensitive, no match
    publish(&ch, "ex.direct", "", None).await;
    assert_eq!(count(&ch, "q.d1").await, 1);
    assert_eq!(count(&ch, "q.d2").await, 2);
    assert_eq!(count(&ch, "q.d3").await, 0);

    within(
        "unbind",
        ch.queue_unbind(
            "q.d2".into(),
            "ex.direct".into(),
            "red".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    publish(&ch, "ex.direct", "red", None).await;
    assert_eq!(count(&ch, "q.d1").await, 2);
    assert_eq!(
        count(&ch, "q.d2").await,
        2,
        "unbound key must no longer route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_routing() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.fan", ExchangeKind::Fanout).await;
    for q in ["q.f1", "q.f2", "q.f3"] {
        declare_queue(&ch, q).await;
    }
    bind(&ch, "q.f1", "ex.fan", "", FieldTable::default()).await;
    bind(&ch, "q.f2", "ex.fan", "ignored-key", FieldTable::default()).await;
    publish(&ch, "ex.fan", "anything", None).await;
    publish(&ch, "ex.fan", "", None).await;
    assert_eq!(count(&ch, "q.f1").await, 2);
    assert_eq!(count(&ch, "q.f2").await, 2);
    assert_eq!(count(&ch, "q.f3").await, 0, "unbound queue gets nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_routing() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.topic", ExchangeKind::Topic).await;

    // (binding key, routing keys that must match, routing keys that must not)
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "a.*.c",
            &["a.b.c", "a.x.c"],
            &["a.c", "a.b.b.c", "a.b.c.d", "b.b.c"],
        ),
        ("a.#", &["a", "a.b", "a.b.c.d"], &["b", "ab", "b.a"]),
        ("#.z", &["z", "y.z", "x.y.z"], &["z.y", "zz"]),
        ("#", &["", "a", "a.b.c"], &[]),
        ("*", &["a", "bcd"], &["", "a.b"]),
        (
            "a.#.z",
            &["a.z", "a.b.z", "a.b.c.z"],
            &["a.b", "b.z", "a.z.b"],
        ),
        ("*.*", &["a.b"], &["a", "a.b.c"]),
        ("exact.key", &["exact.key"], &["exact", "exact.key.more"]),
        ("#.#", &["", "a", "a.b"], &[]),
        ("*.#", &["a", "a.b"], &[""]),
    ];

    for (i, (binding, yes, no)) in cases.iter().enumerate() {
        let q = format!("q.topic.{i}");
        declare_queue(&ch, &q).await;
        bind(&ch, &q, "ex.topic", binding, FieldTable::default()).await;
        for rk in yes.iter() {
            purge(&ch, &q).await;
            publish(&ch, "ex.topic", rk, None).await;
            assert_eq!(
                count(&ch, &q).await,
                1,
                "binding {binding:?} must match routing key {rk:?}"
            );
        }
        for rk in no.iter() {
            purge(&ch, &q).await;
            publish(&ch, "ex.topic", rk, None).await;
            assert_eq!(
                count(&ch, &q).await,
                0,
                "binding {binding:?} must NOT match routing key {rk:?}"
            );
        }
        purge(&ch, &q).await;
        within(
            "unbind",
            ch.queue_unbind(
                q.clone().into(),
                "ex.topic".into(),
                (*binding).into(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("unbind");
    }

    // Overlapping bindings to the same queue deliver once.
    declare_queue(&ch, "q.topic.multi").await;
    bind(
        &ch,
        "q.topic.multi",
        "ex.topic",
        "x.*",
        FieldTable::default(),
    )
    .await;
    bind(&ch, "q.topic.multi", "ex.topic", "#", FieldTable::default()).await;
    publish(&ch, "ex.topic", "x.y", None).await;
    assert_eq!(count(&ch, "q.topic.multi").await, 1, "one copy per queue");
}

fn int(v: i32) -> AMQPValue {
    AMQPValue::LongInt(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_routing() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.hdr", ExchangeKind::Headers).await;
    for q in ["q.all", "q.any", "q.allx", "q.anyx", "q.default"] {
        declare_queue(&ch, q).await;
    }
    bind(
        &ch,
        "q.all",
        "ex.hdr",
        "",
        table(&[("x-match", lstr("all")), ("a", int(1)), ("b", lstr("two"))]),
    )
    .await;
    bind(
        &ch,
        "q.any",
        "ex.hdr",
        "",
        table(&[
            ("x-match", lstr("any")),
            ("a", int(1)),
            ("b", lstr("two")),
            ("x-k", lstr("v")),
        ]),
    )
    .await;
    bind(
        &ch,
        "q.allx",
        "ex.hdr",
        "",
        table(&[
            ("x-match", lstr("all-with-x")),
            ("a", int(1)),
            ("x-k", lstr("v")),
        ]),
    )
    .await;
    bind(
        &ch,
        "q.anyx",
        "ex.hdr",
        "",
        table(&[
            ("x-match", lstr("any-with-x")),
            ("a", int(9)),
            ("x-k", lstr("v")),
        ]),
    )
    .await;
    // No x-match: defaults to "all".
    bind(&ch, "q.default", "ex.hdr", "", table(&[("c", lstr("3"))])).await;

    let queues = ["q.all", "q.any", "q.allx", "q.anyx", "q.default"];
    // (message headers, expected [all, any, allx, anyx, default])
    let cases: Vec<(FieldTable, [u32; 5], &str)> = vec![
        (
            table(&[("a", int(1)), ("b", lstr("two"))]),
            [1, 1, 0, 0, 0],
            "a=1,b=two",
        ),
        (
            table(&[("a", int(1)), ("b", lstr("two")), ("extra", lstr("e"))]),
            [1, 1, 0, 0, 0],
            "extra headers are ignored",
        ),
        (table(&[("a", int(1))]), [0, 1, 0, 0, 0], "a=1 only"),
        (
            table(&[("b", lstr("other"))]),
            [0, 0, 0, 0, 0],
            "b mismatching value",
        ),
        (
            table(&[("a", int(1)), ("x-k", lstr("v"))]),
            [0, 1, 1, 1, 0],
            "a=1 with x-k",
        ),
        // "any" ignores x- arguments when matching; "any-with-x" does not.
        (table(&[("x-k", lstr("v"))]), [0, 0, 0, 1, 0], "x-k only"),
        (
            table(&[("c", lstr("3"))]),
            [0, 0, 0, 0, 1],
            "c=3 (default x-match all)",
        ),
        (FieldTable::default(), [0, 0, 0, 0, 0], "empty headers"),
    ];

    for (headers, expected, label) in cases {
        for q in queues {
            purge(&ch, q).await;
        }
        publish(
            &ch,
            "ex.hdr",
            "routing-key-is-ignored",
            Some(headers.clone()),
        )
        .await;
        let mut got = [0u32; 5];
        for (i, q) in queues.iter().enumerate() {
            got[i] = count(&ch, q).await;
        }
        assert_eq!(
            got, expected,
            "headers case {label:?}: counts for {queues:?}"
        );
    }

    // A message with no headers property at all.
    for q in queues {
        purge(&ch, q).await;
    }
    publish(&ch, "ex.hdr", "", None).await;
    for q in queues {
        assert_eq!(count(&ch, q).await, 0, "no headers must not match {q}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_bindings() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.src", ExchangeKind::Direct).await;
    declare_exchange(&ch, "ex.dst", ExchangeKind::Fanout).await;
    declare_exchange(&ch, "ex.dst2", ExchangeKind::Topic).await;
    declare_queue(&ch, "q.e2e").await;
    declare_queue(&ch, "q.e2e.topic").await;
    declare_queue(&ch, "q.e2e.direct").await;
    bind(&ch, "q.e2e", "ex.dst", "", FieldTable::default()).await;
    bind(&ch, "q.e2e.topic", "ex.dst2", "k.#", FieldTable::default()).await;
    bind(&ch, "q.e2e.direct", "ex.src", "k", FieldTable::default()).await;

    within(
        "exchange_bind",
        ch.exchange_bind(
            "ex.dst".into(),
            "ex.src".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind dst <- src");
    within(
        "exchange_bind",
        ch.exchange_bind(
            "ex.dst2".into(),
            "ex.dst".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind dst2 <- dst");

    publish(&ch, "ex.src", "k", None).await;
    assert_eq!(count(&ch, "q.e2e").await, 1, "routed src -> dst -> q.e2e");
    assert_eq!(
        count(&ch, "q.e2e.direct").await,
        1,
        "direct binding on src still works"
    );
    assert_eq!(
        count(&ch, "q.e2e.topic").await,
        1,
        "routed src -> dst -> dst2 (key k matches k.#)"
    );

    publish(&ch, "ex.src", "other", None).await;
    assert_eq!(
        count(&ch, "q.e2e").await,
        1,
        "key 'other' must not pass the src->dst binding"
    );

    // A queue reachable through two paths gets a single copy.
    bind(&ch, "q.e2e", "ex.src", "k", FieldTable::default()).await;
    publish(&ch, "ex.src", "k", None).await;
    assert_eq!(
        count(&ch, "q.e2e").await,
        2,
        "one copy per queue even via two paths"
    );

    within(
        "queue_unbind",
        ch.queue_unbind(
            "q.e2e".into(),
            "ex.src".into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind queue");
    within(
        "exchange_unbind",
        ch.exchange_unbind(
            "ex.dst".into(),
            "ex.src".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.unbind");
    publish(&ch, "ex.src", "k", None).await;
    assert_eq!(
        count(&ch, "q.e2e").await,
        2,
        "after exchange.unbind nothing flows src -> dst"
    );
    assert_eq!(
        count(&ch, "q.e2e.topic").await,
        2,
        "2 earlier copies via src->dst->dst2, none after unbind"
    );
    assert_eq!(
        count(&ch, "q.e2e.direct").await,
        3,
        "src's own queue binding still routes"
    );

    // Exchange bound as a source counts as "used".
    within(
        "exchange_bind",
        ch.exchange_bind(
            "ex.dst".into(),
            "ex.src".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("re-bind");
    within(
        "queue_unbind",
        ch.queue_unbind(
            "q.e2e.direct".into(),
            "ex.src".into(),
            "k".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    let res = within(
        "delete if_unused",
        ch.exchange_delete(
            "ex.src".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "if-unused delete of exchange with an e2e binding",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_bind_to_missing_exchange_is_404() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.present", ExchangeKind::Fanout).await;
    let res = within(
        "exchange_bind missing",
        ch.exchange_bind(
            "ex.present".into(),
            "ex.absent".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, NOT_FOUND, "exchange.bind with a missing source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_exchange_removes_its_bindings() {
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.tmp", ExchangeKind::Fanout).await;
    declare_queue(&ch, "q.tmp").await;
    bind(&ch, "q.tmp", "ex.tmp", "", FieldTable::default()).await;
    within(
        "delete",
        ch.exchange_delete("ex.tmp".into(), Default::default()),
    )
    .await
    .expect("delete");
    // Re-create with the same name: the old binding must be gone.
    declare_exchange(&ch, "ex.tmp", ExchangeKind::Fanout).await;
    publish(&ch, "ex.tmp", "", None).await;
    assert_eq!(
        count(&ch, "q.tmp").await,
        0,
        "bindings die with their exchange"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_missing_exchange_is_ok() {
    // RabbitMQ made exchange.delete idempotent.
    let broker = Broker::start().await;
    let (_conn, ch) = open(&broker).await;
    within(
        "delete missing",
        ch.exchange_delete("ex.never-existed".into(), Default::default()),
    )
    .await
    .expect("delete of a missing exchange");
    assert!(ch.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_reserved_exchanges_is_refused() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    let res = within(
        "delete amq.direct",
        ch.exchange_delete("amq.direct".into(), Default::default()),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "deleting amq.direct");
    let ch = new_channel(&conn).await;
    let res = within(
        "delete default",
        ch.exchange_delete("".into(), Default::default()),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "deleting the default exchange");
    // amq.direct still routes.
    let ch = new_channel(&conn).await;
    declare_queue(&ch, "q.still").await;
    bind(&ch, "q.still", "amq.direct", "k", FieldTable::default()).await;
    publish(&ch, "amq.direct", "k", None).await;
    assert_eq!(count(&ch, "q.still").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclaring_existing_amq_exchange_equivalently_is_ok() {
    // RabbitMQ only applies the amq.* reservation when the exchange would be
    // created; an equivalent redeclaration of amq.direct (durable) succeeds.
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    within(
        "declare amq.direct",
        ch.exchange_declare(
            "amq.direct".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("equivalent redeclare of amq.direct");
    // The default exchange cannot be declared by name "".
    let ch = new_channel(&conn).await;
    let res = within(
        "declare default",
        ch.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res, ACCESS_REFUSED, "declaring the default exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_binding_with_invalid_x_match_is_406() {
    let broker = Broker::start().await;
    let (conn, ch) = open(&broker).await;
    declare_exchange(&ch, "ex.hdr-bad", ExchangeKind::Headers).await;
    declare_queue(&ch, "q.hdr-bad").await;
    let res = within(
        "bind bogus x-match",
        ch.queue_bind(
            "q.hdr-bad".into(),
            "ex.hdr-bad".into(),
            "".into(),
            QueueBindOptions::default(),
            table(&[("x-match", lstr("bogus")), ("a", lstr("1"))]),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "headers binding with x-match=bogus",
    );
    assert!(conn.status().connected());
}
