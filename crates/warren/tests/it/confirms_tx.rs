//! Publisher confirms and transactions.

use std::collections::BTreeSet;

use crate::common::*;
use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic, confirm},
};
use lapin::{BasicProperties, Channel, Confirmation, options::*};

async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> lapin::PublisherConfirm {
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
    .expect("basic_publish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_ack_every_publish() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.confirm").await;

    // Without confirm.select, confirmations are not requested.
    let c = publish(&ch, "q.confirm", b"plain").await;
    assert_eq!(
        within("not requested", c).await.expect("confirm"),
        Confirmation::NotRequested
    );

    within("confirm_select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    // Selecting twice is allowed.
    within(
        "confirm_select again",
        ch.confirm_select(Default::default()),
    )
    .await
    .expect("second confirm.select");

    let mut pending = Vec::new();
    for i in 0..50u32 {
        pending.push(publish(&ch, "q.confirm", &i.to_be_bytes()).await);
    }
    for (i, c) in pending.into_iter().enumerate() {
        let conf = within("confirmation", c).await.expect("confirmation");
        assert_eq!(conf, Confirmation::Ack(None), "publish #{i} must be acked");
    }
    let returned = within("wait_for_confirms", ch.wait_for_confirms())
        .await
        .expect("wait_for_confirms");
    assert!(returned.is_empty());
    assert_eq!(ready_count(&ch, "q.confirm").await, 51);

    // Unroutable messages are acked too.
    let c = within(
        "publish unroutable",
        ch.basic_publish(
            "amq.direct".into(),
            "nobody".into(),
            Default::default(),
            b"x",
            Default::default(),
        ),
    )
    .await
    .expect("publish");
    assert_eq!(
        within("confirm", c).await.expect("confirm"),
        Confirmation::Ack(None)
    );
}

/// Raw view of confirm delivery tags: they start at 1 and increase, and the
/// acks (possibly `multiple`) cover every publish exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_delivery_tags_increase() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false,
        })),
    )
    .await;
    match raw.expect_method("confirm.select-ok").await {
        (1, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))) => {}
        other => panic!("expected confirm.select-ok, got {other:?}"),
    }

    const N: u64 = 10;
    for i in 0..N {
        // Publish to the default exchange with an unroutable key: still confirmed.
        raw.send_frame(&method_frame(1, publish_method("", "nowhere")))
            .await;
        let body = format!("m{i}").into_bytes();
        raw.send_frame(&header_frame(1, body.len() as u64)).await;
        raw.send_frame(&AMQPFrame::Body(1, body)).await;
    }

    let mut confirmed = BTreeSet::new();
    let mut last = 0u64;
    while (confirmed.len() as u64) < N {
        match raw.expect_frame("basic.ack").await {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))) => {
                assert!(
                    ack.delivery_tag > last,
                    "confirm tags must increase: {} after {last}",
                    ack.delivery_tag
                );
                assert!(
                    ack.delivery_tag <= N,
                    "tag {} beyond the {N} publishes",
                    ack.delivery_tag
                );
                let from = if ack.multiple {
                    last + 1
                } else {
                    ack.delivery_tag
                };
                for t in from..=ack.delivery_tag {
                    assert!(confirmed.insert(t), "tag {t} confirmed twice");
                }
                last = ack.delivery_tag;
            }
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
                panic!("unexpected basic.nack {n:?}")
            }
            other => panic!("expected basic.ack, got {other:?}"),
        }
    }
    assert_eq!(confirmed, (1..=N).collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_publishes_only_on_commit() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let observer = new_channel(&conn).await;
    declare(&observer, "q.tx").await;

    let ch = new_channel(&conn).await;
    within("tx_select", ch.tx_select())
        .await
        .expect("tx.select");
    publish(&ch, "q.tx", b"1").await;
    publish(&ch, "q.tx", b"2").await;
    // The passive declare on the tx channel itself is handled after both
    // publishes, so this proves they were buffered rather than routed.
    assert_eq!(
        ready_count(&ch, "q.tx").await,
        0,
        "uncommitted publishes are invisible"
    );
    assert_eq!(ready_count(&observer, "q.tx").await, 0);

    within("tx_commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    assert_eq!(
        ready_count(&observer, "q.tx").await,
        2,
        "committed publishes are enqueued"
    );

    // The channel stays transactional: the next batch also waits for commit.
    publish(&ch, "q.tx", b"3").await;
    assert_eq!(ready_count(&ch, "q.tx").await, 2);
    within("tx_commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    assert_eq!(ready_count(&observer, "q.tx").await, 3);

    // Order is preserved.
    for expected in [b"1", b"2", b"3"] {
        let m = within(
            "get",
            observer.basic_get("q.tx".into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("get")
        .expect("message");
        assert_eq!(m.delivery.data, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_rollback_discards_publishes() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    declare(&ch, "q.rollback").await;
    within("tx_select", ch.tx_select())
        .await
        .expect("tx.select");
    publish(&ch, "q.rollback", b"a").await;
    publish(&ch, "q.rollback", b"b").await;
    within("tx_rollback", ch.tx_rollback())
        .await
        .expect("tx.rollback");
    assert_eq!(
        ready_count(&ch, "q.rollback").await,
        0,
        "rolled-back publishes are discarded"
    );
    // A commit after the rollback does not resurrect them.
    within("tx_commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    assert_eq!(ready_count(&ch, "q.rollback").await, 0);

    publish(&ch, "q.rollback", b"c").await;
    within("tx_commit", ch.tx_commit())
        .await
        .expect("tx.commit");
    assert_eq!(ready_count(&ch, "q.rollback").await, 1);
}

/// Poll (bounded) until `queue` has `n` ready messages: requeueing on channel
/// close may complete after close-ok.
async fn wait_for_ready(ch: &Channel, queue: &str, n: u32, what: &str) {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let c = ready_count(ch, queue).await;
        if c == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {queue} has {c} ready messages, expected {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_acks_apply_on_commit_only() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let setup = new_channel(&conn).await;
    declare(&setup, "q.tx-ack-rollback").await;
    declare(&setup, "q.tx-ack-commit").await;
    publish(&setup, "q.tx-ack-rollback", b"keep").await;
    publish(&setup, "q.tx-ack-commit", b"drop").await;

    // Rolled-back ack: the message stays unacked, so closing the channel requeues it.
    let ch = new_channel(&conn).await;
    within("tx_select", ch.tx_select())
        .await
        .expect("tx.select");
    let m = within(
        "get",
        ch.basic_get("q.tx-ack-rollback".into(), Default::default()),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(m.delivery.data, b"keep");
    within(
        "ack",
        ch.basic_ack(m.delivery.delivery_tag, Default::default()),
    )
    .await
    .expect("ack");
    within("tx_rollback", ch.tx_rollback())
        .await
        .expect("rollback");
    within("close", ch.close(200, "".into()))
        .await
        .expect("close");
    wait_for_ready(
        &setup,
        "q.tx-ack-rollback",
        1,
        "rolled-back ack then channel close",
    )
    .await;
    let m = within(
        "get",
        setup.basic_get("q.tx-ack-rollback".into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("requeued message");
    assert_eq!(m.delivery.data, b"keep");
    assert!(m.delivery.redelivered);

    // Committed ack: the message is gone for good.
    let ch = new_channel(&conn).await;
    within("tx_select", ch.tx_select())
        .await
        .expect("tx.select");
    let m = within(
        "get",
        ch.basic_get("q.tx-ack-commit".into(), Default::default()),
    )
    .await
    .expect("get")
    .expect("message");
    assert_eq!(m.delivery.data, b"drop");
    within(
        "ack",
        ch.basic_ack(m.delivery.delivery_tag, Default::default()),
    )
    .await
    .expect("ack");
    within("tx_commit", ch.tx_commit()).await.expect("commit");
    within("close", ch.close(200, "".into()))
        .await
        .expect("close");
    assert_eq!(
        ready_count(&setup, "q.tx-ack-commit").await,
        0,
        "the committed ack removed it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_without_select_is_406() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    let res = within("commit", ch.tx_commit()).await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "tx.commit on a non-transactional channel",
    );
    let ch = new_channel(&conn).await;
    let res = within("rollback", ch.tx_rollback()).await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "tx.rollback on a non-transactional channel",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_and_confirm_modes_are_exclusive() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = new_channel(&conn).await;
    within("tx_select", ch.tx_select())
        .await
        .expect("tx.select");
    let res = within("confirm_select", ch.confirm_select(Default::default())).await;
    assert_amqp_error(
        res,
        PRECONDITION_FAILED,
        "confirm.select on a transactional channel",
    );

    let ch = new_channel(&conn).await;
    within("confirm_select", ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    let res = within("tx_select", ch.tx_select()).await;
    assert_amqp_error(res, PRECONDITION_FAILED, "tx.select on a confirm channel");
}
