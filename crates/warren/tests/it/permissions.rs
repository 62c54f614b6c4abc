//! The permission matrix: users × vhosts × patterns × every method that
//! RabbitMQ checks, against the real binary with lapin. The expected
//! answer of every cell is written down in `MATRIX`; a refusal must close
//! the channel with 403 and name the resource, as RabbitMQ does.

use crate::common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ErrorKind, ExchangeKind};

/// Users, vhosts and permissions under test. Patterns are RabbitMQ's:
/// unanchored regular expressions, `^$` for nothing, the default exchange
/// matched as `amq.default`.
const CONFIG: &str = r#"
[[vhosts]]
name = "ml"

[[users]]
name = "admin"
password = "pw"
tags = ["administrator"]

[[users]]
name = "reader"
password = "pw"

[[users]]
name = "writer"
password = "pw"

[[users]]
name = "config"
password = "pw"

[[users]]
name = "scoped"
password = "pw"

[[users]]
name = "nobody"
password = "pw"

[[permissions]]
user = "admin"
configure = ".*"
write = ".*"
read = ".*"

[[permissions]]
user = "admin"
vhost = "ml"
configure = ".*"
write = ".*"
read = ".*"

[[permissions]]
user = "reader"
configure = "^$"
write = "^$"
read = ".*"

[[permissions]]
user = "writer"
configure = ""
write = ".*"
read = ""

# Unanchored: "doomed" anywhere in the name.
[[permissions]]
user = "config"
configure = "doomed"
write = "^$"
read = "^$"

[[permissions]]
user = "scoped"
vhost = "ml"
configure = '^scoped\.'
write = '^(scoped\..*|amq\.default)$'
read = '^scoped\.'
"#;

