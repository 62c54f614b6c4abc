//! Data written by the first storage format (docs/storage-format.md) must
//! stay readable: these files were produced by `warren serve` (a durable
//! topic exchange, a durable queue with an argument, a binding, five
//! persistent messages with properties of which the first was acked and the
//! second delivered but not acked, one transient message, then a clean
//! shutdown). A later version that cannot read them has broken the format.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use amq_protocol::types::AMQPValue;
use warren_core::{Broker, ConnectionId, Limits, Message, Outbox, QueueDeclare};
use warren_store::{LogConfig, MessageLog, OsFileSystem, SpillArea, TopologyJournal};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format-v1");

/// Opening a store removes its clean-shutdown marker, so tests work on a
/// copy and the fixture stays as written.
fn copy_fixture() -> PathBuf {
    let target = std::env::temp_dir().join(format!("warren-format-v1-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&target);
    std::fs::create_dir_all(target.join("messages")).unwrap();
    for relative in [
        "topology.dat",
        "messages/00000000000000000001.seg",
        "messages/clean-shutdown",
    ] {
        std::fs::copy(Path::new(FIXTURE).join(relative), target.join(relative)).unwrap();
    }
    target
}

#[test]
fn the_first_format_version_recovers() {
    let dir = copy_fixture();
    let fs = Arc::new(OsFileSystem::new());
    let (log, recovery) = MessageLog::open(
        fs.clone(),
        &dir.join("messages"),
        LogConfig::default(),
        Box::new(|_| {}),
    )
    .unwrap();
    let mut broker = Broker::new(&[], Limits::default(), 7);
    let (topology, entries) = TopologyJournal::open(fs.clone(), &dir, Box::new(|_| {})).unwrap();
    let summary = broker
        .attach_store(
            log,
            recovery,
            topology,
            entries,
            Some(SpillArea::open(fs.clone(), &dir.join("messages").join("spill")).unwrap()),
        )
        .unwrap();
    assert_eq!(
        (summary.exchanges, summary.queues, summary.bindings),
        (1, 1, 1)
    );
    assert_eq!(
        summary.messages, 4,
        "five published, one acked, the transient one not kept"
    );
    assert!(summary.clean_shutdown);

    let connection = ConnectionId(1);
    broker.open_connection(connection, "/", true);
    broker.open_channel(connection, 1);
    let declared = broker
        .declare_queue(
            connection,
            QueueDeclare {
                name: "fixture.queue".into(),
                passive: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(declared.message_count, 4);

    let mut seen = Vec::new();
    while let Some(got) = broker
        .get(connection, 1, "fixture.queue", true, &mut Outbox::default())
        .unwrap()
    {
        let message = &got.message;
        let headers = message.properties.headers().as_ref().expect("headers kept");
        let number = match headers.inner().get("n") {
            Some(AMQPValue::LongInt(n)) => *n as i64,
            Some(AMQPValue::LongLongInt(n)) => *n,
            Some(AMQPValue::ShortShortInt(n)) => *n as i64,
            other => panic!("header n: {other:?}"),
        };
        assert_eq!(
            message.body.as_ref(),
            format!("message {number}").as_bytes()
        );
        assert_eq!(
            message
                .properties
                .correlation_id()
                .as_ref()
                .map(|id| id.to_string()),
            Some(format!("c-{number}"))
        );
        assert_eq!(message.routing_key.as_str(), format!("fixture.{number}"));
        seen.push((number, got.redelivered));
    }
    // Message 2 had been delivered; after a clean shutdown only it is marked.
    assert_eq!(seen, [(2, true), (3, false), (4, false), (5, false)]);

    // The recovered binding routes.
    let message = Arc::new(Message {
        exchange: "fixture.exchange".into(),
        routing_key: "fixture.new".into(),
        properties: Default::default(),
        body: bytes::Bytes::from_static(b"new"),
    });
    assert_eq!(
        broker
            .publish(connection, 1, message, &mut Outbox::default())
            .unwrap()
            .routed,
        1
    );
    broker.close_store().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
