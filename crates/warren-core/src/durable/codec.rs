//! How messages and topology entries are encoded for the store. Strings and
//! field tables use AMQP's own encodings, through amq-protocol, so anything
//! a client could send can be stored. docs/storage-format.md gives the
//! layouts byte by byte.

use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use amq_protocol::types::generation::gen_field_table;
use amq_protocol::types::parsing::parse_field_table;
use amq_protocol::types::{FieldTable, ShortString};
use bytes::Bytes;

use crate::Message;

/// Why stored bytes could not be decoded.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("stored {what} is malformed")]
pub struct DecodeError {
    pub what: &'static str,
}

/// Version of the message payload layout; the first byte of every payload.
/// Format 1 lacked the arrival time; it is still read.
const MESSAGE_FORMAT: u8 = 2;
const MESSAGE_FORMAT_WITHOUT_ARRIVAL: u8 = 1;

/// `[format u8 = 2][arrived ms u64][exchange short][routing key short]
/// [properties len u32][properties][body]`. The arrival time (ms since the
/// epoch) lets a TTL keep counting across a restart.
pub fn encode_message(message: &Message, arrived_ms: u64) -> Vec<u8> {
    let mut out = encode_message_head(message, arrived_ms);
    out.extend_from_slice(&message.body);
    out
}

/// Everything of `encode_message` but the body, which the store writes
/// from the message's own buffer (`append_message_with_tail`).
pub fn encode_message_head(message: &Message, arrived_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(72);
    out.push(MESSAGE_FORMAT);
    out.extend_from_slice(&arrived_ms.to_le_bytes());
    put_short(&mut out, message.exchange.as_str());
    put_short(&mut out, message.routing_key.as_str());
    let properties = gen_properties(&message.properties)(WriteContext::from(Vec::new()))
        .expect("properties that were decoded from a frame encode again")
        .write;
    out.extend_from_slice(&(properties.len() as u32).to_le_bytes());
    out.extend_from_slice(&properties);
    out
}

pub fn decode_message(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_stored_message(&Bytes::copy_from_slice(bytes)).map(|(message, _)| message)
}

/// Decodes a payload and the arrival time it carries (None for format 1).
/// The body is a view of `bytes`, not a copy: a large message read back
/// from the store is held once.
pub fn decode_stored_message(bytes: &Bytes) -> Result<(Message, Option<u64>), DecodeError> {
    let error = DecodeError { what: "message" };
    let mut reader = Reader {
        bytes: &bytes[..],
        position: 0,
    };
    let arrived_ms = match reader.u8().ok_or(error.clone())? {
        MESSAGE_FORMAT => Some(reader.u64().ok_or(error.clone())?),
        MESSAGE_FORMAT_WITHOUT_ARRIVAL => None,
        _ => return Err(error),
    };
    let exchange = reader.short().ok_or(error.clone())?;
    let routing_key = reader.short().ok_or(error.clone())?;
    let properties_length = reader.u32().ok_or(error.clone())? as usize;
    let properties_bytes = reader.take(properties_length).ok_or(error.clone())?;
    let properties = match parse_properties(properties_bytes) {
        Ok((&[], properties)) => properties,
        _ => return Err(error),
    };
    let message = Message {
        exchange,
        routing_key,
        properties,
        body: bytes.slice(reader.position..),
    };
    Ok((message, arrived_ms))
}

pub(crate) fn put_short(out: &mut Vec<u8>, text: &str) {
    debug_assert!(text.len() <= 255);
    out.push(text.len() as u8);
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn put_table(out: &mut Vec<u8>, table: &FieldTable) {
    let encoded = gen_field_table(table)(WriteContext::from(Vec::new()))
        .expect("field tables that were decoded from a frame encode again")
        .write;
    out.extend_from_slice(&encoded);
}

/// Reads the encodings above back.
pub(crate) struct Reader<'a> {
    pub bytes: &'a [u8],
    pub position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    pub fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        let slice = self.bytes.get(self.position..self.position + length)?;
        self.position += length;
        Some(slice)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|bytes| u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|bytes| u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }

    pub fn short(&mut self) -> Option<ShortString> {
        let length = self.u8()? as usize;
        let text = std::str::from_utf8(self.take(length)?).ok()?;
        Some(ShortString::from(text))
    }

    pub fn table(&mut self) -> Option<FieldTable> {
        let rest = &self.bytes[self.position..];
        let (remaining, table) = parse_field_table(rest).ok()?;
        self.position += rest.len() - remaining.len();
        Some(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::AMQPValue;

    #[test]
    fn messages_round_trip_with_their_properties() {
        let mut headers = FieldTable::default();
        headers.insert("tenant".into(), AMQPValue::LongString("t1".into()));
        let message = Message {
            exchange: "jobs".into(),
            routing_key: "embed.text".into(),
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_correlation_id("c-1".into())
                .with_headers(headers),
            body: Bytes::from_static(b"payload"),
        };
        let (decoded, arrived_ms) =
            decode_stored_message(&Bytes::from(encode_message(&message, 1_700_000_000_123)))
                .unwrap();
        assert_eq!(arrived_ms, Some(1_700_000_000_123));
        assert_eq!(decoded.exchange, message.exchange);
        assert_eq!(decoded.routing_key, message.routing_key);
        assert_eq!(decoded.properties, message.properties);
        assert_eq!(decoded.body, message.body);
    }

    #[test]
    fn truncated_payloads_are_errors() {
        let message = Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: BasicProperties::default(),
            body: Bytes::new(),
        };
        let encoded = encode_message(&message, 0);
        assert!(decode_message(&encoded[..encoded.len() - 3]).is_err());
        assert!(decode_message(&[9]).is_err());
    }
}
