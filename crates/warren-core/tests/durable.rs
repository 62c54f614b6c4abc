//! The broker with a store on a simulated disk: transient messages past a
//! queue's memory window are paged out and read back in order, and a failed
//! fsync makes later persistent publishes report a store error (the server
//! turns that into basic.nack).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use warren_core::codec::decode_stored_message;
use warren_core::{
    Broker, ConnectionId, Consume, Discard, Effect, Limits, Message, Outbox, QueueDeclare,
    ReadAhead,
};
use warren_store::{
    FileSystem, LogConfig, MessageLog, SimulatedFileSystem, SpillArea, TopologyJournal,
};

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
    let (topology, entries) =
        TopologyJournal::open(fs_dyn.clone(), Path::new("/data"), Box::new(|_| {})).unwrap();
    let mut broker = Broker::new(&[], Limits::default(), 3);
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
    // The server replies declare-ok only once the declaration is durable.
    broker.wait_for_topology().unwrap();
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

/// What the server's reader thread does with a read-ahead: read each
/// record back and hand the messages to the broker.
fn serve_read_ahead(broker: &mut Broker, request: ReadAhead) {
    let reader = broker.message_log().expect("a log").handle();
    let loaded = request
        .reads
        .iter()
        .map(|&(sequence, location)| {
            let payload = reader.read(location).expect("readable");
            let (message, arrived_ms) = decode_stored_message(&payload).expect("decodable");
            (sequence, message, arrived_ms)
        })
        .collect();
    broker.install_read_ahead(request.queue, loaded);
}

