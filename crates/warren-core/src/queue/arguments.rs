//! RabbitMQ's optional queue arguments (`x-message-ttl`, `x-max-length`,
//! ...) and per-message extensions (`expiration`), parsed and validated
//! once when a queue is declared. A value of the wrong type or out of range
//! is refused with 406 PRECONDITION_FAILED, naming the argument, as
//! RabbitMQ does.
//!
//! A queue runs on its *effective* arguments: what it was declared with,
//! combined with what the policies that apply to it set
//! (`QueueArguments::with_policy`), by RabbitMQ's rules: the lower of two
//! limits, the queue's own dead-letter target.

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

use crate::error::{ArgumentOf, BrokerError, BrokerResult};
use crate::field::as_integer;

/// The longest TTL, expiry or timeout a queue accepts, in milliseconds:
/// RabbitMQ's limit (2^32 - 1 ms, about 49.7 days), which keeps deadlines
/// far from overflow.
pub const DURATION_MAX_MS: u64 = u32::MAX as u64;

/// The highest priority level a queue may declare (`x-max-priority`); each
/// level is a FIFO of its own, so this bounds the per-queue overhead.
pub const PRIORITY_MAX: u8 = 255;

/// Redeliveries a quorum queue allows when `x-delivery-limit` is not given:
/// RabbitMQ 4's default, so that a poison message cannot loop forever.
pub const QUORUM_DELIVERY_LIMIT_DEFAULT: u64 = 20;

/// What a full queue (`x-max-length`, `x-max-length-bytes`) does with a new
/// message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drops (or dead-letters) the oldest messages to make room.
    #[default]
    DropHead,
    /// Refuses the new message; a confirming publisher gets `basic.nack`.
    RejectPublish,
    /// Refuses it as above and dead-letters it.
    RejectPublishDlx,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Classic,
    /// Accepted for compatibility: always durable, every message written to
    /// disk, and redeliveries limited by `x-delivery-limit`.
    Quorum,
}

/// A queue's validated arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueArguments {
    pub message_ttl_ms: Option<u64>,
    pub expires_ms: Option<u64>,
    pub dead_letter_exchange: Option<ShortString>,
    pub dead_letter_routing_key: Option<ShortString>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// Whether `x-overflow` was given: `overflow` alone cannot say, since
    /// drop-head is also the default, and a classic queue's own value
    /// wins over a policy's.
    pub overflow_declared: bool,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    pub queue_type: QueueType,
    /// Returns of one message to the queue before it is dead-lettered with
    /// reason `delivery_limit` (quorum queues only). As declared, None
    /// when not given; in effect, None means no limit.
    pub delivery_limit: Option<u64>,
    pub consumer_timeout_ms: Option<u64>,
}

/// What a queue's policy and operator policy, merged, set for it: the
/// queue keys of a policy definition, typed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyArguments {
    pub message_ttl_ms: Option<u64>,
    pub expires_ms: Option<u64>,
    pub dead_letter_exchange: Option<ShortString>,
    pub dead_letter_routing_key: Option<ShortString>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Option<Overflow>,
    /// A negative limit means none, as in RabbitMQ 4.
    pub delivery_limit: Option<i64>,
    pub consumer_timeout_ms: Option<u64>,
}

impl PolicyArguments {
    /// Merges a policy's settings with an operator policy's, as RabbitMQ
    /// does: for a key both set, the lower limit (for the delivery limit,
    /// the more conservative of an unlimited and a limited one) and the
    /// operator's overflow; a key only one sets is taken from it.
    pub fn merge_operator(&self, operator: &PolicyArguments) -> PolicyArguments {
        PolicyArguments {
            message_ttl_ms: lower(self.message_ttl_ms, operator.message_ttl_ms),
            expires_ms: lower(self.expires_ms, operator.expires_ms),
            dead_letter_exchange: operator
                .dead_letter_exchange
                .clone()
                .or_else(|| self.dead_letter_exchange.clone()),
            dead_letter_routing_key: operator
                .dead_letter_routing_key
                .clone()
                .or_else(|| self.dead_letter_routing_key.clone()),
            max_length: lower(self.max_length, operator.max_length),
            max_length_bytes: lower(self.max_length_bytes, operator.max_length_bytes),
            overflow: operator.overflow.or(self.overflow),
            delivery_limit: match (self.delivery_limit, operator.delivery_limit) {
                (Some(a), Some(b)) => Some(stricter_delivery_limit(a, b)),
                (a, b) => a.or(b),
            },
            consumer_timeout_ms: lower(self.consumer_timeout_ms, operator.consumer_timeout_ms),
        }
    }
}

