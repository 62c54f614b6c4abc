//! Extensions that must survive a restart: a TTL keeps counting from the
//! message's arrival, not from the restart, and a priority queue comes
//! back in priority order.

use std::path::Path;
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use warren_core::{Broker, ConnectionId, Limits, Message, Outbox, QueueDeclare};
use warren_store::{
    FileSystem, LogConfig, MessageLog, SimulatedFileSystem, SpillArea, TopologyJournal,
};

const CONNECTION: ConnectionId = ConnectionId(1);
const T0: u64 = 1_800_000_000_000;

/// A broker whose clock reads `now_ms` when it recovers from `fs`.
fn broker_at(fs: &Arc<SimulatedFileSystem>, now_ms: u64) -> Broker {
    let fs_dyn: Arc<dyn FileSystem> = fs.clone();
    let (log, recovery) = MessageLog::open(
        fs_dyn.clone(),
        Path::new("/data/messages"),
        LogConfig::default(),
        Box::new(|_| {}),
    )
    .unwrap();
    let (topology, entries) =
        TopologyJournal::open(fs_dyn.clone(), Path::new("/data"), Box::new(|_| {})).unwrap();
    let mut broker = Broker::new(&[], Limits::default(), 3);
    broker.advance_clock(now_ms);
    broker
        .attach_store(
            log,
            recovery,
            topology,
            entries,
            Some(SpillArea::open(fs_dyn.clone(), Path::new("/data/messages/spill")).unwrap()),
        )
        .unwrap();
    broker.open_connection(CONNECTION, "/", true);
    broker.open_channel(CONNECTION, 1);
    broker
}

fn declare(broker: &mut Broker, name: &str, key: &str, value: AMQPValue) {
    let mut arguments = FieldTable::default();
    arguments.insert(key.into(), value);
    broker
        .declare_queue(
            CONNECTION,
            QueueDeclare {
                name: name.into(),
                durable: true,
                arguments,
                ..Default::default()
            },
        )
        .unwrap();
    // The server replies declare-ok only once the declaration is durable.
    broker.wait_for_topology().unwrap();
}

fn publish(broker: &mut Broker, queue: &str, body: &str, priority: Option<u8>) {
    let mut properties = BasicProperties::default().with_delivery_mode(2);
    if let Some(priority) = priority {
        properties = properties.with_priority(priority);
    }
    broker
        .publish(
            CONNECTION,
            1,
            Arc::new(Message {
                exchange: "".into(),
                routing_key: queue.into(),
                properties,
                body: Bytes::copy_from_slice(body.as_bytes()),
            }),
            &mut Outbox::default(),
        )
        .unwrap();
}

fn bodies(broker: &mut Broker, queue: &str) -> Vec<String> {
    let mut taken = Vec::new();
    while let Some(got) = broker
        .get(CONNECTION, 1, queue, true, &mut Outbox::default())
        .unwrap()
    {
        taken.push(String::from_utf8_lossy(&got.message.body).into_owned());
    }
    taken
}

#[test]
fn a_ttl_counts_from_arrival_across_a_restart() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_at(&fs, T0);
    declare(
        &mut broker,
        "short",
        "x-message-ttl",
        AMQPValue::LongInt(1_000),
    );
    declare(
        &mut broker,
        "long",
        "x-message-ttl",
        AMQPValue::LongInt(10_000),
    );
    publish(&mut broker, "short", "s", None);
    publish(&mut broker, "long", "l", None);
    broker.close_store().unwrap();

    let mut broker = broker_at(&fs, T0 + 1_500);
    broker.tick(&mut Outbox::default());
    assert_eq!(
        broker.queue_counts("/", "short"),
        Some((0, 0)),
        "expired while down"
    );
    assert_eq!(broker.queue_counts("/", "long"), Some((1, 0)));
    broker.advance_clock(T0 + 10_000);
    broker.tick(&mut Outbox::default());
    assert_eq!(broker.queue_counts("/", "long"), Some((0, 0)));
}

#[test]
fn a_priority_queue_recovers_in_priority_order() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_at(&fs, T0);
    declare(
        &mut broker,
        "urgent",
        "x-max-priority",
        AMQPValue::ShortShortUInt(9),
    );
    for (body, priority) in [("low", 1), ("high", 8), ("none", 0), ("mid", 5)] {
        publish(&mut broker, "urgent", body, Some(priority));
    }
    broker.close_store().unwrap();

    let mut broker = broker_at(&fs, T0 + 1);
    assert_eq!(
        bodies(&mut broker, "urgent"),
        vec!["high", "mid", "low", "none"]
    );
}
