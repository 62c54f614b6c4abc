//! Dead-lettering: the message a queue republishes to its
//! `x-dead-letter-exchange`, with the `x-death` history RabbitMQ adds.
//!
//! Each `x-death` entry describes one (queue, reason) pair: how many times
//! the message died there for that reason, when it last did, and the
//! exchange and routing keys it had then. The most recent death comes
//! first. `x-first-death-*` keep the first death; `x-last-death-*` the
//! latest.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

use super::Stored;
use crate::{Message, QueueId};

/// A message that left `queue` and waits to be routed to its dead-letter
/// exchange.
#[derive(Debug)]
pub(crate) struct DeadLetter {
    pub queue: QueueId,
    pub message: Arc<Message>,
    /// Its copy in the log, removed once the dead-lettered copy is written.
    pub stored: Stored,
    pub reason: DeathReason,
}

/// Why a message left its queue for the dead-letter exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    /// Rejected or nacked with requeue=false.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped from a full queue (`x-max-length`, `x-max-length-bytes`).
    Maxlen,
    /// Returned more often than the quorum queue's `x-delivery-limit`.
    DeliveryLimit,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// The message as it is republished after dying in `queue`: routed with
/// `routing_key` (the queue's `x-dead-letter-routing-key`) or, when that is
/// None, with its own routing keys; its `expiration` is removed so that it
/// does not expire again, and kept in `x-death` as `original-expiration`.
pub fn dead_lettered(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    dead_letter_exchange: &str,
    routing_key: Option<&ShortString>,
    now_ms: u64,
) -> Message {
    let mut headers = message.properties.headers().clone().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = deaths.iter().position(|death| {
        death_field(death, "queue").as_deref() == Some(queue)
            && death_field(death, "reason").as_deref() == Some(reason.as_str())
    });
    let count = match same {
        Some(index) => {
            let previous = deaths.remove(index);
            death_count(&previous) + 1
        }
        None => 1,
    };
    let mut routing_keys = FieldArray::default();
    routing_keys.push(AMQPValue::LongString(LongString::from(
        message.routing_key.as_str(),
    )));
    if let Some(AMQPValue::FieldArray(cc)) = headers.inner().get("CC") {
        for key in cc.as_slice() {
            routing_keys.push(key.clone());
        }
    }
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(count as i64));
    death.insert("reason".into(), long_string(reason.as_str()));
    death.insert("queue".into(), long_string(queue));
    death.insert("time".into(), AMQPValue::Timestamp(now_ms / 1000));
    death.insert("exchange".into(), long_string(message.exchange.as_str()));
    death.insert("routing-keys".into(), AMQPValue::FieldArray(routing_keys));
    if let Some(expiration) = message.properties.expiration() {
        death.insert(
            "original-expiration".into(),
            long_string(expiration.as_str()),
        );
    }
    deaths.insert(0, AMQPValue::FieldTable(death));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    for (key, value) in [
        ("reason", reason.as_str()),
        ("queue", queue),
        ("exchange", message.exchange.as_str()),
    ] {
        let first = ShortString::from(format!("x-first-death-{key}"));
        if !headers.inner().contains_key(&first) {
            headers.insert(first, long_string(value));
        }
        headers.insert(format!("x-last-death-{key}").into(), long_string(value));
    }
    let properties = without_expiration(&message.properties).with_headers(headers);
    Message {
        exchange: ShortString::from(dead_letter_exchange),
        routing_key: routing_key
            .cloned()
            .unwrap_or_else(|| message.routing_key.clone()),
        properties,
        body: message.body.clone(),
    }
}

/// Whether delivering a dead-lettered message to `queue` would close a
/// cycle: it already died in that queue and was never rejected on the way,
/// so nothing but the broker itself keeps it going round. RabbitMQ drops
/// such a message rather than loop forever.
pub fn is_cycle(message: &Message, queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = message
        .properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get("x-death"))
    else {
        return false;
    };
    let deaths = deaths.as_slice();
    deaths
        .iter()
        .any(|death| death_field(death, "queue").as_deref() == Some(queue))
        && !deaths.iter().any(|death| {
            death_field(death, "reason").as_deref() == Some(DeathReason::Rejected.as_str())
        })
}

