//! Misbehaving clients, driven with raw bytes: every case must get the
//! RabbitMQ-compatible error, and the broker must keep serving others.

use crate::common::*;
use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, basic, channel, queue as pqueue},
    types::FieldTable,
};

fn channel_open() -> AMQPClass {
    AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))
}

fn queue_declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(pqueue::AMQPMethod::Declare(pqueue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

async fn assert_header_refused(broker: &Broker, header: &[u8]) {
    let mut raw = broker.raw().await;
    raw.send_bytes(header).await;
    let got = raw
        .read_to_close(EVENT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("header {header:?}: expected reply then close, got {e:?}"));
    assert_eq!(
        got,
        PROTOCOL_HEADER.to_vec(),
        "after header {:?} the broker must answer with AMQP 0-9-1's header and close",
        String::from_utf8_lossy(header)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_supported_header_and_close() {
    let broker = Broker::start().await;
    assert_header_refused(&broker, b"AMQP\x00\x01\x00\x00").await; // AMQP 1.0
    assert_header_refused(&broker, b"AMQP\x00\x00\x08\x00").await;
    assert_header_refused(&broker, b"AMQP\x00\x00\x09\x00").await; // 0-9
    assert_header_refused(&broker, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_broker_alive(&broker).await;
}

/// Note: real RabbitMQ accepts this legacy header as AMQP 0-9 and proceeds
/// with 0-9-1; a broker speaking only 0-9-1 answers with its own header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_header_gets_supported_header_and_close() {
    let broker = Broker::start().await;
    assert_header_refused(&broker, b"AMQP\x01\x01\x00\x09").await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_larger_than_frame_max_is_501() {
    let broker = Broker::start().await;
    let (mut raw, tune) = broker.raw_handshake().await;
    assert_eq!(tune.frame_max, 131072);
    raw.open_channel(1).await;
    raw.send_method(1, queue_declare("q.big")).await;
    let _ = raw.expect_method("queue.declare-ok").await;
    raw.send_frame(&method_frame(1, publish_method("", "q.big")))
        .await;
    raw.send_frame(&header_frame(1, 200_000)).await;
    // One body frame of 140000 bytes: 140008 bytes on the wire > frame_max.
    raw.send_frame(&AMQPFrame::Body(1, vec![7u8; 140_000]))
        .await;
    raw.expect_connection_close(FRAME_ERROR, "frame larger than frame_max")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_larger_than_client_lowered_frame_max_is_501() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    // The client may lower frame_max in tune-ok; the broker must then enforce it.
    raw.handshake(|t| (t.channel_max, 4096, 0)).await;
    raw.open_channel(1).await;
    raw.send_frame(&method_frame(1, publish_method("amq.fanout", "")))
        .await;
    raw.send_frame(&header_frame(1, 6000)).await;
    raw.send_frame(&AMQPFrame::Body(1, vec![1u8; 6000])).await;
    raw.expect_connection_close(FRAME_ERROR, "frame larger than the tune-ok frame_max")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_end_byte_is_501() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    let mut bytes = encode_frame(&method_frame(1, channel_open()));
    let last = bytes.len() - 1;
    assert_eq!(bytes[last], 0xCE);
    bytes[last] = 0x00;
    raw.send_bytes(&bytes).await;
    raw.expect_connection_close(FRAME_ERROR, "frame-end byte 0x00")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_on_unopened_channel_is_504() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(5, queue_declare("q.never")).await;
    raw.expect_connection_close(CHANNEL_ERROR, "queue.declare on never-opened channel 5")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_channel_open_is_504() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(1, channel_open()).await;
    raw.expect_connection_close(CHANNEL_ERROR, "channel.open on an already open channel")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_header_without_publish_is_505() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_frame(&header_frame(1, 3)).await;
    raw.expect_connection_close(UNEXPECTED_FRAME, "content header with no preceding publish")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_without_publish_is_505() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_frame(&AMQPFrame::Body(1, b"orphan".to_vec()))
        .await;
    raw.expect_connection_close(UNEXPECTED_FRAME, "content body with no preceding publish")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_instead_of_content_header_is_505() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_frame(&method_frame(1, publish_method("amq.fanout", "")))
        .await;
    raw.send_method(1, queue_declare("q.interleaved")).await;
    raw.expect_connection_close(
        UNEXPECTED_FRAME,
        "method frame where a content header was due",
    )
    .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_exceeding_declared_size_is_505() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_frame(&method_frame(1, publish_method("amq.fanout", "")))
        .await;
    raw.send_frame(&header_frame(1, 5)).await;
    raw.send_frame(&AMQPFrame::Body(1, b"0123456789".to_vec()))
        .await;
    raw.expect_connection_close(
        UNEXPECTED_FRAME,
        "body frame larger than the declared body size",
    )
    .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_with_prefetch_size_is_540() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    let mut bytes = encode_frame(&method_frame(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: false,
        })),
    ));
    // Frame header is 7 bytes; payload = class(2) method(2) prefetch_size(4) ...
    assert_eq!(&bytes[7..11], &[0, 60, 0, 10], "basic.qos class/method ids");
    assert_eq!(
        &bytes[11..15],
        &[0, 0, 0, 0],
        "amq-protocol encodes prefetch_size 0"
    );
    bytes[11..15].copy_from_slice(&65536u32.to_be_bytes());
    raw.send_bytes(&bytes).await;
    raw.expect_connection_close(NOT_IMPLEMENTED, "basic.qos with prefetch_size != 0")
        .await;
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_with_zero_prefetch_size_is_accepted() {
    // Control for the test above: the unpatched frame is fine.
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 10,
            global: false,
        })),
    )
    .await;
    match raw.expect_method("basic.qos-ok").await {
        (1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))) => {}
        other => panic!("expected basic.qos-ok, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_handshake_is_501_or_close() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    let garbage: Vec<u8> = (0..64u32).map(|i| (0xDE ^ (i * 37)) as u8).collect();
    raw.send_bytes(&garbage).await;
    // Either a connection.close 501 (then the socket closes after close-ok), or
    // the socket is closed straight away.
    loop {
        match raw.read_frame().await {
            Ok(AMQPFrame::Method(
                0,
                AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(c)),
            )) => {
                assert_eq!(
                    c.reply_code, FRAME_ERROR,
                    "garbage: close code (text {:?})",
                    c.reply_text
                );
                raw.send_method(
                    0,
                    AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::CloseOk(
                        amq_protocol::protocol::connection::CloseOk {},
                    )),
                )
                .await;
                raw.expect_socket_closed("after garbage").await;
                break;
            }
            Ok(AMQPFrame::Heartbeat) => continue,
            Ok(other) => panic!("garbage: unexpected frame {other:?}"),
            Err(ReadError::Closed) => break,
            Err(e) => panic!("garbage: expected connection.close 501 or socket close, got {e:?}"),
        }
    }
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_start_ok_closes_socket() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    let _start = raw.start().await;
    raw.send_bytes(&[0xFFu8; 32]).await;
    // Before the connection is open the broker may just drop the socket.
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        match raw
            .read_frame_within(deadline.saturating_duration_since(std::time::Instant::now()))
            .await
        {
            Err(ReadError::Closed) => break,
            Err(ReadError::Timeout) => panic!("socket not closed after garbage during handshake"),
            Ok(AMQPFrame::Method(
                0,
                AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(c)),
            )) => {
                assert_eq!(c.reply_code, FRAME_ERROR, "close code");
                raw.send_method(
                    0,
                    AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::CloseOk(
                        amq_protocol::protocol::connection::CloseOk {},
                    )),
                )
                .await;
            }
            Ok(_) | Err(ReadError::Malformed(_)) => continue,
        }
    }
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_message_is_harmless() {
    let broker = Broker::start().await;
    {
        let (mut raw, _) = broker.raw_handshake().await;
        raw.open_channel(1).await;
        raw.send_frame(&method_frame(1, publish_method("amq.fanout", "")))
            .await;
        raw.send_frame(&header_frame(1, 1000)).await;
        raw.send_frame(&AMQPFrame::Body(1, vec![0u8; 10])).await;
        // Dropped here: the socket closes mid-body.
    }
    // Immediately after the TCP handshake, then drop.
    {
        let mut raw = broker.raw().await;
        raw.send_bytes(b"AMQ").await;
    }
    assert_broker_alive(&broker).await;
}

