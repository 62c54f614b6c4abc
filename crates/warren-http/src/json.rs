//! AMQP field tables and message properties in JSON, as RabbitMQ's
//! management API writes and reads them: integers as JSON numbers, strings
//! as strings, nested tables as objects, arrays as arrays.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Nesting a JSON argument table may have; deeper ones are refused rather
/// than recursed into.
pub const JSON_TABLE_DEPTH_MAX: usize = 16;

pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(
        table
            .inner()
            .iter()
            .map(|(key, value)| (key.to_string(), value_to_json(value)))
            .collect(),
    )
}

pub fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(value) => json!(value),
        AMQPValue::ShortShortInt(value) => json!(value),
        AMQPValue::ShortShortUInt(value) => json!(value),
        AMQPValue::ShortInt(value) => json!(value),
        AMQPValue::ShortUInt(value) => json!(value),
        AMQPValue::LongInt(value) => json!(value),
        AMQPValue::LongUInt(value) => json!(value),
        AMQPValue::LongLongInt(value) => json!(value),
        AMQPValue::Float(value) => json!(value),
        AMQPValue::Double(value) => json!(value),
        AMQPValue::DecimalValue(decimal) => {
            json!(decimal.value as f64 / 10f64.powi(decimal.scale as i32))
        }
        AMQPValue::ShortString(text) => json!(text.as_str()),
        AMQPValue::LongString(text) => json!(String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::FieldArray(array) => {
            Value::Array(array.as_slice().iter().map(value_to_json).collect())
        }
        AMQPValue::Timestamp(seconds) => json!(seconds),
        AMQPValue::FieldTable(table) => table_to_json(table),
        AMQPValue::ByteArray(bytes) => json!(STANDARD.encode(bytes.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// A JSON object as a field table (`arguments`, `headers`).
pub fn json_to_table(value: &Value, what: &str) -> Result<FieldTable, ApiError> {
    json_to_table_at(value, what, 0)
}

fn json_to_table_at(value: &Value, what: &str, depth: usize) -> Result<FieldTable, ApiError> {
    if depth > JSON_TABLE_DEPTH_MAX {
        return Err(ApiError::BadRequest(format!(
            "{what} is nested deeper than {JSON_TABLE_DEPTH_MAX} levels"
        )));
    }
    let object = match value {
        Value::Null => return Ok(FieldTable::default()),
        Value::Object(object) => object,
        _ => {
            return Err(ApiError::BadRequest(format!(
                "{what} must be a JSON object"
            )));
        }
    };
    let mut table = FieldTable::default();
    for (key, value) in object {
        if key.len() > 255 {
            return Err(ApiError::BadRequest(format!(
                "{what}: a key is longer than 255 bytes"
            )));
        }
        table.insert(
            ShortString::from(key.as_str()),
            json_to_value(value, what, depth)?,
        );
    }
    Ok(table)
}

fn json_to_value(value: &Value, what: &str, depth: usize) -> Result<AMQPValue, ApiError> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => AMQPValue::LongLongInt(integer),
            None => AMQPValue::Double(number.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_str())),
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(json_to_value(item, what, depth + 1)?);
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(_) => AMQPValue::FieldTable(json_to_table_at(value, what, depth + 1)?),
    })
}

/// A message's properties as RabbitMQ's management API lists them: only
/// those that are set.
pub fn properties_to_json(properties: &BasicProperties) -> Value {
    let mut object = Map::new();
    let mut put = |key: &str, value: Value| {
        object.insert(key.to_owned(), value);
    };
    if let Some(value) = properties.content_type() {
        put("content_type", json!(value.as_str()));
    }
    if let Some(value) = properties.content_encoding() {
        put("content_encoding", json!(value.as_str()));
    }
    if let Some(value) = properties.headers() {
        put("headers", table_to_json(value));
    }
    if let Some(value) = properties.delivery_mode() {
        put("delivery_mode", json!(value));
    }
    if let Some(value) = properties.priority() {
        put("priority", json!(value));
    }
    if let Some(value) = properties.correlation_id() {
        put("correlation_id", json!(value.as_str()));
    }
    if let Some(value) = properties.reply_to() {
        put("reply_to", json!(value.as_str()));
    }
    if let Some(value) = properties.expiration() {
        put("expiration", json!(value.as_str()));
    }
    if let Some(value) = properties.message_id() {
        put("message_id", json!(value.as_str()));
    }
    if let Some(value) = properties.timestamp() {
        put("timestamp", json!(value));
    }
    if let Some(value) = properties.kind() {
        put("type", json!(value.as_str()));
    }
    if let Some(value) = properties.user_id() {
        put("user_id", json!(value.as_str()));
    }
    if let Some(value) = properties.app_id() {
        put("app_id", json!(value.as_str()));
    }
    Value::Object(object)
}

