//! Peers that do not play by the rules, over raw sockets: a thousand
//! connections that never finish the handshake (slow loris), frames too
//! large before and after login, and a well-behaved client that must keep
//! working through all of it.

use std::time::Duration;

use crate::common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bound the broker must keep per unauthenticated connection.
const UNAUTHENTICATED_CONNECTION_BYTES_MAX: u64 = 64 * 1024;
const SLOW_LORIS_CONNECTIONS: usize = 1_000;

/// A well-behaved client's round trip, to show the broker still serves.
async fn round_trip(broker: &Broker, queue: &str) {
    let connection = broker.connect().await;
    let channel = within("channel", connection.create_channel())
        .await
        .expect("channel");
    within(
        "declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    within(
        "publish",
        channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"still here",
            Default::default(),
        ),
    )
    .await
    .expect("publish");
    let got = within(
        "get",
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get");
    assert!(got.is_some(), "the message came back");
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unfinished_handshakes_cost_little_and_are_closed_in_time() {
    let broker = Broker::start_with_config("[amqp]\nhandshake_timeout_s = 3\n").await;
    round_trip(&broker, "warm-up").await;
    let before = resident_bytes(broker.pid());
    let started = tokio::time::Instant::now();
    let mut sockets = Vec::with_capacity(SLOW_LORIS_CONNECTIONS);
    for _ in 0..SLOW_LORIS_CONNECTIONS {
        let mut socket = TcpStream::connect(broker.addr()).await.expect("connect");
        // The protocol header and the first bytes of a start-ok frame,
        // then nothing: the broker has sent connection.start and waits.
        socket
            .write_all(b"AMQP\x00\x00\x09\x01\x01\x00\x00")
            .await
            .expect("write");
        sockets.push(socket);
    }
    // Every connection has been served: each got its connection.start.
    for socket in &mut sockets {
        let mut first = [0u8; 1];
        within("connection.start", socket.read_exact(&mut first))
            .await
            .expect("read connection.start");
        assert_eq!(first[0], 1, "a method frame");
    }
    let after = resident_bytes(broker.pid());
    let per_connection = after.saturating_sub(before) / SLOW_LORIS_CONNECTIONS as u64;
    eprintln!(
        "broker RSS {before} -> {after} bytes: {per_connection} bytes per unfinished handshake"
    );
    assert!(
        per_connection < UNAUTHENTICATED_CONNECTION_BYTES_MAX,
        "{per_connection} bytes per unfinished handshake (RSS {before} -> {after})"
    );
    // Others are served meanwhile.
    round_trip(&broker, "during").await;
    // And each is closed once the handshake timeout has passed, not before.
    for socket in &mut sockets {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(15), socket.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the broker closes an unfinished handshake");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3),
        "closed after the timeout, not before ({elapsed:?})"
    );
    broker.wait_for_log("handshake not completed in time").await;
    round_trip(&broker, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_minimum_before_login_is_501() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    raw.send_bytes(b"AMQP\x00\x00\x09\x01").await;
    // A start-ok frame announcing 64 KiB: more than the 4096 bytes allowed
    // before tune-ok, refused before its payload is read.
    let mut frame = vec![1u8, 0, 0];
    frame.extend_from_slice(&(64 * 1024u32).to_be_bytes());
    raw.send_bytes(&frame).await;
    raw.expect_connection_close(501, "a 64 KiB frame before tune-ok")
        .await;
    round_trip(&broker, "after-oversize").await;
}

/// A field table nested `depth` levels deep: {"k": {"k": ... {}}}.
fn nested_table(depth: usize) -> Vec<u8> {
    let mut table = Vec::new(); // the innermost table's entries: none
    for _ in 1..depth {
        let mut entries = vec![1u8, b'k', b'F'];
        entries.extend_from_slice(&(table.len() as u32).to_be_bytes());
        entries.extend_from_slice(&table);
        table = entries;
    }
    let mut encoded = (table.len() as u32).to_be_bytes().to_vec();
    encoded.extend_from_slice(&table);
    encoded
}

/// A queue.declare frame on channel 1 with `arguments` as its table.
fn queue_declare_frame(arguments: &[u8]) -> Vec<u8> {
    let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    payload.extend_from_slice(arguments);
    let mut frame = vec![1u8, 0, 1];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xCE);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_nested_too_deep_are_501_before_they_are_parsed() {
    let broker = Broker::start().await;
    // At the limit (16 levels) a declaration is fine...
    let (mut raw, _) = broker.raw_handshake().await;
    raw.open_channel(1).await;
    raw.send_bytes(&queue_declare_frame(&nested_table(16)))
        .await;
    let _ = raw.expect_method("queue.declare-ok").await;
    // ...one level more closes the connection, and so does a depth that
    // would overflow a recursive parser's stack.
    for depth in [17, 10_000] {
        let (mut raw, _) = broker.raw_handshake().await;
        raw.open_channel(1).await;
        raw.send_bytes(&queue_declare_frame(&nested_table(depth)))
            .await;
        raw.expect_connection_close(501, "a table nested too deep")
            .await;
    }
    round_trip(&broker, "after-deep-tables").await;
    assert!(broker.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_the_limit_close_the_channel_with_406() {
    let broker = Broker::start_with_config("[amqp]\nheaders_size_max_bytes = 1024\n").await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let big = table(&[("padding", lstr(&"x".repeat(2_000)))]);
    let refused = async {
        channel
            .basic_publish(
                "".into(),
                "nowhere".into(),
                BasicPublishOptions::default(),
                b"body",
                lapin::BasicProperties::default().with_headers(big),
            )
            .await?
            .await
    };
    assert_amqp_error(
        within("publish", refused).await,
        406,
        "headers over the limit",
    );
    // The connection and its other channels go on.
    let channel = connection.create_channel().await.expect("another channel");
    channel
        .queue_declare(
            "fine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("the connection still works");
    broker
        .wait_for_log("message headers of 2013 bytes are larger than the configured max size 1024")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_are_limited() {
    let broker = Broker::start_with_config("[amqp]\nconnections_per_user_max = 2\n").await;
    let first = broker.connect().await;
    let _second = broker.connect().await;
    let refused = broker.try_connect_url(&broker.amqp_url()).await;
    assert_amqp_error(refused, 530, "a third connection of guest");
    broker
        .wait_for_log("User connection limit (2) is reached")
        .await;
    // A slot frees when a connection closes.
    first.close(200, "bye".into()).await.expect("close");
    let mut reconnected = None;
    for _ in 0..50 {
        if let Ok(connection) = broker.try_connect_url(&broker.amqp_url()).await {
            reconnected = Some(connection);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reconnected.is_some(), "the freed slot is usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhosts_queues_are_limited() {
    let broker = Broker::start_with_config("[amqp]\nqueues_per_vhost_max = 3\n").await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.expect("channel");
    for name in ["a", "b", "c"] {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("under the limit");
    }
    // Redeclaring an existing queue is not a new one.
    channel
        .queue_declare(
            "a".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("redeclare");
    let refused = channel
        .queue_declare(
            "d".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(refused, 406, "a fourth queue");
    broker
        .wait_for_log("cannot declare queue 'd': queue limit in virtual host '/' is reached (3)")
        .await;
}