/// Valid but unusual framing: a body split into 1-byte frames, content of two
/// channels interleaved, and heartbeats between content frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_and_fragmented_content_is_reassembled() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.open_channel(2).await;
    raw.send_method(1, queue_declare("q.frag")).await;
    let _ = raw.expect_method("queue.declare-ok").await;

    let body1: Vec<u8> = (0..50u8).collect();
    let body2 = b"second-channel".to_vec();
    raw.send_frame(&method_frame(1, publish_method("", "q.frag")))
        .await;
    raw.send_frame(&header_frame(1, body1.len() as u64)).await;
    raw.send_frame(&method_frame(2, publish_method("", "q.frag")))
        .await;
    raw.send_frame(&header_frame(2, body2.len() as u64)).await;
    for (i, b) in body1.iter().enumerate() {
        raw.send_frame(&AMQPFrame::Body(1, vec![*b])).await;
        if i == 10 {
            raw.send_frame(&AMQPFrame::Heartbeat).await;
            raw.send_frame(&AMQPFrame::Body(2, body2.clone())).await;
        }
    }
    // A sync command on each channel: the publishes were handled before it.
    for ch in [1u16, 2] {
        raw.send_method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 0,
                global: false,
            })),
        )
        .await;
        match raw.expect_method("basic.qos-ok").await {
            (c, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))) if c == ch => {}
            other => panic!("expected qos-ok on {ch}, got {other:?}"),
        }
    }
    drop(raw);

    let conn = broker.connect().await;
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("channel");
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let m = within(
            "get",
            ch.basic_get(
                "q.frag".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            ),
        )
        .await
        .expect("get")
        .expect("message");
        bodies.push(m.delivery.data);
    }
    // Channel 2's message completed first.
    assert_eq!(bodies, vec![body2, body1]);
}

