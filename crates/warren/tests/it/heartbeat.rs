//! Heartbeats: the broker sends them at the negotiated interval and drops
//! clients that go silent for two intervals.

use std::time::{Duration, Instant};

use crate::common::*;
use amq_protocol::{
    frame::AMQPFrame,
    protocol::{AMQPClass, connection},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_disconnected_after_missed_heartbeats() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    let tune = raw.handshake(|t| (t.channel_max, t.frame_max, 1)).await;
    assert_eq!(
        tune.heartbeat, 60,
        "server proposes its configured heartbeat"
    );
    let negotiated_at = Instant::now();

    let mut heartbeats = 0u32;
    let mut close_frame = None;
    let closed_after = loop {
        match raw.read_frame_within(Duration::from_secs(10)).await {
            Ok(AMQPFrame::Heartbeat) => heartbeats += 1,
            Ok(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                // Allowed (some brokers say why), but we stay silent.
                close_frame = Some(c);
            }
            Ok(other) => panic!("unexpected frame while idle: {other:?}"),
            Err(ReadError::Closed) => break negotiated_at.elapsed(),
            Err(ReadError::Timeout) => panic!(
                "broker kept a silent client with heartbeat=1s for 10s (received {heartbeats} heartbeats)"
            ),
            Err(e) => panic!("read error: {e:?}"),
        }
    };
    assert!(
        heartbeats >= 1,
        "the broker must send heartbeats at the 1s interval before giving up (got {heartbeats})"
    );
    assert!(
        closed_after >= Duration::from_millis(1000),
        "closed too early ({closed_after:?}); two missed 1s heartbeats are needed"
    );
    assert!(
        closed_after <= Duration::from_millis(4500),
        "closed after {closed_after:?}; expected within ~4s (two missed heartbeats)"
    );
    if let Some(c) = close_frame {
        eprintln!("broker sent connection.close before dropping: {c:?}");
    }
    assert_broker_alive(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sending_heartbeats_stays_connected() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    raw.handshake(|t| (t.channel_max, t.frame_max, 1)).await;
    let start = Instant::now();
    let mut received = 0u32;
    // For 4 seconds (well past two intervals) send a heartbeat every 400 ms and
    // collect whatever the broker sends.
    while start.elapsed() < Duration::from_secs(4) {
        raw.send_frame(&AMQPFrame::Heartbeat).await;
        let next_send = Instant::now() + Duration::from_millis(400);
        loop {
            let left = next_send.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match raw.read_frame_within(left).await {
                Ok(AMQPFrame::Heartbeat) => received += 1,
                Ok(other) => panic!("unexpected frame: {other:?}"),
                Err(ReadError::Timeout) => break,
                Err(e) => panic!(
                    "connection dropped after {:?} although the client heartbeats: {e:?}",
                    start.elapsed()
                ),
            }
        }
    }
    assert!(
        received >= 2,
        "expected broker heartbeats over 4s at 1s interval, got {received}"
    );
    // Still fully usable.
    raw.open_channel(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_zero_disables_heartbeats() {
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    raw.handshake(|t| (t.channel_max, t.frame_max, 0)).await;
    // Silence for 3 s: no heartbeat frames and no disconnect.
    match raw.read_frame_within(Duration::from_secs(3)).await {
        Err(ReadError::Timeout) => {}
        Ok(f) => panic!("heartbeat disabled, yet the broker sent {f:?}"),
        Err(e) => panic!("heartbeat disabled, yet the connection failed: {e:?}"),
    }
    raw.open_channel(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_heartbeat_is_proposed() {
    let broker = Broker::start_with_config("[amqp]\nheartbeat_s = 2\n").await;
    let (_raw, tune) = broker.raw_handshake().await;
    assert_eq!(tune.heartbeat, 2);
    let conn = broker.connect().await;
    assert_eq!(
        conn.configuration().heartbeat(),
        2,
        "lapin adopts the server's heartbeat"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_connection_survives_idle_heartbeat_intervals() {
    let broker = Broker::start_with_config("[amqp]\nheartbeat_s = 1\n").await;
    let conn = broker.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 1);
    let ch = within("create_channel", conn.create_channel())
        .await
        .expect("create_channel");
    // Idle for 3.5 heartbeat intervals: both sides' heartbeats keep it alive.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        conn.status().connected(),
        "connection dropped while idle with heartbeats"
    );
    within(
        "declare after idle",
        ch.queue_declare("q.idle".into(), Default::default(), Default::default()),
    )
    .await
    .expect("channel usable after idling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_client_traffic_counts_as_liveness() {
    use amq_protocol::protocol::basic;
    let broker = Broker::start().await;
    let mut raw = broker.raw().await;
    raw.handshake(|t| (t.channel_max, t.frame_max, 1)).await;
    raw.open_channel(1).await;
    let start = Instant::now();
    // No heartbeat frames from us, only methods every 400 ms, for 4 s.
    while start.elapsed() < Duration::from_secs(4) {
        raw.send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1,
                global: false,
            })),
        )
        .await;
        loop {
            match raw.read_frame().await {
                Ok(AMQPFrame::Heartbeat) => continue,
                Ok(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_)))) => break,
                Ok(other) => panic!("unexpected frame {other:?}"),
                Err(e) => panic!(
                    "dropped after {:?} despite method traffic: {e:?}",
                    start.elapsed()
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}
