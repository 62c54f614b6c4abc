//! Which permissions each AMQP method needs: RabbitMQ's table from its
//! access-control guide, in one place.
//!
//! | method                          | configure    | write            | read            |
//! |---------------------------------|--------------|------------------|-----------------|
//! | exchange.declare (passive)      |              |                  |                 |
//! | exchange.declare                | exchange     | alternate exch.¹ | exchange¹       |
//! | exchange.delete                 | exchange     |                  |                 |
//! | exchange.bind / unbind          |              | destination      | source          |
//! | queue.declare (passive)         |              |                  |                 |
//! | queue.declare                   | queue²       | dead-letter exch.³ | queue³        |
//! | queue.delete                    | queue        |                  |                 |
//! | queue.bind / unbind             |              | queue            | exchange        |
//! | queue.purge                     |              |                  | queue           |
//! | basic.publish                   |              | exchange⁴        |                 |
//! | basic.consume, basic.get        |              |                  | queue⁵          |
//!
//! ¹ with an `alternate-exchange` argument. ² a server-named queue is
//! checked under the name it will get. ³ with an `x-dead-letter-exchange`
//! argument. ⁴ the default exchange as `amq.default`. ⁵ consuming from
//! `amq.rabbitmq.reply-to` reads only the channel's own replies, and needs
//! nothing.

use amq_protocol::protocol::{AMQPClass, basic, exchange, queue};
use amq_protocol::types::{AMQPValue, FieldTable};
use warren_access::{Access, Resource};

/// At most three checks per method.
pub(crate) type Checks<'a> = [Option<(Access, Resource<'a>)>; 3];

/// The checks `method` needs. `queue.declare` with an empty name must
/// have had its name filled in already (see `generate_queue_name`).
pub(crate) fn required(method: &AMQPClass) -> Checks<'_> {
    match method {
        AMQPClass::Exchange(exchange::AMQPMethod::Declare(declare)) if !declare.passive => {
            let name = declare.exchange.as_str();
            let alternate = string_argument(&declare.arguments, "alternate-exchange");
            [
                Some((Access::Configure, Resource::exchange(name))),
                alternate.map(|ae| (Access::Write, Resource::exchange(ae))),
                alternate.map(|_| (Access::Read, Resource::exchange(name))),
            ]
        }
        AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete)) => one(
            Access::Configure,
            Resource::exchange(delete.exchange.as_str()),
        ),
        AMQPClass::Exchange(exchange::AMQPMethod::Bind(bind)) => two(
            (Access::Write, Resource::exchange(bind.destination.as_str())),
            (Access::Read, Resource::exchange(bind.source.as_str())),
        ),
        AMQPClass::Exchange(exchange::AMQPMethod::Unbind(unbind)) => two(
            (
                Access::Write,
                Resource::exchange(unbind.destination.as_str()),
            ),
            (Access::Read, Resource::exchange(unbind.source.as_str())),
        ),
        AMQPClass::Queue(queue::AMQPMethod::Declare(declare)) if !declare.passive => {
            let name = declare.queue.as_str();
            let dead_letter = string_argument(&declare.arguments, "x-dead-letter-exchange");
            [
                Some((Access::Configure, Resource::queue(name))),
                dead_letter.map(|dlx| (Access::Write, Resource::exchange(dlx))),
                dead_letter.map(|_| (Access::Read, Resource::queue(name))),
            ]
        }
        AMQPClass::Queue(queue::AMQPMethod::Delete(delete)) => {
            one(Access::Configure, Resource::queue(delete.queue.as_str()))
        }
        AMQPClass::Queue(queue::AMQPMethod::Bind(bind)) => two(
            (Access::Write, Resource::queue(bind.queue.as_str())),
            (Access::Read, Resource::exchange(bind.exchange.as_str())),
        ),
        AMQPClass::Queue(queue::AMQPMethod::Unbind(unbind)) => two(
            (Access::Write, Resource::queue(unbind.queue.as_str())),
            (Access::Read, Resource::exchange(unbind.exchange.as_str())),
        ),
        AMQPClass::Queue(queue::AMQPMethod::Purge(purge)) => {
            one(Access::Read, Resource::queue(purge.queue.as_str()))
        }
        AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => {
            one(Access::Write, Resource::exchange(publish.exchange.as_str()))
        }
        AMQPClass::Basic(basic::AMQPMethod::Consume(consume))
            if consume.queue.as_str() != warren_core::REPLY_TO_QUEUE =>
        {
            one(Access::Read, Resource::queue(consume.queue.as_str()))
        }
        AMQPClass::Basic(basic::AMQPMethod::Get(get)) => {
            one(Access::Read, Resource::queue(get.queue.as_str()))
        }
        _ => [None, None, None],
    }
}

