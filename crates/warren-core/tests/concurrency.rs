//! Operations that move messages run on several threads at once (`&self`,
//! the broker held shared): what must still hold when they race.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use warren_core::{
    Broker, ConnectionId, Consume, Delivery, DeliverySink, Limits, Message, Outbox, QueueDeclare,
};

const CONSUMER: ConnectionId = ConnectionId(1);
const PUBLISHERS: [ConnectionId; 2] = [ConnectionId(2), ConnectionId(3)];
const QUEUES: [&str; 2] = ["left", "right"];
const MESSAGES_PER_QUEUE: usize = 2_000;

/// What a connection's writer would get, in the order it gets it.
#[derive(Default)]
struct RecordingSink {
    deliveries: Mutex<Vec<Delivery>>,
    /// Acks begun by the test, and the most deliveries seen outstanding
    /// beyond them.
    acks_started: AtomicUsize,
    most_outstanding: AtomicUsize,
}

impl DeliverySink for RecordingSink {
    fn deliver(&self, delivery: Delivery) {
        // The writer puts it on the wire at once.
        delivery.unwritten.written(1);
        let mut deliveries = self.deliveries.lock();
        deliveries.push(delivery);
        let outstanding = deliveries.len() - self.acks_started.load(Ordering::SeqCst);
        self.most_outstanding
            .fetch_max(outstanding, Ordering::SeqCst);
    }
}

fn message(queue: &str, index: usize) -> Arc<Message> {
    Arc::new(Message {
        exchange: "".into(),
        routing_key: queue.into(),
        properties: BasicProperties::default(),
        body: Bytes::from(index.to_string()),
    })
}

/// A broker with two queues, both consumed on one channel of CONSUMER
/// whose deliveries go to the returned sink.
fn broker_with_one_channel_consuming_two_queues(
    no_ack: bool,
    global_prefetch: u16,
) -> (Arc<RwLock<Broker>>, Arc<RecordingSink>) {
    let mut broker = Broker::new(&[], Limits::default(), 7);
    let sink = Arc::new(RecordingSink::default());
    broker.open_connection(CONSUMER, "/", true);
    broker.open_channel_with(
        CONSUMER,
        1,
        Some(Arc::clone(&sink) as Arc<dyn DeliverySink>),
    );
    for publisher in PUBLISHERS {
        broker.open_connection(publisher, "/", true);
        broker.open_channel(publisher, 1);
    }
    let mut out = Outbox::default();
    if global_prefetch > 0 {
        broker.set_prefetch(CONSUMER, 1, global_prefetch, true, &mut out);
    }
    for queue in QUEUES {
        broker
            .declare_queue(
                CONSUMER,
                QueueDeclare {
                    name: queue.into(),
                    ..Default::default()
                },
            )
            .unwrap();
        broker
            .consume(
                CONSUMER,
                1,
                Consume {
                    queue: queue.into(),
                    consumer_tag: queue.into(),
                    no_ack,
                    ..Default::default()
                },
                &mut out,
            )
            .unwrap();
    }
    assert!(out.effects.is_empty());
    (Arc::new(RwLock::new(broker)), sink)
}

/// Each publisher publishes to its own queue, at the same time as the
/// other, through the broker held shared.
fn publish_from_two_threads(broker: &Arc<RwLock<Broker>>) {
    let threads: Vec<_> = PUBLISHERS
        .into_iter()
        .zip(QUEUES)
        .map(|(publisher, queue)| {
            let broker = Arc::clone(broker);
            thread::spawn(move || {
                for index in 0..MESSAGES_PER_QUEUE {
                    let mut out = Outbox::default();
                    broker
                        .read()
                        .publish(publisher, 1, message(queue, index), &mut out)
                        .unwrap();
                    assert!(out.effects.is_empty(), "deliveries go to the sink");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

#[test]
fn two_queues_delivering_to_one_channel_at_once_keep_its_delivery_tags_in_order() {
    let (broker, sink) = broker_with_one_channel_consuming_two_queues(true, 0);
    publish_from_two_threads(&broker);

    let deliveries = sink.deliveries.lock();
    assert_eq!(deliveries.len(), 2 * MESSAGES_PER_QUEUE);
    // A client acking "up to n" must have seen every tag below n: the
    // writer gets the tags in order, with none missing.
    let tags: Vec<u64> = deliveries.iter().map(|d| d.delivery_tag).collect();
    let expected: Vec<u64> = (1..=2 * MESSAGES_PER_QUEUE as u64).collect();
    assert_eq!(tags, expected);
    // And each queue's messages arrive in the order they were published.
    for queue in QUEUES {
        let bodies: Vec<usize> = deliveries
            .iter()
            .filter(|d| d.consumer_tag.as_str() == queue)
            .map(|d| {
                std::str::from_utf8(&d.message.body)
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            bodies,
            (0..MESSAGES_PER_QUEUE).collect::<Vec<_>>(),
            "{queue}"
        );
    }
}

#[test]
fn two_queues_refilling_one_channel_at_once_stay_within_its_global_prefetch() {
    const PREFETCH: u16 = 10;
    let (broker, sink) = broker_with_one_channel_consuming_two_queues(false, PREFETCH);
    publish_from_two_threads(&broker);
    assert_eq!(sink.deliveries.lock().len(), PREFETCH as usize);
    assert_eq!(broker.read().unacked_count(CONSUMER, 1), PREFETCH as usize);

    // Two threads ack, one per queue, each ack making room that both
    // queues then race to fill.
    let ackers: Vec<_> = QUEUES
        .into_iter()
        .map(|queue| {
            let broker = Arc::clone(&broker);
            let sink = Arc::clone(&sink);
            thread::spawn(move || {
                let mut seen = 0;
                let mut acked = 0;
                while acked < MESSAGES_PER_QUEUE {
                    let next = {
                        let deliveries = sink.deliveries.lock();
                        let next = deliveries[seen..]
                            .iter()
                            .position(|d| d.consumer_tag.as_str() == queue)
                            .map(|offset| (seen + offset, deliveries[seen + offset].delivery_tag));
                        if next.is_none() {
                            seen = deliveries.len();
                        }
                        next
                    };
                    let Some((index, tag)) = next else {
                        thread::yield_now();
                        continue;
                    };
                    seen = index + 1;
                    sink.acks_started.fetch_add(1, Ordering::SeqCst);
                    let mut out = Outbox::default();
                    broker
                        .read()
                        .ack(CONSUMER, 1, tag, false, &mut out)
                        .unwrap();
                    acked += 1;
                }
            })
        })
        .collect();
    for acker in ackers {
        acker.join().unwrap();
    }

    assert_eq!(sink.deliveries.lock().len(), 2 * MESSAGES_PER_QUEUE);
    // An ack counts from before it is made, so this undercounts what the
    // channel held, never overcounts it.
    let most = sink.most_outstanding.load(Ordering::SeqCst);
    assert!(
        most <= PREFETCH as usize,
        "{most} unacked on a channel with prefetch {PREFETCH}"
    );
    let guard = broker.read();
    assert_eq!(guard.unacked_count(CONSUMER, 1), 0);
    for queue in QUEUES {
        assert_eq!(guard.queue_counts("/", queue), Some((0, 1)));
    }
}