/// The policies that apply to a queue, as the queue keeps them: their
/// names and merged definition for the management API, and the settings
/// it runs on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppliedPolicy {
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    /// RabbitMQ's `effective_policy_definition`: both definitions merged,
    /// every key, those Warren ignores included.
    pub definition: FieldTable,
    pub arguments: PolicyArguments,
}

/// The lower of two optional limits, or whichever is set.
fn lower(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// RabbitMQ's rule for two delivery limits: a negative one means none, and
/// when either is negative the higher wins (a real limit over none);
/// otherwise the lower.
fn stricter_delivery_limit(a: i64, b: i64) -> i64 {
    if a < 0 || b < 0 { a.max(b) } else { a.min(b) }
}

/// What the queue is, for error messages and for the rules that depend on
/// the queue's own flags.
pub struct QueueShape<'a> {
    pub name: &'a str,
    pub vhost: &'a str,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
}

impl QueueArguments {
    pub fn parse(arguments: &FieldTable, queue: &QueueShape<'_>) -> BrokerResult<Self> {
        let invalid = |key: &str, reason: String| BrokerError::InvalidArgument {
            key: key.to_owned(),
            of: ArgumentOf::Queue {
                name: queue.name.to_owned(),
                vhost: queue.vhost.to_owned(),
            },
            reason,
        };
        let table = arguments.inner();
        let integer = |key: &str, minimum: i128, maximum: i128| -> BrokerResult<Option<u64>> {
            let Some(value) = table.get(key) else {
                return Ok(None);
            };
            let Some(number) = as_integer(value) else {
                return Err(invalid(
                    key,
                    format!("expected an integer, got {}", type_name(value)),
                ));
            };
            if number < minimum {
                return Err(invalid(
                    key,
                    format!("value {number} is below the minimum {minimum}"),
                ));
            }
            if number > maximum {
                return Err(invalid(
                    key,
                    format!("value {number} is above the maximum {maximum}"),
                ));
            }
            Ok(Some(number as u64))
        };
        let text = |key: &str| -> BrokerResult<Option<ShortString>> {
            match table.get(key) {
                None => Ok(None),
                Some(value) => match as_text(value) {
                    Some(text) if text.len() <= 255 => Ok(Some(ShortString::from(text))),
                    Some(_) => Err(invalid(key, "longer than 255 bytes".to_owned())),
                    None => Err(invalid(
                        key,
                        format!("expected a string, got {}", type_name(value)),
                    )),
                },
            }
        };
        let duration_max = DURATION_MAX_MS as i128;

        let queue_type = match text("x-queue-type")?.as_ref().map(|t| t.as_str()) {
            None | Some("classic") => QueueType::Classic,
            Some("quorum") => QueueType::Quorum,
            Some("stream") => {
                return Err(invalid(
                    "x-queue-type",
                    "stream queues are not supported by Warren; declare 'classic' or 'quorum'"
                        .to_owned(),
                ));
            }
            Some(other) => {
                return Err(invalid(
                    "x-queue-type",
                    format!("unknown queue type '{other}'; expected 'classic' or 'quorum'"),
                ));
            }
        };
        if queue_type == QueueType::Quorum {
            // RabbitMQ refuses these with the same code: a quorum queue
            // outlives every connection and is always on disk.
            for (flag, set) in [
                ("non-durable", !queue.durable),
                ("exclusive", queue.exclusive),
                ("auto-delete", queue.auto_delete),
            ] {
                if set {
                    return Err(BrokerError::QuorumProperty {
                        flag,
                        name: queue.name.to_owned(),
                        vhost: queue.vhost.to_owned(),
                    });
                }
            }
        }

        let declared_overflow = text("x-overflow")?;
        let overflow = match declared_overflow.as_ref().map(|t| t.as_str()) {
            None | Some("drop-head") => Overflow::DropHead,
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            Some(other) => {
                return Err(invalid(
                    "x-overflow",
                    format!(
                        "unknown value '{other}'; expected 'drop-head', 'reject-publish' or \
                         'reject-publish-dlx'"
                    ),
                ));
            }
        };
        match text("x-queue-mode")?.as_ref().map(|t| t.as_str()) {
            // Every Warren queue already keeps only a window in memory, which
            // is what "lazy" asks for.
            None | Some("default") | Some("lazy") => {}
            Some(other) => {
                return Err(invalid(
                    "x-queue-mode",
                    format!("unknown value '{other}'; expected 'default' or 'lazy'"),
                ));
            }
        }
        let single_active_consumer = match table.get("x-single-active-consumer") {
            None => false,
            Some(AMQPValue::Boolean(flag)) => *flag,
            Some(other) => {
                return Err(invalid(
                    "x-single-active-consumer",
                    format!("expected a boolean, got {}", type_name(other)),
                ));
            }
        };
        let dead_letter_exchange = text("x-dead-letter-exchange")?;
        let dead_letter_routing_key = text("x-dead-letter-routing-key")?;
        if dead_letter_routing_key.is_some() && dead_letter_exchange.is_none() {
            return Err(invalid(
                "x-dead-letter-routing-key",
                "x-dead-letter-exchange must also be given".to_owned(),
            ));
        }
        let delivery_limit = integer("x-delivery-limit", 0, i64::MAX as i128)?;
        if delivery_limit.is_some() && queue_type == QueueType::Classic {
            // RabbitMQ refuses it too: a classic queue does not count
            // deliveries, so the limit would silently do nothing.
            return Err(invalid(
                "x-delivery-limit",
                "only quorum queues support a delivery limit".to_owned(),
            ));
        }
        Ok(Self {
            message_ttl_ms: integer("x-message-ttl", 0, duration_max)?,
            expires_ms: integer("x-expires", 1, duration_max)?,
            dead_letter_exchange,
            dead_letter_routing_key,
            max_length: integer("x-max-length", 0, i64::MAX as i128)?,
            max_length_bytes: integer("x-max-length-bytes", 0, i64::MAX as i128)?,
            overflow,
            overflow_declared: declared_overflow.is_some(),
            // 0 is accepted, as by RabbitMQ, and means one level: no
            // priorities at all.
            max_priority: integer("x-max-priority", 0, PRIORITY_MAX as i128)?
                .filter(|priority| *priority > 0)
                .map(|priority| priority as u8),
            single_active_consumer,
            queue_type,
            delivery_limit,
            consumer_timeout_ms: integer("x-consumer-timeout", 1, duration_max)?,
        })
    }