fn one(access: Access, resource: Resource<'_>) -> Checks<'_> {
    [Some((access, resource)), None, None]
}

fn two<'a>(first: (Access, Resource<'a>), second: (Access, Resource<'a>)) -> Checks<'a> {
    [Some(first), Some(second), None]
}

/// A string argument as RabbitMQ reads it: a long or short string; any
/// other type is left for the broker to refuse with 406.
fn string_argument<'a>(arguments: &'a FieldTable, key: &str) -> Option<&'a str> {
    match arguments.inner().get(key)? {
        AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::ShortString;

    fn checks(method: &AMQPClass) -> Vec<(Access, &str, &str)> {
        required(method)
            .into_iter()
            .flatten()
            .map(|(access, resource)| (access, resource.kind.as_str(), resource.matched_name()))
            .collect()
    }

    #[test]
    fn passive_declares_need_nothing() {
        let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            passive: true,
            ..Default::default()
        }));
        assert!(checks(&declare).is_empty());
        let declare = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "x".into(),
            passive: true,
            ..Default::default()
        }));
        assert!(checks(&declare).is_empty());
    }

    #[test]
    fn declares_with_a_dead_letter_or_alternate_exchange_need_three() {
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString("dlx".into()),
        );
        let declare = AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "q".into(),
            arguments,
            ..Default::default()
        }));
        assert_eq!(
            checks(&declare),
            [
                (Access::Configure, "queue", "q"),
                (Access::Write, "exchange", "dlx"),
                (Access::Read, "queue", "q"),
            ]
        );
        let mut arguments = FieldTable::default();
        arguments.insert(
            ShortString::from("alternate-exchange"),
            AMQPValue::LongString("ae".into()),
        );
        let declare = AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
            exchange: "x".into(),
            arguments,
            ..Default::default()
        }));
        assert_eq!(
            checks(&declare),
            [
                (Access::Configure, "exchange", "x"),
                (Access::Write, "exchange", "ae"),
                (Access::Read, "exchange", "x"),
            ]
        );
    }

    #[test]
    fn publishing_to_the_default_exchange_writes_amq_default() {
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            ..Default::default()
        }));
        assert_eq!(
            checks(&publish),
            [(Access::Write, "exchange", "amq.default")]
        );
    }

    #[test]
    fn bindings_write_the_destination_and_read_the_source() {
        let bind = AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
            queue: "q".into(),
            exchange: "x".into(),
            ..Default::default()
        }));
        assert_eq!(
            checks(&bind),
            [
                (Access::Write, "queue", "q"),
                (Access::Read, "exchange", "x")
            ]
        );
        let bind = AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
            destination: "d".into(),
            source: "s".into(),
            ..Default::default()
        }));
        assert_eq!(
            checks(&bind),
            [
                (Access::Write, "exchange", "d"),
                (Access::Read, "exchange", "s")
            ]
        );
    }

    #[test]
    fn direct_reply_to_needs_no_read_permission() {
        let consume = AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "amq.rabbitmq.reply-to".into(),
            ..Default::default()
        }));
        assert!(checks(&consume).is_empty());
    }
}
