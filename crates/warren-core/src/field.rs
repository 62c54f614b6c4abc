//! Reading AMQP field values the way RabbitMQ compares them.

use amq_protocol::types::AMQPValue;

/// The value of an integer field of any width (a timestamp included), as
/// headers and `x-` arguments may carry the same number in any of them.
pub(crate) fn as_integer(value: &AMQPValue) -> Option<i128> {
    Some(match *value {
        AMQPValue::ShortShortInt(v) => v as i128,
        AMQPValue::ShortShortUInt(v) => v as i128,
        AMQPValue::ShortInt(v) => v as i128,
        AMQPValue::ShortUInt(v) => v as i128,
        AMQPValue::LongInt(v) => v as i128,
        AMQPValue::LongUInt(v) => v as i128,
        AMQPValue::LongLongInt(v) => v as i128,
        AMQPValue::Timestamp(v) => v as i128,
        _ => return None,
    })
}