/// Message properties from a JSON object such as RabbitMQ's publish form
/// sends; an unknown property or a wrongly typed one is a 400.
pub fn json_to_properties(value: &Value) -> Result<BasicProperties, ApiError> {
    let object = match value {
        Value::Null => return Ok(BasicProperties::default()),
        Value::Object(object) => object,
        _ => {
            return Err(ApiError::BadRequest(
                "properties must be a JSON object".to_owned(),
            ));
        }
    };
    let mut properties = BasicProperties::default();
    for (key, value) in object {
        let text = || {
            value
                .as_str()
                .map(ShortString::from)
                .ok_or_else(|| ApiError::BadRequest(format!("property {key} must be a string")))
        };
        // rabbitmqadmin sends numbers as text ("delivery_mode": "2").
        let integer = |max: u64| {
            value
                .as_u64()
                .or_else(|| value.as_str().and_then(|text| text.trim().parse().ok()))
                .filter(|number| *number <= max)
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "property {key} must be an integer from 0 to {max}"
                    ))
                })
        };
        properties = match key.as_str() {
            "content_type" => properties.with_content_type(text()?),
            "content_encoding" => properties.with_content_encoding(text()?),
            "headers" => properties.with_headers(json_to_table(value, "headers")?),
            "delivery_mode" => properties.with_delivery_mode(integer(2)? as u8),
            "priority" => properties.with_priority(integer(255)? as u8),
            "correlation_id" => properties.with_correlation_id(text()?),
            "reply_to" => properties.with_reply_to(text()?),
            "expiration" => properties.with_expiration(text()?),
            "message_id" => properties.with_message_id(text()?),
            "timestamp" => properties.with_timestamp(integer(u64::MAX)?),
            "type" => properties.with_type(text()?),
            "user_id" => properties.with_user_id(text()?),
            "app_id" => properties.with_app_id(text()?),
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown message property '{other}'"
                )));
            }
        };
    }
    Ok(properties)
}

/// A payload as RabbitMQ's API returns it: text when it is UTF-8 (and
/// `auto` is asked), base64 otherwise.
pub fn payload_to_json(body: &[u8], allow_text: bool) -> (Value, &'static str) {
    match std::str::from_utf8(body) {
        Ok(text) if allow_text => (json!(text), "string"),
        _ => (json!(STANDARD.encode(body)), "base64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_through_json() {
        let input = json!({"x-max-length": 10, "x-queue-type": "quorum", "flag": true,
            "ratio": 0.5, "nested": {"list": [1, "two"]}});
        let table = json_to_table(&input, "arguments").unwrap();
        assert_eq!(
            table.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert_eq!(table_to_json(&table), input);
    }

    #[test]
    fn deeply_nested_tables_are_refused() {
        let mut value = json!({});
        for _ in 0..=JSON_TABLE_DEPTH_MAX + 1 {
            value = json!({ "inner": value });
        }
        assert!(matches!(
            json_to_table(&value, "arguments"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn properties_round_trip_and_unknown_ones_are_refused() {
        let input = json!({"content_type": "text/plain", "delivery_mode": 2,
            "headers": {"a": 1}, "correlation_id": "c-1", "priority": 3});
        let properties = json_to_properties(&input).unwrap();
        assert_eq!(properties_to_json(&properties), input);
        assert!(json_to_properties(&json!({"colour": "red"})).is_err());
        assert!(json_to_properties(&json!({"delivery_mode": 7})).is_err());
    }

    #[test]
    fn binary_payloads_come_back_as_base64() {
        assert_eq!(payload_to_json(b"hi", true), (json!("hi"), "string"));
        assert_eq!(payload_to_json(b"hi", false), (json!("aGk="), "base64"));
        assert_eq!(payload_to_json(&[0xff, 0], true).1, "base64");
    }
}
