//! 503 COMMAND_INVALID: a method the broker understands but that is not
//! valid where it was sent closes the connection, as in RabbitMQ; and the
//! one such refusal the current RabbitMQ turned into a channel error.

use crate::common::*;
use amq_protocol::protocol::{AMQPClass, basic, connection, exchange};

fn declare_exchange(name: &str, kind: &str) -> AMQPClass {
    AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
        exchange: name.into(),
        kind: kind.into(),
        ..Default::default()
    }))
}

/// RabbitMQ 3.x closed the connection with 503 for an unknown exchange
/// type; the current RabbitMQ (and Warren) closes only the channel, with
/// 406, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_exchange_type_closes_only_the_channel_with_406() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(1, declare_exchange("jobs", "nonsense"))
        .await;
    let close = raw
        .expect_channel_close(1, PRECONDITION_FAILED, "unknown exchange type")
        .await;
    assert!(
        close
            .reply_text
            .as_str()
            .contains("invalid exchange type 'nonsense'"),
        "reply text names the type: {}",
        close.reply_text
    );
    raw.open_channel(2).await;
    raw.send_method(2, declare_exchange("jobs", "direct")).await;
    match raw
        .expect_method("exchange.declare-ok on the same connection")
        .await
    {
        (2, AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_))) => {}
        other => panic!("expected exchange.declare-ok on channel 2, got {other:?}"),
    }
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_before_connection_open_is_503() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    let _start = raw.start().await;
    raw.start_ok("guest", "guest").await;
    let (_, tune) = raw.expect_method("connection.tune").await;
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
        panic!("expected connection.tune, got {tune:?}");
    };
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        })),
    )
    .await;
    // basic.publish where connection.open belongs.
    raw.send_method(0, publish_method("", "q")).await;
    raw.expect_connection_close(COMMAND_INVALID, "method before connection.open")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_only_method_from_client_is_503() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
            consumer_tag: "c".into(),
            delivery_tag: 1,
            redelivered: false,
            exchange: "".into(),
            routing_key: "q".into(),
        })),
    )
    .await;
    raw.expect_connection_close(COMMAND_INVALID, "basic.deliver sent by a client")
        .await;
    assert_broker_alive(&broker).await;
}