    /// The arguments a queue declared with these runs on under `policy`
    /// (its policies' settings merged, `PolicyArguments::merge_operator`),
    /// by RabbitMQ's rules for a key both set: the lower of two limits and
    /// timeouts; the queue's own dead-letter target; the queue's own
    /// overflow for a classic queue and the policy's for a quorum queue;
    /// for the delivery limit, the stricter, then RabbitMQ 4's default of
    /// 20 for a quorum queue neither sets.
    pub fn with_policy(&self, policy: &PolicyArguments) -> QueueArguments {
        let overflow = match (self.queue_type, policy.overflow) {
            (QueueType::Quorum, Some(overflow)) => overflow,
            (QueueType::Classic, Some(overflow)) if !self.overflow_declared => overflow,
            _ => self.overflow,
        };
        let dead_letter_exchange = self
            .dead_letter_exchange
            .clone()
            .or_else(|| policy.dead_letter_exchange.clone());
        let dead_letter_routing_key = self
            .dead_letter_routing_key
            .clone()
            .or_else(|| policy.dead_letter_routing_key.clone());
        let declared_limit = self
            .delivery_limit
            .map(|limit| limit.min(i64::MAX as u64) as i64);
        let delivery_limit = match self.queue_type {
            QueueType::Classic => None,
            QueueType::Quorum => match (declared_limit, policy.delivery_limit) {
                (None, None) => Some(QUORUM_DELIVERY_LIMIT_DEFAULT),
                (Some(a), Some(b)) => u64::try_from(stricter_delivery_limit(a, b)).ok(),
                (a, b) => a.or(b).and_then(|limit| u64::try_from(limit).ok()),
            },
        };
        QueueArguments {
            message_ttl_ms: lower(self.message_ttl_ms, policy.message_ttl_ms),
            expires_ms: lower(self.expires_ms, policy.expires_ms),
            dead_letter_exchange,
            dead_letter_routing_key,
            max_length: lower(self.max_length, policy.max_length),
            max_length_bytes: lower(self.max_length_bytes, policy.max_length_bytes),
            overflow,
            overflow_declared: self.overflow_declared,
            max_priority: self.max_priority,
            single_active_consumer: self.single_active_consumer,
            queue_type: self.queue_type,
            delivery_limit,
            consumer_timeout_ms: lower(self.consumer_timeout_ms, policy.consumer_timeout_ms),
        }
    }
}

