//! The broker with a store on a simulated disk: transient messages past a
//! queue's memory window are paged out and read back in order, and a failed
//! fsync makes later persistent publishes report a store error (the server
//! turns that into basic.nack).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use warren_core::{Broker, ConnectionId, Limits, Message, Outbox, QueueDeclare};
use warren_store::{FileSystem, LogConfig, MessageLog, SimulatedFileSystem, TopologyFile};

const CONNECTION: ConnectionId = ConnectionId(1);

fn broker_on(fs: &Arc<SimulatedFileSystem>) -> Broker {
    let fs_dyn: Arc<dyn FileSystem> = fs.clone();
    let (log, recovery) = MessageLog::open(
        fs_dyn.clone(),
        Path::new("/data/messages"),
        LogConfig::default(),
        Box::new(|_| {}),
    )
    .unwrap();
    let mut broker = Broker::new(&[], Limits::default(), 3);
    broker
        .attach_store(log, TopologyFile::new(fs_dyn, Path::new("/data")), recovery)
        .unwrap();
    broker.open_connection(CONNECTION, "/", true);
    broker.open_channel(CONNECTION, 1);
    broker
}

fn declare(broker: &mut Broker, name: &str, durable: bool) {
    broker
        .declare_queue(
            CONNECTION,
            QueueDeclare {
                name: name.into(),
                durable,
                ..Default::default()
            },
        )
        .unwrap();
}

fn message(queue: &str, body: String, persistent: bool) -> Arc<Message> {
    let properties = if persistent {
        BasicProperties::default().with_delivery_mode(2)
    } else {
        BasicProperties::default()
    };
    Arc::new(Message {
        exchange: "".into(),
        routing_key: queue.into(),
        properties,
        body: Bytes::from(body),
    })
}

#[test]
fn transient_messages_past_the_memory_window_are_paged_out_and_come_back_in_order() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_on(&fs);
    declare(&mut broker, "big", false);
    let count = warren_core::RESIDENT_MESSAGES_MAX + 500;
    for index in 0..count {
        broker
            .publish(
                CONNECTION,
                1,
                message("big", format!("m{index}"), false),
                &mut Outbox::default(),
            )
            .unwrap();
    }
    let segment = Path::new("/data/messages/00000000000000000001.seg");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs.file_length(segment).unwrap_or(0) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing was paged out to the log"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for index in 0..count {
        let got = broker
            .get(CONNECTION, 1, "big", true, &mut Outbox::default())
            .unwrap()
            .expect("message");
        assert_eq!(got.message.body, format!("m{index}").as_bytes());
    }
    assert!(
        broker
            .get(CONNECTION, 1, "big", true, &mut Outbox::default())
            .unwrap()
            .is_none()
    );
}

#[test]
fn after_a_failed_fsync_persistent_publishes_report_the_store_error() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_on(&fs);
    declare(&mut broker, "jobs", true);
    fs.fail_next_syncs(1);
    let first = broker
        .publish(
            CONNECTION,
            1,
            message("jobs", "first".into(), true),
            &mut Outbox::default(),
        )
        .unwrap();
    assert!(first.ticket.is_some() && first.store_error.is_none());
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker.message_log().unwrap().poisoned().is_none() {
        assert!(
            Instant::now() < deadline,
            "the failed fsync did not poison the log"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = broker
        .publish(
            CONNECTION,
            1,
            message("jobs", "second".into(), true),
            &mut Outbox::default(),
        )
        .unwrap();
    assert!(
        second.store_error.is_some(),
        "a poisoned log must refuse the publish"
    );
    assert_eq!(
        second.routed, 1,
        "the message is still delivered from memory"
    );
    // The durable ticket never covers the first publish: it is never confirmed.
    assert!(broker.message_log().unwrap().durable_ticket() < first.ticket.unwrap());
}

#[test]
fn a_message_redelivered_after_a_crash_stays_marked_after_a_clean_restart() {
    let fs = SimulatedFileSystem::new();
    {
        let mut broker = broker_on(&fs);
        declare(&mut broker, "jobs", true);
        let published = broker
            .publish(
                CONNECTION,
                1,
                message("jobs", "once".into(), true),
                &mut Outbox::default(),
            )
            .unwrap();
        let log = broker.message_log().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.durable_ticket() < published.ticket.unwrap() {
            assert!(Instant::now() < deadline, "publish never became durable");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Crash: every recovered message is marked redelivered.
        broker.abandon_store();
        fs.crash(|_| 0);
    }
    let mut broker = broker_on(&fs);
    let got = broker
        .get(CONNECTION, 1, "jobs", false, &mut Outbox::default())
        .unwrap()
        .expect("recovered");
    assert!(got.redelivered);
    // Requeued by closing the channel, then a clean stop and start.
    broker.close_channel(CONNECTION, 1, &mut Outbox::default());
    broker.close_store().unwrap();
    let mut broker = broker_on(&fs);
    let again = broker
        .get(CONNECTION, 1, "jobs", true, &mut Outbox::default())
        .unwrap()
        .expect("still there");
    assert!(
        again.redelivered,
        "it was delivered before the clean restart"
    );
}