fn passive_declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(pqueue::AMQPMethod::Declare(pqueue::Declare {
        queue: name.into(),
        passive: true,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

/// After the server closes a channel, methods the client sent before seeing
/// the close are discarded (not errors), and the channel id can be reopened
/// once the client has answered close-ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_close_handshake_and_reopen() {
    let broker = Broker::start().await;
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_method(1, passive_declare("q.absent")).await;
    // Sent "in flight", before the client has seen channel.close.
    raw.send_method(1, queue_declare("q.in-flight")).await;
    raw.send_frame(&method_frame(1, publish_method("", "q.in-flight")))
        .await;
    raw.send_frame(&header_frame(1, 2)).await;
    raw.send_frame(&AMQPFrame::Body(1, b"hi".to_vec())).await;
    raw.expect_channel_close(1, NOT_FOUND, "passive declare of a missing queue")
        .await;
    // Answered close-ok; reopen the same id and use it.
    raw.open_channel(1).await;
    raw.send_method(1, passive_declare("q.in-flight")).await;
    raw.expect_channel_close(1, NOT_FOUND, "the in-flight declare was discarded")
        .await;
    raw.open_channel(1).await;
    raw.send_method(1, queue_declare("q.reopened")).await;
    match raw.expect_method("queue.declare-ok").await {
        (1, AMQPClass::Queue(pqueue::AMQPMethod::DeclareOk(ok))) => {
            assert_eq!(ok.queue.as_str(), "q.reopened")
        }
        other => panic!("expected declare-ok on the reopened channel, got {other:?}"),
    }
}