/// The `x-priority` argument of `basic.consume` (0 when absent).
pub fn consumer_priority(arguments: &FieldTable) -> BrokerResult<i32> {
    match arguments.inner().get("x-priority") {
        None => Ok(0),
        Some(value) => match as_integer(value) {
            Some(number) if (i32::MIN as i128..=i32::MAX as i128).contains(&number) => {
                Ok(number as i32)
            }
            _ => Err(BrokerError::InvalidArgument {
                key: "x-priority".to_owned(),
                of: ArgumentOf::Consume,
                reason: format!("expected an integer, got {}", type_name(value)),
            }),
        },
    }
}

/// A message's `expiration` property: a TTL in milliseconds written as a
/// decimal string, as RabbitMQ requires.
pub fn message_expiration_ms(expiration: Option<&ShortString>) -> BrokerResult<Option<u64>> {
    let Some(expiration) = expiration else {
        return Ok(None);
    };
    let text = expiration.as_str();
    match text.parse::<u64>() {
        Ok(ms) if ms <= DURATION_MAX_MS && !text.starts_with('+') => Ok(Some(ms)),
        _ => Err(BrokerError::InvalidExpiration {
            text: text.to_owned(),
            max_ms: DURATION_MAX_MS,
        }),
    }
}

pub(crate) fn as_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.to_string()),
        _ => None,
    }
}

fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "a boolean",
        AMQPValue::LongString(_) | AMQPValue::ShortString(_) => "a string",
        AMQPValue::FieldTable(_) => "a table",
        AMQPValue::FieldArray(_) => "an array",
        AMQPValue::Float(_) | AMQPValue::Double(_) | AMQPValue::DecimalValue(_) => "a fraction",
        AMQPValue::Void => "void",
        AMQPValue::ByteArray(_) => "a byte array",
        _ => "an integer",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> QueueShape<'static> {
        QueueShape {
            name: "q",
            vhost: "/",
            durable: true,
            exclusive: false,
            auto_delete: false,
        }
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn valid_arguments_are_parsed() {
        let parsed = QueueArguments::parse(
            &table(&[
                ("x-message-ttl", AMQPValue::LongInt(500)),
                ("x-max-length", AMQPValue::LongLongInt(10)),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
                ("x-max-priority", AMQPValue::ShortShortUInt(9)),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("dlx".into()),
                ),
                ("x-queue-type", AMQPValue::LongString("quorum".into())),
            ]),
            &shape(),
        )
        .unwrap();
        assert_eq!(parsed.message_ttl_ms, Some(500));
        assert_eq!(parsed.max_length, Some(10));
        assert_eq!(parsed.overflow, Overflow::RejectPublish);
        assert_eq!(parsed.max_priority, Some(9));
        assert_eq!(
            parsed.dead_letter_exchange.as_ref().unwrap().as_str(),
            "dlx"
        );
        assert_eq!(parsed.delivery_limit, None, "as declared");
        assert_eq!(
            parsed
                .with_policy(&PolicyArguments::default())
                .delivery_limit,
            Some(QUORUM_DELIVERY_LIMIT_DEFAULT),
            "in effect"
        );
    }

    fn quorum(entries: &[(&str, AMQPValue)]) -> QueueArguments {
        let mut entries = entries.to_vec();
        entries.push(("x-queue-type", AMQPValue::LongString("quorum".into())));
        QueueArguments::parse(&table(&entries), &shape()).unwrap()
    }

    #[test]
    fn a_policy_lowers_limits_and_fills_what_the_queue_leaves_out() {
        let declared = QueueArguments::parse(
            &table(&[
                ("x-message-ttl", AMQPValue::LongInt(500)),
                ("x-max-length", AMQPValue::LongInt(10)),
                (
                    "x-dead-letter-exchange",
                    AMQPValue::LongString("own".into()),
                ),
                ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            ]),
            &shape(),
        )
        .unwrap();
        let policy = PolicyArguments {
            message_ttl_ms: Some(100),
            max_length: Some(50),
            max_length_bytes: Some(4096),
            dead_letter_exchange: Some("policy".into()),
            overflow: Some(Overflow::DropHead),
            expires_ms: Some(60_000),
            ..Default::default()
        };
        let effective = declared.with_policy(&policy);
        assert_eq!(effective.message_ttl_ms, Some(100), "the lower TTL");
        assert_eq!(effective.max_length, Some(10), "the lower length");
        assert_eq!(effective.max_length_bytes, Some(4096), "only the policy's");
        assert_eq!(effective.expires_ms, Some(60_000), "only the policy's");
        assert_eq!(effective.dead_letter_exchange.unwrap().as_str(), "own");
        assert_eq!(
            effective.overflow,
            Overflow::RejectPublish,
            "a classic queue's own overflow wins"
        );
        let undeclared = QueueArguments::parse(&table(&[]), &shape()).unwrap();
        assert_eq!(
            undeclared.with_policy(&policy).overflow,
            Overflow::DropHead,
            "the policy's, when the queue gives none"
        );
        let reject = PolicyArguments {
            overflow: Some(Overflow::RejectPublish),
            ..Default::default()
        };
        let declared_quorum = quorum(&[("x-overflow", AMQPValue::LongString("drop-head".into()))]);
        assert_eq!(
            declared_quorum.with_policy(&reject).overflow,
            Overflow::RejectPublish,
            "a quorum queue takes the policy's overflow"
        );
    }

    #[test]
    fn delivery_limits_follow_rabbitmq_4() {
        let limit = |declared: Option<i64>, policy: Option<i64>| {
            let entries: Vec<(&str, AMQPValue)> = declared
                .map(|limit| ("x-delivery-limit", AMQPValue::LongLongInt(limit)))
                .into_iter()
                .collect();
            quorum(&entries)
                .with_policy(&PolicyArguments {
                    delivery_limit: policy,
                    ..Default::default()
                })
                .delivery_limit
        };
        assert_eq!(limit(None, None), Some(QUORUM_DELIVERY_LIMIT_DEFAULT));
        assert_eq!(limit(Some(5), None), Some(5));
        assert_eq!(limit(None, Some(3)), Some(3));
        assert_eq!(limit(Some(5), Some(3)), Some(3), "the lower");
        assert_eq!(
            limit(None, Some(-1)),
            None,
            "a negative policy limit lifts it"
        );
        assert_eq!(limit(Some(5), Some(-1)), Some(5), "a limit wins over none");
        let merged = PolicyArguments {
            delivery_limit: Some(-1),
            max_length: Some(100),
            overflow: Some(Overflow::DropHead),
            ..Default::default()
        }
        .merge_operator(&PolicyArguments {
            delivery_limit: Some(7),
            max_length: Some(10),
            overflow: Some(Overflow::RejectPublish),
            ..Default::default()
        });
        assert_eq!(merged.delivery_limit, Some(7));
        assert_eq!(merged.max_length, Some(10));
        assert_eq!(
            merged.overflow,
            Some(Overflow::RejectPublish),
            "the operator's"
        );
    }

    #[test]
    fn bad_values_name_the_argument() {
        for (key, value) in [
            ("x-max-length", AMQPValue::LongInt(-1)),
            ("x-message-ttl", AMQPValue::LongString("abc".into())),
            ("x-overflow", AMQPValue::LongString("bogus".into())),
            ("x-max-priority", AMQPValue::LongInt(256)),
            ("x-expires", AMQPValue::LongInt(0)),
            ("x-single-active-consumer", AMQPValue::LongInt(1)),
            ("x-queue-type", AMQPValue::LongString("stream".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString("k".into()),
            ),
        ] {
            let error = QueueArguments::parse(&table(&[(key, value)]), &shape()).unwrap_err();
            assert_eq!(error.code(), crate::ErrorCode::PreconditionFailed);
            assert!(error.to_string().contains(key), "{key}: {error}");
        }
    }

    #[test]
    fn classic_queues_refuse_a_delivery_limit_and_take_priority_zero_as_none() {
        let limit = table(&[("x-delivery-limit", AMQPValue::LongInt(3))]);
        let error = QueueArguments::parse(&limit, &shape()).unwrap_err();
        assert!(error.to_string().contains("x-delivery-limit"), "{error}");
        let zero = table(&[("x-max-priority", AMQPValue::LongInt(0))]);
        assert_eq!(
            QueueArguments::parse(&zero, &shape()).unwrap().max_priority,
            None
        );
    }

    #[test]
    fn quorum_queues_must_be_durable() {
        let mut transient = shape();
        transient.durable = false;
        let quorum = table(&[("x-queue-type", AMQPValue::LongString("quorum".into()))]);
        let error = QueueArguments::parse(&quorum, &transient).unwrap_err();
        assert!(error.to_string().contains("non-durable"));
    }

    #[test]
    fn expirations_are_decimal_milliseconds() {
        assert_eq!(
            message_expiration_ms(Some(&"250".into())).unwrap(),
            Some(250)
        );
        assert_eq!(message_expiration_ms(None).unwrap(), None);
        for bad in ["abc", "-1", "1.5", "+5", ""] {
            assert!(message_expiration_ms(Some(&bad.into())).is_err(), "{bad}");
        }
    }
}
