//! RabbitMQ's six tutorials, written with lapin as a RabbitMQ user would
//! write them, run against the real broker.

use crate::common::*;
use futures_lite::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::*,
    types::{FieldTable, ShortString},
};

async fn channel(connection: &Connection) -> Channel {
    within("create_channel", connection.create_channel())
        .await
        .expect("create_channel")
}

/// Publishes and waits for the broker's confirm, so the message is routed
/// and enqueued when this returns.
async fn publish_confirmed(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let confirm = within(
        "basic_publish",
        channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        ),
    )
    .await
    .expect("basic_publish");
    let confirmation = within("publisher confirm", confirm).await.expect("confirm");
    assert!(
        confirmation.is_ack(),
        "publish to {exchange}/{routing_key} was not acked"
    );
}

async fn confirming_channel(connection: &Connection) -> Channel {
    let channel = channel(connection).await;
    within(
        "confirm_select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await
    .expect("confirm_select");
    channel
}

/// Takes every message waiting in a queue with basic.get.
async fn drain(channel: &Channel, queue: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    while let Some(message) = within(
        "basic_get",
        channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic_get")
    {
        bodies.push(String::from_utf8(message.delivery.data.clone()).expect("utf-8 body"));
    }
    bodies
}

async fn server_named_queue(channel: &Channel) -> String {
    let queue = within(
        "queue_declare",
        channel.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue_declare");
    let name = queue.name().to_string();
    assert!(name.starts_with("amq.gen-"), "server-named queue {name}");
    name
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, routing_key: &str) {
    within(
        "queue_bind",
        channel.queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue_bind");
}

async fn declare_exchange(channel: &Channel, name: &str, kind: ExchangeKind) {
    within(
        "exchange_declare",
        channel.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange_declare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hello_world() {
    let broker = Broker::start().await;
    let connection = broker.connect().await;
    let sender = channel(&connection).await;
    within(
        "queue_declare",
        sender.queue_declare(
            "hello".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare hello");
    within(
        "basic_publish",
        sender.basic_publish(
            "".into(),
            "hello".into(),
            BasicPublishOptions::default(),
            b"Hello World!",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");

    let receiver = channel(&broker.connect().await).await;
    let mut consumer = within(
        "basic_consume",
        receiver.basic_consume(
            "hello".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    let delivery = next_delivery(&mut consumer, "hello world").await;
    assert_eq!(delivery.data, b"Hello World!");
    assert_eq!(delivery.routing_key.as_str(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_work_queues_with_fair_dispatch() {
    let broker = Broker::start().await;
    let producer_connection = broker.connect().await;
    let producer = confirming_channel(&producer_connection).await;
    within(
        "queue_declare",
        producer.queue_declare(
            "task_queue".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare task_queue");

    // Two workers with prefetch 1 and manual acks.
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let connection = broker.connect().await;
        let channel = channel(&connection).await;
        within(
            "basic_qos",
            channel.basic_qos(1, BasicQosOptions::default()),
        )
        .await
        .expect("qos");
        let consumer = within(
            "basic_consume",
            channel.basic_consume(
                "task_queue".into(),
                name.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("consume");
        workers.push((connection, channel, consumer));
    }

    for index in 0..6 {
        publish_confirmed(
            &producer,
            "",
            "task_queue",
            format!("task {index}").as_bytes(),
        )
        .await;
    }
    // Each worker holds one unacked task; the other four wait in the queue,
    // because prefetch 1 forbids a second delivery before the ack.
    let first_w1 = next_delivery(&mut workers[0].2, "w1's first task").await;
    let first_w2 = next_delivery(&mut workers[1].2, "w2's first task").await;
    let waiting = within(
        "passive declare",
        producer.queue_declare(
            "task_queue".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive declare")
    .message_count();
    assert_eq!(waiting, 4, "prefetch 1: two tasks out, four waiting");

    let mut done = vec![
        String::from_utf8(first_w1.data.clone()).unwrap(),
        String::from_utf8(first_w2.data.clone()).unwrap(),
    ];
    within("ack", first_w1.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    within("ack", first_w2.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    // The rest are shared out as acks free the workers, in whatever order
    // the acks reach the broker: take each task from whichever worker got it.
    let (w2_connection, w2_channel, w2_consumer) = workers.pop().expect("w2");
    let (w1_connection, w1_channel, w1_consumer) = workers.pop().expect("w1");
    let mut tasks = futures_lite::stream::race(
        w1_consumer.map(|delivery| (0, delivery)),
        w2_consumer.map(|delivery| (1, delivery)),
    );
    while done.len() < 6 {
        let delivery = match within("next task", tasks.next()).await {
            Some((_worker, Ok(delivery))) => delivery,
            other => panic!("next task: {other:?}"),
        };
        done.push(String::from_utf8(delivery.data.clone()).unwrap());
        within("ack", delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    drop((w1_connection, w1_channel, w2_connection, w2_channel));
    done.sort();
    let expected: Vec<String> = (0..6).map(|index| format!("task {index}")).collect();
    assert_eq!(done, expected, "every task processed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publish_subscribe() {
    let broker = Broker::start().await;
    let connection = broker.connect().await;
    let channel = confirming_channel(&connection).await;
    declare_exchange(&channel, "logs", ExchangeKind::Fanout).await;
    let first = server_named_queue(&channel).await;
    let second = server_named_queue(&channel).await;
    assert_ne!(first, second);
    bind(&channel, &first, "logs", "").await;
    bind(&channel, &second, "logs", "").await;
    publish_confirmed(&channel, "logs", "ignored", b"info: hello").await;
    publish_confirmed(&channel, "logs", "", b"warning: disk").await;
    for queue in [&first, &second] {
        assert_eq!(
            drain(&channel, queue).await,
            ["info: hello", "warning: disk"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_routing() {
    let broker = Broker::start().await;
    let connection = broker.connect().await;
    let channel = confirming_channel(&connection).await;
    declare_exchange(&channel, "direct_logs", ExchangeKind::Direct).await;
    let errors = server_named_queue(&channel).await;
    let everything = server_named_queue(&channel).await;
    bind(&channel, &errors, "direct_logs", "error").await;
    for severity in ["info", "warning", "error"] {
        bind(&channel, &everything, "direct_logs", severity).await;
    }
    for severity in ["info", "warning", "error", "debug"] {
        publish_confirmed(&channel, "direct_logs", severity, severity.as_bytes()).await;
    }
    assert_eq!(drain(&channel, &errors).await, ["error"]);
    assert_eq!(
        drain(&channel, &everything).await,
        ["info", "warning", "error"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_topics() {
    let broker = Broker::start().await;
    let connection = broker.connect().await;
    let channel = confirming_channel(&connection).await;
    declare_exchange(&channel, "topic_logs", ExchangeKind::Topic).await;
    let q1 = server_named_queue(&channel).await;
    let q2 = server_named_queue(&channel).await;
    let all = server_named_queue(&channel).await;
    bind(&channel, &q1, "topic_logs", "*.orange.*").await;
    bind(&channel, &q2, "topic_logs", "*.*.rabbit").await;
    bind(&channel, &q2, "topic_logs", "lazy.#").await;
    bind(&channel, &all, "topic_logs", "#").await;
    let keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.new.rabbit",
        "lazy.orange.new.rabbit",
        "",
    ];
    for key in keys {
        publish_confirmed(&channel, "topic_logs", key, key.as_bytes()).await;
    }
    assert_eq!(
        drain(&channel, &q1).await,
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "quick.orange.fox"
        ]
    );
    assert_eq!(
        drain(&channel, &q2).await,
        [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.new.rabbit"
        ]
    );
    assert_eq!(
        drain(&channel, &all).await,
        keys,
        "'#' matches every key, the empty one too"
    );
}

fn fibonacci(n: u64) -> u64 {
    (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_rpc() {
    let broker = Broker::start().await;

    // The server: consumes rpc_queue, replies to reply_to with the request's
    // correlation_id.
    let server_connection = broker.connect().await;
    let server = channel(&server_connection).await;
    within(
        "queue_declare",
        server.queue_declare(
            "rpc_queue".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare rpc_queue");
    within("basic_qos", server.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut requests = within(
        "basic_consume",
        server.basic_consume(
            "rpc_queue".into(),
            "rpc-server".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume rpc_queue");
    let server_task = tokio::spawn(async move {
        while let Some(Ok(request)) = requests.next().await {
            let n: u64 = std::str::from_utf8(&request.data).unwrap().parse().unwrap();
            let reply_to = request.properties.reply_to().clone().expect("reply_to");
            let correlation_id = request
                .properties
                .correlation_id()
                .clone()
                .expect("correlation_id");
            server
                .basic_publish(
                    "".into(),
                    reply_to,
                    BasicPublishOptions::default(),
                    fibonacci(n).to_string().as_bytes(),
                    BasicProperties::default().with_correlation_id(correlation_id),
                )
                .await
                .expect("reply");
            request
                .ack(BasicAckOptions::default())
                .await
                .expect("ack request");
        }
    });

    // The client: an exclusive callback queue and one request per number.
    let client_connection = broker.connect().await;
    let client = channel(&client_connection).await;
    let callback_queue = server_named_queue(&client).await;
    let mut replies = within(
        "basic_consume",
        client.basic_consume(
            callback_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume callback queue");
    for n in [1u64, 10, 30] {
        let correlation_id = ShortString::from(format!("request-{n}"));
        within(
            "basic_publish",
            client.basic_publish(
                "".into(),
                "rpc_queue".into(),
                BasicPublishOptions::default(),
                n.to_string().as_bytes(),
                BasicProperties::default()
                    .with_reply_to(callback_queue.as_str().into())
                    .with_correlation_id(correlation_id.clone()),
            ),
        )
        .await
        .expect("request");
        let reply = next_delivery(&mut replies, "rpc reply").await;
        assert_eq!(
            reply.properties.correlation_id().as_ref(),
            Some(&correlation_id)
        );
        assert_eq!(
            std::str::from_utf8(&reply.data).unwrap(),
            fibonacci(n).to_string()
        );
    }
    assert_eq!(fibonacci(30), 832_040);
    server_task.abort();
}