/// Splits an outbox into its deliveries' bodies and its read-aheads.
/// Waits until the log has made everything up to `ticket` durable.
fn wait_durable(broker: &Broker, ticket: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while broker.message_log().unwrap().durable_ticket() < ticket {
        assert!(Instant::now() < deadline, "{what} never became durable");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn deliveries_and_read_aheads(out: &mut Outbox) -> (Vec<Bytes>, Vec<ReadAhead>) {
    let mut bodies = Vec::new();
    let mut read_aheads = Vec::new();
    for effect in out.take() {
        match effect {
            Effect::Deliver(delivery) => {
                delivery.unwritten.written(1);
                bodies.push(delivery.message.body.clone());
            }
            Effect::ReadAhead(request) => read_aheads.push(request),
            _ => {}
        }
    }
    (bodies, read_aheads)
}

#[test]
fn paged_out_messages_are_read_back_ahead_of_a_consumer_and_kept_in_order() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_on(&fs);
    broker.enable_store_worker();
    declare(&mut broker, "big", false);
    let count = warren_core::RESIDENT_MESSAGES_MAX + 1_000;
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
    let info = broker.queue_info("/", "big").unwrap();
    assert_eq!(info.ready_in_memory, warren_core::RESIDENT_MESSAGES_MAX);

    // The consumer takes the messages in memory (as many as its channel
    // may have unwritten) and the broker asks for the next paged-out ones.
    let mut out = Outbox::default();
    broker
        .consume(
            CONNECTION,
            1,
            Consume {
                queue: "big".into(),
                consumer_tag: "c".into(),
                no_ack: true,
                ..Default::default()
            },
            &mut out,
        )
        .unwrap();
    // As the server does, the rounds the consume left run to their end.
    while broker.continue_rounds(&mut out) {}
    let mut delivered = Vec::new();
    let (bodies, read_aheads) = deliveries_and_read_aheads(&mut out);
    delivered.extend(bodies);
    assert_eq!(delivered.len(), warren_core::RESIDENT_MESSAGES_MAX);
    let [request] = read_aheads.as_slice() else {
        panic!("expected one read-ahead, got {read_aheads:?}");
    };
    assert_eq!(request.reads.len(), warren_core::READ_AHEAD_MESSAGES);
    assert!(
        request.reads.windows(2).all(|pair| pair[0].0 < pair[1].0),
        "reads come in queue order"
    );
    let info = broker.queue_info("/", "big").unwrap();
    assert_eq!(info.ready_in_memory, 0);

    // Once read, they wait in memory without having been taken.
    serve_read_ahead(&mut broker, request.clone());
    let info = broker.queue_info("/", "big").unwrap();
    assert_eq!(info.ready, 1_000);
    assert_eq!(info.ready_in_memory, warren_core::READ_AHEAD_MESSAGES);

    // The consumer drains the rest in order, read-aheads served as asked.
    while delivered.len() < count {
        broker.resume_deliveries(CONNECTION, 1, &mut out);
        let (bodies, read_aheads) = deliveries_and_read_aheads(&mut out);
        assert!(
            !bodies.is_empty(),
            "the consumer stalled at {}",
            delivered.len()
        );
        delivered.extend(bodies);
        for request in read_aheads {
            serve_read_ahead(&mut broker, request);
        }
    }
    for (index, body) in delivered.iter().enumerate() {
        assert_eq!(body, format!("m{index}").as_bytes());
    }
    assert_eq!(broker.queue_info("/", "big").unwrap().ready, 0);
}

/// Read-ahead serves consumers that are taking messages, within what the
/// queue keeps in memory anyway: a queue without consumers asks for
/// nothing, and a body larger than the queue's memory budget is never read
/// ahead, only when a consumer takes it.
#[test]
fn read_ahead_never_holds_more_than_the_queue_keeps_in_memory() {
    let fs = SimulatedFileSystem::new();
    let mut broker = broker_on(&fs);
    broker.enable_store_worker();
    declare(&mut broker, "large", false);
    let large = "x".repeat(warren_core::RESIDENT_BYTES_MAX + 1);
    let mut out = Outbox::default();
    for _ in 0..3 {
        broker
            .publish(
                CONNECTION,
                1,
                message("large", large.clone(), false),
                &mut out,
            )
            .unwrap();
    }
    assert_eq!(broker.queue_info("/", "large").unwrap().ready_in_memory, 0);
    assert!(
        deliveries_and_read_aheads(&mut out).1.is_empty(),
        "a queue without consumers asked for a read-ahead"
    );

    // A consumer with room for one message takes the first; the next two
    // stay on disk until it asks for them.
    broker.set_prefetch(CONNECTION, 1, 1, false, &mut out);
    broker
        .consume(
            CONNECTION,
            1,
            Consume {
                queue: "large".into(),
                consumer_tag: "c".into(),
                ..Default::default()
            },
            &mut out,
        )
        .unwrap();
    for taken in 1..=3u64 {
        let (bodies, read_aheads) = deliveries_and_read_aheads(&mut out);
        assert_eq!(bodies.len(), 1, "delivery {taken}");
        assert_eq!(bodies[0].len(), large.len());
        assert!(
            read_aheads.is_empty(),
            "a body past the memory budget was read ahead"
        );
        assert_eq!(broker.queue_info("/", "large").unwrap().ready_in_memory, 0);
        broker.ack(CONNECTION, 1, taken, false, &mut out).unwrap();
    }
    assert_eq!(broker.queue_info("/", "large").unwrap().ready, 0);
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
        wait_durable(&broker, published.ticket.unwrap(), "the publish");
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

/// A delivery writes nothing to the log; a clean stop marks the deliveries
/// still unacknowledged, so after the restart exactly those come back
/// redelivered, and a message that never went out does not.
#[test]
fn a_clean_stop_marks_unacked_deliveries_and_only_those() {
    let fs = SimulatedFileSystem::new();
    {
        let mut broker = broker_on(&fs);
        declare(&mut broker, "jobs", true);
        for body in ["delivered", "waiting"] {
            broker
                .publish(
                    CONNECTION,
                    1,
                    message("jobs", body.into(), true),
                    &mut Outbox::default(),
                )
                .unwrap();
        }
        let got = broker
            .get(CONNECTION, 1, "jobs", false, &mut Outbox::default())
            .unwrap()
            .expect("published");
        assert!(!got.redelivered);
        broker.close_store().unwrap();
    }
    let mut broker = broker_on(&fs);
    let mut taken = Vec::new();
    while let Some(got) = broker
        .get(CONNECTION, 1, "jobs", true, &mut Outbox::default())
        .unwrap()
    {
        taken.push((got.message.body.clone(), got.redelivered));
    }
    assert_eq!(
        taken,
        [
            (Bytes::from_static(b"delivered"), true),
            (Bytes::from_static(b"waiting"), false)
        ]
    );
}

/// A message recovered after a crash may have been delivered before it, so
/// it stays marked redelivered across a later clean restart even though
/// nobody took it in between.
#[test]
fn a_message_recovered_after_a_crash_stays_marked_without_being_taken() {
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
        wait_durable(&broker, published.ticket.unwrap(), "the publish");
        broker.abandon_store();
        fs.crash(|_| 0);
    }
    broker_on(&fs).close_store().unwrap();
    let mut broker = broker_on(&fs);
    let got = broker
        .get(CONNECTION, 1, "jobs", true, &mut Outbox::default())
        .unwrap()
        .expect("still there");
    assert!(got.redelivered);
}

/// A queue longer than its in-memory head spills the index entries behind
/// it to disk and takes them back in order, for persistent and transient
/// messages alike; after a crash the persistent ones are recovered, in
/// order, into a queue that spills again.
#[test]
fn a_long_queue_spills_its_index_and_keeps_its_order_across_a_crash() {
    let fs = SimulatedFileSystem::new();
    let spill_dir = Path::new("/data/messages/spill");
    let count = warren_store::spill::HEAD_WINDOW * 3;
    {
        let mut broker = broker_on(&fs);
        declare(&mut broker, "long", true);
        let mut last_ticket = 0;
        for index in 0..count {
            // Every third message is transient: it is paged, not published.
            let persistent = index % 3 != 2;
            let published = broker
                .publish(
                    CONNECTION,
                    1,
                    message("long", format!("m{index}"), persistent),
                    &mut Outbox::default(),
                )
                .unwrap();
            last_ticket = published.ticket.unwrap_or(last_ticket);
        }
        assert!(
            !fs.list(spill_dir).unwrap().is_empty(),
            "the index behind the head went to spill files"
        );
        wait_durable(&broker, last_ticket, "the publishes");
        for index in 0..10 {
            let got = broker
                .get(CONNECTION, 1, "long", true, &mut Outbox::default())
                .unwrap()
                .expect("message");
            assert_eq!(got.message.body, format!("m{index}").as_bytes());
        }
        // The marks of those ten are written with the batch that holds the
        // next publish, if not before: once it is durable, so are they.
        declare(&mut broker, "barrier", true);
        let barrier = broker
            .publish(
                CONNECTION,
                1,
                message("barrier", "after the acks".into(), true),
                &mut Outbox::default(),
            )
            .unwrap()
            .ticket
            .unwrap();
        wait_durable(&broker, barrier, "the barrier");
        broker.abandon_store();
        fs.crash(|_| 0);
    }
    let mut broker = broker_on(&fs);
    assert!(
        !fs.list(spill_dir).unwrap().is_empty(),
        "recovery spills the long backlog again"
    );
    let expected: Vec<String> = (10..count)
        .filter(|index| index % 3 != 2)
        .map(|index| format!("m{index}"))
        .collect();
    for body in &expected {
        let got = broker
            .get(CONNECTION, 1, "long", true, &mut Outbox::default())
            .unwrap()
            .expect("recovered");
        assert_eq!(got.message.body, body.as_bytes());
        assert!(got.redelivered, "recovered after a crash");
    }
    assert!(
        broker
            .get(CONNECTION, 1, "long", true, &mut Outbox::default())
            .unwrap()
            .is_none()
    );
    assert!(
        fs.list(spill_dir).unwrap().is_empty(),
        "no spill file outlives its entries"
    );
}

/// Purging a long queue costs the broker O(1): its messages go to the
/// store's worker as one discard, which writes their removal records off
/// the lock; after a restart the purged messages stay gone and a message
/// published after the purge is still there.
#[test]
fn a_purged_queue_is_discarded_off_the_lock_and_stays_purged_after_a_restart() {
    let fs = SimulatedFileSystem::new();
    let count = 10_000;
    {
        let mut broker = broker_on(&fs);
        broker.enable_store_worker();
        declare(&mut broker, "jobs", true);
        for index in 0..count {
            broker
                .publish(
                    CONNECTION,
                    1,
                    message("jobs", format!("m{index}"), true),
                    &mut Outbox::default(),
                )
                .unwrap();
        }
        let mut out = Outbox::default();
        let purged = broker.purge_queue(CONNECTION, "jobs", &mut out).unwrap();
        assert_eq!(purged, count);
        assert_eq!(broker.queue_info("/", "jobs").unwrap().ready, 0);
        let discards: Vec<Discard> = out
            .take()
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Discard(discard) => Some(discard),
                _ => None,
            })
            .collect();
        let [discard] = <[Discard; 1]>::try_from(discards).expect("one discard");
        assert_eq!(discard.len(), count as usize);
        discard.run(&broker.message_log().unwrap().handle());
        broker
            .publish(
                CONNECTION,
                1,
                message("jobs", "after".into(), true),
                &mut Outbox::default(),
            )
            .unwrap();
        broker.close_store().unwrap();
    }
    let mut broker = broker_on(&fs);
    assert_eq!(broker.queue_info("/", "jobs").unwrap().ready, 1);
    let got = broker
        .get(CONNECTION, 1, "jobs", true, &mut Outbox::default())
        .unwrap()
        .expect("the message published after the purge");
    assert_eq!(got.message.body, "after".as_bytes());
}

