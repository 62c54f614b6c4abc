//! Connection-level behaviour: handshake, negotiation, authentication, vhosts,
//! channel limits and clean shutdown.

use crate::common::*;
use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, channel, connection},
    types::AMQPValue,
};
use lapin::{ErrorKind, options::QueueDeclareOptions, types::FieldTable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_close() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    assert!(
        conn.status().connected(),
        "lapin connection should be connected"
    );
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    assert!(ch.status().connected());
    within("channel close", ch.close(200, "bye".into()))
        .await
        .expect("channel close");
    within("connection close", conn.close(200, "bye".into()))
        .await
        .expect("connection close");
    assert!(
        !conn.status().connected(),
        "connection should no longer be connected"
    );
    // The broker keeps serving new connections.
    let conn2 = broker.connect().await;
    assert!(conn2.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_properties_and_start_method() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    let start = raw.start().await;
    assert_eq!(start.version_major, 0);
    assert_eq!(start.version_minor, 9);

    let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
    assert!(
        mechanisms.split_whitespace().any(|m| m == "PLAIN"),
        "mechanisms {mechanisms:?} must include PLAIN"
    );
    let locales = String::from_utf8_lossy(start.locales.as_bytes()).into_owned();
    assert!(
        locales.split_whitespace().any(|l| l == "en_US"),
        "locales {locales:?} must include en_US"
    );

    let props = start.server_properties.inner();
    let product = props.get("product").and_then(value_str);
    assert_eq!(
        product.as_deref(),
        Some("Warren"),
        "server_properties: {props:?}"
    );
    let caps = match props.get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.clone(),
        other => panic!("capabilities must be a table, got {other:?}"),
    };
    for cap in [
        "publisher_confirms",
        "basic.nack",
        "consumer_cancel_notify",
        "exchange_exchange_bindings",
        "per_consumer_qos",
        "authentication_failure_close",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap} must be true; capabilities = {caps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_tune_values() {
    let broker = Broker::start().await;

    // What the server proposes in connection.tune.
    let (_raw, tune) = broker.raw_handshake().await;
    assert_eq!(tune.channel_max, 2047, "tune.channel_max");
    assert_eq!(tune.frame_max, 131072, "tune.frame_max");
    assert_eq!(tune.heartbeat, 60, "tune.heartbeat (default heartbeat_s)");

    // What lapin negotiated.
    let conn = broker.connect().await;
    let cfg = conn.configuration();
    assert_eq!(cfg.channel_max(), 2047, "negotiated channel_max");
    assert_eq!(cfg.frame_max(), 131072, "negotiated frame_max");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_tune_values() {
    let broker = Broker::start_with_config(
        "[amqp]\nchannel_max = 16\nframe_max_bytes = 8192\nheartbeat_s = 7\n",
    )
    .await;
    let (_raw, tune) = broker.raw_handshake().await;
    assert_eq!(tune.channel_max, 16, "tune.channel_max from config");
    assert_eq!(tune.frame_max, 8192, "tune.frame_max from config");
    assert_eq!(tune.heartbeat, 7, "tune.heartbeat from config");

    let conn = broker.connect().await;
    assert_eq!(conn.configuration().channel_max(), 16);
    assert_eq!(conn.configuration().frame_max(), 8192);

    // A message much larger than frame_max still round-trips (split in frames
    // of at most 8192 bytes in both directions).
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    let q = within(
        "declare",
        ch.queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    within(
        "publish",
        ch.basic_publish(
            "".into(),
            q.name().clone(),
            Default::default(),
            &body,
            Default::default(),
        ),
    )
    .await
    .expect("publish");
    let got = within("get", ch.basic_get(q.name().clone(), Default::default()))
        .await
        .expect("get")
        .expect("message present");
    assert_eq!(got.delivery.data.len(), body.len());
    assert!(got.delivery.data == body, "body corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_403() {
    let broker = Broker::start().await;
    let url = broker.url_for("guest", "not-the-password", "%2f");
    let err = broker
        .try_connect_url(&url)
        .await
        .expect_err("connecting with a wrong password must fail");
    assert_eq!(
        amqp_code(&err),
        Some(ACCESS_REFUSED),
        "lapin advertises authentication_failure_close, so the broker must send \
         connection.close 403; got {err} ({err:?})"
    );

    // Unknown user, same answer.
    let url = broker.url_for("nobody", "guest", "%2f");
    let err = broker
        .try_connect_url(&url)
        .await
        .expect_err("unknown user must fail");
    assert_eq!(amqp_code(&err), Some(ACCESS_REFUSED), "unknown user: {err}");

    // Broker still fine.
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_raw_gets_connection_close_403() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    let _ = raw.start().await;
    raw.start_ok("guest", "wrong").await;
    let close = raw
        .expect_connection_close(ACCESS_REFUSED, "bad password")
        .await;
    // As RabbitMQ: the close names no method.
    assert_eq!((close.class_id, close.method_id), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_refused_with_530() {
    let broker = Broker::start().await;
    let url = broker.url_for("guest", "guest", "no-such-vhost");
    let err = broker
        .try_connect_url(&url)
        .await
        .expect_err("opening an unknown vhost must fail");
    assert_eq!(
        amqp_code(&err),
        Some(NOT_ALLOWED),
        "unknown vhost: {err} ({err:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_user_and_vhost() {
    let broker = Broker::start_with_config(
        r#"
[[users]]
name = "alice"
password = "secret"

[[vhosts]]
name = "staging"

[[permissions]]
user = "alice"
configure = ".*"
write = ".*"
read = ".*"

[[permissions]]
user = "alice"
vhost = "staging"
configure = ".*"
write = ".*"
read = ".*"
"#,
    )
    .await;

    let conn = broker
        .connect_url(&broker.url_for("alice", "secret", "%2f"))
        .await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    within(
        "declare as alice",
        ch.queue_declare(
            "alice-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("alice can declare a queue");

    // Configured vhost exists; queues are per vhost.
    let conn2 = broker
        .connect_url(&broker.url_for("alice", "secret", "staging"))
        .await;
    let ch2 = within("create_channel", conn2.create_channel())
        .await
        .expect("create_channel");
    let res = within(
        "passive declare in other vhost",
        ch2.queue_declare(
            "alice-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        NOT_FOUND,
        "queue of vhost / must not be visible in vhost staging",
    );

    // guest still works beside alice.
    let _guest = broker.connect().await;

    let err = broker
        .try_connect_url(&broker.url_for("alice", "wrong", "%2f"))
        .await
        .expect_err("alice with a wrong password");
    assert_eq!(amqp_code(&err), Some(ACCESS_REFUSED), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_more_channels_than_channel_max_fails() {
    let broker = Broker::start_with_config("[amqp]\nchannel_max = 16\n").await;
    let (mut raw, tune) = broker.raw_handshake().await;
    assert_eq!(tune.channel_max, 16);
    for id in 1..=16u16 {
        raw.open_channel(id).await;
    }
    // The 17th channel exceeds the negotiated channel_max: RabbitMQ closes the
    // connection with 530 NOT_ALLOWED.
    raw.send_method(
        17,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    raw.expect_connection_close(NOT_ALLOWED, "channel 17 with channel_max 16")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_channel_limit_matches_negotiated() {
    let broker = Broker::start_with_config("[amqp]\nchannel_max = 4\n").await;
    let conn = broker.connect().await;
    let mut chans = Vec::new();
    for _ in 0..4 {
        chans.push(
            within("create_channel", conn.create_channel())
                .await
                .expect("create_channel"),
        );
    }
    let err = within("5th channel", conn.create_channel())
        .await
        .expect_err("5th channel over channel_max 4");
    assert!(
        matches!(err.kind(), ErrorKind::ChannelsLimitReached)
            || amqp_code(&err) == Some(NOT_ALLOWED),
        "unexpected error: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_gets_close_ok() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match raw.expect_frame("connection.close-ok").await {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    raw.expect_socket_closed("after close-ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let broker = Broker::start().await;
    let conn = broker.connect().await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    within(
        "declare",
        ch.queue_declare(
            "before-shutdown".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");

    broker.terminate_and_assert_clean_exit().await;

    // The client connection is gone.
    let res = within(
        "declare after shutdown",
        ch.queue_declare(
            "after-shutdown".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert!(
        res.is_err(),
        "a command after broker shutdown must fail, got {res:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_no_clients_exits_zero() {
    let broker = Broker::start().await;
    broker.terminate_and_assert_clean_exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_id_reusable_after_close() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    for _ in 0..3 {
        raw.open_channel(1).await;
        raw.send_method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: 200,
                reply_text: "bye".into(),
                class_id: 0,
                method_id: 0,
            })),
        )
        .await;
        match raw.expect_frame("channel.close-ok").await {
            AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_))) => {}
            other => panic!("expected channel.close-ok, got {other:?}"),
        }
    }
}

async fn tune_ok_refused(
    broker: &Broker,
    channel_max: Option<u16>,
    frame_max: Option<u32>,
    what: &str,
) {
    let mut raw = broker.raw().await;
    let _ = raw.start().await;
    raw.start_ok("guest", "guest").await;
    let tune = match raw.expect_method("connection.tune").await {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
        other => panic!("expected connection.tune, got {other:?}"),
    };
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: channel_max.unwrap_or(tune.channel_max),
            frame_max: frame_max.unwrap_or(tune.frame_max),
            heartbeat: 0,
        })),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )
    .await;
    raw.expect_connection_close(NOT_ALLOWED, what).await;
}

/// RabbitMQ validates tune-ok: frame_max below 4096 (FRAME_MIN_SIZE) or above
/// the server's maximum, and channel_max above the server's, close the
/// connection with 530 NOT_ALLOWED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_tune_ok_is_530() {
    let broker = Broker::start().await;
    tune_ok_refused(&broker, None, Some(1024), "tune-ok frame_max below 4096").await;
    tune_ok_refused(
        &broker,
        None,
        Some(1 << 20),
        "tune-ok frame_max above the server's",
    )
    .await;
    tune_ok_refused(
        &broker,
        Some(4000),
        None,
        "tune-ok channel_max above the server's",
    )
    .await;
    assert_broker_alive(&broker).await;
}