/// One AMQP operation, on resources the fixtures create.
#[derive(Debug, Clone, Copy)]
enum Op {
    DeclareExchange(&'static str),
    DeclareExchangePassive(&'static str),
    DeclareExchangeWithAlternate(&'static str, &'static str),
    DeleteExchange(&'static str),
    /// destination, source
    BindExchange(&'static str, &'static str),
    DeclareQueue(&'static str),
    DeclareQueuePassive(&'static str),
    DeclareServerNamedQueue,
    DeclareQueueWithDeadLetter(&'static str, &'static str),
    DeleteQueue(&'static str),
    /// queue, exchange
    BindQueue(&'static str, &'static str),
    UnbindQueue(&'static str, &'static str),
    PurgeQueue(&'static str),
    /// exchange, routing key
    Publish(&'static str, &'static str),
    Consume(&'static str),
    Get(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Allow,
    /// 403, and the message names this resource ("queue 'q.shared'").
    Deny(&'static str),
}

use Expect::*;
use Op::*;

/// The allow/deny table. In "/": queues q.shared, q.doomed; exchanges
/// x.shared, x.dest, x.doomed, dlx. In "ml": scoped.q, other.q,
/// scoped.doomed, other.doomed; exchanges scoped.x, other.x.
const MATRIX: &[(&str, &str, Op, Expect)] = &[
    // admin: everything, everywhere.
    ("admin", "/", DeclareExchange("x.shared"), Allow),
    (
        "admin",
        "/",
        DeclareExchangeWithAlternate("x.with-alternate", "x.shared"),
        Allow,
    ),
    ("admin", "/", DeleteExchange("x.doomed"), Allow),
    ("admin", "/", BindExchange("x.dest", "x.shared"), Allow),
    ("admin", "/", DeclareQueue("q.shared"), Allow),
    ("admin", "/", DeclareServerNamedQueue, Allow),
    (
        "admin",
        "/",
        DeclareQueueWithDeadLetter("q.dl", "dlx"),
        Allow,
    ),
    ("admin", "/", DeleteQueue("q.doomed"), Allow),
    ("admin", "/", BindQueue("q.shared", "x.shared"), Allow),
    ("admin", "/", UnbindQueue("q.shared", "x.shared"), Allow),
    ("admin", "/", PurgeQueue("q.shared"), Allow),
    ("admin", "/", Publish("", "q.shared"), Allow),
    ("admin", "/", Publish("x.shared", "k"), Allow),
    ("admin", "/", Consume("q.shared"), Allow),
    ("admin", "/", Get("q.shared"), Allow),
    ("admin", "ml", DeclareQueue("other.q"), Allow),
    // reader: read only; passive declares need nothing.
    (
        "reader",
        "/",
        DeclareExchange("x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    ("reader", "/", DeclareExchangePassive("x.shared"), Allow),
    (
        "reader",
        "/",
        DeleteExchange("x.doomed"),
        Deny("exchange 'x.doomed'"),
    ),
    (
        "reader",
        "/",
        BindExchange("x.dest", "x.shared"),
        Deny("exchange 'x.dest'"),
    ),
    (
        "reader",
        "/",
        DeclareQueue("q.shared"),
        Deny("queue 'q.shared'"),
    ),
    ("reader", "/", DeclareQueuePassive("q.shared"), Allow),
    (
        "reader",
        "/",
        DeclareServerNamedQueue,
        Deny("queue 'amq.gen-"),
    ),
    (
        "reader",
        "/",
        DeleteQueue("q.doomed"),
        Deny("queue 'q.doomed'"),
    ),
    (
        "reader",
        "/",
        BindQueue("q.shared", "x.shared"),
        Deny("queue 'q.shared'"),
    ),
    (
        "reader",
        "/",
        UnbindQueue("q.shared", "x.shared"),
        Deny("queue 'q.shared'"),
    ),
    ("reader", "/", PurgeQueue("q.shared"), Allow),
    (
        "reader",
        "/",
        Publish("", "q.shared"),
        Deny("exchange 'amq.default'"),
    ),
    (
        "reader",
        "/",
        Publish("x.shared", "k"),
        Deny("exchange 'x.shared'"),
    ),
    ("reader", "/", Consume("q.shared"), Allow),
    ("reader", "/", Get("q.shared"), Allow),
    // writer: write only ("" is "^$").
    (
        "writer",
        "/",
        DeclareExchange("x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    ("writer", "/", DeclareExchangePassive("x.shared"), Allow),
    (
        "writer",
        "/",
        BindExchange("x.dest", "x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    (
        "writer",
        "/",
        DeclareQueue("q.shared"),
        Deny("queue 'q.shared'"),
    ),
    ("writer", "/", DeclareQueuePassive("q.shared"), Allow),
    (
        "writer",
        "/",
        BindQueue("q.shared", "x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    (
        "writer",
        "/",
        PurgeQueue("q.shared"),
        Deny("queue 'q.shared'"),
    ),
    ("writer", "/", Publish("", "q.shared"), Allow),
    ("writer", "/", Publish("x.shared", "k"), Allow),
    ("writer", "/", Consume("q.shared"), Deny("queue 'q.shared'")),
    ("writer", "/", Get("q.shared"), Deny("queue 'q.shared'")),
    // config: configure what has "doomed" in its name, nothing else.
    ("config", "/", DeclareExchange("x.doomed"), Allow),
    (
        "config",
        "/",
        DeclareExchange("x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    ("config", "/", DeleteExchange("x.doomed"), Allow),
    ("config", "/", DeclareQueue("q.doomed"), Allow),
    (
        "config",
        "/",
        DeclareQueue("q.shared"),
        Deny("queue 'q.shared'"),
    ),
    ("config", "/", DeleteQueue("q.doomed"), Allow),
    (
        "config",
        "/",
        DeclareQueueWithDeadLetter("q.doomed", "dlx"),
        Deny("exchange 'dlx'"),
    ),
    (
        "config",
        "/",
        DeclareExchangeWithAlternate("x.doomed", "x.shared"),
        Deny("exchange 'x.shared'"),
    ),
    (
        "config",
        "/",
        DeclareServerNamedQueue,
        Deny("queue 'amq.gen-"),
    ),
    (
        "config",
        "/",
        PurgeQueue("q.doomed"),
        Deny("queue 'q.doomed'"),
    ),
    // scoped: its own prefix in "ml", and the default exchange.
    ("scoped", "ml", DeclareQueue("scoped.q"), Allow),
    (
        "scoped",
        "ml",
        DeclareQueue("other.q"),
        Deny("queue 'other.q'"),
    ),
    ("scoped", "ml", DeclareQueuePassive("other.q"), Allow),
    (
        "scoped",
        "ml",
        DeclareServerNamedQueue,
        Deny("queue 'amq.gen-"),
    ),
    (
        "scoped",
        "ml",
        DeclareQueueWithDeadLetter("scoped.dl", "scoped.x"),
        Allow,
    ),
    (
        "scoped",
        "ml",
        DeclareQueueWithDeadLetter("scoped.dl", "other.x"),
        Deny("exchange 'other.x'"),
    ),
    ("scoped", "ml", DeclareExchange("scoped.x"), Allow),
    (
        "scoped",
        "ml",
        DeclareExchangeWithAlternate("scoped.x", "other.x"),
        Deny("exchange 'other.x'"),
    ),
    ("scoped", "ml", DeleteQueue("scoped.doomed"), Allow),
    (
        "scoped",
        "ml",
        DeleteQueue("other.doomed"),
        Deny("queue 'other.doomed'"),
    ),
    ("scoped", "ml", BindQueue("scoped.q", "scoped.x"), Allow),
    (
        "scoped",
        "ml",
        BindQueue("scoped.q", "other.x"),
        Deny("exchange 'other.x'"),
    ),
    (
        "scoped",
        "ml",
        BindQueue("other.q", "scoped.x"),
        Deny("queue 'other.q'"),
    ),
    ("scoped", "ml", PurgeQueue("scoped.q"), Allow),
    ("scoped", "ml", Publish("", "scoped.q"), Allow),
    ("scoped", "ml", Publish("scoped.x", "k"), Allow),
    (
        "scoped",
        "ml",
        Publish("other.x", "k"),
        Deny("exchange 'other.x'"),
    ),
    ("scoped", "ml", Consume("scoped.q"), Allow),
    ("scoped", "ml", Consume("other.q"), Deny("queue 'other.q'")),
    ("scoped", "ml", Get("other.q"), Deny("queue 'other.q'")),
];

/// Users who may not open a vhost at all: connection.open gets 530.
const NO_VHOST_ACCESS: &[(&str, &str)] = &[
    ("nobody", "/"),
    ("nobody", "ml"),
    ("reader", "ml"),
    ("scoped", "/"),
];

const NOT_ALLOWED: u16 = 530;
const ACCESS_REFUSED: u16 = 403;

/// Declares, as admin, everything the matrix's operations touch, so that
/// an allowed operation succeeds and a refused one fails only for want of
/// permission.
async fn create_fixtures(admin_root: &Channel, admin_ml: &Channel) {
    for (channel, exchanges) in [
        (admin_root, &["x.shared", "x.dest", "x.doomed", "dlx"][..]),
        (admin_ml, &["scoped.x", "other.x"][..]),
    ] {
        for name in exchanges {
            channel
                .exchange_declare(
                    (*name).into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("fixture exchange");
        }
    }
    for (channel, queues) in [
        (admin_root, &["q.shared", "q.doomed"][..]),
        (
            admin_ml,
            &["scoped.q", "other.q", "scoped.doomed", "other.doomed"][..],
        ),
    ] {
        for name in queues {
            channel
                .queue_declare(
                    (*name).into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("fixture queue");
        }
    }
    admin_root
        .queue_bind(
            "q.shared".into(),
            "x.shared".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("fixture binding");
}

fn dead_letter_args(exchange: &str) -> FieldTable {
    table(&[("x-dead-letter-exchange", lstr(exchange))])
}

fn alternate_args(exchange: &str) -> FieldTable {
    table(&[("alternate-exchange", lstr(exchange))])
}

async fn run(channel: &Channel, op: Op) -> lapin::Result<()> {
    let declare = |passive| QueueDeclareOptions {
        passive,
        ..Default::default()
    };
    let exchange_options = |passive| ExchangeDeclareOptions {
        passive,
        ..Default::default()
    };
    match op {
        DeclareExchange(name) | DeclareExchangePassive(name) => channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                exchange_options(matches!(op, DeclareExchangePassive(_))),
                FieldTable::default(),
            )
            .await
            .map(drop),
        DeclareExchangeWithAlternate(name, alternate) => channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                exchange_options(false),
                alternate_args(alternate),
            )
            .await
            .map(drop),
        DeleteExchange(name) => channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .map(drop),
        BindExchange(destination, source) => channel
            .exchange_bind(
                destination.into(),
                source.into(),
                "k".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        DeclareQueue(name) | DeclareQueuePassive(name) => channel
            .queue_declare(
                name.into(),
                declare(matches!(op, DeclareQueuePassive(_))),
                FieldTable::default(),
            )
            .await
            .map(drop),
        DeclareServerNamedQueue => channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(drop),
        DeclareQueueWithDeadLetter(name, exchange) => channel
            .queue_declare(name.into(), declare(false), dead_letter_args(exchange))
            .await
            .map(drop),
        DeleteQueue(name) => channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .map(drop),
        BindQueue(queue, exchange) => channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "k".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        UnbindQueue(queue, exchange) => channel
            .queue_unbind(
                queue.into(),
                exchange.into(),
                "k".into(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        PurgeQueue(name) => channel
            .queue_purge(name.into(), QueuePurgeOptions::default())
            .await
            .map(drop),
        Publish(exchange, routing_key) => {
            // Confirms make the outcome of a publish observable: the
            // confirm, or the channel's closing.
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    b"matrix",
                    BasicProperties::default(),
                )
                .await?
                .await
                .map(drop)
        }
        Consume(name) => channel
            .basic_consume(
                name.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map(drop),
        Get(name) => channel
            .basic_get(name.into(), BasicGetOptions { no_ack: true })
            .await
            .map(drop),
    }
}

fn protocol_error(error: &lapin::Error) -> Option<(u16, String)> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_matrix() {
    let broker = Broker::start_with_config(CONFIG).await;
    let admin_root = broker
        .connect_url(&broker.url_for("admin", "pw", "%2f"))
        .await;
    let admin_ml = broker
        .connect_url(&broker.url_for("admin", "pw", "ml"))
        .await;
    let mut connections: Vec<((&str, &str), Connection)> = Vec::new();
    let mut failures = Vec::new();
    for &(user, vhost, op, expect) in MATRIX {
        let setup_root = admin_root.create_channel().await.expect("admin channel");
        let setup_ml = admin_ml.create_channel().await.expect("admin channel");
        create_fixtures(&setup_root, &setup_ml).await;
        if !connections.iter().any(|(key, _)| *key == (user, vhost)) {
            let path = if vhost == "/" { "%2f" } else { vhost };
            let connection = broker.connect_url(&broker.url_for(user, "pw", path)).await;
            connections.push(((user, vhost), connection));
        }
        let connection = &connections
            .iter()
            .find(|(key, _)| *key == (user, vhost))
            .expect("connected above")
            .1;
        let channel = within("create_channel", connection.create_channel())
            .await
            .expect("channel");
        let outcome = within(&format!("{user} {vhost} {op:?}"), run(&channel, op)).await;
        let verdict = match (expect, &outcome) {
            (Allow, Ok(())) => Ok(()),
            (Deny(resource), Err(error)) => match protocol_error(error) {
                Some((ACCESS_REFUSED, text))
                    if text.contains(resource)
                        && text
                            .contains(&format!("in vhost '{vhost}' refused for user '{user}'")) =>
                {
                    Ok(())
                }
                other => Err(format!("expected 403 naming {resource}, got {other:?}")),
            },
            (Allow, Err(error)) => Err(format!("expected success, got {error}")),
            (Deny(_), Ok(())) => Err("expected 403, got success".to_owned()),
        };
        if let Err(reason) = verdict {
            failures.push(format!("{user} in '{vhost}': {op:?}: {reason}"));
        }
    }
    for &(user, vhost) in NO_VHOST_ACCESS {
        let path = if vhost == "/" { "%2f" } else { vhost };
        match broker
            .try_connect_url(&broker.url_for(user, "pw", path))
            .await
        {
            Err(error) if amqp_code(&error) == Some(NOT_ALLOWED) => {}
            other => failures.push(format!(
                "{user} opening '{vhost}': expected 530, got {:?}",
                other.map(drop)
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells wrong:\n{}",
        failures.len(),
        MATRIX.len() + NO_VHOST_ACCESS.len(),
        failures.join("\n")
    );
    // Refusals are logged with the resource.
    broker
        .wait_for_log("access to queue 'other.q' in vhost 'ml' refused for user 'scoped'")
        .await;
}