/// The journal records each durable change as it is made, not the whole
/// topology: after any sequence of declarations, bindings, deletions and
/// auto-deletions, what a restart recovers must be exactly what the broker
/// held. Driven by a fixed pseudo-random sequence so a failure repeats.
#[test]
fn the_topology_journal_adds_up_to_the_topology_after_any_changes() {
    use amq_protocol::types::FieldTable;
    use warren_core::{Consume, ExchangeDeclare};

    let fs = SimulatedFileSystem::new();
    let mut broker = broker_on(&fs);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let exchanges = ["x.direct", "x.fanout", "x.auto", "x.transient"];
    let queues = ["q.a", "q.b", "q.auto", "q.transient"];
    let mut largest = 0;
    for step in 0..3_000 {
        let exchange = exchanges[next(4) as usize];
        let queue = queues[next(4) as usize];
        let mut out = Outbox::default();
        // Refusals (binding what does not exist, say) are part of the mix.
        let _ = match next(8) {
            0 => broker.declare_exchange(
                CONNECTION,
                ExchangeDeclare {
                    name: exchange.into(),
                    kind: if exchange == "x.fanout" {
                        "fanout"
                    } else {
                        "direct"
                    }
                    .into(),
                    durable: exchange != "x.transient",
                    auto_delete: exchange == "x.auto",
                    ..Default::default()
                },
            ),
            1 => broker.delete_exchange(CONNECTION, exchange, false),
            2 => broker
                .declare_queue(
                    CONNECTION,
                    QueueDeclare {
                        name: queue.into(),
                        durable: queue != "q.transient",
                        auto_delete: queue == "q.auto",
                        ..Default::default()
                    },
                )
                .map(|_| ()),
            3 => broker
                .delete_queue(CONNECTION, queue, false, false, &mut out)
                .map(|_| ()),
            4 | 5 => broker.bind_queue(
                CONNECTION,
                queue,
                exchange,
                format!("key{}", next(3)).as_str().into(),
                FieldTable::default(),
                next(3) != 0,
            ),
            6 => broker.bind_exchange(
                CONNECTION,
                exchanges[next(4) as usize],
                exchange,
                "".into(),
                FieldTable::default(),
                next(2) == 0,
            ),
            _ => {
                // A consumer that comes and goes auto-deletes q.auto.
                let tag = format!("c{step}");
                if broker
                    .consume(
                        CONNECTION,
                        1,
                        Consume {
                            queue: queue.into(),
                            consumer_tag: tag.as_str().into(),
                            ..Default::default()
                        },
                        &mut out,
                    )
                    .is_ok()
                {
                    broker.cancel(CONNECTION, 1, &tag, &mut out);
                }
                Ok(())
            }
        };
        broker.wait_for_topology().unwrap();
        // Every so often, crash and recover, and go on from there.
        if step % 250 == 249 {
            let expected = broker.durable_topology();
            largest = largest.max(expected.len());
            broker.abandon_store();
            fs.crash(|_| 0);
            broker = broker_on(&fs);
            assert_eq!(broker.durable_topology(), expected, "after step {step}");
        }
    }
    assert!(
        largest >= 6,
        "the sequence should build up some durable topology (at most {largest} entries)"
    );
}