/// A copy of `properties` with no `expiration` (amq-protocol's properties
/// can be set but not unset, so the rest is copied over).
fn without_expiration(properties: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    macro_rules! keep {
        ($($getter:ident => $setter:ident),* $(,)?) => {
            $(if let Some(value) = properties.$getter().clone() {
                copy = copy.$setter(value);
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn death_field(death: &AMQPValue, key: &str) -> Option<String> {
    let AMQPValue::FieldTable(table) = death else {
        return None;
    };
    table.inner().get(key).and_then(crate::arguments::as_text)
}

fn death_count(death: &AMQPValue) -> u64 {
    let AMQPValue::FieldTable(table) = death else {
        return 0;
    };
    table
        .inner()
        .get("count")
        .and_then(crate::field::as_integer)
        .map_or(0, |count| count.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message() -> Message {
        Message {
            exchange: "jobs".into(),
            routing_key: "embed".into(),
            properties: BasicProperties::default().with_expiration("5000".into()),
            body: Bytes::from_static(b"x"),
        }
    }

    fn deaths(message: &Message) -> Vec<FieldTable> {
        match message
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
        {
            Some(AMQPValue::FieldArray(array)) => array
                .as_slice()
                .iter()
                .map(|death| match death {
                    AMQPValue::FieldTable(table) => table.clone(),
                    other => panic!("not a table: {other:?}"),
                })
                .collect(),
            other => panic!("no x-death: {other:?}"),
        }
    }

    #[test]
    fn the_first_death_records_everything() {
        let dead = dead_lettered(&message(), "work", DeathReason::Expired, "dlx", None, 5_000);
        assert_eq!(dead.exchange.as_str(), "dlx");
        assert_eq!(dead.routing_key.as_str(), "embed");
        assert_eq!(*dead.properties.expiration(), None);
        let deaths = deaths(&dead);
        assert_eq!(deaths.len(), 1);
        let death = deaths[0].inner();
        assert_eq!(death["count"], AMQPValue::LongLongInt(1));
        assert_eq!(death["reason"], long_string("expired"));
        assert_eq!(death["queue"], long_string("work"));
        assert_eq!(death["exchange"], long_string("jobs"));
        assert_eq!(death["time"], AMQPValue::Timestamp(5));
        assert_eq!(death["original-expiration"], long_string("5000"));
        let headers = dead.properties.headers().clone().unwrap();
        assert_eq!(headers.inner()["x-first-death-queue"], long_string("work"));
        assert_eq!(
            headers.inner()["x-last-death-reason"],
            long_string("expired")
        );
    }

    #[test]
    fn dying_again_in_the_same_place_counts_up_and_moves_to_the_front() {
        let once = dead_lettered(
            &message(),
            "a",
            DeathReason::Rejected,
            "dlx",
            Some(&"b".into()),
            0,
        );
        let twice = dead_lettered(
            &once,
            "b",
            DeathReason::Rejected,
            "dlx",
            Some(&"a".into()),
            0,
        );
        let thrice = dead_lettered(
            &twice,
            "a",
            DeathReason::Rejected,
            "dlx",
            Some(&"b".into()),
            0,
        );
        let deaths = deaths(&thrice);
        assert_eq!(deaths.len(), 2);
        assert_eq!(deaths[0].inner()["queue"], long_string("a"));
        assert_eq!(deaths[0].inner()["count"], AMQPValue::LongLongInt(2));
        assert_eq!(deaths[1].inner()["count"], AMQPValue::LongLongInt(1));
        let headers = thrice.properties.headers().clone().unwrap();
        assert_eq!(headers.inner()["x-first-death-queue"], long_string("a"));
        assert_eq!(thrice.routing_key.as_str(), "b");
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let expired = dead_lettered(&message(), "a", DeathReason::Expired, "dlx", None, 0);
        assert!(is_cycle(&expired, "a"));
        assert!(!is_cycle(&expired, "b"));
        let rejected = dead_lettered(&expired, "b", DeathReason::Rejected, "dlx", None, 0);
        assert!(!is_cycle(&rejected, "a"));
    }
}
